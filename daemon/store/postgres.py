"""The store on PostgreSQL: `database = "postgresql://…"` (SPEC §10).

The statements are the store's named queries (queries/common.sql and queries/postgres.sql), the schema is
schema/postgres.sql with its counting triggers in PL/pgSQL. Writers take one transaction-scoped advisory
lock, so a PostgreSQL database is written as an SQLite one is, one transaction at a time, whoever writes
(daemons, commands): every rule that holds on SQLite (a claim, a day's count, a gap) holds here for the same
reason. Several daemons share it, each sending for the mailboxes it leases.

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

from daemon.errors import Refused, StoreBusy, StoreError, StoreUnavailable
from daemon.store.engine import Queries, Statement, commits, load
from daemon.store.records import SCHEMA_VERSION
from daemon.store.urls import PASSWORD_PARAMS, shown_database

PG_FIRST_SCHEMA = 10  # the schema PostgreSQL support started at
SCHEMA = (Path(__file__).parent / "schema" / "postgres.sql").read_text(encoding="utf-8")
QUERIES: Queries = load("postgres")
WRITE_LOCK = 0x63616465  # the advisory lock every writing transaction takes ("cade")
CHANNEL = "cadenced"  # NOTIFY at every commit: the daemon hears other processes' commits
NOT_COPIED = frozenset({"cadenced_schema", "daemons", "leases"})  # PostgreSQL's own


@contextmanager
def _errors(url: str = "") -> Iterator[None]:
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        raise StoreBusy(f"database is locked: {exc}") from None
    except psycopg.Error as exc:
        raise StoreUnavailable(redact_url(str(exc).strip() or type(exc).__name__, url)) from None


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
    except psycopg.Error as exc:
        raise StoreError(f"{shown(url)}: cannot connect: {redact_url(str(exc).strip(), url)}") from None
    return (str(version[0]) if version else "?"), (int(schema[0]) if schema else None)


def hold_daemon_lock(url: str, node: str) -> Callable[[], None]:
    """One process per node name: a session advisory lock on a connection of its own, held until released
    (or the process dies); the connection's application_name says which process holds it. Daemons with
    other node names share the database, each with the mailboxes it leases."""
    name = f"cadenced run pid {os.getpid()} on {socket.gethostname()}"[:63]
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name=name)
    except psycopg.Error as exc:
        raise StoreError(f"{shown(url)}: cannot connect: {redact_url(str(exc), url)}") from None
    key = f"cadenced node {node}"
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
    if not row or not row[0]:
        holder = conn.execute(
            """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.objid = (hashtext(%s)::bigint & 4294967295) AND l.granted
               AND a.pid != pg_backend_pid()""",
            (key,),
        ).fetchone()
        conn.close()
        who = str(holder[0]).removeprefix("cadenced run ") if holder else "unknown"
        raise Refused(
            f"another cadenced run ({who}) already runs on {shown(url)} as node {node!r} "
            "(give each daemon its own [daemon] node)"
        )
    return conn.close


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


def _statements(script: str) -> Iterator[str]:
    """The schema's statements (a function body's `;` and `$$` kept whole)."""
    body = "\n".join(line for line in script.strip().split("\n") if not line.startswith("-- "))
    for piece in re.split(r";\n(?=CREATE )", body.strip()):
        yield piece.rstrip(";")


class PgEngine:
    """One psycopg connection, as the store uses it."""

    shared = True
    counts_by_hand = False  # PostgreSQL keeps its counting triggers
    LEASE_MARGIN = 0.5  # a claim needs its lease to last this share of a lease longer (a send fits in it)

    def __init__(self, url: str, *, wait: bool, timeout: float) -> None:
        self.pg = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
        self.pg.adapters.register_dumper(str, StrDumper)  # text, not unknown: lists of strings are text[]
        self.pg.adapters.register_loader("numeric", _IntLoader)
        self.url = url
        self.where: Path | str = shown(url)
        self.q = QUERIES
        self.wait = wait
        self.heard = 0  # notifications from other connections (data_version)
        self.listening = False
        self.pid = self.pg.info.backend_pid
        # Whose commits are not news (data_version): the daemon's own connections. With 2,000 IMAP sessions
        # saving their positions, hearing them woke all 2,000 sender loops every second.
        self.own = {self.pid}
        self.node: str | None = None  # set on the daemon's connections: its claims are fenced by its leases
        self.lease_ttl = 60.0
        self.pg.add_notify_handler(self._heard)
        self.pg.execute(f"SET lock_timeout = {int(timeout * 1000)}")

    @classmethod
    def connect(cls, url: str, *, busy_timeout: float = 30.0, wait: bool = True) -> PgEngine:
        where = shown(url)
        try:
            engine = cls(url, wait=wait, timeout=busy_timeout)
        except psycopg.Error as exc:
            raise StoreError(f"{where}: cannot connect: {redact_url(str(exc), url)}") from None
        try:
            engine._migrate()
        except (psycopg.Error, StoreUnavailable) as exc:
            engine.close()
            raise StoreError(f"{where}: {redact_url(str(exc), url)}") from None
        except StoreError:
            engine.close()
            raise
        return engine

    def _heard(self, notify: psycopg.Notify) -> None:
        if notify.pid not in self.own:
            self.heard += 1

    def _migrate(self) -> None:
        found = self.execute("SELECT to_regclass('cadenced_schema') IS NOT NULL").fetchone()[0]
        if not found:
            with self.transaction():
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
                # 10 → 11 and 11 → 12 changed SQLite's counting triggers and its index by state only:
                # PostgreSQL keeps its own triggers and indexes. 13: the index of due follow-ups;
                # 14: first emails counted apart.
                self.run(
                    """CREATE INDEX IF NOT EXISTS messages_due_follow_ups ON messages (mailbox, due_at, id)
                       WHERE state = 'scheduled' AND step > 1"""
                )
                self.run("ALTER TABLE daily_counts ADD COLUMN IF NOT EXISTS first_emails BIGINT NOT NULL DEFAULT 0")
                self.execute("UPDATE cadenced_schema SET version = %s WHERE version < %s", (SCHEMA_VERSION,) * 2)

    def server(self) -> tuple[str, int]:
        """(server version, schema version) for `cadenced check`."""
        version = self.execute("SHOW server_version").fetchone()[0]
        schema = self.execute("SELECT version FROM cadenced_schema").fetchone()[0]
        return str(version), int(schema)

    @property
    def in_transaction(self) -> bool:
        return self.pg.info.transaction_status != pq.TransactionStatus.IDLE

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Rows:
        with _errors(self.url):
            return _Rows(self.pg.execute(sql, _params(sql, params)))

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        with _errors(self.url):
            return self.pg.execute(sql, _params(sql, params)).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with _errors(self.url):
            return self.pg.execute(sql, _params(sql, params)).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with _errors(self.url):
            return self.pg.execute(sql, _params(sql, params)).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        with _errors(self.url), self.pg.cursor() as cursor:
            cursor.executemany(sql, [_params(sql, r) for r in rows])
            return cursor.rowcount

    def _begin(self) -> None:
        with _errors(self.url):
            self.pg.execute("BEGIN")
            if self.wait:
                self.pg.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                return
            row = self.pg.execute("SELECT pg_try_advisory_xact_lock(%s)", (WRITE_LOCK,)).fetchone()
            if row is not None and row[0]:
                return
            self.pg.execute("ROLLBACK")
        raise StoreBusy("database is locked: another process is writing")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.in_transaction:
            yield
            return
        started = time.perf_counter()
        self._begin()
        try:
            yield
            with _errors(self.url):
                self.pg.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
                self.pg.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        commits.committed(time.perf_counter() - started)

    @contextmanager
    def enrolling(self) -> Iterator[None]:
        """PostgreSQL checks foreign keys as it must: an import's transaction is a transaction."""
        with self.transaction():
            yield

    @contextmanager
    def staging(self) -> Iterator[None]:
        """A TEMP table of PostgreSQL's is written statement by statement, as before: no transaction needed."""
        yield

    def rollback(self) -> None:
        if self.in_transaction:
            try:
                self.pg.execute("ROLLBACK")
            except psycopg.Error:
                pass

    def data_version(self) -> int:
        """Counts commits by other connections, heard by LISTEN (a round trip delivers what has come)."""
        with _errors(self.url):
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
        self.pg.close()

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
                taken = [r[0] for r in self.execute(q.free_mailboxes, (wanted, now, share - len(mine))).fetchall()]
                self.executemany(q.take_lease, [(m, node, now + ttl) for m in taken])
            orphaned = taken + (mine if first else [])
            uncertain = [r[0] for r in self.execute(q.orphaned_to_uncertain, (now, node, orphaned)).fetchall()]
        return sorted(mine + taken), taken, uncertain, extra

    def holds(self, mailbox: str) -> bool:
        """Fencing, in the claiming transaction: this daemon's lease on the mailbox lasts long enough for a send."""
        if self.node is None:
            return True
        row = self.execute(self.q.holds_lease, (mailbox, self.node, self.lease_ttl * self.LEASE_MARGIN)).fetchone()
        return row is not None

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
            order = sorted(tables, key=lambda t: {"enrollments": 0, "messages": 1}.get(t, 2))  # references first
            copied: dict[str, int] = {}
            with self.transaction():
                for table in order:
                    if self.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                        raise StoreError(f"{where}: table {table} is not empty: migrate copies into an empty database")
                for table in order:
                    columns, batches = rows_of(table)
                    n = 0
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
