"""The database: the store's operations, grouped by the record they own, over one of two engines.

    store/
      engine.py       the Engine protocol both backends keep, the named-statement loader, commit hooks
      sqlite.py       SQLite (the default): one file in WAL mode, its migrations
      postgres.py     PostgreSQL: several daemons, leases on mailboxes
      queries/*.sql   every statement, by name: common.sql, and each engine's own
      schema/*.sql    the schema of a new database, per engine
      core.py         transactions, and the moves several records make together (an enrollment ends)
      outbox.py, enrollments.py, imports.py, health.py, counts.py: the operations, by record
      records.py      Claimed, Snapshot, SentRecord, Pin, the states

Nothing outside this package imports sqlite3 or psycopg: every error comes out as the store's own
(daemon.errors: StoreError, StoreUnavailable, StoreBusy, StoreDamaged).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from daemon.errors import StoreBusy, StoreDamaged, StoreError, StoreUnavailable
from daemon.store.core import Core
from daemon.store.counts import Counts
from daemon.store.engine import Engine, Leasing, commits
from daemon.store.enrollments import Enrollments
from daemon.store.health import Health, snapshot_of
from daemon.store.imports import Imports
from daemon.store.outbox import Outbox
from daemon.store.prospects import Prospects
from daemon.store.records import (
    BLOCKED_BY,
    ENROLLMENT_STATES,
    HELD_DUE,
    IDEMPOTENCY_KEPT,
    MESSAGE_STATES,
    OUTCOMES,
    PENDING,
    SCHEMA_VERSION,
    SUPPRESSED_BY,
    Claimed,
    Pin,
    SentRecord,
    Snapshot,
    domain_of,
)
from daemon.store.sqlite import IntegrityCheck, SqliteEngine

__all__ = [
    "BLOCKED_BY",
    "ENROLLMENT_STATES",
    "HELD_DUE",
    "IDEMPOTENCY_KEPT",
    "MESSAGE_STATES",
    "OUTCOMES",
    "PENDING",
    "SCHEMA_VERSION",
    "SUPPRESSED_BY",
    "Claimed",
    "Engine",
    "IntegrityCheck",
    "Pin",
    "SentRecord",
    "Snapshot",
    "Store",
    "StoreBusy",
    "StoreDamaged",
    "StoreError",
    "StoreUnavailable",
    "commits",
    "copy_to_postgres",
    "domain_of",
    "startup_failure",
]


class Store(Outbox, Enrollments, Imports, Health, Counts, Prospects, Core):
    """The store's operations on one connection of one engine."""

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
        """The database of `daemon.database`: an SQLite file, or a PostgreSQL URL.

        `wait` False: a write that finds another process's lock fails at once (StoreBusy) instead of waiting.
        `counts_by_hand`: no counting triggers; only claim, record_sent and finish_enrollment may change a state
        on this connection (the daemon's group commit). SQLite counts in Python; PostgreSQL in those statements.
        """
        if isinstance(path, str):
            from daemon.store.postgres import PgEngine  # psycopg is loaded only for a PostgreSQL database

            return cls(PgEngine.connect(path, busy_timeout=busy_timeout, wait=wait, counting=counts_by_hand))
        return cls(
            SqliteEngine.open(path, create=create, busy_timeout=busy_timeout, wait=wait, counts_by_hand=counts_by_hand)
        )

    def ask_turn_reads(
        self, mailbox: str, day: str, day_start: float, now: float, prioritize: str | None
    ) -> tuple[Callable[[], bool], Callable[[], Snapshot], Callable[[], Any] | None]:
        """holding, ask_snapshot and (`prioritize`: the turn may claim) ask_next_due, asked now and each read when
        called. A fenced PostgreSQL session asks them in one statement composed of the three (the `ask_` ones):
        each statement costs the server and psycopg their own work (one, not three: the daemon's CPU per message
        623 → 532 µs, bench/cluster.py)."""
        fence = self.conn.lease_check(mailbox)
        if fence is None:
            holds = self.holding(mailbox)
            snap = self.ask_snapshot(mailbox, day, day_start)
            return holds, snap, None if prioritize is None else self.ask_next_due(mailbox, now, prioritize)
        if prioritize is None:
            rows = self.conn.execute(self.q.ask_lease_snapshot, (*fence, mailbox, day, day_start))
        else:
            statement = self._next_due_statement(prioritize, "ask_lease_snapshot_")
            rows = self.conn.execute(statement, (*fence, mailbox, day, day_start, mailbox, now))
        got: list[Any] = []

        def row() -> Any:
            if not got:
                got.append(rows.fetchone())
            return got[0]

        def following() -> Any:
            r = row()
            return None if r[13] is None else r[13:]  # holds_lease's column, snapshot's 12, then next_due's

        return lambda: row()[0] is not None, lambda: snapshot_of(row()[1:13]), None if prioritize is None else following

    # --- several daemons on one database (PostgreSQL) ------------------------------------------------

    @property
    def leasing(self) -> Leasing:
        if not self.shared:
            raise StoreError(f"{self.path}: an SQLite database has one daemon: no leases")
        return cast(Leasing, self.conn)

    def lease_round(self, *args: Any) -> tuple[list[str], list[str], list[int], list[str]]:
        return self.leasing.lease_round(*args)

    def release_all(self, node: str) -> None:
        self.leasing.release_all(node)

    def leases(self) -> dict[str, tuple[str, float]]:
        return self.leasing.leases()

    def daemons(self, ttl: float) -> list[dict[str, Any]]:
        return self.leasing.daemons(ttl)

    def fence(self, node: str, ttl: float) -> None:
        """This connection claims only for mailboxes `node` holds a lease on, long enough for a send."""
        self.leasing.node, self.leasing.lease_ttl = node, ttl

    def server(self) -> tuple[str, int]:
        """(server version, schema version) of a PostgreSQL database, for `cadenced check`."""
        return self.leasing.server()


def copy_to_postgres(source: Store, url: str) -> dict[str, int]:
    """`cadenced migrate`: every row of an SQLite database copied into an empty PostgreSQL one, in one
    transaction, the counts verified table by table: on any difference (or error) nothing stays there."""
    from daemon.store.postgres import PgEngine

    if not isinstance(source.conn, SqliteEngine):
        raise StoreError(f"{source.path}: migrate copies from an SQLite database")
    target = PgEngine.connect(url)
    try:
        return target.copy_from(source.conn.tables(), source.conn.rows)
    finally:
        target.close()


def startup_failure(path: Path | str, exc: StoreUnavailable) -> StoreError:
    """Why the daemon cannot start on the database (exit 2): damaged, locked, or what the engine says."""
    if isinstance(exc, StoreDamaged):
        return StoreError(str(exc))
    return StoreError(f"{path}: cannot start on the database: {exc}")
