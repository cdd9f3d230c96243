"""Benchmark: the daemon's sending rate against a raw aiosmtplib loop, in the same run.

1. N messages over M mailboxes (gap 0, limits out of the way) through a real
   `cadenced run` process to a local sink: Postfix `smtp-sink` when installed,
   aiosmtpd's Sink otherwise, in a process of its own.
2. The baseline: what a user would write instead, a plain aiosmtplib script
   that builds each message with the standard library per send, over the same
   number of connections to the same sink. CPU per message for both (the
   daemon's from /proc/PID/stat, user + sys, while it sends).
3. The daemon with 1,000,000 enrollments in its database (one message due now,
   the rest tomorrow): its time from start to first send and its peak RSS.

With `--against DIR` (another checkout of cadenced, say `git worktree add /tmp/old <commit>`), each round
also runs that build's daemon on a database of its own, in turns with this one: the ratio of the two builds'
CPU per message, median of the rounds, says whether a change cost sending anything.

Targets: daemon >= 0.9 of the raw loop (median of alternated rounds); <= 150 MB peak RSS; <= 1 s to
first send.

    python bench/throughput.py [--messages N] [--mailboxes M] [--enrollments E] [--rounds R] [--against DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import email.message
import email.utils
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import tomli_w

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sink did not listen on {port}")


def start_sink(port: int) -> tuple[subprocess.Popen[bytes], str]:
    sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
    if sink:
        cmd = [sink, *(["-u", "nobody"] if os.geteuid() == 0 else []), f"127.0.0.1:{port}", "1024"]
        name = "postfix smtp-sink"
    else:
        cmd = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"]
        name = "aiosmtpd Sink"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, name


FIRST_STEP = {"subject": "Hello {{ company }}", "body": "Hi {{ first_name }},\n\nA short note.\n"}


def write_config(
    root: Path,
    port: int,
    mailboxes: int,
    database: Path,
    *,
    daily_limit: int = 100_000,
    gap: str = "0s",
    steps: list[dict[str, str]] | None = None,
    name: str = "",
) -> Path:
    """N mailboxes open all day, every day, on one cadence; by default limits and gaps out of the way."""
    smtp = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": "30s"}
    config = {
        "daemon": {"database": str(database), "log_format": "json", "log_level": "info", "max_connections": 1000},
        "defaults": {
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
            "hours": ["00:00-24:00"],
            "daily_limit": daily_limit,
            "gap": gap,
        },
        "users": [{"name": "bench"}],
        "mailboxes": [
            {"address": f"sender{i}@bench.example", "name": f"Sender {i}", "owner": "bench", "smtp": smtp}
            for i in range(mailboxes)
        ],
        "cadences": [{"name": "bench", "users": ["bench"], "steps": steps or [FIRST_STEP]}],
    }
    path = root / (name or f"bench-{mailboxes}.toml")
    path.write_text(tomli_w.dumps(config))
    return path


def cadenced(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", *args]


def enroll(config: Path, root: Path, n: int, build: Path | None = None) -> None:
    """n prospects enrolled by `build`'s cadenced (default: this one): its schema is the one its daemon reads."""
    csv = root / "prospects.csv"
    csv.write_text("email,first_name,company\n" + "".join(f"p{i}@sink.example,P{i},Co{i}\n" for i in range(n)))
    env = {**os.environ, "PYTHONPATH": str(build)} if build else None
    subprocess.run(
        cadenced("--config", str(config), "enroll", "--cadence", "bench", "--as", "bench", str(csv)),
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=build,
        env=env,
    )


