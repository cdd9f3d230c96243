"""`cadenced demo`: the real daemon against a loopback SMTP server, in under a minute."""

from __future__ import annotations

import email
import email.policy
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import tomli_w
from aiosmtpd.controller import Controller

from daemon import logs, readside
from daemon.config import load_config
from daemon.enroll import Importer
from daemon.service import Daemon
from daemon.store import Store

PROSPECTS = [
    ("ada@lovelace.example", "Ada", "Analytical Engines"),
    ("grace@hopper.example", "Grace", "Compilers Inc"),
    ("alan@turing.example", "Alan", "Bletchley"),
    ("edsger@dijkstra.example", "Edsger", "Semaphores BV"),
    ("barbara@liskov.example", "Barbara", "Substitution"),
    ("donald@knuth.example", "Donald", "TeX Works"),
]
LIMITED = "bob@outreach.example"
TIME_LIMIT = 90.0


@dataclass
class Received:
    sender: str
    recipient: str
    subject: str
    message_id: str
    in_reply_to: str
    references: str


@dataclass
class Sink:
    """aiosmtpd handler that keeps every message it accepts."""

    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.messages.append(
                    Received(
                        envelope.mail_from,
                        rcpt,
                        str(msg["Subject"]),
                        str(msg["Message-ID"]),
                        str(msg.get("In-Reply-To", "")),
                        str(msg.get("References", "")),
                    )
                )
        return "250 2.0.0 queued"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, port: int) -> Path:
    smtp = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": "10s"}
    config = {
        "daemon": {"database": str(root / "demo.db"), "log_format": "console", "idle_close": "5s"},
        "defaults": {
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
            "hours": ["00:00-24:00"],
            "daily_limit": 50,
            "gap": "1s",
        },
        "users": [{"name": "alice"}, {"name": "bob"}],
        "mailboxes": [
            {"address": "alice@outreach.example", "name": "Alice Walker", "owner": "alice", "smtp": smtp},
            {
                "address": "alice.w@outreach.example",
                "name": "Alice Walker",
                "owner": "alice",
                "timezone": "Europe/Berlin",
                "smtp": smtp,
            },
            {"address": LIMITED, "name": "Bob Stone", "owner": "bob", "daily_limit": 2, "smtp": smtp},
        ],
        "cadences": [
            {
                "name": "demo",
                "users": ["alice", "bob"],
                "rotate_among": "cadence",  # a shared pool: alice's imports rotate over bob's mailbox too
                "steps": [
                    {"wait": "0s", "subject": "A question for {{ company }}", "body": "Hi {{ first_name }}, ..."},
                    {"wait": "4s", "body": "Hi {{ first_name }}, following up on my note."},
                    {"wait": "4s", "body": "Hi {{ first_name }}, one last note from {{ sender_name }}."},
                ],
            }
        ],
    }
    path = root / "cadenced.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def settled(document: dict[str, Any], outbox: list[dict[str, Any]]) -> bool:
    """Nothing left that may go today: every mailbox is empty or held by its daily limit, and says so."""
    held = all(m["scheduled"] == 0 or m["waiting_for"] == "daily_limit" for m in document["mailboxes"])
    told = all((m["detail"] or "").startswith("deferred:") for m in outbox if m["state"] == "scheduled")
    return held and told


async def drive(daemon: Daemon, config_path: Path) -> dict[str, Any]:
    config = daemon.config
    reader = Store.open(config.daemon.database)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            deadline = time.monotonic() + TIME_LIMIT
            document = readside.status(config, reader, time.time())
            while time.monotonic() < deadline:
                await anyio.sleep(0.5)
                document = readside.status(config, reader, time.time())
                if settled(document, reader.outbox(state="scheduled")):
                    break
            daemon.stop()
        return document
    finally:
        reader.close()


def report(sink: Sink, status: dict[str, Any], outbox: list[dict[str, Any]]) -> None:
    out = sys.stdout.write
    out("\n=== what the SMTP server received ===\n")
    by_prospect: dict[str, list[Received]] = defaultdict(list)
    for r in sink.messages:
        by_prospect[r.recipient].append(r)
    ids = {r.message_id for r in sink.messages}
    for prospect, received in sorted(by_prospect.items()):
        senders = {r.sender for r in received}
        sticky = "same sender throughout" if len(senders) == 1 else "SENDER CHANGED"
        out(f"{prospect}  ({len(received)} emails, {sticky})\n")
        for r in received:
            threaded = ""
            if r.in_reply_to:
                threaded = (
                    "  in thread" if r.in_reply_to in ids and r.in_reply_to in r.references else "  BROKEN THREAD"
                )
            out(f"    from {r.sender:<26} {r.subject!r}{threaded}\n")
    out("\n=== rotation: first emails per mailbox ===\n")
    firsts: dict[str, int] = defaultdict(int)
    for received in by_prospect.values():
        firsts[received[0].sender] += 1
    for sender, n in sorted(firsts.items()):
        out(f"    {sender:<26} {n} prospects\n")
    out("\n=== mailboxes now ===\n")
    for m in status["mailboxes"]:
        waiting = f", waiting for {m['waiting_for']} until {m['next_send_at']}" if m["waiting_for"] else ""
        sent = f"sent today {m['sent_today']}/{m['daily_limit']}"
        out(f"    {m['address']:<26} {sent}, scheduled {m['scheduled']}{waiting}\n")
    deferred = [m for m in outbox if m["state"] == "scheduled"]
    if deferred:
        out("\n=== still in the outbox ===\n")
        for m in deferred:
            out(f"    #{m['id']} step {m['step']} {m['mailbox']} → {m['prospect']}: {m['detail'] or 'scheduled'}\n")
    # A step is (prospect, the message it answers): the same step twice would repeat the pair.
    steps = Counter((r.recipient, r.in_reply_to) for r in sink.messages)
    twice = sum(1 for n in steps.values() if n > 1)
    verdict = "none twice" if twice == 0 else f"{twice} STEPS DELIVERED MORE THAN ONCE"
    out(f"\n{len(sink.messages)} emails delivered to the loopback server; {verdict}.\n")


def main(keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="cadenced-demo-"))
    port = free_port()
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        config_path = write_config(root, port)
        config = load_config(config_path)
        logs.configure("console", "info")
        csv_path = root / "prospects.csv"
        csv_path.write_text("email,first_name,company\n" + "".join(f"{e},{f},{c}\n" for e, f, c in PROSPECTS))
        print(f"demo folder: {root}\nSMTP server: 127.0.0.1:{port}\n")
        store = Store.open(config.daemon.database)
        try:
            result = Importer(store, config, "demo", "alice").run(csv_path, time.time())
        finally:
            store.close()
        print(f"enrolled {result.enrolled} prospects: {dict(sorted(result.assignments.items()))}\n")
        daemon = Daemon(config_path, config)
        status = anyio.run(drive, daemon, config_path, backend="asyncio")
        store = Store.open(config.daemon.database)
        try:
            outbox = store.outbox()
        finally:
            store.close()
        report(sink, status, outbox)
        return 0
    finally:
        controller.stop()
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
