"""Benchmark: `cadenced report` on the results of a large database.

The results table as E enrollments of C cadences (two steps, step 1 with two variants) over M mailboxes and D
days make it: a row per cadence, UTC day, step, variant, mailbox and kind that happened (enrolled, sent, replied,
bounced, finished, an outcome), written straight into the schema the daemon made (its triggers keep the rollups:
all time, and per day without variant or mailbox). Each report is timed as a fresh
process, the way an operator runs it, three times (the median is printed).

Baseline in the same run: `cadenced check` on the same config (what any command costs to load code and config).

Target: every report <= 1 s at 10,000,000 enrollments (the results table does not grow with enrollments once
every (cadence, day, step, variant, mailbox) has its rows: 10,000,000 over 200 mailboxes and 90 days fills it).

    python bench/report.py [--enrollments E] [--cadences C] [--mailboxes M] [--days D]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import cadenced, write_config

from daemon.store import Store

KINDS = ("sent", "replied", "bounced", "finished", "outcome:interested")


def generate(db: Path, enrollments: int, cadences: int, mailboxes: int, days: int) -> int:
    """The results rows; returns how many."""
    per = max(1, enrollments // (cadences * mailboxes * days))  # enrollments per cadence, mailbox and day
    start = time.time() - days * 86400
    day_names = [time.strftime("%Y-%m-%d", time.gmtime(start + d * 86400)) for d in range(days)]
    rows = []
    for c in range(cadences):
        for day in day_names:
            for m in range(mailboxes):
                box = f"sender{m}@bench.example"
                rows.append(((f"bench{c}" if c else "bench"), day, 0, "", box, "enrolled", per))
                for variant in ("A", "B"):
                    rows.extend(
                        (
                            (f"bench{c}" if c else "bench"),
                            day,
                            1,
                            variant,
                            box,
                            k,
                            max(1, per // (2 if k == "sent" else 40)),
                        )
                        for k in KINDS
                    )
                rows.extend(
                    ((f"bench{c}" if c else "bench"), day, 2, "", box, k, max(1, per // (3 if k == "sent" else 60)))
                    for k in KINDS
                )
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def timed(*args: str) -> float:
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(cadenced(*args), check=True, stdout=subprocess.DEVNULL)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enrollments", type=int, default=10_000_000)
    parser.add_argument("--cadences", type=int, default=5)
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        db = root / "report.db"
        config = write_config(root, 2525, args.mailboxes, db, name="report.toml")
        Store.open(db).close()  # the schema, as the daemon makes it
        rows = generate(db, args.enrollments, args.cadences, args.mailboxes, args.days)
        print(
            f"results rows: {rows:,} ({args.enrollments:,} enrollments, {args.cadences} cadences, "
            f"{args.mailboxes} mailboxes, {args.days} days)"
        )
        week = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400))
        print(f"baseline  check                          {timed('--config', str(config), 'check'):.3f} s")
        for extra in (
            (),
            ("--by", "step"),
            ("--by", "variant"),
            ("--by", "mailbox"),
            ("--by", "day"),
            ("--cadence", "bench", "--by", "variant"),
            ("--since", week, "--by", "step"),
            ("--since", week, "--by", "variant"),
            ("--since", week, "--by", "mailbox"),
        ):
            seconds = timed("--config", str(config), "report", "--json", *extra)
            print(f"report {' '.join(extra) or '(totals)':<33} {seconds:.3f} s")


if __name__ == "__main__":
    main()
