"""Benchmark: one /metrics scrape of N mailboxes (the collector and the text format, as the daemon serves it).

Prints seconds (wall and CPU) per scrape and the body's size for each size, and as the baseline measured in
the same run, `status --json`'s per-mailbox reading of the same figures (sent today, allowance, state), which
the scrape read before it had its own batched statements. A scrape runs in a worker thread every scrape
interval (15 s is usual): at 10,000 mailboxes its CPU over the interval is what the daemon gives up.

    python bench/scrape.py [--sizes 1000,10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).parent))
from mailboxes import write_config

from daemon import api, readside
from daemon.config import load_config
from daemon.store import Store


def timed(fn: object, rounds: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()  # type: ignore[operator]
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            config = load_config(write_config(Path(folder), n))
            store = Store.open(config.daemon.database)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(api.DaemonMetrics(lambda c=config: c, lambda: None))
            size = len(generate_latest(registry))
            wall, cpu = timed(lambda r=registry: generate_latest(r), args.rounds)
            gauges, _ = timed(lambda c=config, s=store: readside.gauges(c, s, time.time()), args.rounds)
            status, _ = timed(lambda c=config, s=store: readside.status(c, s, time.time()), args.rounds)
            store.close()
            print(
                f"{n:>6} mailboxes: scrape {wall:.3f} s (CPU {cpu:.3f} s, {size / 1e6:.1f} MB, "
                f"{100 * cpu / 15:.1f}% of a core at a 15 s interval); its mailbox reading {gauges:.3f} s; "
                f"baseline: status's reading {status:.3f} s"
            )


if __name__ == "__main__":
    main()
