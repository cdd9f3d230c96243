"""The store on PostgreSQL: `database = "postgresql://…"` (SPEC §10).

The statements are the store's named queries (queries/common.sql and queries/postgres.sql), the schema is
schema/postgres.sql with its counting triggers in PL/pgSQL (which stand aside on the group commit's session,
whose claim and send record count in their own statements). There is no global write lock: writers lock the
rows they change. A claim takes its message with `FOR UPDATE SKIP LOCKED` and holds its mailbox's lease row
`FOR SHARE` (a takeover waits for it), so one daemon claims for a mailbox at a time and a day's count, gap and
new-prospect count, kept per mailbox, hold as on SQLite; imports take one advisory lock among themselves
(their enrollment ids are numbered in one run). Several daemons share the database, each sending for the
mailboxes it leases.

Every wait is bounded: each session sets lock_timeout, statement_timeout and
idle_in_transaction_session_timeout (the server ends the transaction of a daemon stopped mid-way), and TCP
keepalives with tcp_user_timeout find a connection cut by the network. A connection found broken is opened
again at its next use, outside a transaction: a server restart pauses sending, it never stops a daemon.

psycopg 3 (the maintained PostgreSQL driver for Python, with a binary wheel: nothing to compile) runs each
connection; the daemon calls it from worker threads, never from its event loop.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import psycopg
from psycopg import pq
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import StrDumper

from daemon.errors import Refused, StoreBusy, StoreError, StoreUnavailable, StoreUnreachable
from daemon.store.engine import Queries, Statement, commits, load
from daemon.store.records import SCHEMA_VERSION
from daemon.store.urls import PASSWORD_PARAMS, shown_database

PG_FIRST_SCHEMA = 10  # the schema PostgreSQL support started at
SCHEMA = (Path(__file__).parent / "schema" / "postgres.sql").read_text(encoding="utf-8")
QUERIES: Queries = load("postgres")
IMPORT_LOCK = 0x63616465  # the advisory lock imports take among themselves ("cade"): nobody else waits on it
SCHEMA_LOCK = IMPORT_LOCK + 1  # who makes or upgrades the schema (two daemons starting at once)
CHANNEL = "cadenced"  # NOTIFY: the mailboxes whose queue a commit changed ('' for any), heard by the daemons
NOTIFY_MAX = 7000  # bytes of mailbox names in one notification (PostgreSQL's limit is 8000): past it, ''
STATEMENT_TIMEOUT = 300.0  # seconds one statement may run (an import's INSERT of 200,000 rows takes a few)
IDLE_IN_TRANSACTION = 15.0  # seconds a session may sit in a transaction doing nothing: a stopped daemon's ends
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 30_000  # unacknowledged data for this long: the connection is dead (a partition)
NOT_COPIED = frozenset({"cadenced_schema", "daemons", "leases"})  # PostgreSQL's own


_TRANSIENT = (
    psycopg.errors.LockNotAvailable,  # lock_timeout: another transaction holds a row this one needs
    psycopg.errors.DeadlockDetected,  # two transactions locked rows in opposite orders: one is rolled back
    psycopg.errors.SerializationFailure,
)


@contextmanager
def _errors(url: str = "") -> Iterator[None]:
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreBusy(f"database is busy: {str(exc).strip().splitlines()[0]}") from None
    except psycopg.Error as exc:
        raise StoreUnavailable(redact_url(str(exc).strip() or type(exc).__name__, url)) from None


def _open(url: str, timeout: float, **settings: Any) -> psycopg.Connection[Any]:
    """A connection whose waits are all bounded: connecting, locks, statements, an idle transaction, and the
    network itself (keepalives and tcp_user_timeout, unless the URL says otherwise)."""
    given = conninfo_to_dict(url)
    network: dict[str, Any] = {k: v for k, v in KEEPALIVE.items() if k not in given}
    if "tcp_user_timeout" not in given and not str(given.get("host", "")).startswith("/"):
        network["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
    if "options" in settings and given.get("options"):  # the URL's own options (a search_path) come first
        settings["options"] = f"{given['options']} {settings['options']}"
    return psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)), **network, **settings)


# Refusals that waiting cannot mend: a wrong password or user, a database that does not exist, no pg_hba
# entry. libpq gives no SQLSTATE for a failed connection, only the server's words (in English unless the
# server's lc_messages says otherwise; then the daemon waits, saying why, as for a server that is down).
_REFUSED = re.compile(
    r'FATAL:\s+(database "[^"]*" does not exist|password authentication failed|role "[^"]*" does not exist'
    r"|no pg_hba\.conf entry)"
)


def _cannot_connect(url: str, exc: psycopg.Error) -> StoreError:
    """StoreUnreachable (waited for) when the server may answer later; a StoreError (exit 2) when it refused."""
    text = f"{shown(url)}: cannot connect: {redact_url(str(exc).strip(), url)}"
    return StoreError(text) if _REFUSED.search(str(exc)) else StoreUnreachable(text)


def is_postgres(database: object) -> bool:
    return isinstance(database, str) and database.startswith(("postgresql://", "postgres://"))


def shown(url: str) -> str:
    """The URL without its password: what logs, errors and `check` may print."""
    return shown_database(url)


def database_passwords(url: str) -> set[str]:
    """Every password a PostgreSQL URL carries (in its user part, or as `?password=` in libpq's form), as written
    and as decoded: what must never be shown. psycopg's conninfo parser says what libpq will use."""
    parts = urlsplit(url)
    found = {parts.password or ""}
    try:
        found |= {str(v) for k, v in conninfo_to_dict(url).items() if k in PASSWORD_PARAMS and v is not None}
    except psycopg.Error as exc:  # libpq cannot parse it
        raise ValueError(str(exc).strip()) from None
    for piece in parts.query.split("&"):
        key, _, value = piece.partition("=")
        if unquote(key).lower() in PASSWORD_PARAMS:
            found |= {value, unquote(value), unquote_plus(value)}
    found |= {unquote(f) for f in found}
    return {f for f in found if f}


def redact_url(text: str, url: str) -> str:
    """`text` without any password of `url` (its user part, `?password=`, written or decoded)."""
    try:
        passwords = database_passwords(url)
    except ValueError:
        return text
    for password in sorted(passwords, key=len, reverse=True):
        text = text.replace(password, "********")
    return text


def inspect(url: str) -> tuple[str, int | None]:
    """(server version, cadenced schema version or None) without changing anything: `cadenced check`."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            present = conn.execute("SELECT to_regclass('cadenced_schema') IS NOT NULL").fetchone()
            schema = conn.execute("SELECT version FROM cadenced_schema").fetchone() if present and present[0] else None
    except psycopg.OperationalError as exc:
        raise _cannot_connect(url, exc) from None
    except psycopg.Error as exc:
        raise StoreError(f"{shown(url)}: {redact_url(str(exc).strip(), url)}") from None
    return (str(version[0]) if version else "?"), (int(schema[0]) if schema else None)


class NodeLock:
    """One process per node name: a session advisory lock on a connection of its own, held until released
    (calling it) or the process dies; the connection's application_name says which process holds it. Daemons
    with other node names share the database, each with the mailboxes it leases.

    A server restart (or a cut connection) ends the session and its lock: `check`, every few seconds, takes it
    again on a new connection, and raises Refused when another process has taken it meanwhile (two processes
    of one node would both pass the lease fence: the one that finds the lock taken stops)."""

    def __init__(self, url: str, node: str) -> None:
        self.url, self.key = url, f"cadenced node {node}"
        self.node = node
        self.name = f"cadenced run pid {os.getpid()} on {socket.gethostname()}"[:63]
        self.conn: psycopg.Connection[Any] | None = None
        try:
            self._take()
        except psycopg.Error as exc:
            raise _cannot_connect(url, exc) from None

    def _take(self) -> None:
        conn = _open(self.url, 10, application_name=self.name)
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.key,)).fetchone()
        if row and row[0]:
            self.conn = conn
            return
        holder = conn.execute(
            """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.objid = (hashtext(%s)::bigint & 4294967295) AND l.granted
               AND a.pid != pg_backend_pid()""",
            (self.key,),
        ).fetchone()
        conn.close()
        who = str(holder[0]).removeprefix("cadenced run ") if holder else "unknown"
        raise Refused(
            f"another cadenced run ({who}) already runs on {shown(self.url)} as node {self.node!r} "
            "(give each daemon its own [daemon] node)"
        )

    def check(self) -> bool:
        """The lock still held, or taken again (True: it had been lost and is held again). A server that cannot
        be reached raises StoreUnavailable (nobody can take the lock from it meanwhile: asked again next time);
        another process holding it raises Refused."""
        if self.conn is not None and not self.conn.closed:
            try:
                self.conn.execute("SELECT 1")
                return False
            except psycopg.Error:
                pass
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        try:
            self._take()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"the node's lock: {redact_url(str(exc).strip(), self.url)}") from None
        return True

    def __call__(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def hold_daemon_lock(url: str, node: str) -> NodeLock:
    """The node's lock (NodeLock), taken now: Refused when another process holds it."""
    return NodeLock(url, node)


class _IntLoader(Loader):
    """numeric (what sum() of bigints gives) as int when whole: counts stay ints, as SQLite gives them."""

    def load(self, data: Any) -> Any:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


class _Rows:
    """A psycopg cursor whose fetches raise the store's errors."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.cursor = cursor
        self.description = cursor.description
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Any:
        with _errors():
            return self.cursor.fetchone()

    def fetchall(self) -> list[Any]:
        with _errors():
            return self.cursor.fetchall()

    def fetchmany(self, size: int) -> list[Any]:
        with _errors():
            return self.cursor.fetchmany(size)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def _value(v: Any) -> Any:
    """What PostgreSQL can take: booleans as the integers SQLite keeps, NUL (which no PostgreSQL text holds,
    and a hostile Message-ID or query may carry) as U+FFFD: it matched nothing before and matches nothing now."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, str):
        return v.replace("\x00", "\ufffd") if "\x00" in v else v
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def _params(sql: str, params: Sequence[Any]) -> Any:
    values = [_value(v) for v in params]
    if getattr(sql, "numbered", False):
        return {f"p{i + 1}": v for i, v in enumerate(values)}
    return values


RESULTS = re.compile(r"CREATE (TABLE|(OR REPLACE )?FUNCTION|TRIGGER) result")
ROLLUPS = re.compile(r"CREATE (TABLE|(OR REPLACE )?FUNCTION|TRIGGER) result_(totals|days|rolled_up)")
TRIGGER = re.compile(r"^CREATE TRIGGER (\w+) .*? ON (\w+)\s", re.M | re.S)
PER_NODE = re.compile(r"CREATE OR REPLACE FUNCTION (counting_node|enrollment_recounted|result_rolled_up)\b")
ROLLED_UP = ("result_totals", "result_days")
ROLLUPS_BEFORE = (  # as sqlite.ROLLUPS_BEFORE
    """INSERT INTO result_totals SELECT cadence, step, variant, mailbox, kind, sum(n) FROM results
       GROUP BY 1, 2, 3, 4, 5""",
    "INSERT INTO result_days SELECT cadence, day, step, kind, sum(n) FROM results GROUP BY 1, 2, 3, 4",
)
RESULTS_BEFORE = (  # as sqlite.RESULTS_BEFORE
    """INSERT INTO results SELECT e.cadence, result_day(m.sent_at), m.step, '', m.mailbox, 'sent', count(*)
       FROM messages m JOIN enrollments e ON e.id = m.enrollment_id WHERE m.state = 'sent' GROUP BY 1, 2, 3, 4, 5""",
    """INSERT INTO results SELECT cadence, result_day(created_at), 0, '', mailbox, 'enrolled', count(*)
       FROM enrollments GROUP BY 1, 2, 3, 4, 5""",
    """INSERT INTO results SELECT e.cadence, result_day(coalesce(e.ended_at, e.created_at)), coalesce(m.step, 0), '',
       coalesce(m.mailbox, e.mailbox), k.kind, count(*)
       FROM (SELECT id, state AS kind FROM enrollments WHERE state <> 'active'
             UNION ALL SELECT id, 'outcome:' || outcome FROM enrollments WHERE outcome IS NOT NULL) AS k
       JOIN enrollments e ON e.id = k.id
       LEFT JOIN messages m ON m.id = (SELECT id FROM messages WHERE enrollment_id = e.id AND state = 'sent'
                                       ORDER BY step DESC LIMIT 1)
       GROUP BY 1, 2, 3, 4, 5, 6""",
)


def _statements(script: str) -> Iterator[str]:
    """The schema's statements (a function body's `;` and `$$` kept whole)."""
    body = "\n".join(line for line in script.strip().split("\n") if not line.startswith("-- "))
    for piece in re.split(r";\n(?=CREATE )", body.strip()):
        yield piece.rstrip(";")


class PgEngine:
    """One psycopg connection, as the store uses it."""

    shared = True
    counts_by_hand = False  # nothing is counted in Python: the triggers or (`counting`) the statements count
    pipelines = True
    LEASE_MARGIN = 0.5  # a claim needs its lease to last this share of a lease longer (a send fits in it)

    def __init__(self, url: str, *, wait: bool, timeout: float, counting: bool = False) -> None:
        self.url = url
        # `cadenced.counting` = 'statement': the counting triggers stand aside, the claim and the send's record
        # count in their statements (the group commit's session, whose only state changes those are)
        self.counting = counting
        self.where: Path | str = shown(url)
        self.q = QUERIES
        self.wait = wait
        self.timeout = timeout
        self.heard = 0  # notifications from other connections (data_version)
        self.heard_for: set[str] | None = set()  # the mailboxes they named since last read (None: any)
        self.listening = False
        # Whose commits are not news (data_version): the daemon's own connections. With 2,000 IMAP sessions
        # saving their positions, hearing them woke all 2,000 sender loops every second.
        self.own: set[int] = set()
        self.loud = True  # every commit is news to the daemons ('' notified); the daemon's own: `tell` only
        self.news: set[str] | None = set()  # mailboxes this transaction's changes make news for (None: any)
        self.node: str | None = None  # set on the daemon's connections: its claims are fenced by its leases
        self.lease_ttl = 60.0
        self.pid = 0
        self.pipe: psycopg.Pipeline | None = None  # in pipeline mode (the group commit's batch): `pipelined`
        self.begun = False  # a transaction of `transaction()` is open (libpq's status lags in a pipeline)
        self.named: str | None = None  # the node this session counts for (`cadenced.node`), once set
        self.writer: psycopg.Cursor[Any] | None = None  # `write`'s cursor in a pipeline
        self.pg = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        """A session with its waits bounded (_open) and the store's settings; LISTEN again if it listened."""
        lock = int(self.timeout * 1000) if self.wait else 1000  # a connection that does not wait: one second
        pg = _open(
            self.url,
            self.timeout,
            options=f"-c lock_timeout={lock} -c statement_timeout={int(STATEMENT_TIMEOUT * 1000)} "
            f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION * 1000)}"
            + (" -c cadenced.counting=statement" if self.counting else ""),
        )
        pg.adapters.register_dumper(str, StrDumper)  # text, not unknown: lists of strings are text[]
        pg.adapters.register_loader("numeric", _IntLoader)
        pg.add_notify_handler(self._heard)
        self.named = None  # a new session counts for no node until its first transaction names it
        self.pid = pg.info.backend_pid
        self.own.add(self.pid)
        if self.listening:
            pg.execute(f"LISTEN {CHANNEL}")
            self.heard_for = None  # what was said while it was away is unknown: everything may have changed
            self.heard += 1
        return pg

    def _usable(self) -> None:
        """Outside a transaction, a broken connection (a server restart, a cut network) is opened again."""
        if not (self.pg.closed or self.pg.broken):
            return
        try:
            self.pg.close()
        except psycopg.Error:
            pass
        try:
            self.pg = self._connect()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect: {redact_url(str(exc).strip(), self.url)}") from None

    @classmethod
    def connect(cls, url: str, *, busy_timeout: float = 30.0, wait: bool = True, counting: bool = False) -> PgEngine:
        where = shown(url)
        try:
            engine = cls(url, wait=wait, timeout=busy_timeout, counting=counting)
        except psycopg.Error as exc:
            raise _cannot_connect(url, exc) from None
        try:
            engine._migrate()
        except psycopg.OperationalError as exc:  # the server went away meanwhile: it may come back
            engine.close()
            raise StoreUnreachable(f"{where}: {redact_url(str(exc).strip(), url)}") from None
        except (psycopg.Error, StoreUnavailable) as exc:
            broken = engine.pg.broken
            engine.close()
            if broken:
                raise StoreUnreachable(f"{where}: {redact_url(str(exc), url)}") from None
            raise StoreError(f"{where}: {redact_url(str(exc), url)}") from None
        except StoreError:
            engine.close()
            raise
        return engine

    def _heard(self, notify: psycopg.Notify) -> None:
        if notify.pid in self.own:
            return
        self.heard += 1
        if self.heard_for is not None:
            if notify.payload:
                self.heard_for.update(notify.payload.split("\n"))
            else:
                self.heard_for = None

    def tell(self, mailboxes: Iterable[str]) -> None:
        """This transaction changes what is due for `mailboxes`: their holders hear of it at the commit."""
        if self.news is not None:
            self.news.update(mailboxes)

    def heard_mailboxes(self) -> set[str] | None:
        """The mailboxes other processes' commits named since the last call (None: any may have changed)."""
        named, self.heard_for = self.heard_for, set()
        return named

    def _migrate(self) -> None:
        found = self.execute("SELECT to_regclass('cadenced_schema') IS NOT NULL").fetchone()[0]
        if not found:
            with self.transaction():
                self.run("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                # Read with this statement's snapshot, after the lock: another process may have made it meanwhile.
                tables = {
                    r[0]
                    for r in self.execute(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                    )
                }
                if "cadenced_schema" in tables:
                    return
                if tables:
                    raise StoreError(f"{self.where}: a database of another program (tables, no cadenced schema)")
                for statement in _statements(SCHEMA):
                    self.pg.execute(statement)
                self.execute("INSERT INTO cadenced_schema VALUES (%s)", (SCHEMA_VERSION,))
            return
        version = self.execute("SELECT version FROM cadenced_schema").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.where}: database schema {version} is newer than this cadenced knows ({SCHEMA_VERSION}); "
                "upgrade cadenced"
            )
        if version < PG_FIRST_SCHEMA:
            raise StoreError(f"{self.where}: database schema {version}: this cadenced cannot upgrade it")
        if version < SCHEMA_VERSION:
            with self.transaction():
                self.run("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                # 10 → 11 and 11 → 12 changed SQLite's counting triggers and its index by state only:
                # PostgreSQL keeps its own triggers and indexes. 13: the index of due follow-ups;
                # 14: first emails counted apart; 15: uncertain sends found by mailbox.
                self.run(
                    """CREATE INDEX IF NOT EXISTS messages_due_follow_ups ON messages (mailbox, due_at, id)
                       WHERE state = 'scheduled' AND step > 1"""
                )
                self.run("ALTER TABLE daily_counts ADD COLUMN IF NOT EXISTS first_emails BIGINT NOT NULL DEFAULT 0")
                self.run(  # 16: a cadence's new_per_day, counted per mailbox and day
                    """CREATE TABLE IF NOT EXISTS cadence_counts (mailbox TEXT NOT NULL, cadence TEXT NOT NULL,
                       day TEXT NOT NULL, first_emails BIGINT NOT NULL, PRIMARY KEY (mailbox, cadence, day))"""
                )
                for statement in (  # 17: cadence pauses, outcomes, enrollment events
                    "ALTER TABLE enrollments ADD COLUMN IF NOT EXISTS outcome TEXT",
                    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS held_due DOUBLE PRECISION",
                    """CREATE TABLE IF NOT EXISTS cadence_pauses (cadence TEXT PRIMARY KEY,
                       paused_at DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL)""",
                    """CREATE TABLE IF NOT EXISTS enrollment_events (enrollment_id BIGINT NOT NULL,
                       at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL)""",
                    """CREATE INDEX IF NOT EXISTS enrollment_events_by_enrollment
                       ON enrollment_events (enrollment_id, at)""",
                ):
                    self.run(statement)
                self.run(  # 15: uncertain sends count in their mailbox's day
                    """CREATE INDEX IF NOT EXISTS messages_uncertain ON messages (mailbox, uncertain_at)
                       WHERE state = 'error' AND reason = 'uncertain'"""
                )
                for statement in _statements(SCHEMA):  # 20 (first: 18's results count with them)
                    if PER_NODE.search(statement):
                        self.pg.execute(statement)
                # 18: variants, and results counted as they happen (what came before counted once)
                self.run("ALTER TABLE enrollments ADD COLUMN IF NOT EXISTS seq BIGINT")
                self.run("ALTER TABLE messages ADD COLUMN IF NOT EXISTS variant TEXT")
                if not self.execute("SELECT to_regclass('results') IS NOT NULL").fetchone()[0]:
                    for statement in _statements(SCHEMA):
                        if RESULTS.search(statement):
                            self.pg.execute(statement)
                    for statement in RESULTS_BEFORE:  # the rollups (created above with it) count them too
                        self.run(statement)
                # 19: the results rolled up without the day, and per day without variant or mailbox; sign-ins
                self.run(
                    """CREATE TABLE IF NOT EXISTS web_sessions (digest TEXT PRIMARY KEY, role TEXT NOT NULL,
                       created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"""
                )
                if not self.execute("SELECT to_regclass('result_totals') IS NOT NULL").fetchone()[0]:
                    for statement in _statements(SCHEMA):
                        if ROLLUPS.search(statement):
                            self.pg.execute(statement)
                    for statement in ROLLUPS_BEFORE:
                        self.run(statement)
                # 20: a cadence's counts and results per day kept per node (no daemon waits for another's)
                per_node = (("enrollment_counts", "cadence, state"), ("result_days", "cadence, day, step, kind"))
                for table, key in per_node:
                    if not self.execute(
                        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
                        " AND table_name = %s AND column_name = 'node'",
                        (table,),
                    ).fetchone():
                        self.run(f"ALTER TABLE {table} ADD COLUMN node TEXT NOT NULL DEFAULT ''")
                        self.run(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey, ADD PRIMARY KEY ({key}, node)")
                # 21: the counting triggers stand aside on a session that counts in its statements
                for statement in _statements(SCHEMA):
                    trigger = TRIGGER.search(statement)
                    if trigger is not None:
                        self.run(f"DROP TRIGGER IF EXISTS {trigger[1]} ON {trigger[2]}")
                        self.pg.execute(statement)
                self.execute("UPDATE cadenced_schema SET version = %s WHERE version < %s", (SCHEMA_VERSION,) * 2)

    def server(self) -> tuple[str, int]:
        """(server version, schema version) for `cadenced check`."""
        version = self.execute("SHOW server_version").fetchone()[0]
        schema = self.execute("SELECT version FROM cadenced_schema").fetchone()[0]
        return str(version), int(schema)

    @property
    def in_transaction(self) -> bool:
        """In a transaction, begun or failed (a broken connection's UNKNOWN is not one: it is opened again).
        In a pipeline libpq's status is only kept up to date at a sync (it says IDLE after a read in an open
        transaction): there, the transaction this engine began is what counts."""
        if self.pipe is not None and self.begun:
            return not self.pg.broken
        status = self.pg.info.transaction_status
        return status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR, pq.TransactionStatus.ACTIVE)

    def _cursor(self, sql: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        if not self.in_transaction:
            self._usable()
        return self.pg.execute(sql, _params(sql, params))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Rows:
        with _errors(self.url):
            return _Rows(self._cursor(sql, params))

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        with _errors(self.url):
            cursor = self._cursor(sql, params)
            if self.pipe is not None:
                self.pipe.sync()  # its count of rows is its answer: wait for it
            return cursor.rowcount

    def write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose answer nobody reads: in a pipeline it is sent with the next statement that needs an
        answer (its error, if any, raised there), not waited for on its own, on one cursor for all of them
        (py-spy: making cursors was 7% of a sending daemon's samples; psycopg copies its adapters into each)."""
        with _errors(self.url):
            if self.pipe is None:
                self._cursor(sql, params)
                return
            if self.writer is None or self.writer.connection is not self.pg:
                self.writer = self.pg.cursor()
            self.writer.execute(sql, _params(sql, params))

    @contextmanager
    def pipelined(self) -> Iterator[None]:
        """Pipeline mode for a batch of transactions (the group commit's): the writes whose answers are not read
        (`write`) travel with the next statement that is read, a round trip each fewer. A commit, a `run` and
        `sync` wait for every answer before them; an error is raised at the first of those or of a read."""
        if self.pipe is not None:
            yield
            return
        self._usable()
        with _errors(self.url), self.pg.pipeline() as pipe:
            self.pipe = pipe
            try:
                yield
            finally:
                self.pipe = None

    def sync(self, quiet: bool = False) -> None:
        """Every statement sent in the pipeline answered; its first error raised here (`quiet`: after an
        error already raised, the statements sent after it are dropped and the pipeline usable again)."""
        if self.pipe is None:
            return
        if quiet:
            try:
                self.pipe.sync()
            except psycopg.Error:
                pass
            return
        with _errors(self.url):
            self.pipe.sync()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with _errors(self.url):
            return self._cursor(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with _errors(self.url):
            return self._cursor(sql, params).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        with _errors(self.url):
            if not self.in_transaction:
                self._usable()
            with self.pg.cursor() as cursor:
                cursor.executemany(sql, [_params(sql, r) for r in rows])
                return cursor.rowcount

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.in_transaction:
            yield
            return
        started = time.perf_counter()
        self._usable()
        self.news = None if self.loud else set()
        with _errors(self.url):
            self.pg.execute("BEGIN")
        self.begun = True
        try:
            if self.node is not None and self.named != self.node:  # the counts per node (schema): this one's
                with _errors(self.url):
                    self.pg.execute("SELECT set_config('cadenced.node', %s, false)", (self.node,))
                self.named = self.node
            yield
            with _errors(self.url):
                if self.news is None or self.news:
                    names = "\n".join(sorted(self.news or ()))
                    payload = "" if len(names) > NOTIFY_MAX else names
                    self.pg.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                self.pg.execute("COMMIT")
                if self.pipe is not None:
                    self.pipe.sync()  # committed, or its error raised here: no caller goes on before that
        except BaseException:
            self.rollback()
            raise
        finally:
            self.news = set()
            self.begun = False
        commits.committed(time.perf_counter() - started)

    @contextmanager
    def enrolling(self) -> Iterator[None]:
        """An import's transaction; imports take one advisory lock among themselves (enrollment ids and each
        cadence's rotation are read, then written): the daemons' sends never wait on it."""
        with self.transaction():
            self.run("SELECT pg_advisory_xact_lock(%s)", (IMPORT_LOCK,))
            yield

    @contextmanager
    def staging(self) -> Iterator[None]:
        """A TEMP table of PostgreSQL's is written statement by statement, as before: no transaction needed."""
        yield

    def rollback(self) -> None:
        self.sync(quiet=True)  # a pipeline stopped by the error that brought us here: usable again
        self.named = None  # a setting made in the transaction is undone with it
        if self.begun or self.in_transaction:
            try:
                self.pg.execute("ROLLBACK")
                if self.pipe is not None:
                    self.pipe.sync()
            except psycopg.Error:
                pass  # the connection is broken: its next use opens another

    def data_version(self) -> int:
        """Counts commits by other connections, heard by LISTEN (a round trip delivers what has come)."""
        with _errors(self.url):
            self._usable()
            if not self.listening:
                self.pg.execute(f"LISTEN {CHANNEL}")
                self.listening = True
            self.pg.execute("SELECT 1")
        return self.heard

    def check_integrity(self) -> None:
        """PostgreSQL checks its own pages (and its operator runs its backups): nothing to read here."""

    def list_param(self, values: Sequence[Any]) -> Any:
        return list(values)

    def describe(self) -> dict[str, Any]:
        """Tables (columns, and which may be NULL) and the indexes made by name: what the schema test compares."""
        tables: dict[str, dict[str, bool]] = {}
        for table, column, nullable in self.execute(
            """SELECT table_name, column_name, is_nullable FROM information_schema.columns
               WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"""
        ).fetchall():
            tables.setdefault(table, {})[column] = nullable == "NO"
        indexes = {
            r[0]: (r[1], tuple(r[2]))
            for r in self.execute(
                """SELECT i.relname, t.relname, array_agg(a.attname::text ORDER BY k.ord)
                   FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
                   CROSS JOIN unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                   WHERE t.relnamespace = to_regnamespace(current_schema()) AND NOT x.indisprimary
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
                   GROUP BY i.relname, t.relname"""
            ).fetchall()
        }
        return {"tables": tables, "indexes": indexes}

    def close(self) -> None:
        try:
            self.pg.close()
        except psycopg.Error:
            pass

    def interrupt(self) -> None:
        """From another thread: a call stuck on a connection that answers nothing (a partition that a proxy or
        a firewall hides from TCP) fails now; the connection is broken, and opened again at its next use."""
        try:
            fd = self.pg.pgconn.socket
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:  # a duplicate: closing it is safe
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            pass  # closed already

    # --- leases: which daemon sends for which mailbox -------------------------------------------

    def now(self) -> float:
        return float(self.execute(self.q.server_now).fetchone()[0])

    def lease_round(
        self, node: str, mailboxes: Sequence[str], ttl: float, release: Sequence[str], first: bool
    ) -> tuple[list[str], list[str], list[int], list[str]]:
        """One round, in one transaction, in the server's time: this daemon seen; its leases renewed; those it
        let go of (`release`, their loops stopped) dropped; its share of the live daemons' taken from the free
        or expired ones. Returns (held, taken, messages found in `sending` under a dead holder (now
        uncertain), extra: held beyond the fair share, to stop and release next round).

        `first`: the daemon has just started; leases still under its node name are its dead predecessor's,
        and what that left in `sending` is uncertain too."""
        q = self.q
        wanted = sorted(set(mailboxes))
        with self.transaction():
            now = self.now()
            self.execute(q.daemon_seen, (node, os.getpid(), socket.gethostname(), now, now, first))
            self.execute(q.forget_daemons, (now - 10 * ttl,))
            live = int(self.execute(q.live_daemons, (now - ttl,)).fetchone()[0])
            self.execute(q.let_go, (node, list(release), wanted))  # and mailboxes no longer in its config
            mine = sorted(r[0] for r in self.execute(q.renew_leases, (now + ttl, node)).fetchall())
            share = -(-len(wanted) // max(live, 1))
            extra = mine[share:]
            taken: list[str] = []
            if len(mine) < share:
                free = [r[0] for r in self.execute(q.free_mailboxes, (wanted, now, share - len(mine))).fetchall()]
                if free:
                    self.execute(q.lock_taken, (free,))
                taken = sorted(r[0] for r in self.all(q.take_lease, (free, node, now + ttl, now))) if free else []
            orphaned = taken + (mine if first else [])
            uncertain = [r[0] for r in self.execute(q.orphaned_to_uncertain, (now, node, orphaned)).fetchall()]
        return sorted(mine + taken), taken, uncertain, extra

    def holding(self, mailbox: str) -> Callable[[], bool]:
        """Fencing, in the claiming transaction: this daemon's lease on the mailbox lasts long enough for a send
        (and the lease row is held until the commit). Asked now; in a pipeline, answered with the next read."""
        fence = self.lease_check(mailbox)
        if fence is None:
            return lambda: True
        rows = self.execute(self.q.holds_lease, fence)
        return lambda: rows.fetchone() is not None

    def lease_check(self, mailbox: str) -> tuple[str, str, float] | None:
        return None if self.node is None else (mailbox, self.node, self.lease_ttl * self.LEASE_MARGIN)

    def release_all(self, node: str) -> None:
        """A daemon that stops lets go of everything at once: the others take over at their next round."""
        with self.transaction():
            self.execute(self.q.release_leases, (node,))
            self.execute(self.q.release_daemon, (node,))

    def leases(self) -> dict[str, tuple[str, float]]:
        return {r[0]: (r[1], float(r[2])) for r in self.execute(self.q.leases).fetchall()}

    def daemons(self, ttl: float) -> list[dict[str, Any]]:
        now = self.now()
        return [
            {"node": r[0], "pid": r[1], "host": r[2], "started_at": r[3], "seen_at": r[4], "live": r[4] >= now - ttl}
            for r in self.execute(self.q.daemons).fetchall()
        ]

    # --- copying an SQLite database over -------------------------------------------------------------

    def copy_from(
        self, tables: Sequence[str], rows_of: Callable[[str], tuple[list[str], Iterator[list[Any]]]]
    ) -> dict[str, int]:
        """Every row of `tables` (read by `rows_of`: columns, batches of rows) copied in, in one transaction,
        the counts verified table by table: on any difference (or error) nothing stays. Rows by table."""
        where = self.where
        try:
            theirs = {
                r[0]
                for r in self.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                )
            }
            missing = sorted(set(tables) - theirs)
            if missing:
                raise StoreError(f"{where}: no table {', '.join(missing)} (schemas differ: upgrade cadenced)")
            # References first; the rollups after the results they are made from.
            order = sorted(tables, key=lambda t: {"enrollments": 0, "messages": 1}.get(t, 3 if t in ROLLED_UP else 2))
            copied: dict[str, int] = {}
            with self.transaction():
                for table in order:
                    if self.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                        raise StoreError(f"{where}: table {table} is not empty: migrate copies into an empty database")
                for table in order:
                    columns, batches = rows_of(table)
                    n = 0
                    if table in ROLLED_UP:  # PostgreSQL's triggers make them from `results` as it is copied
                        copied[table] = sum(len(rows) for rows in batches)
                        continue
                    with (
                        self.pg.cursor() as cursor,
                        cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
                    ):
                        for rows in batches:
                            for row in rows:
                                copy.write_row([_value(v) for v in row])
                            n += len(rows)
                    copied[table] = n
                self.execute(
                    """SELECT setval(pg_get_serial_sequence('messages', 'id'), coalesce(max(id), 0) + 1, false)
                       FROM messages"""
                )
                for table, n in copied.items():
                    there = int(self.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                    if there != n:
                        raise StoreError(f"{where}: {table}: {n} rows read, {there} in PostgreSQL; nothing was kept")
            return copied
        except (psycopg.Error, StoreUnavailable) as exc:
            raise StoreError(f"{where}: {redact_url(str(exc).strip(), self.url)}; nothing was kept") from None


__all__ = ["PgEngine", "Statement"]
