"""Benchmark: enroll 100,000 prospects from CSV into a cadence of 20 mailboxes.

Prints prospects/second through `cadenced enroll` (in process, the same code the
command runs) and, as the baseline measured in the same run, a bare loop that
parses the same CSV and inserts the same rows with plain sqlite3 executemany.
Peak RSS is that of this process after the enroll, before the baseline.
Target: >= 50,000 prospects/s for 1,000,000 rows.

    python bench/enroll.py [--prospects N] [--mailboxes M] [--quoted] [--crm] [--utf16]

`--quoted` writes every field in quotes, as some CRMs export them: the csv module then reads every row
(a file with no quote, control character or backslash in a block is split at commas instead).
`--crm` writes the file as a European CRM export: a BOM, CR LF, semicolons, the header as people write it
(`Email Address;First Name;Last Name;Company Name;Job Title`): the delimiter is found and the names mapped.
`--utf16` writes it in UTF-16 with a BOM (Excel's "Unicode text"): decoded and encoded again as it is read.

With `--against DIR` (another checkout of cadenced, say `git worktree add /tmp/old <commit>`), it
compares two builds instead: each imports the same file in a fresh process, the two taking turns
for `--rounds` rounds (which goes first alternates), and it prints each round's times, the
ratio of this build's time to the other's in the same round, and both builds' medians. This
machine's speed drifts by half from one minute to the next; a ratio within one round does not.

    python bench/enroll.py --prospects 300000 --rounds 12 --against /tmp/old
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from daemon.config import load_config
from daemon.enroll import Importer
from daemon.store import Store


def write_inputs(
    root: Path, prospects: int, mailboxes: int, quoted: bool = False, crm: bool = False, utf16: bool = False
) -> tuple[Path, Path]:
    """The config, and a CSV of `prospects` rows; `quoted`: every field in quotes, as some CRMs export them
    (then no block of the file is plain: every row goes through the csv module); `crm`: a BOM, CR LF,
    semicolons and people's column names; `utf16`: in UTF-16 with a BOM."""
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
    encoding = "utf-16" if utf16 else "utf-8-sig" if crm else "utf-8"
    with csv_path.open("w", newline="", encoding=encoding) as f:
        w = csv.writer(
            f,
            quoting=csv.QUOTE_ALL if quoted else csv.QUOTE_MINIMAL,
            delimiter=";" if crm else ",",
            lineterminator="\r\n" if crm else "\n",
        )
        if crm:
            w.writerow(["Email Address", "First Name", "Last Name", "Company Name", "Job Title"])
        else:
            w.writerow(["email", "first_name", "last_name", "company", "title"])
        for i in range(prospects):
            w.writerow([f"person{i}@prospect{i % 997}.example", f"First{i}", f"Last{i}", f"Company {i % 5000}", "CTO"])
    return config_path, csv_path


