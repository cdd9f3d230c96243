"""The database: schema, migrations, every SQL statement, transactions."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import PauseRule
from daemon.errors import StoreError

SCHEMA_VERSION = 12

MESSAGE_STATES = ("scheduled", "sending", "sent", "error", "failed", "cancelled")
ENROLLMENT_STATES = ("active", "finished", "replied", "bounced", "stopped")
PENDING = ("scheduled", "sending", "error")

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE suppressions (
        email TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE cadence_pins (
        cadence TEXT PRIMARY KEY,
        auto_rotate INTEGER NOT NULL,
        rotate_among TEXT NOT NULL,
        pinned_at REAL NOT NULL
    );
    CREATE TABLE enrollments (
        id INTEGER PRIMARY KEY,
        cadence TEXT NOT NULL,
        email TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        owner TEXT NOT NULL,
        adder TEXT NOT NULL,
        fields TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'active',
        created_at REAL NOT NULL,
        ended_at REAL,
        UNIQUE (email, cadence)
    );
    CREATE TABLE rotation_counts (
        cadence TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        enrollments INTEGER NOT NULL,
        PRIMARY KEY (cadence, mailbox)
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        enrollment_id INTEGER NOT NULL REFERENCES enrollments(id),
        step INTEGER NOT NULL,
        mailbox TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        due_at REAL NOT NULL,
        sent_at REAL,
        message_id TEXT,
        subject TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        transient_failures INTEGER NOT NULL DEFAULT 0,
        smtp_code INTEGER,
        detail TEXT,
        UNIQUE (enrollment_id, step)
    );
    CREATE INDEX messages_due ON messages (mailbox, due_at) WHERE state = 'scheduled';
    CREATE INDEX messages_open ON messages (state, mailbox) WHERE state IN ('sending', 'error');
    CREATE INDEX messages_by_message_id ON messages (message_id) WHERE message_id IS NOT NULL;
    CREATE TABLE daily_counts (
        mailbox TEXT NOT NULL,
        day TEXT NOT NULL,
        sent INTEGER NOT NULL,
        PRIMARY KEY (mailbox, day)
    );
    CREATE TABLE imap_state (
        mailbox TEXT PRIMARY KEY,
        uidvalidity INTEGER NOT NULL,
        last_uid INTEGER NOT NULL
    );
    CREATE TABLE mailbox_health (
        mailbox TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        reason TEXT,
        since REAL NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        next_probe_at REAL,
        last_send_at REAL,
        not_before REAL,
        quota_day TEXT,
        limit_logged_day TEXT
    );
    """,
    2: """
    ALTER TABLE mailbox_health ADD COLUMN throttled_until REAL;
    ALTER TABLE mailbox_health ADD COLUMN blocks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN uncertain_at REAL;
    ALTER TABLE suppressions ADD COLUMN message INTEGER;
    CREATE TABLE daemon_state (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    """,
    3: """
    CREATE TABLE rotation_cursors (
        cadence TEXT NOT NULL,
        grp TEXT NOT NULL,
        last TEXT NOT NULL,
        PRIMARY KEY (cadence, grp)
    );
    CREATE TABLE rotation_credits (
        cadence TEXT NOT NULL,
        grp TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        credit REAL NOT NULL,
        PRIMARY KEY (cadence, grp, mailbox)
    );
    """,
    # Scans that grew with everything ever sent: a full index on state (the partial one was not used for
    # `state = 'sending'`), and enrollment counts kept by triggers instead of counted for every `status`.
    4: """
    DROP INDEX messages_open;
    CREATE INDEX messages_state ON messages (state, mailbox, reason);
    CREATE TABLE enrollment_counts (
        cadence TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (cadence, state)
    );
    INSERT INTO enrollment_counts SELECT cadence, state, count(*) FROM enrollments GROUP BY cadence, state;
    CREATE TRIGGER enrollment_counted AFTER INSERT ON enrollments BEGIN
        INSERT INTO enrollment_counts VALUES (new.cadence, new.state, 1)
        ON CONFLICT (cadence, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER enrollment_recounted AFTER UPDATE OF state ON enrollments WHEN old.state != new.state BEGIN
        UPDATE enrollment_counts SET n = n - 1 WHERE cadence = old.cadence AND state = old.state;
        INSERT INTO enrollment_counts VALUES (new.cadence, new.state, 1)
        ON CONFLICT (cadence, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER enrollment_uncounted AFTER DELETE ON enrollments BEGIN
        UPDATE enrollment_counts SET n = n - 1 WHERE cadence = old.cadence AND state = old.state;
    END;
    """,
    # `status` counted every scheduled message (2 s at 10,000,000): the counts are now kept as they change,
    # by trigger on update and delete, and by the two places that insert messages (in bulk for an import:
    # a trigger per row would cost an import a fifth more).
    # The due index covers what `plan` reads of each message (its step and enrollment), in claim order.
    5: """
    DROP INDEX messages_due;
    CREATE INDEX messages_due ON messages (mailbox, due_at, id, step, enrollment_id) WHERE state = 'scheduled';
    CREATE TABLE message_counts (
        mailbox TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (mailbox, state)
    ) WITHOUT ROWID;
    INSERT INTO message_counts SELECT mailbox, state, count(*) FROM messages
        WHERE state IN ('scheduled', 'sending', 'error') GROUP BY mailbox, state;
    CREATE TRIGGER message_recounted AFTER UPDATE OF state, mailbox ON messages
    WHEN old.state != new.state OR old.mailbox != new.mailbox BEGIN
        UPDATE message_counts SET n = n - 1 WHERE mailbox = old.mailbox AND state = old.state;
        INSERT INTO message_counts SELECT new.mailbox, new.state, 1 WHERE new.state IN ('scheduled', 'sending', 'error')
        ON CONFLICT (mailbox, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER message_uncounted AFTER DELETE ON messages BEGIN
        UPDATE message_counts SET n = n - 1 WHERE mailbox = old.mailbox AND state = old.state;
    END;
    """,
    # The insert trigger on enrollments cost an import of 1,000,000 rows 2.5 s: the one function that inserts
    # enrollments counts them in bulk, as messages are.
    6: """
    DROP TRIGGER enrollment_counted;
    """,
    # sent_copies = "append": what the server took (250), waiting to be saved to the mailbox's Sent folder.
    7: """
    CREATE TABLE sent_copies (
        message INTEGER PRIMARY KEY,
        mailbox TEXT NOT NULL,
        message_id TEXT NOT NULL,
        content BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        detail TEXT
    );
    CREATE INDEX sent_copies_mailbox ON sent_copies (mailbox, message);
    """,
    # pause_on (SPEC §11): per local day, what the mailbox's sends came to: refused at SMTP time (5xx, also
    # attempts), bounced, blocked (at SMTP time or by a DSN); and a pause the database keeps (not the config).
    8: """
    ALTER TABLE daily_counts ADD COLUMN refused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_counts ADD COLUMN bounces INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_counts ADD COLUMN blocks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE mailbox_health ADD COLUMN paused_reason TEXT;
    """,
    # domain_daily_limit: what each mailbox sent to each recipient domain per local day.
    9: """
    CREATE TABLE domain_counts (
        mailbox TEXT NOT NULL,
        day TEXT NOT NULL,
        domain TEXT NOT NULL,
        sent INTEGER NOT NULL,
        PRIMARY KEY (mailbox, day, domain)
    ) WITHOUT ROWID;
    """,
    # POST /v1/playbooks/…/enrollments: the answer given to each Idempotency-Key, committed with what it did.
    10: """
    CREATE TABLE api_requests (
        key TEXT PRIMARY KEY,
        playbook TEXT NOT NULL,
        digest TEXT NOT NULL,
        answer TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX api_requests_created ON api_requests (created_at);
    """,
    # A trigger costs SQLite about 15 µs a row before its body runs (measured): the claim's and the send's
    # were a sixth of the daemon's CPU per send. The counts of changes are now kept by TEMP triggers every connection
    # installs (COUNTING), except the daemon's group-commit connection, whose claim and send count by hand.
    11: """
    DROP TRIGGER message_recounted;
    DROP TRIGGER enrollment_recounted;
    """,
    # A scheduled message was in two indexes: the due index (by mailbox and time) and the index by state. The
    # second cost an import a third of its message inserts and every claim a delete from it (measured), and
    # nothing read scheduled messages through it: they are read through the due index. It now holds the
    # other states only, written as terms a query's `state = '…'` matches (SQLite's rule for partial indexes).
    12: """
    DROP INDEX messages_state;
    CREATE INDEX messages_state ON messages (state, mailbox, reason) WHERE """
    + " OR ".join(f"state = '{s}'" for s in ("sending", "error", "sent", "failed", "cancelled"))
    + """;
    """,
}

