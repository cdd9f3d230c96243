"""The store on SQLite (the default): one file in WAL mode, its schema and migrations, SQLite's errors as
the store's."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.errors import StoreBusy, StoreDamaged, StoreError, StoreUnavailable
from daemon.store.engine import Queries, commits, load
from daemon.store.records import SCHEMA_VERSION

MIGRATIONS: dict[int, str] = {}  # filled below, from schema version 1 on

MIGRATIONS = {
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
    # prioritize = "follow_ups" (the default): a mailbox's oldest due follow-up is found through an index of
    # its own, however many first emails of a backlog are due before it. First emails (an import's bulk) are
    # not in it: an import costs what it did.
    13: """
    CREATE INDEX messages_due_follow_ups ON messages (mailbox, due_at, id) WHERE state = 'scheduled' AND step > 1;
    """,
    # new_per_day: a day's first emails (step 1) are counted apart from its sends.
    14: """
    ALTER TABLE daily_counts ADD COLUMN first_emails INTEGER NOT NULL DEFAULT 0;
    """,
    # An uncertain send may have been delivered: it counts in its mailbox's day (found through this index).
    15: """
    CREATE INDEX messages_uncertain ON messages (mailbox, uncertain_at) WHERE state = 'error' AND reason = 'uncertain';
    """,
    # [[cadences]] new_per_day: first emails counted per mailbox, cadence and day.
    16: """
    CREATE TABLE cadence_counts (
        mailbox TEXT NOT NULL,
        cadence TEXT NOT NULL,
        day TEXT NOT NULL,
        first_emails INTEGER NOT NULL,
        PRIMARY KEY (mailbox, cadence, day)
    ) WITHOUT ROWID;
    """,
    # A cadence paused (its due messages held, their due time kept), outcomes marked, and what ended an
    # enrollment or changed it, in order (`prospect show`).
    17: """
    ALTER TABLE enrollments ADD COLUMN outcome TEXT;
    ALTER TABLE messages ADD COLUMN held_due REAL;
    CREATE TABLE cadence_pauses (
        cadence TEXT PRIMARY KEY,
        paused_at REAL NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE enrollment_events (
        enrollment_id INTEGER NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX enrollment_events_by_enrollment ON enrollment_events (enrollment_id, at);
    """,
    # Variants (an enrollment's number in its cadence picks them; the message keeps the one it was sent in)
    # and results counted as they happen (the schema's `results` and its triggers, then what was before).
    18: """
    ALTER TABLE enrollments ADD COLUMN seq INTEGER;
    ALTER TABLE messages ADD COLUMN variant TEXT;
    """,
    19: """
    DROP TRIGGER IF EXISTS result_sent;
    DROP TRIGGER IF EXISTS result_ended;
    CREATE TABLE web_sessions (
        digest TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    20: "",  # PostgreSQL's cadence counts kept per node (one daemon writes SQLite)
    21: "",  # PostgreSQL's counting triggers stand aside where a statement counts (SQLite's are TEMP ones)
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


# Results (`cadenced report`, /metrics), counted as things happen, installed with COUNTING: see schema/sqlite.sql.
# The group commit counts its sends and ends by hand (Store.count_results): two trigger firings per send were
# what the results cost it.
RESULT_COUNTING = (
    """CREATE TEMP TRIGGER IF NOT EXISTS result_sent AFTER UPDATE OF state ON main.messages
    WHEN new.state != old.state AND (new.state = 'sent' OR (new.state = 'failed' AND new.reason = 'blocked')) BEGIN
        INSERT INTO results SELECT e.cadence,
            date(CASE WHEN new.state = 'sent' THEN new.sent_at ELSE unixepoch() END, 'unixepoch'),
            new.step, coalesce(new.variant, ''), new.mailbox,
            CASE WHEN new.state = 'sent' THEN 'sent' ELSE 'blocked' END, 1
        FROM enrollments e WHERE e.id = new.enrollment_id
        ON CONFLICT (cadence, day, step, variant, mailbox, kind) DO UPDATE SET n = n + 1;
END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS result_ended AFTER UPDATE OF state, outcome ON main.enrollments
    WHEN new.state != old.state OR new.outcome IS NOT old.outcome BEGIN
        -- What it was, taken back (-1), and what it is (+1), on the row of the last step sent: one lookup.
        INSERT INTO results SELECT new.cadence, date(coalesce(k.at, unixepoch()), 'unixepoch'),
            coalesce(m.step, 0), coalesce(m.variant, ''), coalesce(m.mailbox, k.mailbox), k.kind, k.n
        FROM (SELECT old.state AS kind, -1 AS n, old.ended_at AS at, old.mailbox AS mailbox
                  WHERE old.state != new.state AND old.state != 'active'
              UNION ALL SELECT 'outcome:' || old.outcome, -1, old.ended_at, old.mailbox
                  WHERE old.outcome IS NOT new.outcome AND old.outcome IS NOT NULL
              UNION ALL SELECT new.state, 1, new.ended_at, new.mailbox
                  WHERE new.state != old.state AND new.state != 'active'
              UNION ALL SELECT 'outcome:' || new.outcome, 1, new.ended_at, new.mailbox
                  WHERE new.outcome IS NOT old.outcome AND new.outcome IS NOT NULL) k
        LEFT JOIN (SELECT step, variant, mailbox FROM messages
                   WHERE enrollment_id = new.id AND state = 'sent' ORDER BY step DESC LIMIT 1) m
        WHERE true
        ON CONFLICT (cadence, day, step, variant, mailbox, kind) DO UPDATE SET n = n + excluded.n;
END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS result_rolled_up AFTER INSERT ON main.results BEGIN
    INSERT INTO result_totals VALUES (new.cadence, new.step, new.variant, new.mailbox, new.kind, new.n)
        ON CONFLICT (cadence, step, variant, mailbox, kind) DO UPDATE SET n = n + excluded.n;
    INSERT INTO result_days VALUES (new.cadence, new.day, new.step, new.kind, new.n)
        ON CONFLICT (cadence, day, step, kind) DO UPDATE SET n = n + excluded.n;
END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS result_rolled_up_again AFTER UPDATE OF n ON main.results BEGIN
    INSERT INTO result_totals VALUES (new.cadence, new.step, new.variant, new.mailbox, new.kind, new.n - old.n)
        ON CONFLICT (cadence, step, variant, mailbox, kind) DO UPDATE SET n = n + excluded.n;
    INSERT INTO result_days VALUES (new.cadence, new.day, new.step, new.kind, new.n - old.n)
        ON CONFLICT (cadence, day, step, kind) DO UPDATE SET n = n + excluded.n;
END""",
)


def _always() -> bool:
    return True


def install_counting(conn: sqlite3.Connection) -> None:
    """The counting triggers on a connection of its own (every writer but the group commit's has them)."""
    for statement in (*COUNTING, *RESULT_COUNTING):
        conn.execute(statement)


QUERIES: Queries = load("sqlite")
SCHEMA = (Path(__file__).parent / "schema" / "sqlite.sql").read_text(encoding="utf-8")


def is_busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock: worth waiting for, unlike a full disk or a damaged file."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def failure(exc: sqlite3.Error, where: Path | str) -> StoreUnavailable:
    """SQLite's error as the store's: busy, damaged, or unavailable for another reason (full disk, I/O)."""
    text = str(exc) or type(exc).__name__
    if is_busy(exc):
        return StoreBusy(f"{text}: another process holds the write lock")
    if type(exc) is sqlite3.DatabaseError:  # SQLITE_CORRUPT, SQLITE_NOTADB
        return StoreDamaged(f"{where}: the database is damaged ({text}); restore it from a backup")
    return StoreUnavailable(text)


class _Rows:
    """A cursor whose fetches raise the store's errors (a damaged page can be met mid-scan)."""

    __slots__ = ("_cursor", "_where", "rowcount")

    def __init__(self, cursor: sqlite3.Cursor, where: Path) -> None:
        self._cursor = cursor
        self._where = where
        self.rowcount = cursor.rowcount

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> Any:
        try:
            return self._cursor.fetchone()
        except sqlite3.Error as exc:
            raise failure(exc, self._where) from None

    def fetchall(self) -> list[Any]:
        try:
            return self._cursor.fetchall()
        except sqlite3.Error as exc:
            raise failure(exc, self._where) from None

    def fetchmany(self, size: int) -> list[Any]:
        try:
            return self._cursor.fetchmany(size)
        except sqlite3.Error as exc:
            raise failure(exc, self._where) from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class SqliteEngine:
    """One SQLite connection in WAL mode; writes go through `transaction()`."""

    shared = False
    pipelines = False

    def __init__(self, conn: sqlite3.Connection, path: Path, counts_by_hand: bool = False) -> None:
        self.conn = conn
        self.where: Path | str = path
        self.path = path
        self.q = QUERIES
        self.counts_by_hand = counts_by_hand  # no counting triggers: claim, record_sent and finish count

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        create: bool = True,
        busy_timeout: float = 30.0,
        wait: bool = True,
        counts_by_hand: bool = False,
    ) -> SqliteEngine:
        """`wait` False: a write that finds another process's lock fails at once (StoreBusy) instead of waiting.
        `counts_by_hand`: no counting triggers; only claim, record_sent and finish_enrollment may change a state
        on this connection (the daemon's group commit)."""
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
        engine = cls(conn, path, counts_by_hand)
        # Several processes opening a new file at once (three imports started together) can find it busy in
        # a way SQLite does not wait for: each step here can be taken again, so it is, within busy_timeout.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                engine._set_up(busy_timeout if wait else 0.0)
                return engine
            except sqlite3.DatabaseError as exc:
                engine.rollback()
                if is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                conn.close()
                raise StoreError(f"{path}: not a cadenced database ({exc})") from None
            except StoreError:
                conn.close()
                raise

    def _set_up(self, busy_timeout: float) -> None:
        conn = self.conn
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{self.path}: cannot switch the database to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")  # a power cut loses no commit (SPEC §6)
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()
        if not self.counts_by_hand:
            install_counting(conn)

    def _migrate(self) -> None:
        """A new file gets the schema of today (schema/sqlite.sql); an older one each migration since its own."""
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
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            current = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if current == 0:
                for statement in statements(SCHEMA):
                    self.conn.execute(statement)
            else:
                for v in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in migration(v):
                        self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def migrate_from(self, version: int) -> None:
        """Migrations `version`+1 … today on a database at `version` (tests: the first schema upgraded)."""
        with self.transaction():
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in migration(v):
                    self.execute(statement)
            self.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Rows:
        try:
            return _Rows(self.conn.execute(sql, params), self.path)
        except sqlite3.Error as exc:
            raise failure(exc, self.path) from None

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """A write: the rows it changed (no cursor kept: the send's path runs a dozen of these)."""
        try:
            return self.conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise failure(exc, self.path) from None

    def write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose answer nobody reads (PostgreSQL's pipeline sends it with the next read)."""
        try:
            self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise failure(exc, self.path) from None

    @contextmanager
    def pipelined(self) -> Iterator[None]:
        """No pipeline in process: every statement is answered as it runs."""
        yield

    def sync(self, quiet: bool = False) -> None:
        """Nothing waits to be answered in process."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a statement, or None."""
        try:
            return self.conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise failure(exc, self.path) from None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a statement."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise failure(exc, self.path) from None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        try:
            return self.conn.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise failure(exc, self.path) from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT: one writer at a time across processes; nests into an open one."""
        if self.conn.in_transaction:
            yield
            return
        started = time.perf_counter()
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        commits.committed(time.perf_counter() - started)

    @contextmanager
    def enrolling(self) -> Iterator[None]:
        """An import's enrolling transaction, its foreign keys not checked: each message it inserts is of an
        enrollment inserted before it in the same transaction. The check cost each message a look-up, a sixth
        of its insert (counted by callgrind). Nested in an open transaction, it is that one, checks and all."""
        if self.conn.in_transaction:
            yield
            return
        self.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.transaction():
                yield
        finally:
            self.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def staging(self) -> Iterator[None]:
        """The staging of a file in one transaction of SQLite's temp database: a commit of the scratch table
        per batch cost an import of 1,000,000 rows 2 s of its 35. Nothing of the real database is read or
        written in it, so no lock or snapshot of the real database is held (a test holds that)."""
        if self.conn.in_transaction:
            yield
            return
        self.execute("BEGIN")
        try:
            yield
            self.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        """End the open transaction, if SQLite has not ended it already (disk full, I/O error)."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that brought us here says why

    def data_version(self) -> int:
        """Changes whenever another connection commits: how the daemon notices other commands."""
        return int(self.execute("PRAGMA data_version").fetchone()[0])

    def check_integrity(self) -> None:
        """A corrupt database is refused (`PRAGMA quick_check`: it reads the whole file)."""
        _refuse_damage(self.conn, self.path)

    def tell(self, mailboxes: Iterable[str]) -> None:
        """One daemon sends for every mailbox of an SQLite database: there is nobody else to tell."""

    def heard_mailboxes(self) -> set[str] | None:
        """PRAGMA data_version says that another connection committed, never what: any mailbox."""
        return None

    def list_param(self, values: Sequence[Any]) -> Any:
        """A list as one parameter: JSON, for json_each."""
        return json.dumps(list(values))

    def holding(self, mailbox: str) -> Callable[[], bool]:
        """On SQLite one daemon sends for every mailbox."""
        return _always

    def lease_check(self, mailbox: str) -> tuple[str, str, float] | None:
        return None

    def trace(self, callback: Any) -> None:
        """Every statement run, to `callback` (tests of query plans); None stops."""
        self.conn.set_trace_callback(callback)

    def describe(self) -> dict[str, Any]:
        """Tables (columns, and which may be NULL) and the indexes made by name: what the schema test compares."""
        tables: dict[str, dict[str, bool]] = {}
        for (table,) in self.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall():
            tables[table] = {r[1]: bool(r[3] or r[5]) for r in self.execute(f"PRAGMA table_info({table})")}
        indexes = {
            name: (table, tuple(r[2] for r in self.execute(f"PRAGMA index_info({name})")))
            for name, table in self.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            ).fetchall()
        }
        return {"tables": tables, "indexes": indexes}

    def tables(self) -> list[str]:
        """Its tables, in the order they were made (`cadenced migrate` copies them)."""
        return [
            r[0]
            for r in self.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
            ).fetchall()
        ]

    def rows(self, table: str, size: int = 5000) -> tuple[list[str], Iterator[list[Any]]]:
        """(columns, batches of rows) of a table of its own (`table` from tables())."""
        cursor = self.execute(f"SELECT * FROM {table}")

        def batches() -> Iterator[list[Any]]:
            while rows := cursor.fetchmany(size):
                yield rows

        return [d[0] for d in cursor.description], batches()

    def close(self) -> None:
        self.conn.close()


def statements(script: str) -> Iterator[str]:
    """The statements of a script, one at a time (a trigger's body has semicolons of its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def migration(version: int) -> list[str]:
    """The statements that bring a database of `version` - 1 to `version`."""
    found = list(statements(MIGRATIONS[version]))
    if version == 18:  # the results table, then what came before (its triggers are TEMP ones since 19)
        found += [s for s in statements(SCHEMA) if RESULTS.search(s)] + list(statements(RESULTS_BEFORE))
    if version == 19:  # the result triggers made TEMP ones; the rollups as a new database has them, filled
        found += [s for s in statements(SCHEMA) if ROLLUPS.search(s)] + list(statements(ROLLUPS_BEFORE))
    return found


ROLLUPS = re.compile(r"CREATE TABLE result_(totals|days)")
ROLLUPS_BEFORE = """
INSERT INTO result_totals SELECT cadence, step, variant, mailbox, kind, sum(n) FROM results GROUP BY 1, 2, 3, 4, 5;
INSERT INTO result_days SELECT cadence, day, step, kind, sum(n) FROM results GROUP BY 1, 2, 3, 4;
"""
RESULTS = re.compile(r"CREATE TABLE results\b")
# What happened before schema 18, counted once: sends (no variant then), ends and outcomes on the row of the last
# step sent, enrollments on their day.
RESULTS_BEFORE = """
INSERT INTO results SELECT e.cadence, date(m.sent_at, 'unixepoch'), m.step, '', m.mailbox, 'sent', count(*)
    FROM messages m JOIN enrollments e ON e.id = m.enrollment_id WHERE m.state = 'sent' GROUP BY 1, 2, 3, 4, 5;
INSERT INTO results SELECT cadence, date(created_at, 'unixepoch'), 0, '', mailbox, 'enrolled', count(*)
    FROM enrollments GROUP BY 1, 2, 3, 4, 5;
INSERT INTO results SELECT e.cadence, date(coalesce(e.ended_at, e.created_at), 'unixepoch'), coalesce(m.step, 0), '',
    coalesce(m.mailbox, e.mailbox), k.kind, count(*)
    FROM (SELECT id, state AS kind FROM enrollments WHERE state != 'active'
          UNION ALL SELECT id, 'outcome:' || outcome FROM enrollments WHERE outcome IS NOT NULL) AS k
    JOIN enrollments e ON e.id = k.id
    LEFT JOIN messages m ON m.id = (SELECT id FROM messages WHERE enrollment_id = e.id AND state = 'sent'
                                    ORDER BY step DESC LIMIT 1)
    GROUP BY 1, 2, 3, 4, 5, 6;
"""


def _refuse_damage(conn: sqlite3.Connection, path: Path | str) -> None:
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