def baseline(csv_path: Path, db_path: Path, encoding: str = "utf-8", delimiter: str = ",") -> float:
    """Parse the CSV and insert prospect, enrollment and message rows with nothing else."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, email TEXT UNIQUE)")
    conn.execute("CREATE TABLE e (id INTEGER PRIMARY KEY, p INTEGER, mailbox TEXT, fields TEXT)")
    conn.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, e INTEGER, mailbox TEXT, due REAL)")
    start = time.perf_counter()
    with csv_path.open(newline="", encoding=encoding) as f:
        rows = list(csv.reader(f, delimiter=delimiter))[1:]
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


IMPORT_ONCE = """
import sys, time
from pathlib import Path
from daemon.config import load_config
from daemon.enroll import Importer
from daemon.store import Store
config_path, csv_path, database = map(Path, sys.argv[1:4])
store = Store.open(database)
start = time.perf_counter()
report = Importer(store, load_config(config_path), "bench", "alice").run(csv_path, time.time())
elapsed = time.perf_counter() - start
store.close()
print(elapsed, report.enrolled)
"""


def compare(args: argparse.Namespace) -> int:
    """This build against the checkout `args.against`, round by round, each import in a fresh process."""
    builds = {"this": Path(__file__).resolve().parent.parent, "other": Path(args.against).resolve()}
    if not (builds["other"] / "daemon" / "enroll.py").is_file():
        print(f"{builds['other']}: not a checkout of cadenced (no daemon/enroll.py)", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {name: [] for name in builds}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_path, csv_path = write_inputs(root, args.prospects, args.mailboxes, args.quoted, args.crm, args.utf16)
        for n in range(args.rounds):
            order = list(builds) if n % 2 == 0 else list(reversed(builds))
            for name in order:
                database = root / f"{name}-{n}.db"
                run = subprocess.run(
                    [sys.executable, "-c", IMPORT_ONCE, str(config_path), str(csv_path), str(database)],
                    cwd=builds[name],
                    env=dict(os.environ, PYTHONPATH=str(builds[name])),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if run.returncode != 0:
                    print(f"{builds[name]}: the import failed (exit {run.returncode}):\n{run.stderr}", file=sys.stderr)
                    return 1
                elapsed, enrolled = run.stdout.split()
                assert int(enrolled) == args.prospects, run.stdout
                times[name].append(float(elapsed))
                for path in root.glob(f"{name}-{n}.db*"):
                    path.unlink()
            ratios.append(times["this"][-1] / times["other"][-1])
            print(
                f"round {n + 1}: this {times['this'][-1]:.2f} s, other {times['other'][-1]:.2f} s, "
                f"ratio {ratios[-1]:.2f}",
                flush=True,
            )
    for name, label in (("this", "this build"), ("other", str(builds["other"]))):
        rates = sorted(args.prospects / t for t in times[name])
        print(f"{label}: median {statistics.median(rates):,.0f} prospects/s ({rates[0]:,.0f}-{rates[-1]:,.0f})")
    faster = sum(r < 1 for r in ratios)
    print(
        f"time of this build / the other's, round by round: median {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}), this one faster in {faster} of {len(ratios)} rounds"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prospects", type=int, default=100_000)
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--against", metavar="DIR", help="compare with the cadenced checkout in DIR, round by round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of --against (default 10)")
    parser.add_argument("--quoted", action="store_true", help="every field of the CSV in quotes")
    parser.add_argument("--crm", action="store_true", help="a BOM, CR LF, semicolons, people's column names")
    parser.add_argument("--utf16", action="store_true", help="the file in UTF-16 with a BOM")
    args = parser.parse_args()
    if args.rounds < 1 or args.prospects < 1:
        parser.error("--rounds and --prospects must be 1 or more")
    if args.against:
        return compare(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_path, csv_path = write_inputs(root, args.prospects, args.mailboxes, args.quoted, args.crm, args.utf16)
        config = load_config(config_path)
        store = Store.open(config.daemon.database)
        start = time.perf_counter()
        report = Importer(store, config, "bench", "alice").run(csv_path, time.time())
        elapsed = time.perf_counter() - start
        store.close()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the baseline loads the file
        assert report.enrolled == args.prospects, report.as_dict()["rejected"][:3]
        counts = sorted(report.assignments.values())
        encoding = "utf-16" if args.utf16 else "utf-8-sig"
        base = baseline(csv_path, root / "baseline.db", encoding, ";" if args.crm else ",")
        print(f"prospects:            {args.prospects} over {args.mailboxes} mailboxes ({counts[0]}-{counts[-1]} each)")
        print(f"cadenced enroll:      {args.prospects / elapsed:,.0f} prospects/s ({elapsed:.2f} s)")
        print(f"baseline (csv+sqlite): {args.prospects / base:,.0f} prospects/s ({base:.2f} s)")
        print(f"ratio to baseline:    {base / elapsed:.2f}")
        print(f"peak RSS of the enroll: {peak_mb:.0f} MB (the baseline holds the whole file in memory; not counted)")
        print("target:               >= 50,000 prospects/s at 1,000,000 rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
