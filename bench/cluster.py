"""Benchmark: one daemon on SQLite (the baseline, same run) against one and three daemons on PostgreSQL.

N messages over M mailboxes (gap 0, limits out of the way) to the same local sink (Postfix `smtp-sink` when
installed, aiosmtpd's Sink otherwise). For each setup: messages/s from the first send to the last (as the
database records them), the daemons' CPU per message (user + sys from /proc, all daemons together), and on
PostgreSQL the server's CPU per message too (its processes, while they send). PostgreSQL is a throwaway
server of this run (initdb, fsync on), as the tests start it.

    python bench/cluster.py [--messages N] [--mailboxes M] [--daemons 3]
    python bench/cluster.py --idle 2000 [--daemons 3]   # nothing to send: CPU per daemon and the server's
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from throughput import cadenced, count_sent, cpu_seconds, enroll, free_port, start_sink, write_config

from tests.postgres_server import Postgres

CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu() -> float:
    """CPU seconds of every postgres process on this machine (the throwaway server's)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("postgres"):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


POLLS: dict[str, psycopg.Connection[Any]] = {}


def pg_sent(url: str) -> tuple[int, float | None, float | None]:
    """Asked every 50 ms on one connection (a new one each time was a backend started 20 times a second, which
    the server's CPU per message counted)."""
    conn = POLLS.get(url)
    if conn is None:
        conn = POLLS[url] = psycopg.connect(url, autocommit=True)
    row = conn.execute("SELECT count(*), min(sent_at), max(sent_at) FROM messages WHERE state = 'sent'").fetchone()
    assert row is not None
    return int(row[0]), row[1], row[2]


def shared_out(url: str, daemons: int, mailboxes: int, timeout: float = 120) -> float:
    """Seconds until every daemon holds its share of the mailboxes (measured before anything is enrolled)."""
    started = time.monotonic()
    share = -(-mailboxes // daemons)
    while time.monotonic() - started < timeout:
        with psycopg.connect(url, autocommit=True) as conn:
            if not conn.execute("SELECT to_regclass('leases') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
                time.sleep(0.1)
                continue  # the first daemon is making the schema
            held = [r[0] for r in conn.execute("SELECT count(*) FROM leases GROUP BY holder").fetchall()]
        if len(held) == daemons and sum(held) == mailboxes and max(held) <= share:
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"the mailboxes were not shared out in {timeout} s")


def run(configs: list[Path], sent: object, n: int, prepare: object, timeout: float = 900) -> tuple[float, float, float]:
    """(messages/s, daemon CPU s per message, server CPU s per message) with these daemons running; `prepare`
    runs once they have started (the share-out awaited, then the enrollment): only sending is measured."""
    procs = [subprocess.Popen(cadenced("--config", str(c), "run"), stdout=subprocess.DEVNULL) for c in configs]
    prepare()  # type: ignore[operator]
    server_before = server_cpu()
    try:
        deadline = time.monotonic() + timeout
        cpu_at_first: float | None = None
        server_at_first = server_before
        while time.monotonic() < deadline:
            count, first, last = sent()  # type: ignore[operator]
            if count and cpu_at_first is None:
                cpu_at_first = sum(cpu_seconds(p.pid) for p in procs)
                server_at_first = server_cpu()
            if count >= n:
                cpu = sum(cpu_seconds(p.pid) for p in procs) - (cpu_at_first or 0.0)
                return n / (last - first), cpu / n, (server_cpu() - server_at_first) / n
            time.sleep(0.05)
        raise RuntimeError(f"sent {sent()[0]} of {n} in {timeout} s")  # type: ignore[operator]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)


def idle(postgres: Postgres, root: Path, port: int, mailboxes: int, daemons: int, seconds: float = 30) -> None:
    """Daemons with nothing to send: each one's CPU (and the server's) over `seconds`, once shared out, against
    one daemon alone holding every mailbox (the baseline, same run)."""
    for count in (1, daemons):
        url = postgres.database()
        configs = []
        for k in range(count):
            path = write_config(root, port, mailboxes, root / "unused.db", name=f"idle-{count}-{k}.toml")
            text = path.read_text().replace(f'database = "{root / "unused.db"}"', f'database = "{url}"\nnode = "i{k}"')
            path.write_text(text)
            configs.append(path)
        procs = [subprocess.Popen(cadenced("--config", str(c), "run"), stdout=subprocess.DEVNULL) for c in configs]
        try:
            took = shared_out(url, count, mailboxes, timeout=300)
            time.sleep(5)  # the loops started on their leases have looked once
            before = [cpu_seconds(p.pid) for p in procs]
            server_before = server_cpu()
            time.sleep(seconds)
            used = [(cpu_seconds(p.pid) - b) / seconds * 100 for p, b in zip(procs, before, strict=True)]
            server = (server_cpu() - server_before) / seconds * 100
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=120)
        each = ", ".join(f"{u:.1f}%" for u in used)
        print(
            f"idle, {mailboxes} mailboxes over {count} daemon(s): CPU per daemon {each}; server {server:.1f}%;"
            f" shared out in {took:.1f} s"
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--mailboxes", type=int, default=12)
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--idle", type=int, default=0, help="instead: N idle mailboxes, CPU per daemon")
    args = parser.parse_args()
    port = free_port()
    sink, sink_name = start_sink(port)
    postgres = Postgres()
    postgres.fsync = True
    postgres.start()
    if args.idle:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                idle(postgres, Path(tmp), port, args.idle, args.daemons)
        finally:
            postgres.stop()
            sink.terminate()
            sink.wait()
        return 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            results = {}
            # 1. The baseline: one daemon on SQLite.
            db = root / "bench.db"
            config = write_config(root, port, args.mailboxes, db, name="sqlite.toml")
            results["1 daemon, SQLite"] = run(
                [config], lambda: count_sent(db), args.messages, lambda: enroll(config, root, args.messages)
            )
            share_out: dict[int, float] = {}
            # 2. One, then several daemons on PostgreSQL (each on a database of its own, same enrollments).
            for daemons in (1, args.daemons):
                url = postgres.database()
                configs = []
                for k in range(daemons):
                    path = write_config(root, port, args.mailboxes, db, name=f"pg-{daemons}-{k}.toml")
                    text = path.read_text().replace(f'database = "{db}"', f'database = "{url}"\nnode = "n{k}"')
                    path.write_text(text)
                    configs.append(path)
                label = f"{daemons} daemon{'s' if daemons > 1 else ''}, PostgreSQL"

                def prepare(u: str = url, k: int = daemons, first: Path = configs[0]) -> None:
                    share_out[k] = shared_out(u, k, args.mailboxes)
                    enroll(first, root, args.messages)

                results[label] = run(configs, lambda u=url: pg_sent(u), args.messages, prepare)
    finally:
        for conn in POLLS.values():
            conn.close()
        postgres.stop()
        sink.terminate()
        sink.wait()
    print(f"{args.messages} messages over {args.mailboxes} mailboxes to {sink_name}")
    for label, (rate, cpu, server) in results.items():
        on_server = f", server {server * 1e6:,.0f} µs CPU/msg" if "PostgreSQL" in label else ""
        print(f"{label:<26} {rate:,.0f} msg/s, daemons {cpu * 1e6:,.0f} µs CPU/msg{on_server}")
    for k, seconds in share_out.items():
        print(f"  {k} daemon(s) on PostgreSQL shared {args.mailboxes} mailboxes out in {seconds:.1f} s (not measured)")
    base = results["1 daemon, SQLite"][0]
    for label, (rate, _, _) in results.items():
        print(f"  {label}: {rate / base:.2f} of the SQLite baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