# What the permanent triggers did until schema 11, installed on each connection as it opens (Store.open,
# install_counting): the counts of messages and enrollments follow every change of a state or a mailbox.
COUNTING = (
    """CREATE TEMP TRIGGER IF NOT EXISTS message_recounted AFTER UPDATE OF state, mailbox ON main.messages
    WHEN old.state != new.state OR old.mailbox != new.mailbox BEGIN
        UPDATE message_counts SET n = n - 1 WHERE mailbox = old.mailbox AND state = old.state;
        INSERT INTO message_counts SELECT new.mailbox, new.state, 1 WHERE new.state IN ('scheduled', 'sending', 'error')
        ON CONFLICT (mailbox, state) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS enrollment_recounted AFTER UPDATE OF state ON main.enrollments
    WHEN old.state != new.state BEGIN
        UPDATE enrollment_counts SET n = n - 1 WHERE cadence = old.cadence AND state = old.state;
        INSERT INTO enrollment_counts VALUES (new.cadence, new.state, 1)
        ON CONFLICT (cadence, state) DO UPDATE SET n = n + 1;
    END""",
)
COUNTED_STATES = ("scheduled", "sending", "error")  # of messages, in message_counts


def install_counting(conn: sqlite3.Connection) -> None:
    """The counting triggers on a connection of its own (every writer but the group commit's has them)."""
    for statement in COUNTING:
        conn.execute(statement)


# Told how long each transaction took, BEGIN to COMMIT (lock wait, work, fsync): the daemon's /metrics sets it.
commit_observer: Callable[[float], None] | None = None
IDEMPOTENCY_KEPT = 7 * 86400.0  # an Idempotency-Key is remembered this long (webhooks retry for up to days)


@dataclass(frozen=True, slots=True)
class Pin:
    cadence: str
    auto_rotate: bool
    rotate_among: str
    enrollments: int


