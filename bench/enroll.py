"""Benchmark: enroll 100,000 prospects from CSV into a cadence of 20 mailboxes.

Prints prospects/second through `cadenced enroll` (in process, the same code the
command runs) and, as the baseline measured in the same run, a bare loop that
parses the same CSV and inserts the same rows with plain sqlite3 executemany.
Peak RSS is that of this process after the enroll, before the baseline.
Target: >= 50,000 prospects/s for 1,000,000 rows.

    python bench/enroll.py [--prospects N] [--mailboxes M]
"""

from __future__ import annotations

import argparse
import csv
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from daemon.config import load_config
from daemon.enroll import Importer
from daemon.store import Store


def write_inputs(root: Path, prospects: int, mailboxes: int) -> tuple[Path, Path]:
    config = {
        "daemon": {"database": str(root / "bench.db")},
        "users": [{"name": "alice"}],
        "mailboxes": [
            {"address": f"sender{i}@acme.example", "owner": "alice", "smtp": {"host": "127.0.0.1", "security": "none"}}
            for i in range(mailboxes)
        ],
        "cadences": [
            {
                "name": "bench",
                "users": ["alice"],
                "steps": [{"subject": "Hi {{ company }}", "body": "Hello {{ first_name | default('there') }}"}],
            }
        ],
    }
    config_path = root / "cadenced.toml"
    config_path.write_text(tomli_w.dumps(config))
    csv_path = root / "prospects.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["email", "first_name", "last_name", "company", "title"])
        for i in range(prospects):
            w.writerow([f"person{i}@prospect{i % 997}.example", f"First{i}", f"Last{i}", f"Company {i % 5000}", "CTO"])
    return config_path, csv_path


def baseline(csv_path: Path, db_path: Path) -> float:
    """Parse the CSV and insert prospect, enrollment and message rows with nothing else."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, email TEXT UNIQUE)")
    conn.execute("CREATE TABLE e (id INTEGER PRIMARY KEY, p INTEGER, mailbox TEXT, fields TEXT)")
    conn.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, e INTEGER, mailbox TEXT, due REAL)")
    start = time.perf_counter()
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO p (id, email) VALUES (?, ?)", ((i, r[0]) for i, r in enumerate(rows)))
    conn.executemany(
        "INSERT INTO e VALUES (?, ?, ?, ?)", ((i, i, f"sender{i % 20}", ",".join(r)) for i, r in enumerate(rows))
    )
    conn.executemany("INSERT INTO m VALUES (?, ?, ?, ?)", ((i, i, f"sender{i % 20}", 0.0) for i in range(len(rows))))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prospects", type=int, default=100_000)
    parser.add_argument("--mailboxes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_path, csv_path = write_inputs(root, args.prospects, args.mailboxes)
        config = load_config(config_path)
        store = Store.open(config.daemon.database)
        start = time.perf_counter()
        report = Importer(store, config, "bench", "alice").run(csv_path, time.time())
        elapsed = time.perf_counter() - start
        store.close()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the baseline loads the file
        assert report.enrolled == args.prospects, report.as_dict()["rejected"][:3]
        counts = sorted(report.assignments.values())
        base = baseline(csv_path, root / "baseline.db")
        print(f"prospects:            {args.prospects} over {args.mailboxes} mailboxes ({counts[0]}-{counts[-1]} each)")
        print(f"cadenced enroll:      {args.prospects / elapsed:,.0f} prospects/s ({elapsed:.2f} s)")
        print(f"baseline (csv+sqlite): {args.prospects / base:,.0f} prospects/s ({base:.2f} s)")
        print(f"ratio to baseline:    {base / elapsed:.2f}")
        print(f"peak RSS of the enroll: {peak_mb:.0f} MB (the baseline holds the whole file in memory; not counted)")
        print("target:               >= 50,000 prospects/s at 1,000,000 rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
