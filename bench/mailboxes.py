"""Benchmark: cost of configured mailboxes with nothing due: start-up to READY=1, idle CPU, RSS.

For each size, a config of N mailboxes (one user each, one cadence over all,
nothing enrolled) and a real `cadenced run` with a real NOTIFY_SOCKET: the
seconds from exec to READY=1, the CPU the process uses over the idle
seconds after a warm-up (as % of one core), and its peak RSS. The baseline, measured in the
same run, is the same process's fixed cost: `cadenced check` on the same file
(interpreter, imports, parsing and validating the config).

Targets (issue: cost per mailbox): 10,000 mailboxes: READY <= 5 s, idle CPU <= 1%, RSS <= 300 MB.

    python bench/mailboxes.py [--sizes 10,100,1000,10000,50000] [--idle 10] [--warmup 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

CLK_TCK = os.sysconf("SC_CLK_TCK")


def write_config(folder: Path, n: int) -> Path:
    users = [{"name": f"u{i}"} for i in range(n)]
    mailboxes = [
        {
            "address": f"m{i}@box{i % 97}.example",
            "owner": f"u{i}",
            "helo_name": "bench.example",
            "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"},
        }
        for i in range(n)
    ]
    data = {
        "daemon": {"database": str(folder / "cadenced.db"), "log_format": "json", "log_level": "warning"},
        "users": users,
        "mailboxes": mailboxes,
        "cadences": [{"name": "c", "users": [u["name"] for u in users], "steps": [{"subject": "Hi", "body": "Hello"}]}],
    }
    path = folder / "cadenced.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(n: int, idle: float, warmup: float) -> tuple[float, float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, n)
        cmd = [sys.executable, "-m", "daemon", "--config", str(config)]
        started = time.perf_counter()
        subprocess.run([*cmd, "check"], check=True, capture_output=True)
        baseline = time.perf_counter() - started
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(folder / "notify"))
        sock.settimeout(600)
        started = time.perf_counter()
        proc = subprocess.Popen([*cmd, "run"], env={**os.environ, "NOTIFY_SOCKET": str(folder / "notify")})
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            ready = time.perf_counter() - started
            sock.setblocking(False)
            time.sleep(warmup)  # every sender loop takes its first look at the database, then sleeps
            before = cpu_seconds(proc.pid)
            time.sleep(idle)  # the measurement window: CPU used while nothing is due
            used = cpu_seconds(proc.pid) - before
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            sock.close()
    return baseline, ready, 100 * used / idle, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,1000,10000,50000")
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    args = parser.parse_args()
    print(f"{'mailboxes':>10} {'check (baseline)':>17} {'READY=1':>9} {'idle CPU':>9} {'peak RSS':>9}")
    for n in (int(x) for x in args.sizes.split(",")):
        baseline, ready, cpu, rss = measure(n, args.idle, args.warmup)
        print(f"{n:>10,} {baseline:>15.2f} s {ready:>7.2f} s {cpu:>8.2f}% {rss:>6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