class Store:
    """One SQLite connection in WAL mode; writes go through `transaction()`."""

    shared = False  # True on PostgreSQL: several daemons, each sending for the mailboxes it leases
    counts_by_hand = False  # no counting triggers on this connection: claim, record_sent and finish count

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    # --- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        create: bool = True,
        busy_timeout: float = 30.0,
        wait: bool = True,
        counts_by_hand: bool = False,
    ) -> Store:
        """The database of `daemon.database`: an SQLite file, or a PostgreSQL URL (daemon.pg).

        `wait` False: a write that finds another process's lock fails at once (is_busy) instead of waiting.
        `counts_by_hand` (SQLite): no counting triggers; only claim, record_sent and finish_enrollment may
        change a state on this connection (the daemon's group commit). PostgreSQL keeps its triggers.
        """
        if isinstance(path, str):
            from daemon import pg

            return pg.PgStore.connect(path, busy_timeout=busy_timeout, wait=wait)
        if not create and not path.exists():
            raise StoreError(f"{path}: no database here yet (nothing has been enrolled)")
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{path}: cannot create its folder: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open database: {exc}") from None
        store = cls(conn, path)
        # Several processes opening a new file at once (three imports started together) can find it busy in
        # a way SQLite does not wait for: each step here can be taken again, so it is, within busy_timeout.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                store._set_up(busy_timeout if wait else 0.0, counts_by_hand)
                return store
            except sqlite3.DatabaseError as exc:
                store.rollback()
                if is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                conn.close()
                raise StoreError(f"{path}: not a cadenced database ({exc})") from None
            except StoreError:
                conn.close()
                raise

    def _set_up(self, busy_timeout: float, counts_by_hand: bool) -> None:
        conn = self.conn
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{self.path}: cannot switch the database to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")  # a power cut loses no commit (SPEC §6)
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()
        if counts_by_hand:
            self.counts_by_hand = True
        else:
            install_counting(conn)

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema {version} is newer than this cadenced knows "
                f"({SCHEMA_VERSION}); upgrade cadenced"
            )
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            tables = self.conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables:
                raise StoreError(f"{self.path}: an SQLite database of another program (tables, no cadenced schema)")
        with self.transaction():
            current = self.conn.execute("PRAGMA user_version").fetchone()[0]
            for v in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _statements(_MIGRATIONS[v]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {v}")

    def close(self) -> None:
        self.conn.close()

    def holds(self, mailbox: str) -> bool:
        """May this daemon claim the mailbox's messages? On SQLite one daemon sends for every mailbox."""
        return True

    def _list(self, values: Sequence[Any]) -> Any:
        """A list as one parameter: JSON for json_each (PostgreSQL takes an array)."""
        return json.dumps(list(values))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: one writer at a time across processes; nests into an open one."""
        if self.conn.in_transaction:
            yield self.conn
            return
        started = time.perf_counter()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        if commit_observer is not None:
            commit_observer(time.perf_counter() - started)

    @contextmanager
    def enrolling(self) -> Iterator[sqlite3.Connection]:
        """An import's enrolling transaction, its foreign keys not checked: each message it inserts is of an
        enrollment inserted before it in the same transaction. The check cost each message a look-up, a sixth
        of its insert (counted by callgrind). Nested in an open transaction, it is that one, checks and all."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.transaction() as conn:
                yield conn
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")

    def rollback(self) -> None:
        """End the open transaction, if SQLite has not ended it already (disk full, I/O error)."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that brought us here says why

    def check_integrity(self) -> None:
        """A corrupt database is refused (`PRAGMA quick_check`: it reads the whole file)."""
        _refuse_damage(self.conn, self.path)

    # --- the daemon's own state (heartbeat, config it runs) ------------------------------------

    def daemon_state(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT key, value FROM daemon_state")}

    def set_daemon_state(self, values: dict[str, str | None]) -> None:
        with self.transaction():
            self.conn.executemany(
                "INSERT INTO daemon_state VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    # --- pins -----------------------------------------------------------------

    def pins(self) -> dict[str, Pin]:
        rows = self.conn.execute(
            """SELECT p.cadence, p.auto_rotate, p.rotate_among,
                      (SELECT coalesce(sum(n), 0) FROM enrollment_counts c WHERE c.cadence = p.cadence)
               FROM cadence_pins p"""
        ).fetchall()
        return {r[0]: Pin(r[0], bool(r[1]), r[2], r[3]) for r in rows}

    def pin(self, cadence: str, auto_rotate: bool, rotate_among: str, now: float) -> None:
        self.conn.execute(
            "INSERT INTO cadence_pins VALUES (?, ?, ?, ?) ON CONFLICT (cadence) DO NOTHING",
            (cadence, int(auto_rotate), rotate_among, now),
        )

    # --- enrollment -------------------------------------------------------------

    def unsubscribe_key(self) -> bytes:
        """The key of every unsubscribe token (made once; the same across restarts and reloads)."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO daemon_state VALUES ('unsubscribe_key', ?) ON CONFLICT (key) DO NOTHING",
                (secrets.token_hex(32),),
            )
            row = self.conn.execute("SELECT value FROM daemon_state WHERE key = 'unsubscribe_key'").fetchone()
        return bytes.fromhex(row[0])

    def api_answer(self, key: str) -> tuple[str, str, str] | None:
        """(playbook, digest of the request, answer as JSON) given to an Idempotency-Key, if still kept."""
        row = self.conn.execute("SELECT playbook, digest, answer FROM api_requests WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def keep_api_answer(self, key: str, playbook: str, digest: str, answer: str, now: float) -> None:
        """In the transaction of what the request did; keys older than IDEMPOTENCY_KEPT are forgotten."""
        with self.transaction():
            self.conn.execute("DELETE FROM api_requests WHERE created_at < ?", (now - IDEMPOTENCY_KEPT,))
            self.conn.execute("INSERT INTO api_requests VALUES (?, ?, ?, ?, ?)", (key, playbook, digest, answer, now))

    def unsubscribe(self, enrollment: int, now: float, detail: str) -> tuple[str, list[int]] | None:
        """The prospect of `enrollment` asked to hear no more: suppressed, every cadence of theirs stopped."""
        row = self.conn.execute("SELECT email FROM enrollments WHERE id = ?", (enrollment,)).fetchone()
        if row is None:
            return None
        return row[0], self.unsubscribe_address(row[0], now, detail)

    def unsubscribe_address(self, email: str, now: float, detail: str) -> list[int]:
        """Suppressed as unsubscribed; its active enrollments stopped and their pending messages cancelled."""
        self.suppress(email, "unsubscribed", now)
        return self._end("e.email = ?", (email,), "stopped", now, detail)

    def suppress_addresses(self, emails: Sequence[str], reason: str, now: float) -> dict[str, list[int]]:
        """The operator's `cadenced suppress`: each address suppressed, its pending messages cancelled."""
        with self.transaction():
            out = {}
            for email in emails:
                self.suppress(email, reason, now)
                out[email] = self._end("e.email = ?", (email,), "stopped", now, f"address suppressed: {reason}")
            return out

    def unsuppress(self, emails: Sequence[str]) -> list[str]:
        """Suppressions lifted (new imports may enroll the address again; nothing ended is restarted)."""
        with self.transaction():
            return [
                r[0]
                for email in emails
                for r in self.conn.execute("DELETE FROM suppressions WHERE email = ? RETURNING email", (email,))
            ]

    def suppressions(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT email, reason, created_at FROM suppressions ORDER BY created_at, email"
        rows = self.conn.execute(sql + (f" LIMIT {int(limit)}" if limit is not None else ""))
        return [{"email": r[0], "reason": r[1], "created_at": r[2]} for r in rows]

    def suppress(self, email: str, reason: str, now: float) -> None:
        self.conn.execute(
            "INSERT INTO suppressions (email, reason, created_at) VALUES (?, ?, ?) ON CONFLICT (email) DO NOTHING",
            (email, reason, now),
        )

    def start_import(self) -> None:
        """A scratch table (SQLite's temp database: no lock on the real one) for the file being imported."""
        self.conn.execute("DROP TABLE IF EXISTS temp.import_rows")
        self.conn.execute(
            "CREATE TEMP TABLE import_rows (n INTEGER PRIMARY KEY, line INTEGER, email TEXT, owner TEXT, fields TEXT)"
        )

    @contextmanager
    def staging(self) -> Iterator[None]:
        """The staging of a file in one transaction of SQLite's temp database: a commit of the scratch table
        per batch cost an import of 1,000,000 rows 2 s of its 35. Nothing of the real database is read or
        written in it, so no lock or snapshot of the real database is held (a test holds that)."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def stage_import(self, rows: Sequence[tuple[int, str, str, str]]) -> None:
        """Stage (line, email, owner, fields) rows, in file order: each is numbered n = 1, 2, … as it comes."""
        self.conn.executemany("INSERT INTO temp.import_rows (line, email, owner, fields) VALUES (?, ?, ?, ?)", rows)

    def drop_staged_duplicates(self) -> list[tuple[int, str, int]]:
        """(line, email, first line) of each repeated address, dropped from the staged rows (set-based, once)."""
        self.conn.execute("CREATE INDEX temp.import_by_email ON import_rows (email, line)")
        # The addresses seen twice, by one pass over the index (a window over every row took three times as long).
        duplicates = self.conn.execute(
            """SELECT r.n, r.line, r.email, d.first
               FROM (SELECT email, min(line) AS first FROM temp.import_rows GROUP BY email HAVING count(*) > 1) AS d
               JOIN temp.import_rows r ON r.email = d.email AND r.line > d.first"""
        ).fetchall()
        self.conn.executemany("DELETE FROM temp.import_rows WHERE n = ?", [(r[0],) for r in duplicates])
        return [(r[1], r[2], r[3]) for r in duplicates]

    def drop_staged_suppressed(self) -> list[tuple[int, str, str]]:
        """(line, email, reason) of staged addresses on the suppression list, dropped from the staged rows."""
        rows = self.conn.execute(
            "SELECT i.n, i.line, i.email, s.reason FROM temp.import_rows i JOIN suppressions s ON s.email = i.email"
        ).fetchall()
        self.conn.executemany("DELETE FROM temp.import_rows WHERE n = ?", [(r[0],) for r in rows])
        return [(r[1], r[2], r[3]) for r in rows]

    def drop_staged_enrolled(self, cadence: str) -> int:
        """Staged addresses the cadence already has, dropped; returns how many."""
        self.conn.execute(
            """DELETE FROM temp.import_rows AS i
               WHERE EXISTS (SELECT 1 FROM enrollments e WHERE e.email = i.email AND e.cadence = ?)""",
            (cadence,),
        )
        return int(self.conn.execute("SELECT changes()").fetchone()[0])

    def staged_groups(self, by_owner: bool) -> list[tuple[str, int]]:
        """(owner, rows) of the staged rows, or ('', rows) for them all."""
        if by_owner:
            return self.conn.execute("SELECT owner, count(*) FROM temp.import_rows GROUP BY owner").fetchall()
        return [("", int(self.conn.execute("SELECT count(*) FROM temp.import_rows").fetchone()[0]))]

    def drop_staged_group(self, owner: str | None) -> list[tuple[int, str]]:
        """(line, email) of the staged rows of `owner` (None: all), dropped."""
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self.conn.execute(f"SELECT line, email FROM temp.import_rows {where} ORDER BY n", args).fetchall()
        self.conn.execute(f"DELETE FROM temp.import_rows {where}", args)
        return rows

    def staged(self, size: int) -> Iterator[list[tuple[int, str, str, str]]]:
        """The staged rows in file order, `size` at a time."""
        cursor = self.conn.execute("SELECT line, email, owner, fields FROM temp.import_rows ORDER BY n")
        while rows := cursor.fetchmany(size):
            yield rows

    def rotation_counts(self, cadence: str) -> dict[str, int]:
        rows = self.conn.execute("SELECT mailbox, enrollments FROM rotation_counts WHERE cadence = ?", (cadence,))
        return dict(rows.fetchall())

    def rotation_state(self, cadence: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
        """Where the cadence's rotation stopped: per group the last mailbox used, and weighted credits."""
        cursors = dict(self.conn.execute("SELECT grp, last FROM rotation_cursors WHERE cadence = ?", (cadence,)))
        credits = {
            (g, m): c
            for g, m, c in self.conn.execute(
                "SELECT grp, mailbox, credit FROM rotation_credits WHERE cadence = ?", (cadence,)
            )
        }
        return cursors, credits

    def save_rotation(self, cadence: str, cursors: dict[str, str], credits: dict[tuple[str, str], float]) -> None:
        self.conn.executemany(
            """INSERT INTO rotation_cursors VALUES (?, ?, ?)
               ON CONFLICT (cadence, grp) DO UPDATE SET last = excluded.last""",
            [(cadence, g, last) for g, last in cursors.items()],
        )
        self.conn.executemany(
            """INSERT INTO rotation_credits VALUES (?, ?, ?, ?)
               ON CONFLICT (cadence, grp, mailbox) DO UPDATE SET credit = excluded.credit""",
            [(cadence, g, m, c) for (g, m), c in credits.items()],
        )

    def count_enrollments(self, cadence: str, added: dict[str, int]) -> None:
        """Keep the per-mailbox tally rotation balances on (SPEC §3: fewest so far)."""
        self.conn.executemany(
            """INSERT INTO rotation_counts VALUES (?, ?, ?) ON CONFLICT (cadence, mailbox)
               DO UPDATE SET enrollments = rotation_counts.enrollments + excluded.enrollments""",
            ((cadence, mailbox, n) for mailbox, n in added.items()),
        )

    def next_enrollment_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM enrollments").fetchone()[0]) + 1

    def insert_enrollments(self, cadence: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """rows: (id, cadence, email, mailbox, owner, adder, fields_json, created_at), all of `cadence`."""
        self.conn.executemany(
            """INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            rows,
        )
        self._count_enrolled(cadence, len(rows))

    def enroll_staged(
        self, cadence: str, adder: str, now: float, first_id: int, cycles: dict[str, tuple[str, ...]], by_owner: bool
    ) -> None:
        """Every staged row enrolled, ids from `first_id` in file order, in one statement.

        `cycles`: per rotation group ('' for the whole file, else an owner when the group is the owner's)
        the mailboxes its rows take in turn, the i-th row of the group `cycle[i % len(cycle)]`.
        """
        self.conn.execute("DROP TABLE IF EXISTS temp.import_turns")
        self.conn.execute("DROP TABLE IF EXISTS temp.import_cycles")
        self.conn.execute("CREATE TEMP TABLE import_cycles (grp TEXT PRIMARY KEY, turns INTEGER)")
        self.conn.execute(
            "CREATE TEMP TABLE import_turns (grp TEXT, turn INTEGER, mailbox TEXT, PRIMARY KEY (grp, turn))"
        )
        self.conn.executemany("INSERT INTO temp.import_cycles VALUES (?, ?)", [(g, len(c)) for g, c in cycles.items()])
        self.conn.executemany(
            "INSERT INTO temp.import_turns VALUES (?, ?, ?)",
            [(g, i, m) for g, cycle in cycles.items() for i, m in enumerate(cycle)],
        )
        # Rows were numbered n = 1, 2, … as they were staged. While none was dropped since (the usual import:
        # no duplicate, none suppressed or enrolled already) n gives the id and the turn, with no sort and no
        # window: a third of the time of the statement below.
        count, last = self.conn.execute("SELECT count(*), coalesce(max(n), 0) FROM temp.import_rows").fetchone()
        if not by_owner and count == last and "" in cycles:
            # The turn's mailbox by rowid: half the cost per row of a look-up under (grp, turn).
            self.conn.execute("DROP TABLE IF EXISTS temp.import_cycle")
            self.conn.execute("CREATE TEMP TABLE import_cycle (turn INTEGER PRIMARY KEY, mailbox TEXT)")
            self.conn.executemany("INSERT INTO temp.import_cycle VALUES (?, ?)", list(enumerate(cycles[""])))
            self.conn.execute(
                """INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at)
                   SELECT ?1 + r.n - 1, ?2, r.email,
                          (SELECT c.mailbox FROM temp.import_cycle c WHERE c.turn = (r.n - 1) % ?5),
                          r.owner, ?3, r.fields, ?4
                   FROM temp.import_rows r ORDER BY r.n""",
                (first_id, cadence, adder, now, len(cycles[""])),
            )
            self._count_enrolled(cadence, int(self.conn.execute("SELECT changes()").fetchone()[0]))
            return
        # Otherwise numbered again in file order: the whole file's numbers give the ids, the group's the turn.
        # Only (n, numbers) is numbered (a window over whole rows would copy every field); rows are read by n.
        group, turn = ("owner", "row_number() OVER (PARTITION BY owner ORDER BY n) - 1") if by_owner else ("''", "i")
        self.conn.execute(
            f"""INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at)
                SELECT ? + w.i, ?, r.email, t.mailbox, r.owner, ?, r.fields, ?
                FROM (SELECT n, grp, i, {turn} AS k
                      FROM (SELECT n, owner, {group} AS grp, row_number() OVER (ORDER BY n) - 1 AS i
                            FROM temp.import_rows) AS numbered) AS w
                JOIN temp.import_rows r ON r.n = w.n
                JOIN temp.import_cycles c ON c.grp = w.grp
                JOIN temp.import_turns t ON t.grp = w.grp AND t.turn = w.k % c.turns""",
            (first_id, cadence, adder, now),
        )
        self._count_enrolled(cadence, int(self.conn.execute("SELECT changes()").fetchone()[0]))

    def _count_enrolled(self, cadence: str, n: int) -> None:
        """New enrollments, all active (the one place that inserts counts them; changes count by trigger)."""
        self.conn.execute(
            """INSERT INTO enrollment_counts VALUES (?, 'active', ?)
               ON CONFLICT (cadence, state) DO UPDATE SET n = enrollment_counts.n + excluded.n""",
            (cadence, n),
        )

    def schedule_first_steps(
        self, first_id: int, sender: str | None, due_at: float, per_mailbox: dict[str, int]
    ) -> None:
        """Step 1 of every enrollment from `first_id` on (`per_mailbox` of them), from `sender` or its own mailbox."""
        self.conn.execute(
            """INSERT INTO messages (enrollment_id, step, mailbox, state, due_at)
               SELECT id, 1, coalesce(?, mailbox), 'scheduled', ? FROM enrollments WHERE id >= ? ORDER BY id""",
            (sender, due_at, first_id),
        )
        self._count_scheduled([(sender, sum(per_mailbox.values()))] if sender else per_mailbox.items())

    # --- mailbox health ---------------------------------------------------------

    def mailbox_states(self) -> dict[str, tuple[str, str | None]]:
        """(stored state, paused_reason) by mailbox: lifecycle.mailbox_state says what that makes it."""
        rows = self.conn.execute("SELECT mailbox, state, paused_reason FROM mailbox_health")
        return {r[0]: (r[1], r[2]) for r in rows.fetchall()}

    def set_mailbox_state(self, mailbox: str, state: str, reason: str | None, now: float) -> None:
        self.conn.execute(
            """INSERT INTO mailbox_health (mailbox, state, reason, since) VALUES (?, ?, ?, ?)
               ON CONFLICT (mailbox) DO UPDATE SET state = excluded.state, reason = excluded.reason,
               since = excluded.since""",
            (mailbox, state, reason, now),
        )

    # --- read side -----------------------------------------------------------------

    def health(self) -> dict[str, dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM mailbox_health")
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def message_counts(self) -> dict[tuple[str, str], int]:
        """(mailbox, state) → messages scheduled, sending or in error, as kept by every change (not counted here)."""
        rows = self.conn.execute("SELECT mailbox, state, n FROM message_counts WHERE n > 0")
        return {(r[0], r[1]): r[2] for r in rows}

    def _recount(self, mailbox: str, old: str, new: str) -> None:
        """What the counting trigger does for one message, on the connection without it (counts_by_hand)."""
        self.conn.execute("UPDATE message_counts SET n = n - 1 WHERE mailbox = ? AND state = ?", (mailbox, old))
        if new in COUNTED_STATES:
            self.conn.execute(
                "INSERT INTO message_counts VALUES (?, ?, 1) ON CONFLICT (mailbox, state) DO UPDATE SET n = n + 1",
                (mailbox, new),
            )

    def _count_scheduled(self, added: Iterable[tuple[str, int]]) -> None:
        """New scheduled messages (the one place that inserts counts them; updates count by trigger)."""
        self.conn.executemany(
            """INSERT INTO message_counts VALUES (?, 'scheduled', ?)
               ON CONFLICT (mailbox, state) DO UPDATE SET n = message_counts.n + excluded.n""",
            added,
        )

    def sent_on(self, mailbox: str, day: str) -> int:
        row = self.conn.execute(
            "SELECT sent FROM daily_counts WHERE mailbox = ? AND day = ?", (mailbox, day)
        ).fetchone()
        return int(row[0]) if row else 0

    def enrollment_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for cadence, state, n in self.conn.execute("SELECT cadence, state, n FROM enrollment_counts WHERE n > 0"):
            out.setdefault(cadence, {})[state] = n
        return out

    def earliest_due(self, mailbox: str) -> float | None:
        row = self.conn.execute(
            "SELECT min(due_at) FROM messages WHERE mailbox = ? AND state = 'scheduled'", (mailbox,)
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def outbox(
        self,
        *,
        state: str | None = None,
        mailbox: str | None = None,
        cadence: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if state:
            if state not in MESSAGE_STATES:
                return []
            where.append(f"m.state = '{state}'")  # written out: a partial index is chosen by its value
        if mailbox:
            where.append("m.mailbox = ?")
            args.append(mailbox)
        if cadence:
            where.append("e.cadence = ?")
            args.append(cadence)
        # By state, always through its index: with ANALYZE statistics (a state is a quarter of 20,000,000 rows
        # on average) SQLite would rather scan every message in id order than sort the few in error.
        indexed = {None: "", "": "", "scheduled": " INDEXED BY messages_due"}.get(state, " INDEXED BY messages_state")
        sql = f"""SELECT m.id, e.cadence, e.email, m.step, m.mailbox, m.state, m.reason, m.due_at,
                        m.sent_at, m.message_id, m.attempts, m.smtp_code, m.detail
                 FROM messages m{indexed} JOIN enrollments e ON e.id = m.enrollment_id"""
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        keys = (
            "id",
            "cadence",
            "prospect",
            "step",
            "mailbox",
            "state",
            "reason",
            "due_at",
            "sent_at",
            "message_id",
            "attempts",
            "smtp_code",
            "detail",
        )
        return [dict(zip(keys, r, strict=True)) for r in self.conn.execute(sql, args)]

    # --- the sending side --------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever another connection commits: how the daemon notices other commands."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def recover_sending(self, now: float) -> list[int]:
        """Messages left in `sending` by a crash: maybe delivered, so never resent by themselves."""
        with self.transaction():
            rows = self.conn.execute(
                """UPDATE messages SET state = 'error', reason = 'uncertain', uncertain_at = ?,
                   detail = 'found in sending at start-up: the daemon stopped mid-transaction'
                   WHERE state = 'sending' RETURNING id""",
                (now,),
            ).fetchall()
        return [r[0] for r in rows]

    def snapshot(self, mailbox: str, day: str) -> Snapshot:
        row = self.conn.execute(
            """SELECT (SELECT min(due_at) FROM messages WHERE mailbox = ?1 AND state = 'scheduled'),
                      (SELECT sent FROM daily_counts WHERE mailbox = ?1 AND day = ?2),
                      h.not_before, coalesce(h.state, 'connected'), h.quota_day, h.limit_logged_day,
                      h.next_probe_at, h.failures, h.throttled_until,
                      (SELECT min(day) FROM daily_counts WHERE mailbox = ?1 AND sent > 0), h.paused_reason, h.since
               FROM (SELECT 1) AS one LEFT JOIN mailbox_health h ON h.mailbox = ?1""",
            (mailbox, day),
        ).fetchone()
        r = row
        return Snapshot(r[0], r[1] or 0, r[2], r[3], r[4], r[5], r[6], r[7] or 0, r[8], r[9], r[10], r[11])

    def sent_on_days(self, wanted: Sequence[tuple[str, str]]) -> dict[str, int]:
        """Sends of each (mailbox, local day) in one statement per 5,000 (a scrape of 10,000 mailboxes)."""
        out: dict[str, int] = {}
        for i in range(0, len(wanted), 5000):
            rows = self.conn.execute(
                """SELECT d.mailbox, d.sent FROM json_each(?) j
                   JOIN daily_counts d ON d.mailbox = json_extract(j.value, '$[0]')
                                      AND d.day = json_extract(j.value, '$[1]')""",
                (json.dumps(wanted[i : i + 5000]),),
            )
            out.update((r[0], int(r[1])) for r in rows)
        return out

    def first_send_days(self, mailboxes: Sequence[str]) -> dict[str, str]:
        """first_send_day of many mailboxes, each by the index."""
        out: dict[str, str] = {}
        for i in range(0, len(mailboxes), 5000):
            rows = self.conn.execute(
                """SELECT j.value, (SELECT min(day) FROM daily_counts WHERE mailbox = j.value AND sent > 0)
                   FROM json_each(?) j""",
                (json.dumps(list(mailboxes[i : i + 5000])),),
            )
            out.update((r[0], r[1]) for r in rows if r[1] is not None)
        return out

    def first_send_day(self, mailbox: str) -> str | None:
        """The local day of the mailbox's first send ever (warm-up counts from it)."""
        row = self.conn.execute(
            "SELECT min(day) FROM daily_counts WHERE mailbox = ? AND sent > 0", (mailbox,)
        ).fetchone()
        return str(row[0]) if row[0] is not None else None

    # --- reputation (pause_on) ---------------------------------------------------------

    def count_failure(self, mailbox: str, day: str, kind: str, at_smtp: bool, n: int = 1) -> None:
        """A bounce or a block of one of the mailbox's messages (`n` < 0 takes some back)."""
        column = {"bounced": "bounces", "blocked": "blocks"}[kind]
        self.conn.execute(
            f"""INSERT INTO daily_counts (mailbox, day, sent, refused, {column}) VALUES (?1, ?2, 0, ?3, max(?4, 0))
                ON CONFLICT (mailbox, day) DO UPDATE SET refused = max(daily_counts.refused + ?3, 0),
                {column} = max(daily_counts.{column} + ?4, 0)""",
            (mailbox, day, n if at_smtp else 0, n),
        )

    def reputation(self, mailbox: str, since_day: str) -> tuple[int, int, int]:
        """(attempts, bounces, blocks) of the mailbox's local days from `since_day` on."""
        row = self.conn.execute(
            """SELECT coalesce(sum(sent + refused), 0), coalesce(sum(bounces), 0), coalesce(sum(blocks), 0)
               FROM daily_counts WHERE mailbox = ? AND day >= ?""",
            (mailbox, since_day),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def pause_if(self, mailbox: str, rule: PauseRule, since_day: str, now: float) -> tuple[str, tuple[int, ...]] | None:
        """Past a rate of `rule` over the window: paused (kept here, not in the config). (reason, numbers) when
        it is newly paused; None when it stays as it was."""
        with self.transaction():
            numbers = self.reputation(mailbox, since_day)
            reason = rule.reason(*numbers)
            if reason is None or not self.pause(mailbox, f"auto-paused: {reason}", now):
                return None
        return reason, numbers

    def pause(self, mailbox: str, reason: str, now: float) -> bool:
        """Paused with `reason` until `mailbox resume`; False when it already was."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO mailbox_health (mailbox, state, since) VALUES (?, 'connected', ?) ON CONFLICT DO NOTHING",
                (mailbox, now),
            )
            rows = self.conn.execute(
                "UPDATE mailbox_health SET paused_reason = ? WHERE mailbox = ? AND paused_reason IS NULL RETURNING 1",
                (reason, mailbox),
            ).fetchall()
        return bool(rows)

    def resume(self, mailbox: str) -> str | None:
        """Unpaused; its bounce and block counts start afresh (else the next bounce pauses it again). Returns
        the reason it was paused for, None when it was not."""
        with self.transaction():
            row = self.conn.execute(
                "SELECT paused_reason FROM mailbox_health WHERE mailbox = ? AND paused_reason IS NOT NULL", (mailbox,)
            ).fetchone()
            if row is None:
                return None
            self.conn.execute("UPDATE mailbox_health SET paused_reason = NULL WHERE mailbox = ?", (mailbox,))
            self.conn.execute("UPDATE daily_counts SET bounces = 0, blocks = 0 WHERE mailbox = ?", (mailbox,))
            # What waited only for the pause no longer says so (the loop says anew what it waits for, if anything).
            self.conn.execute(
                """UPDATE messages SET detail = NULL WHERE mailbox = ? AND state = 'scheduled'
                   AND detail LIKE 'deferred: paused (%'""",
                (mailbox,),
            )
        return str(row[0])

    def next_due_domain(self, mailbox: str, now: float) -> str | None:
        """The recipient domain of the message `claim` would take now."""
        row = self.conn.execute(
            """SELECT e.email FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
               WHERE m.mailbox = ? AND m.state = 'scheduled' AND m.due_at <= ? ORDER BY m.due_at, m.id LIMIT 1""",
            (mailbox, now),
        ).fetchone()
        return domain_of(row[0]) if row else None

    def domain_counts_on(self, mailbox: str, day: str) -> list[tuple[str, str, int]]:
        """(day, domain, sent) of the mailbox's local `day` (what plan starts from)."""
        rows = self.conn.execute(
            "SELECT day, domain, sent FROM domain_counts WHERE mailbox = ? AND day = ?", (mailbox, day)
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def email_of(self, enrollment: int) -> str:
        row = self.conn.execute("SELECT email FROM enrollments WHERE id = ?", (enrollment,)).fetchone()
        return str(row[0]) if row else ""

    def domain_sent(self, mailbox: str, day: str, domain: str) -> int:
        row = self.conn.execute(
            "SELECT sent FROM domain_counts WHERE mailbox = ? AND day = ? AND domain = ?", (mailbox, day, domain)
        ).fetchone()
        return int(row[0]) if row else 0

    def defer_domain(self, mailbox: str, domain: str, now: float, until: float, detail: str) -> list[int]:
        """domain_daily_limit reached: the mailbox's due messages to `domain` wait until `until`, in their order
        (the others go on). Costs the mailbox's due messages, once per domain and day."""
        with self.transaction():
            rows = self.conn.execute(
                """UPDATE messages SET due_at = ?1 + (due_at - ?5) / 1e6, detail = ?2 WHERE id IN (
                       SELECT m.id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
                       WHERE m.mailbox = ?3 AND m.state = 'scheduled' AND m.due_at <= ?5
                       AND substr(e.email, instr(e.email, '@') + 1) = ?4)
                   RETURNING id""",
                (until, detail, mailbox, domain, now),
            ).fetchall()
        return [r[0] for r in rows]

    def claim(self, mailbox: str, now: float, message_id: Callable[[int, int], str]) -> Claimed | None:
        """The oldest due message of `mailbox`, moved to `sending` and committed before any send."""
        with self.transaction():
            row = self.conn.execute(
                """SELECT m.id, m.enrollment_id, m.step, m.mailbox, e.cadence, e.email, e.fields, m.due_at,
                          m.attempts, m.transient_failures, e.mailbox
                   FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
                   WHERE m.mailbox = ? AND m.state = 'scheduled' AND m.due_at <= ?
                   ORDER BY m.due_at, m.id LIMIT 1""",
                (mailbox, now),
            ).fetchone()
            if row is None:
                return None
            attempts = row[8] + 1
            mid = message_id(row[0], attempts)
            self.conn.execute(
                """UPDATE messages SET state = 'sending', attempts = ?, message_id = ?, reason = NULL, detail = NULL
                   WHERE id = ?""",
                (attempts, mid, row[0]),
            )
            if self.counts_by_hand:
                self._recount(row[3], "scheduled", "sending")
        return Claimed(
            id=row[0],
            enrollment_id=row[1],
            step=row[2],
            mailbox=row[3],
            cadence=row[4],
            email=row[5],
            fields={"email": row[5], **json.loads(row[6])},  # the address is stored once, in its own column
            due_at=row[7],
            attempts=attempts,
            transient_failures=row[9],
            sticky=row[10],
            message_id=mid,
        )

    def thread(self, enrollment_id: int, before_step: int) -> list[tuple[int, str, str]]:
        """(step, message_id, subject) of the enrollment's sent messages, in order."""
        rows = self.conn.execute(
            """SELECT step, message_id, subject FROM messages
               WHERE enrollment_id = ? AND state = 'sent' AND step < ? ORDER BY step""",
            (enrollment_id, before_step),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def record_sent(self, r: SentRecord) -> None:
        """Sent: the message, the day's count, the gap, the next step and the copy for Sent, in one commit."""
        c, now, code, text, subject, day = r.claimed, r.at, r.code, r.text, r.subject, r.day
        gap_until, next_step, copy, count_domain = r.gap_until, r.next_step, r.copy, r.count_domain
        with self.transaction():
            if count_domain:
                self.conn.execute(
                    """INSERT INTO domain_counts VALUES (?, ?, ?, 1)
                       ON CONFLICT (mailbox, day, domain) DO UPDATE SET sent = domain_counts.sent + 1""",
                    (c.mailbox, day, domain_of(c.email)),
                )
            if copy is not None:
                self.conn.execute(
                    """INSERT INTO sent_copies (message, mailbox, message_id, content) VALUES (?, ?, ?, ?)
                       ON CONFLICT DO NOTHING""",
                    (c.id, c.mailbox, c.message_id, copy),
                )
            was = None
            if self.counts_by_hand:
                was = self.conn.execute("SELECT mailbox, state FROM messages WHERE id = ?", (c.id,)).fetchone()
            self.conn.execute(
                """UPDATE messages SET state = 'sent', sent_at = ?, smtp_code = ?, detail = ?, subject = ?
                   WHERE id = ?""",
                (now, code, text, subject, c.id),
            )
            if was is not None and was[1] != "sent":
                self._recount(was[0], was[1], "sent")
            self.conn.execute(
                """INSERT INTO daily_counts (mailbox, day, sent) VALUES (?, ?, 1)
                   ON CONFLICT (mailbox, day) DO UPDATE SET sent = daily_counts.sent + 1""",
                (c.mailbox, day),
            )
            self.conn.execute(
                """INSERT INTO mailbox_health (mailbox, state, since, last_send_at, not_before)
                   VALUES (?, 'connected', ?, ?, ?)
                   ON CONFLICT (mailbox) DO UPDATE SET last_send_at = excluded.last_send_at,
                   not_before = excluded.not_before, throttled_until = NULL""",
                (c.mailbox, now, now, gap_until),
            )
            if next_step is not None:
                step, mailbox, due = next_step
                self.schedule_step(c.enrollment_id, step, mailbox, due)
            else:
                self.finish_enrollment(c.enrollment_id, now)

    def sent_copies_due(self, mailbox: str, limit: int) -> list[tuple[int, str, bytes]]:
        """(message, Message-ID, content) of sent messages not yet saved in the mailbox's Sent folder."""
        rows = self.conn.execute(
            "SELECT message, message_id, content FROM sent_copies WHERE mailbox = ? ORDER BY message LIMIT ?",
            (mailbox, limit),
        )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def copy_filed(self, message: int) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM sent_copies WHERE message = ?", (message,))

    def copy_failed(self, message: int, detail: str) -> None:
        with self.transaction():
            self.conn.execute(
                "UPDATE sent_copies SET attempts = attempts + 1, detail = ? WHERE message = ?", (detail, message)
            )

    def reschedule(self, message: int, due_at: float, code: int | None, detail: str, transient: bool) -> None:
        """Back to `scheduled` (a 4xx to retry later, or a deferral): nothing was delivered."""
        with self.transaction():
            self.conn.execute(
                """UPDATE messages SET state = 'scheduled', due_at = ?, smtp_code = ?, detail = ?,
                   transient_failures = transient_failures + ? WHERE id = ?""",
                (due_at, code, detail, int(transient), message),
            )

    def record_error(self, message: int, reason: str, code: int | None, detail: str, now: float = 0.0) -> None:
        with self.transaction():
            self.conn.execute(
                """UPDATE messages SET state = 'error', reason = ?, smtp_code = ?, detail = ?,
                   uncertain_at = CASE WHEN ? = 'uncertain' THEN ? END WHERE id = ?""",
                (reason, code, detail, reason, now, message),
            )

    def record_failed(
        self, c: Claimed, now: float, code: int | None, detail: str, suppress: bool, day: str = ""
    ) -> list[int]:
        """A permanent refusal of this message.

        suppress (the address does not exist): the enrollment bounced, the address suppressed and every
        pending message to it cancelled. Otherwise (blocked): this enrollment stops, the address is kept,
        and the block counts against the mailbox's health. Either counts on the mailbox's local `day`.
        """
        with self.transaction():
            if day:
                self.count_failure(c.mailbox, day, "bounced" if suppress else "blocked", at_smtp=True)
            self.conn.execute(
                "UPDATE messages SET state = 'failed', reason = ?, smtp_code = ?, detail = ? WHERE id = ?",
                ("bounced" if suppress else "blocked", code, detail, c.id),
            )
            if not suppress:
                self._count_block(c.mailbox, now)
                return self._end("e.id = ?", (c.enrollment_id,), "stopped", now, f"{BLOCKED_BY} {c.id}")
            self.conn.execute(
                "INSERT INTO suppressions VALUES (?, ?, ?, ?) ON CONFLICT (email) DO NOTHING",
                (c.email, f"bounced {code or ''} {detail}".strip()[:200], now, c.id),
            )
            return self._bounced(c.email, c.enrollment_id, now, f"{SUPPRESSED_BY} {c.id}")

    def cut_uncertain(self, message: int, now: float, detail: str) -> bool:
        """A transaction cut by a stop: `uncertain` if it was still in flight (True), unchanged otherwise."""
        with self.transaction():
            rows = self.conn.execute(
                """UPDATE messages SET state = 'error', reason = 'uncertain', uncertain_at = ?, detail = ?
                   WHERE id = ? AND state = 'sending' RETURNING id""",
                (now, detail, message),
            ).fetchall()
        return bool(rows)

    def unblame(self, mailbox: str, messages: Sequence[int], now: float, detail: str, day: str = "") -> list[int]:
        """Refusals that turned out to be the mailbox's (the same one for several recipients in a row):
        undo what they did to the prospects (and to the day's bounce counts), and put the messages in the error
        section as `refused`."""
        ids = self._list(list(messages))
        with self.transaction():
            if day:
                for kind, n in self.conn.execute(
                    """SELECT reason, count(*) FROM messages WHERE state = 'failed' AND reason IN ('bounced', 'blocked')
                       AND id IN (SELECT value FROM json_each(?)) GROUP BY reason""",
                    (ids,),
                ).fetchall():
                    self.count_failure(mailbox, day, kind, at_smtp=True, n=-n)
            restored = self.conn.execute(
                """UPDATE messages SET state = 'scheduled', detail = 'restored: the refusal was the sender''s'
                   WHERE state = 'cancelled' AND detail IN
                   (SELECT ?2 || ' ' || value FROM json_each(?1) UNION SELECT ?3 || ' ' || value FROM json_each(?1))
                   RETURNING enrollment_id""",
                (ids, SUPPRESSED_BY, BLOCKED_BY),
            ).fetchall()
            self.conn.execute("DELETE FROM suppressions WHERE message IN (SELECT value FROM json_each(?))", (ids,))
            enrollments = {r[0] for r in restored}
            enrollments |= {
                r[0]
                for r in self.conn.execute(
                    "SELECT enrollment_id FROM messages WHERE id IN (SELECT value FROM json_each(?))", (ids,)
                )
            }
            self.conn.execute(
                """UPDATE enrollments SET state = 'active', ended_at = NULL
                   WHERE state IN ('bounced', 'stopped') AND id IN (SELECT value FROM json_each(?))""",
                (self._list(sorted(enrollments)),),
            )
            self.conn.execute(
                """UPDATE mailbox_health SET blocks = max(blocks - (SELECT count(*) FROM messages
                   WHERE reason = 'blocked' AND id IN (SELECT value FROM json_each(?1))), 0) WHERE mailbox = ?2""",
                (ids, mailbox),
            )
            rows = self.conn.execute(
                """UPDATE messages SET state = 'error', reason = 'refused', detail = ?
                   WHERE state = 'failed' AND id IN (SELECT value FROM json_each(?)) RETURNING id""",
                (detail, ids),
            ).fetchall()
        return [r[0] for r in rows]

    def throttle(self, message: int, mailbox: str, until: float, code: int | None, detail: str) -> None:
        """The server asked the whole client to wait: the message keeps its place and its retries."""
        with self.transaction():
            self.conn.execute(
                "UPDATE messages SET state = 'scheduled', smtp_code = ?, detail = ? WHERE id = ?",
                (code, detail, message),
            )
            self.conn.execute(
                """INSERT INTO mailbox_health (mailbox, state, since, throttled_until)
                   VALUES (?, 'connected', ?, ?)
                   ON CONFLICT (mailbox) DO UPDATE SET throttled_until = excluded.throttled_until""",
                (mailbox, until, until),
            )

    def _end(self, where: str, args: tuple[Any, ...], state: str, now: float, detail: str) -> list[int]:
        """The one way enrollments end early (replied, stopped, the others of a bounced address): the active ones
        of `where` take `state`, and every message of theirs not yet sent is cancelled with `detail`."""
        rows = self.conn.execute(
            f"""UPDATE messages SET state = 'cancelled', detail = ?
                WHERE state IN ('scheduled', 'error') AND enrollment_id IN
                (SELECT e.id FROM enrollments e WHERE {where}) RETURNING id""",
            (detail, *args),
        ).fetchall()
        self.conn.execute(
            f"""UPDATE enrollments SET state = ?, ended_at = ?
                WHERE state = 'active' AND id IN (SELECT e.id FROM enrollments e WHERE {where})""",
            (state, now, *args),
        )
        return [r[0] for r in rows]

    def disconnect(
        self, mailbox: str, now: float, detail: str, next_probe_at: float | None, state: str = "disconnected"
    ) -> list[int]:
        """The mailbox's problem: it goes to the retry queue with all its scheduled messages.

        `disconnected` is probed with backoff; `refused` (the server refuses this sender) waits for the
        operator: a reload that changes its settings, a restart, or `outbox retry`.
        """
        with self.transaction():
            self.conn.execute(
                """INSERT INTO mailbox_health (mailbox, state, reason, since, failures, next_probe_at)
                   VALUES (?1, ?5, ?2, ?3, 1, ?4)
                   ON CONFLICT (mailbox) DO UPDATE SET
                   since = CASE WHEN mailbox_health.state = ?5 THEN mailbox_health.since ELSE excluded.since END,
                   failures = CASE WHEN mailbox_health.state = ?5 THEN mailbox_health.failures + 1 ELSE 1 END,
                   state = ?5, reason = excluded.reason, next_probe_at = excluded.next_probe_at""",
                (mailbox, detail, now, next_probe_at, state),
            )
            ids = self._unsent_to_error(mailbox, state, detail)
        return ids

    def reconnect(self, mailbox: str, now: float) -> list[int]:
        """A probe succeeded: connected again, its `disconnected` errors back to `scheduled`."""
        with self.transaction():
            self.set_mailbox_state(mailbox, "connected", None, now)
            self.conn.execute(
                "UPDATE mailbox_health SET failures = 0, next_probe_at = NULL WHERE mailbox = ?", (mailbox,)
            )
            rows = self.conn.execute(
                """UPDATE messages SET state = 'scheduled', reason = NULL, detail = 'back from the retry queue'
                   WHERE mailbox = ? AND state = 'error' AND reason IN ('disconnected', 'refused') RETURNING id""",
                (mailbox,),
            ).fetchall()
        return [r[0] for r in rows]

    def catch_due_while_down(self, mailbox: str, now: float) -> list[int]:
        """Messages reaching their due time while the mailbox is down join its error section."""
        with self.transaction():
            rows = self.conn.execute(
                """UPDATE messages SET state = 'error', reason = coalesce(
                       (SELECT state FROM mailbox_health WHERE mailbox = ?1), 'disconnected'),
                   detail = 'came due while the mailbox was ' || coalesce(
                       (SELECT state FROM mailbox_health WHERE mailbox = ?1), 'disconnected')
                   WHERE mailbox = ?1 AND state = 'scheduled' AND due_at <= ?2 RETURNING id""",
                (mailbox, now),
            ).fetchall()
        return [r[0] for r in rows]

    def set_probe(self, mailbox: str, next_probe_at: float, detail: str) -> None:
        with self.transaction():
            self.conn.execute(
                """UPDATE mailbox_health SET next_probe_at = ?, failures = failures + 1, reason = ?
                   WHERE mailbox = ?""",
                (next_probe_at, detail, mailbox),
            )

    def mark_deferred(self, mailbox: str, until: float, detail: str) -> list[int]:
        """Say on each due message why it waits; returns the ones newly told (logged once each)."""
        with self.transaction():
            rows = self.conn.execute(
                """UPDATE messages SET detail = ?1 WHERE mailbox = ?2 AND state = 'scheduled' AND due_at < ?3
                   AND (detail IS NULL OR substr(detail, 1, length(?1)) != ?1) RETURNING id""",
                (detail, mailbox, until),
            ).fetchall()
        return [r[0] for r in rows]

    def note_limit(self, mailbox: str, day: str, quota: bool, now: float) -> bool:
        """Record that `day` is full for `mailbox`; True the first time (to log it once)."""
        with self.transaction():
            self.conn.execute(
                """INSERT INTO mailbox_health (mailbox, state, since) VALUES (?, 'connected', ?)
                   ON CONFLICT (mailbox) DO NOTHING""",
                (mailbox, now),
            )
            if quota:
                self.conn.execute("UPDATE mailbox_health SET quota_day = ? WHERE mailbox = ?", (day, mailbox))
            changed = self.conn.execute(
                """UPDATE mailbox_health SET limit_logged_day = ?1 WHERE mailbox = ?2
                   AND (limit_logged_day IS NULL OR limit_logged_day != ?1) RETURNING mailbox""",
                (day, mailbox),
            ).fetchall()
        return bool(changed)

    def orphan_removed_mailboxes(self, configured: set[str], now: float) -> list[tuple[str, int]]:
        """Pending messages of mailboxes no longer in the config go to error/mailbox_removed."""
        known = {r[0] for r in self.conn.execute("SELECT DISTINCT mailbox FROM rotation_counts")}
        known |= {r[0] for r in self.conn.execute("SELECT mailbox FROM mailbox_health")}
        out: list[tuple[str, int]] = []
        for mailbox in sorted(known - configured):
            with self.transaction():
                ids = self._unsent_to_error(
                    mailbox, "mailbox_removed", "its mailbox left the config: use outbox reassign to move it"
                )
            out += [(mailbox, i) for i in ids]
        return out

    def _unsent_to_error(self, mailbox: str, reason: str, detail: str) -> list[int]:
        """The mailbox's scheduled and sending messages into the retry queue: one statement a state, each on
        its own index (scheduled ones are in the due index only)."""
        ids = [
            r[0]
            for state in ("scheduled", "sending")
            for r in self.conn.execute(
                f"""UPDATE messages SET state = 'error', reason = ?, detail = ?
                    WHERE mailbox = ? AND state = '{state}' RETURNING id""",
                (reason, detail, mailbox),
            ).fetchall()
        ]
        return sorted(ids)

    # --- operator actions on the outbox -------------------------------------------

    def messages_by_id(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        rows = self.conn.execute(
            """SELECT m.id, m.state, m.reason, m.mailbox, m.enrollment_id, m.step, e.cadence, e.email
               FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
               WHERE m.id IN (SELECT value FROM json_each(?))""",
            (self._list(list(ids)),),
        )
        keys = ("id", "state", "reason", "mailbox", "enrollment_id", "step", "cadence", "email")
        return {r[0]: dict(zip(keys, r, strict=True)) for r in rows}

    def error_ids(self, mailbox: str | None, *, exclude_uncertain: bool = False) -> list[int]:
        sql = "SELECT id FROM messages INDEXED BY messages_state WHERE state = 'error'"  # see outbox()
        if exclude_uncertain:
            sql += " AND coalesce(reason, '') != 'uncertain'"
        args: tuple[Any, ...] = ()
        if mailbox is not None:
            sql += " AND mailbox = ?"
            args = (mailbox,)
        return [r[0] for r in self.conn.execute(sql + " ORDER BY id", args)]

    def pending_ids(self, mailbox: str, *, exclude_uncertain: bool = False) -> list[int]:
        """Messages of `mailbox` not yet sent: scheduled, sending or in the error section."""
        extra = " AND coalesce(reason, '') != 'uncertain'" if exclude_uncertain else ""
        rows = self.conn.execute(
            " UNION ALL ".join(
                f"SELECT id FROM messages WHERE mailbox = ?1 AND state = '{state}'{extra}" for state in PENDING
            )
            + " ORDER BY id",
            (mailbox,),
        )
        return [r[0] for r in rows]

    def retry(self, ids: Sequence[int]) -> int:
        """error → scheduled, on the operator's word (uncertain ones included)."""
        rows = self.conn.execute(
            """UPDATE messages SET state = 'scheduled', reason = NULL, transient_failures = 0,
               detail = 'retried by the operator (was ' || coalesce(reason, 'error') || ')'
               WHERE state = 'error' AND id IN (SELECT value FROM json_each(?)) RETURNING id""",
            (self._list(list(ids)),),
        ).fetchall()
        return len(rows)

    def reassign(self, enrollment_ids: Sequence[int], to: str) -> list[int]:
        """Move enrollments to `to`: their sticky sender and every message not yet sent."""
        ids = self._list(list(enrollment_ids))
        for cadence, mailbox, n in self.conn.execute(
            """SELECT cadence, mailbox, count(*) FROM enrollments
               WHERE id IN (SELECT value FROM json_each(?)) AND mailbox != ? GROUP BY cadence, mailbox""",
            (ids, to),
        ).fetchall():
            self.count_enrollments(cadence, {mailbox: -n, to: n})
        self.conn.execute(
            "UPDATE enrollments SET mailbox = ? WHERE id IN (SELECT value FROM json_each(?))",
            (to, ids),
        )
        rows = self.conn.execute(
            """UPDATE messages SET mailbox = ?1, state = 'scheduled', reason = NULL, transient_failures = 0,
               detail = 'reassigned to ' || ?1 || ' (was ' || mailbox || ')'
               WHERE state IN ('scheduled', 'error') AND enrollment_id IN (SELECT value FROM json_each(?2))
               RETURNING id""",
            (to, ids),
        ).fetchall()
        return [r[0] for r in rows]

    def never_contacted(self, mailbox: str) -> list[tuple[int, str, str, str]]:
        """(enrollment, cadence, owner, adder) of the mailbox's active enrollments whose first step has not
        gone (waiting in the retry queue or scheduled): nobody has heard from it yet. Uncertain ones are not
        among them (they may have been delivered)."""
        rows = self.conn.execute(
            """SELECT e.id, e.cadence, e.owner, e.adder FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
               WHERE m.state = 'error' AND m.mailbox = ?1 AND m.reason IN ('disconnected', 'refused') AND m.step = 1
               AND e.mailbox = ?1 AND e.state = 'active'
               UNION ALL
               SELECT e.id, e.cadence, e.owner, e.adder FROM messages m JOIN enrollments e ON e.id = m.enrollment_id
               WHERE m.state = 'scheduled' AND m.mailbox = ?1 AND m.step = 1 AND e.mailbox = ?1 AND e.state = 'active'
               ORDER BY 1""",
            (mailbox,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def probe_now(self, mailbox: str, now: float) -> None:
        """A changed password (reload, restart): try the disconnected mailbox at once."""
        self.conn.execute(
            "UPDATE mailbox_health SET next_probe_at = ? WHERE mailbox = ? AND state IN ('disconnected', 'refused')",
            (now, mailbox),
        )

    # --- replies and bounces (IMAP) -------------------------------------------------

    def imap_position(self, mailbox: str) -> tuple[int, int] | None:
        row = self.conn.execute("SELECT uidvalidity, last_uid FROM imap_state WHERE mailbox = ?", (mailbox,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def set_imap_position(self, mailbox: str, uidvalidity: int, last_uid: int) -> None:
        self.conn.execute(
            """INSERT INTO imap_state VALUES (?, ?, ?) ON CONFLICT (mailbox)
               DO UPDATE SET uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid""",
            (mailbox, uidvalidity, last_uid),
        )

    def enrollments_of_message_ids(self, message_ids: Sequence[str]) -> list[tuple[int, str, str, str]]:
        """(enrollment id, cadence, email, state) of the enrollments that sent these Message-IDs."""
        rows = self.conn.execute(
            """SELECT DISTINCT e.id, e.cadence, e.email, e.state
               FROM json_each(?) j CROSS JOIN messages m ON m.message_id = j.value
               JOIN enrollments e ON e.id = m.enrollment_id""",
            (self._list(list(message_ids)),),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def enrollments_of_sender(self, email: str, mailbox: str) -> list[tuple[int, str, str, str]]:
        """Active enrollments of this address whose sticky sender is `mailbox`."""
        rows = self.conn.execute(
            "SELECT id, cadence, email, state FROM enrollments WHERE email = ? AND mailbox = ? AND state = 'active'",
            (email, mailbox),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def end_enrollments(self, ids: Sequence[int], state: str, now: float, detail: str) -> list[int]:
        """Enrollments end (replied, stopped); their messages not yet sent are cancelled."""
        return self._end("e.id IN (SELECT value FROM json_each(?))", (self._list(list(ids)),), state, now, detail)

    def bounce_address(self, email: str, enrollment: int, now: float, detail: str) -> list[int]:
        """A bounce read in a DSN: as at SMTP (record_failed), the enrollment of the bounced message `bounced`,
        the address suppressed, its other enrollments stopped and nothing more sent to it, in any cadence."""
        self.suppress(email, detail[:200], now)
        return self._bounced(email, enrollment, now, "address suppressed after a bounce")

    def _bounced(self, email: str, enrollment: int, now: float, detail: str) -> list[int]:
        self.conn.execute(
            "UPDATE enrollments SET state = 'bounced', ended_at = ? WHERE id = ? AND state = 'active'",
            (now, enrollment),
        )
        return self._end("e.email = ?", (email,), "stopped", now, detail)

    def dsn_failed(self, message_ids: Sequence[str], email: str, reason: str, detail: str, mailbox: str) -> None:
        """A DSN says a sent message failed after all: the message says so, and a block counts for the mailbox."""
        rows = self.conn.execute(
            """UPDATE messages SET state = 'failed', reason = ?, detail = ?
               WHERE id IN (SELECT m.id FROM json_each(?) j CROSS JOIN messages m ON m.message_id = j.value)
               AND state = 'sent' AND enrollment_id IN (SELECT id FROM enrollments WHERE email = ?) RETURNING id""",
            (reason, detail, self._list(list(message_ids)), email),
        ).fetchall()
        if reason == "blocked" and rows:
            self._count_block(mailbox, time.time())

    def _count_block(self, mailbox: str, now: float) -> None:
        """Blocks count against the mailbox's health (its reputation, not the address)."""
        self.conn.execute(
            """INSERT INTO mailbox_health (mailbox, state, since, blocks) VALUES (?, 'connected', ?, 1)
               ON CONFLICT (mailbox) DO UPDATE SET blocks = mailbox_health.blocks + 1""",
            (mailbox, now),
        )

    def uncertain_message_ids(self, mailbox: str) -> list[tuple[int, str, float]]:
        """(id, Message-ID, since) of the mailbox's uncertain messages."""
        rows = self.conn.execute(
            """SELECT id, message_id, coalesce(uncertain_at, 0) FROM messages
               WHERE state = 'error' AND mailbox = ? AND reason = 'uncertain' AND message_id IS NOT NULL""",
            (mailbox,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def settle_uncertain(
        self, message: int, delivered: bool, now: float, detail: str
    ) -> tuple[int, int, str, str] | None:
        """Settle an `uncertain` message; returns (enrollment, step, cadence, sticky) when it changed."""
        row = self.conn.execute(
            """SELECT m.enrollment_id, m.step, e.cadence, e.mailbox FROM messages m
               JOIN enrollments e ON e.id = m.enrollment_id
               WHERE m.id = ? AND m.state = 'error' AND m.reason = 'uncertain'""",
            (message,),
        ).fetchone()
        if row is None:
            return None
        if delivered:
            self.conn.execute(
                "UPDATE messages SET state = 'sent', reason = NULL, sent_at = ?, detail = ? WHERE id = ?",
                (now, detail, message),
            )
        else:
            self.conn.execute(
                "UPDATE messages SET state = 'scheduled', reason = NULL, detail = ? WHERE id = ?",
                (detail, message),
            )
        return (row[0], row[1], row[2], row[3])

    def schedule_step(self, enrollment: int, step: int, mailbox: str, due: float) -> None:
        inserted = self.conn.execute(
            """INSERT INTO messages (enrollment_id, step, mailbox, state, due_at)
               SELECT id, ?, ?, 'scheduled', ? FROM enrollments WHERE id = ? AND state = 'active'
               ON CONFLICT (enrollment_id, step) DO NOTHING""",
            (step, mailbox, due, enrollment),
        ).rowcount
        if inserted > 0:
            self._count_scheduled([(mailbox, inserted)])

    def finish_enrollment(self, enrollment: int, now: float) -> None:
        row = self.conn.execute(
            """UPDATE enrollments SET state = 'finished', ended_at = ? WHERE id = ? AND state = 'active'
               RETURNING cadence""",
            (now, enrollment),
        ).fetchone()
        if row is not None and self.counts_by_hand:
            self.conn.execute(
                "UPDATE enrollment_counts SET n = n - 1 WHERE cadence = ? AND state = 'active'", (row[0],)
            )
            self.conn.execute(
                """INSERT INTO enrollment_counts VALUES (?, 'finished', 1)
                   ON CONFLICT (cadence, state) DO UPDATE SET n = n + 1""",
                (row[0],),
            )

    def scheduled_in_order(self, mailbox: str, until: float) -> Iterator[tuple[float, int, int]]:
        """(due_at, step, enrollment_id) of the scheduled messages due before `until`, read as they are taken."""
        cursor = self.conn.execute(
            """SELECT due_at, step, enrollment_id FROM messages
               WHERE mailbox = ? AND state = 'scheduled' AND due_at < ? ORDER BY due_at, id""",
            (mailbox, until),
        )
        while rows := cursor.fetchmany(256):
            yield from rows

    def route_of(self, enrollment: int) -> tuple[str, str] | None:
        """(cadence, sticky sender) of an enrollment."""
        row = self.conn.execute("SELECT cadence, mailbox FROM enrollments WHERE id = ?", (enrollment,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))


@dataclass(frozen=True, slots=True)
class SentRecord:
    """A delivery the server accepted, as `record_sent` commits it (by the sender loop's next turn)."""

    claimed: Claimed
    at: float
    code: int
    text: str  # the server's reply, secrets masked
    subject: str
    day: str  # the mailbox's local day of `at`: the day it counts in
    gap_until: float  # no send of this mailbox before
    next_step: tuple[int, str, float] | None  # (step, sender, due) of lifecycle.next_step, None: the last
    copy: bytes | None = None  # the message, for sent_copies = "append"
    count_domain: bool = False  # domain_daily_limit counts it


@dataclass(frozen=True, slots=True)
class Snapshot:
    earliest_due: float | None
    sent_today: int
    gap_until: float | None
    state: str
    quota_day: str | None
    limit_logged_day: str | None
    next_probe_at: float | None
    failures: int
    throttled_until: float | None = None
    first_day: str | None = None  # the local day of its first send ever
    paused_reason: str | None = None  # paused by pause_on or `mailbox pause`, until `mailbox resume`
    since: float | None = None  # when it entered its state (disconnected: since when it is down)


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    enrollment_id: int
    step: int
    mailbox: str
    cadence: str
    email: str
    fields: dict[str, str]
    due_at: float
    attempts: int
    transient_failures: int
    sticky: str
    message_id: str


def domain_of(email: str) -> str:
    """The recipient domain domain_daily_limit counts by (addresses are stored lower-cased)."""
    return email.rpartition("@")[2]


SUPPRESSED_BY = "address suppressed after a bounce of message"
BLOCKED_BY = "enrollment stopped after a block of message"


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration, one at a time (a trigger's body has semicolons of its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def is_busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock: worth waiting for, unlike a full disk or a damaged file."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def describe_store_error(exc: sqlite3.Error) -> str:
    text = str(exc) or type(exc).__name__
    if is_busy(exc):
        return f"{text}: another process holds the write lock"
    return text


def startup_failure(path: Path | str, exc: sqlite3.Error) -> StoreError:
    """Why the daemon cannot start on the database (exit 2): damaged, locked, or what SQLite says."""
    if type(exc) is sqlite3.DatabaseError:  # SQLITE_CORRUPT, SQLITE_NOTADB: a damaged file
        return StoreError(f"{path}: the database is damaged ({exc}); restore it from a backup")
    return StoreError(f"{path}: cannot start on the database: {describe_store_error(exc)}")


def _refuse_damage(conn: sqlite3.Connection, path: Path) -> None:
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: the database is damaged ({exc}); restore it from a backup") from None
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    if problems:
        raise StoreError(f"{path}: the database is damaged ({'; '.join(problems)[:300]}); restore it from a backup")


class IntegrityCheck:
    """`PRAGMA quick_check` on a read-only connection of its own, run in a worker thread.

    It reads the whole file (13 s for 5 GiB here), so the daemon does not make
    its first send wait for it on a large database; `interrupt()` ends it early.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._interrupted = False
        self._lock = threading.Lock()  # interrupt() may come before the connection is open, or as it opens

    def run(self) -> None:
        """Raises StoreError when the database is damaged; returns quietly when interrupted or absent."""
        if isinstance(self.path, str):
            return  # PostgreSQL checks its own pages
        if not self.path.exists():
            return  # nothing enrolled yet: the daemon creates it
        with self._lock:
            if self._interrupted:
                return
            try:
                conn = self._conn = sqlite3.connect(
                    self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot open the database to check it: {exc}") from None
        try:
            _refuse_damage(conn, self.path)
        except StoreError:
            if not self._interrupted:
                raise
        finally:
            with self._lock:
                self._conn = None
                conn.close()

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
            if self._conn is not None:
                self._conn.interrupt()