def count_sent(db: Path) -> tuple[int, float | None, float | None]:
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute("SELECT count(*), min(sent_at), max(sent_at) FROM messages WHERE state = 'sent'").fetchone()
    return int(row[0]), row[1], row[2]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_daemon(
    config: Path, db: Path, n: int, timeout: float = 600, build: Path | None = None
) -> tuple[float, float, float]:
    """(seconds from the first send to the last, seconds from start to the first send, CPU seconds while sending).
    `build`: the checkout whose daemon runs (default: this one)."""
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(build)} if build else None
    proc = subprocess.Popen(cadenced("--config", str(config), "run"), stdout=subprocess.DEVNULL, cwd=build, env=env)
    try:
        deadline = time.monotonic() + timeout
        cpu_at_first: float | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with status {proc.returncode} before sending {n}")
            sent, first, last = count_sent(db)
            if sent and cpu_at_first is None:
                cpu_at_first = cpu_seconds(proc.pid)
            if sent >= n:
                assert first is not None and last is not None and cpu_at_first is not None
                return last - first, first - started, cpu_seconds(proc.pid) - cpu_at_first
            time.sleep(0.05)
        raise RuntimeError(f"daemon sent {count_sent(db)[0]} of {n} in {timeout}s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


async def raw_loop(port: int, n: int, mailboxes: int) -> tuple[float, float]:
    """What a user would write instead: a plain aiosmtplib script that builds each message with the
    standard library (`email.message.Message`, headers, body, `as_bytes()`) and sends it, over the same
    number of connections. No database. Returns (seconds, CPU seconds of this process)."""

    def message(i: int, sender: str) -> bytes:
        msg = email.message.Message()
        msg["From"] = f"Sender {i % mailboxes} <{sender}>"
        msg["To"] = f"p{i}@sink.example"
        msg["Subject"] = f"Hello Co{i}"
        msg["Date"] = email.utils.formatdate()
        msg["Message-ID"] = email.utils.make_msgid(domain="bench.example")
        msg["MIME-Version"] = "1.0"
        msg["Content-Type"] = "text/plain; charset=utf-8"
        msg.set_payload(f"Hi P{i},\n\nA short note.\n")
        return msg.as_bytes()

    async def one_connection(k: int) -> None:
        sender = f"sender{k}@bench.example"
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False, timeout=30)
        await client.connect()
        for i in range(k, n, mailboxes):
            await client.sendmail(sender, [f"p{i}@sink.example"], message(i, sender))
        await client.quit()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_connection(k) for k in range(mailboxes)))
    return time.perf_counter() - start, time.process_time() - cpu


def big_database(db: Path, enrollments: int) -> None:
    """E enrollments of one cadence over 20 mailboxes: one message due now, the rest tomorrow."""
    now = time.time()
    with sqlite3.connect(db) as conn:
        conn.execute("BEGIN")
        conn.execute(
            """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
               INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at)
               SELECT i, 'bench', 'big' || i || '@sink.example', 'sender' || (i % 20) || '@bench.example',
                      'bench', 'bench', '{"first_name":"Big","company":"Co"}', ? FROM n""",
            (enrollments, now),
        )
        conn.execute(
            """INSERT INTO messages (enrollment_id, step, mailbox, state, due_at)
               SELECT id, 1, mailbox, 'scheduled', CASE WHEN id = 1 THEN ? ELSE ? END FROM enrollments""",
            (now, now + 86400),
        )
        conn.execute(
            """INSERT INTO rotation_counts SELECT cadence, mailbox, count(*) FROM enrollments
               GROUP BY cadence, mailbox"""
        )
        conn.execute("INSERT INTO cadence_pins VALUES ('bench', 1, 'cadence', ?)", (now,))
        conn.execute("COMMIT")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def startup_and_memory(root: Path, port: int, enrollments: int) -> tuple[float, float]:
    db = root / "big.db"
    config = write_config(root, port, 20, db)
    subprocess.run(cadenced("--config", str(config), "status"), check=True, stdout=subprocess.DEVNULL)  # schema
    big_database(db, enrollments)
    return first_send(config, lambda: count_sent(db)[1])


