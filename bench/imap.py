"""Benchmark: reply and bounce detection against a real Dovecot (needs root and dovecot-imapd).

1. Classify 10,000 INBOX messages (replies by header and by sender, DSN bounces,
   auto-replies, noise) over one IMAP session, acting on each in the database:
   messages/second. Baseline in the same run: the same UID FETCH of the headers
   with aioimaplib and nothing else.
2. The running daemon idling in IDLE: time from APPEND of a reply to the
   enrollment ending as `replied` (target <= 2 s), over several samples.

    sudo python bench/imap.py [--messages N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import logs  # noqa: E402
from daemon.config import load_config  # noqa: E402
from daemon.dispatch import AsyncStore  # noqa: E402
from daemon.imap import FETCH_CHUNK, HEADER_PARTS, Watcher  # noqa: E402
from daemon.service import Daemon  # noqa: E402
from daemon.smtp import tls_context  # noqa: E402
from daemon.store import Store  # noqa: E402
from tests.imap_server import Dovecot  # noqa: E402
from tests.servers import Pki  # noqa: E402

BOX = "mb1@alice.example"


def message(i: int, rng: random.Random, enrolled: int) -> bytes:
    n = rng.randrange(enrolled)
    kind = rng.random()
    headers = [f"Message-ID: <bench.{i}@prospects.example>", f"To: {BOX}", "Date: Fri, 27 Nov 2026 10:00:00 +0000"]
    if kind < 0.3:
        headers += [
            f"From: p{n}@prospects.example",
            "Subject: Re: Hello",
            f"In-Reply-To: <cadenced.{n}.1.b@alice.example>",
        ]
    elif kind < 0.5:
        headers += [f"From: p{n}@prospects.example", "Subject: a question"]
    elif kind < 0.6:
        headers += [
            "From: MAILER-DAEMON@mx.example",
            "Subject: Undelivered Mail",
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"',
        ]
        body = (
            "--B\r\n\r\nfailed\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"Message-ID: <cadenced.{n}.1.b@alice.example>\r\n--B--\r\n"
        )
        return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()
    elif kind < 0.8:
        headers += [f"From: p{n}@prospects.example", "Subject: Out of Office", "Auto-Submitted: auto-replied"]
    else:
        headers += [f"From: news{i}@letters.example", "Subject: This week's news"]
    return ("\r\n".join(headers) + "\r\n\r\nHello.\r\n").encode()


def prepare(root: Path, dovecot: Dovecot, pki: Pki, enrolled: int) -> Path:
    (root / "imap-pw").write_text("imap-pw")
    config = {
        "daemon": {"database": str(root / "bench.db"), "log_format": "json", "log_level": "warning"},
        "users": [{"name": "alice"}],
        "mailboxes": [
            {
                "address": BOX,
                "owner": "alice",
                "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"},
                "imap": dovecot.imap_config("alice", root / "imap-pw", pki.ca_file, poll="60s"),
            }
        ],
        "cadences": [{"name": "c", "users": ["alice"], "steps": [{"subject": "Hello", "body": "Hi"}]}],
    }
    path = root / "cadenced.toml"
    path.write_text(tomli_w.dumps(config))
    store = Store.open(root / "bench.db")
    now = time.time()
    with store.transaction():
        store.conn.executemany(
            "INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at) "
            "VALUES (?, 'c', ?, ?, 'alice', 'alice', '{}', ?)",
            ((n, f"p{n}@prospects.example", BOX, now) for n in range(enrolled)),
        )
        store.conn.executemany(
            "INSERT INTO messages (enrollment_id, step, mailbox, state, due_at, sent_at, message_id) "
            "VALUES (?, 1, ?, 'sent', ?, ?, ?)",
            ((n, BOX, now, now, f"<cadenced.{n}.1.b@alice.example>") for n in range(enrolled)),
        )
        store.pin("c", True, "cadence", now)
    store.close()
    return path


def fill_inbox(dovecot: Dovecot, n: int, enrolled: int) -> None:
    """Deliver straight into the Maildir (what an MTA's local delivery does): fast and real."""
    conn = dovecot.client("alice")
    conn.select("INBOX")  # creates the Maildir
    conn.logout()
    new = dovecot.root / "mail" / "alice" / "Maildir" / "new"
    rng = random.Random(7)
    for i in range(n):
        path = new / f"{1_800_000_000 + i}.M{i}P1.bench"
        path.write_bytes(message(i, rng, enrolled))
        os.chown(path, 65534, 65534)


async def baseline_fetch(dovecot: Dovecot) -> tuple[float, int]:
    import aioimaplib

    client = aioimaplib.IMAP4("127.0.0.1", dovecot.port, timeout=120, ssl_context=dovecot.ca)
    await client.wait_hello_from_server()
    await client.login("alice", "imap-pw")
    await client.select("INBOX")
    start = time.perf_counter()
    found = await client.uid_search("UID", "1:*", charset=None)
    uids = found.lines[0].split()
    literals = 0
    for i in range(0, len(uids), FETCH_CHUNK):  # the same chunks as the watcher
        answer = await client.uid("fetch", b",".join(uids[i : i + FETCH_CHUNK]).decode(), f"(UID {HEADER_PARTS})")
        literals += sum(1 for x in answer.lines if isinstance(x, bytearray))
    elapsed = time.perf_counter() - start
    await client.logout()
    return elapsed, literals


async def classify_all(config_path: Path) -> tuple[float, int]:
    import aioimaplib

    config = load_config(config_path)
    mailbox = config.mailboxes[0]
    server = mailbox.imap
    assert server is not None
    db = AsyncStore(config.daemon.database)
    watcher = Watcher(mailbox, db, lambda: config)
    client = aioimaplib.IMAP4(server.host, server.port, timeout=120, ssl_context=tls_context(server))
    await client.wait_hello_from_server()
    await client.login("alice", "imap-pw")
    selected = await client.select("INBOX")
    validity = int(next(x for x in selected.lines if b"UIDVALIDITY" in x).split(b"UIDVALIDITY ")[1].split(b"]")[0])
    await db(lambda store: store.set_imap_position(mailbox.address, validity, 0))  # read the whole INBOX
    start = time.perf_counter()
    n = await watcher.fetch_new(client, validity)
    elapsed = time.perf_counter() - start
    await client.logout()
    db.close()
    return elapsed, n


async def idle_latency(config_path: Path, dovecot: Dovecot, enrolled: int, samples: int) -> list[float]:
    config = load_config(config_path)
    daemon = Daemon(config_path, config, handle_signals=False)
    reader = Store.open(config.daemon.database)
    latencies = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(30):
                # The observer polls the database from outside the daemon, as an operator would.
                while daemon.dispatcher is None or reader.imap_position(BOX) is None:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # let the watcher settle into IDLE: the measurement starts from there
            active = [r[0] for r in reader.conn.execute("SELECT email FROM enrollments WHERE state = 'active'")]
            for prospect in active[:samples]:
                raw = f"From: {prospect}\r\nTo: {BOX}\r\nSubject: sure\r\n\r\nYes.\r\n".encode()
                start = time.perf_counter()
                await anyio.to_thread.run_sync(dovecot.deliver, "alice", raw)
                with anyio.fail_after(30):
                    while (  # noqa: ASYNC110
                        reader.conn.execute("SELECT state FROM enrollments WHERE email = ?", (prospect,)).fetchone()[0]
                        != "replied"
                    ):
                        await anyio.sleep(0.005)
                latencies.append(time.perf_counter() - start)
            daemon.stop()
    finally:
        reader.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--enrolled", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    logs.configure("json", "warning", open(os.devnull, "w"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = Pki(root)
        dovecot = Dovecot(pki, {"alice": "imap-pw"}).start()
        try:
            config_path = prepare(root, dovecot, pki, args.enrolled)
            fill_inbox(dovecot, args.messages, args.enrolled)
            raw_time, raw_n = anyio.run(baseline_fetch, dovecot)
            time_all, n = anyio.run(classify_all, config_path)
            latencies = anyio.run(idle_latency, config_path, dovecot, args.enrolled, args.samples)
        finally:
            dovecot.cleanup()
    print(f"INBOX messages:              {n} (replies by header/sender, DSNs, auto-replies, noise)")
    print(f"baseline UID FETCH headers:  {raw_n / raw_time:,.0f} messages/s ({raw_time:.2f} s, no classification)")
    print(f"classified and acted on:     {n / time_all:,.0f} messages/s ({time_all:.2f} s, one session)")
    print(
        f"APPEND -> replied (IDLE):    median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} (target <= 2 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
