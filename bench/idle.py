"""Benchmark: an IMAP IDLE session per mailbox against a real Dovecot (needs root and dovecot-imapd).

N mailboxes (default 2,000), each with [imap] on a Dovecot user of its own,
nothing enrolled. A real `cadenced run`: the seconds until every mailbox says
`imap.watching` (its session is in IDLE), then, after a warm-up, the CPU the
daemon uses over the idle seconds (% of one core) and its RSS. The baseline,
measured in the same run, is the same N mailboxes without [imap].

Target (issue: cost per mailbox): RSS and idle CPU reported for 2,000 sessions.

    sudo python bench/idle.py [--mailboxes N] [--idle 10] [--warmup 10] [--postgres]

--postgres: the daemon's database is a throwaway PostgreSQL of this run (the one daemon leases them all).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.imap_server import Dovecot  # noqa: E402
from tests.postgres_server import Postgres  # noqa: E402
from tests.servers import Pki  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Dovecot's defaults allow 100 imap processes; one long-lived login process serves every handshake here.
DOVECOT_SCALE = """
default_process_limit = {n}
default_client_limit = {clients}
service imap {{
  process_limit = {n}
}}
service imap-login {{
  service_count = 0
  process_min_avail = 2
  client_limit = {clients}
}}
"""


def write_config(folder: Path, n: int, dovecot: Dovecot | None, pki: Pki, database: str = "") -> Path:
    (folder / "imap-pw").write_text("imap-pw")
    mailboxes = []
    for i in range(n):
        box: dict[str, object] = {
            "address": f"m{i}@box{i % 97}.example",
            "owner": f"u{i}",
            "helo_name": "bench.example",
            "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"},
        }
        if dovecot is not None:
            box["imap"] = dovecot.imap_config(f"u{i}", folder / "imap-pw", pki.ca_file, poll="30m")
        mailboxes.append(box)
    data = {
        "daemon": {"database": database or str(folder / f"idle-{n}-{dovecot is not None}.db"), "log_format": "json"},
        "users": [{"name": f"u{i}"} for i in range(n)],
        "mailboxes": mailboxes,
        "cadences": [{"name": "c", "users": [f"u{i}" for i in range(n)], "steps": [{"subject": "Hi", "body": "Hi"}]}],
    }
    path = folder / f"idle-{dovecot is not None}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS now, peak RSS) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def measure(config: Path, sessions: int, warmup: float, idle: float) -> tuple[float, float, float, float, int]:
    """(seconds until `sessions` watch, idle CPU %, RSS MB, peak RSS MB, imap.error lines)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(config), "run"], stdout=subprocess.PIPE, text=True
    )
    watching, errors = 0, 0
    all_in = threading.Event()
    ready_at: list[float] = []

    def read() -> None:
        nonlocal watching, errors
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line).get("event")
            except ValueError:
                continue
            if event == "imap.watching":
                watching += 1
                if watching == sessions:
                    ready_at.append(time.monotonic())
                    all_in.set()
            elif event == "imap.error":
                errors += 1
                if errors <= 3:
                    print("imap.error:", line.strip()[:300], file=sys.stderr)
            elif event == "daemon.started" and sessions == 0:
                ready_at.append(time.monotonic())
                all_in.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not all_in.wait(300):
            raise RuntimeError(f"{watching} of {sessions} sessions watching after 300 s ({errors} imap.error)")
        time.sleep(warmup)
        before = cpu_seconds(proc.pid)
        time.sleep(idle)
        cpu = 100 * (cpu_seconds(proc.pid) - before) / idle
        rss, peak = memory_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return ready_at[0] - started, cpu, rss, peak, errors


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mailboxes", type=int, default=2000)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--postgres", action="store_true", help="on a throwaway PostgreSQL instead of SQLite")
    args = parser.parse_args()
    postgres = Postgres().start() if args.postgres else None
    n = args.mailboxes
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        pki = Pki(root)
        users = {f"u{i}": "imap-pw" for i in range(n)}
        dovecot = Dovecot(pki, users, extra_conf=DOVECOT_SCALE.format(n=n + 100, clients=2 * n + 100)).start()
        try:
            urls = (postgres.database(), postgres.database()) if postgres else ("", "")
            base = measure(write_config(root, n, None, pki, urls[0]), 0, args.warmup, args.idle)
            idle = measure(write_config(root, n, dovecot, pki, urls[1]), n, args.warmup, args.idle)
        finally:
            dovecot.cleanup()
            if postgres:
                postgres.stop()
    print(f"mailboxes:                         {n:,} (database: {'PostgreSQL' if postgres else 'SQLite'})")
    print(
        f"without [imap] (baseline):         started in {base[0]:.1f} s, idle CPU {base[1]:.2f}%, RSS {base[2]:.0f} MB"
    )
    print(
        f"an IDLE session each (Dovecot):    all watching in {idle[0]:.1f} s, idle CPU {idle[1]:.2f}%, "
        f"RSS {idle[2]:.0f} MB (peak {idle[3]:.0f} MB), {idle[4]} imap.error on the way"
    )
    print(f"per session:                       {1024 * (idle[2] - base[2]) / n:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