def first_send(config: Path, sent_at: Callable[[], float | None], within: float = 120) -> tuple[float, float]:
    """Start `cadenced run`: (seconds from start to the send_at() it reports, its peak RSS in MB soon after)."""
    started = time.time()
    proc = subprocess.Popen(cadenced("--config", str(config), "run"), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + within
        first = None
        while time.monotonic() < deadline and first is None:
            first = sent_at()
            time.sleep(0.02)
        time.sleep(3)  # let it settle into its steady state before reading the high-water mark
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    if first is None:
        raise RuntimeError(f"no first send within {within:g} s")
    return first - started, rss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--mailboxes", type=int, default=10)
    parser.add_argument("--enrollments", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7, help="plain script and daemon alternated, this many times")
    parser.add_argument("--against", metavar="DIR", help="also run the daemon of the checkout in DIR, round by round")
    args = parser.parse_args()
    rounds: list[tuple[float, float, float, float, float]] = []
    other: list[tuple[float, float]] = []  # (msg/s, CPU s) of the --against build's daemon
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        sink, sink_name = start_sink(port)
        try:

            def against(r: int) -> tuple[float, float]:
                db = root / f"against-{r}.db"
                config = write_config(root, port, args.mailboxes, db, name=f"against-{r}.toml")
                enroll(config, root, args.messages, build=Path(args.against).resolve())
                span, _, cpu_used = run_daemon(config, db, args.messages, build=Path(args.against).resolve())
                return args.messages / span, cpu_used

            for r in range(args.rounds):
                # The two runs of a round back to back (enrolled before either starts), in turns which goes first:
                # this machine's speed drifts by a third from one minute to the next.
                if args.against and r % 2:  # the two builds in turns which goes first
                    other.append(against(r))
                db = root / f"throughput-{r}.db"
                config = write_config(root, port, args.mailboxes, db)
                enroll(config, root, args.messages)
                if r % 2:
                    daemon_span, first_send, daemon_cpu = run_daemon(config, db, args.messages)
                raw, raw_cpu = asyncio.run(raw_loop(port, args.messages, args.mailboxes))
                if not r % 2:
                    daemon_span, first_send, daemon_cpu = run_daemon(config, db, args.messages)
                rounds.append((args.messages / raw, raw_cpu, args.messages / daemon_span, daemon_cpu, first_send))
                if args.against and not r % 2:
                    other.append(against(r))
            startup, rss = startup_and_memory(root, port, args.enrollments)
        finally:
            sink.terminate()
            sink.wait(timeout=10)
    print(f"sink:                       {sink_name}")
    print(f"messages / connections:     {args.messages} / {args.mailboxes}, {args.rounds} rounds alternated")
    for i, (raw_rate, raw_cpu, daemon_rate, daemon_cpu, _) in enumerate(rounds, 1):
        print(
            f"round {i}: plain script {raw_rate:,.0f} msg/s, {1e6 * raw_cpu / args.messages:,.0f} µs CPU/msg; "
            f"cadenced run {daemon_rate:,.0f} msg/s, {1e6 * daemon_cpu / args.messages:,.0f} µs CPU/msg; "
            f"ratio {daemon_rate / raw_rate:.2f}"
        )
    ratios = sorted(d / r for r, _, d, _, _ in rounds)
    cpu = sorted(1e6 * c / args.messages for _, _, _, c, _ in rounds)
    print(
        f"median ratio daemon / raw:  {statistics.median(ratios):.2f}   (target >= 0.9; every state change "
        "committed, synchronous = FULL)"
    )
    print(f"median daemon CPU:          {statistics.median(cpu):,.0f} µs/message")
    if other:
        theirs = [1e6 * c / args.messages for _, c in other]
        mine = [1e6 * c / args.messages for _, _, _, c, _ in rounds]
        cpu_ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
        rate_ratios = sorted(d / o for (_, _, d, _, _), (o, _) in zip(rounds, other, strict=True))
        print(
            f"against {args.against}: median CPU/msg {statistics.median(theirs):,.0f} µs there, "
            f"{statistics.median(mine):,.0f} µs here; median ratio here / there: "
            f"CPU {statistics.median(cpu_ratios):.3f}, msg/s {statistics.median(rate_ratios):.3f}"
        )
    print(f"first send after start:     {rounds[-1][4]:.2f} s ({args.messages} enrolled)")
    print(
        f"with {args.enrollments:,} enrollments: first send {startup:.2f} s (target <= 1), "
        f"peak RSS {rss:.0f} MB (target <= 150)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
