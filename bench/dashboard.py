"""Benchmark: the dashboard's pages against a large database, through a running daemon's [api] listener.

E enrollments over M mailboxes (bench/scale.py's database: step 1 sent, step 2 scheduled over two weeks, some in
the error outbox), a daemon started on it with [api], one signed-in session; each page fetched 5 times (the median
is printed), the way a browser asks for it.

Baseline in the same run: the sign-in page (no database read: what the listener and a template cost), and the
JSON API's GET /v1/status (every mailbox's status, what the CLI's `status` prints).

Target: every page <= 300 ms at 1,000 mailboxes and 1,000,000 enrollments. The plan's first view makes the
forecast (every send of 14 days) and is printed apart; the dashboard then keeps it and remakes it in the
background.

    python bench/dashboard.py [--enrollments E] [--mailboxes M]
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import generate, write_config
from throughput import cadenced, free_port, start_sink, wait_port

from daemon.store import Store

TOKEN = "bench-dashboard-token-0123456789abcdef"


def median_ms(client: httpx.Client, path: str, **headers: str) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        r = client.get(path, headers=headers)
        runs.append(time.perf_counter() - started)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
    return statistics.median(runs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enrollments", type=int, default=1_000_000)
    parser.add_argument("--mailboxes", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sink_port, api_port = free_port(), free_port()
        sink, _ = start_sink(sink_port)
        db = root / "dashboard.db"
        config = write_config(root, sink_port, args.mailboxes, 50, db)
        data = tomllib.loads(config.read_text())
        (root / "token").write_text(TOKEN)
        data["api"] = {"listen": f"127.0.0.1:{api_port}", "token_file": str(root / "token")}
        config.write_text(tomli_w.dumps(data))
        Store.open(db).close()
        made = generate(db, args.enrollments, args.mailboxes, 500)
        print(f"database: {args.enrollments:,} enrollments over {args.mailboxes:,} mailboxes, made in {made:.0f} s")
        proc = subprocess.Popen(cadenced("--config", str(config), "run"), stdout=subprocess.DEVNULL)
        try:
            wait_port(api_port)
            with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60) as client:
                form = client.get("/signin")
                csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
                assert csrf
                client.post("/signin", data={"csrf": csrf.group(1), "token": TOKEN})
                print(f"baseline  /signin (no database)            {median_ms(client, '/signin'):7.1f} ms")
                status = median_ms(client, "/v1/status", Authorization=f"Bearer {TOKEN}")
                print(f"baseline  GET /v1/status (every mailbox)   {status:7.1f} ms")
                started = time.perf_counter()
                assert client.get("/plan").status_code == 200
                first = (time.perf_counter() - started) * 1000
                print(f"first     /plan (its forecast made now)    {first:7.1f} ms  (then kept, remade after 60 s)")
                for path in (
                    "/mailboxes",
                    "/mailboxes?page=10",
                    "/outbox?state=error",
                    "/outbox?state=scheduled",
                    "/outbox?state=sent&mailbox=sender7%40bench.example",
                    "/plan",
                    "/plan?mailbox=sender7%40bench.example",
                    "/results?by=mailbox",
                    "/prospect?email=p777%40prospects.example",
                ):
                    print(f"page      {path:<52} {median_ms(client, path):7.1f} ms")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            sink.kill()


if __name__ == "__main__":
    main()
