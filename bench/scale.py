"""Benchmark: the read commands and the daemon's start against a large database.

E enrollments of a two-step cadence over M mailboxes, generated straight into
the database (2 messages each: step 1 sent, step 2 scheduled over the next two
weeks; a fixed number in the error outbox, 1 in 50 finished), then timed, each
as a fresh process, the way an operator runs them:

- `status --json`, `outbox --state error --json`, `plan --days 7 --json`
- `cadenced run`: seconds from start to its first send (one message due now),
  and its peak RSS a few seconds later.

Baseline in the same run: `cadenced check` on the same config with no database
yet (what any command costs to load the code and the config).

Targets (10,000,000 enrollments, 20,000,000 messages): each command <= 1 s, first
send <= 1 s, RSS <= 150 MB.

    python bench/scale.py [--enrollments E] [--mailboxes M] [--daily-limit L] [--errors N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import FIRST_STEP, cadenced, free_port, start_sink
from throughput import first_send as time_first_send
from throughput import write_config as bench_config


def write_config(root: Path, port: int, mailboxes: int, daily_limit: int, database: Path) -> Path:
    """A two-step cadence over `mailboxes` at `daily_limit` a day, a gap of 2-4 minutes."""
    steps = [FIRST_STEP, {"wait": "3d", "body": "Hi again {{ first_name }}.\n"}]
    return bench_config(
        root, port, mailboxes, database, daily_limit=daily_limit, gap="2m-4m", steps=steps, name="scale.toml"
    )


def generate(db: Path, enrollments: int, mailboxes: int, errors: int) -> float:
    """Rows straight into the schema the daemon made; returns the seconds it took."""
    started = time.perf_counter()
    now = time.time()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -4000000")  # 4 GB: index pages stay in memory while they fill
        conn.execute("BEGIN")
        # Indexes and triggers are made again afterwards, each in one sorted pass (counts in bulk).
        later = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND sql IS NOT NULL"
        ).fetchall()
        for kind, name, _ in later:
            conn.execute(f"DROP {kind.upper()} {name}")
        conn.execute(
            """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
               INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, state, created_at, ended_at)
               SELECT i, 'bench', 'p' || i || '@prospects.example', 'sender' || (i % ?2) || '@bench.example',
                      'bench', 'bench', '{"first_name":"P","company":"Co"}',
                      CASE WHEN i % 50 = 0 THEN 'finished' ELSE 'active' END, ?3 - 864000,
                      CASE WHEN i % 50 = 0 THEN ?3 END FROM n""",
            (enrollments, mailboxes, now),
        )
        conn.execute(
            """INSERT INTO messages (enrollment_id, step, mailbox, state, reason, due_at, sent_at, message_id,
                                     subject, attempts, smtp_code, detail)
               SELECT id, 1, mailbox, 'sent', NULL, ?1 - 864000, ?1 - 864000 + id % 86400,
                      '<cadenced.' || id || '.1.0@bench.example>', 'Hello Co', 1, 250, '250 ok'
               FROM enrollments""",
            (now,),
        )
        conn.execute(
            """INSERT INTO messages (enrollment_id, step, mailbox, state, reason, due_at, detail, attempts)
               SELECT id, 2, mailbox,
                      CASE WHEN id % 50 = 0 THEN 'cancelled' WHEN id % ?2 = 1 THEN 'error' ELSE 'scheduled' END,
                      CASE WHEN id % ?2 = 1 THEN 'retries_exhausted' END,
                      CASE WHEN id = 1 THEN ?1 - 60 ELSE ?1 + 3600 + (id * 7919) % (14 * 86400) END,
                      CASE WHEN id % ?2 = 1 THEN '451 4.3.0 try again later' END,
                      CASE WHEN id % ?2 = 1 THEN 3 ELSE 0 END
               FROM enrollments""",
            (now, max(enrollments // max(errors, 1), 2)),
        )
        conn.execute("UPDATE messages SET state = 'scheduled', reason = NULL WHERE enrollment_id = 1 AND step = 2")
        conn.execute(
            """INSERT INTO rotation_counts SELECT cadence, mailbox, count(*) FROM enrollments
               GROUP BY cadence, mailbox"""
        )
        conn.execute("INSERT INTO cadence_pins VALUES ('bench', 1, 'adder', ?)", (now,))
        conn.execute("DELETE FROM enrollment_counts")
        conn.execute("INSERT INTO enrollment_counts SELECT cadence, state, count(*) FROM enrollments GROUP BY 1, 2")
        conn.execute("DELETE FROM message_counts")
        conn.execute(
            """INSERT INTO message_counts SELECT mailbox, state, count(*) FROM messages
               WHERE state IN ('scheduled', 'sending', 'error') GROUP BY 1, 2"""
        )
        for _, _, sql in later:
            conn.execute(sql)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    return time.perf_counter() - started


def timed(config: Path, *args: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(cadenced("--config", str(config), *args), check=True, capture_output=True)
    return time.perf_counter() - started, len(out.stdout)


def first_send(config: Path, db: Path) -> tuple[float, float]:
    """One message made due now (again, when the database is kept), then the daemon started."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            """UPDATE messages SET state = 'scheduled', sent_at = NULL, due_at = ?
               WHERE enrollment_id = 1 AND step = 2""",
            (time.time() - 60,),
        )
        conn.execute("UPDATE enrollments SET state = 'active', ended_at = NULL WHERE id = 1")

    def sent_at() -> float | None:
        with sqlite3.connect(db, timeout=30) as conn:
            row = conn.execute(
                "SELECT sent_at FROM messages WHERE enrollment_id = 1 AND step = 2 AND state = 'sent'"
            ).fetchone()
        return float(row[0]) if row else None

    return time_first_send(config, sent_at)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--enrollments", type=int, default=10_000_000)
    parser.add_argument("--mailboxes", type=int, default=100)
    parser.add_argument("--daily-limit", type=int, default=100)
    parser.add_argument("--errors", type=int, default=2_000, help="messages in the error outbox, whatever E is")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the database in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        sink, _ = start_sink(port)
        try:
            db = root / "scale.db"
            config = write_config(root, port, args.mailboxes, args.daily_limit, db)
            if not db.exists():
                subprocess.run(cadenced("--config", str(config), "status"), check=True, capture_output=True)
                built = generate(db, args.enrollments, args.mailboxes, args.errors)
                print(f"generated:                  {args.enrollments:,} enrollments in {built:.0f} s")
            with sqlite3.connect(db) as conn:
                messages = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
            size = db.stat().st_size / 2**30
            print(
                f"database:                   {args.enrollments:,} enrollments, {messages:,} messages, {size:.1f} GiB"
            )
            print(f"mailboxes / daily_limit:    {args.mailboxes} / {args.daily_limit}")
            empty = root / "no-database.toml"
            empty.write_text(config.read_text().replace(str(db), str(root / "not-created.db")))
            base = min(timed(empty, "check")[0] for _ in range(3))
            print(f"{'check, no database (baseline):':<36}{base:.2f} s (best of 3)")
            for command in (
                ("status", "--json"),
                ("outbox", "--state", "error", "--json"),
                ("plan", "--days", "7", "--json"),
            ):
                runs = [timed(config, *command) for _ in range(3)]
                best = min(r[0] for r in runs)
                print(f"{' '.join(command) + ':':<36}{best:.2f} s (best of 3, target <= 1), {runs[0][1]:,} bytes out")
            start, rss = first_send(config, db)
            print(f"run: first send after start {start:.2f} s (target <= 1), peak RSS {rss:.0f} MB (target <= 150)")
        finally:
            sink.terminate()
            sink.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
