"""What the store asks of a database engine, and the named statements it runs on one.

The statements live in `queries/*.sql`, each after a `-- name: <name>` line: `common.sql` holds what both
engines run as written, `sqlite.sql` and `postgres.sql` what each says its own way (a scratch table, a list
parameter, `greatest`). They are written with SQLite's placeholders (`?`, `?1`); PostgreSQL's loader writes
them as psycopg's (`%s`, `%(p1)s`) once, when the file is read, and nothing rewrites a statement after that.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

DIALECTS = ("sqlite", "postgres")
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)
_PLACEHOLDER = re.compile(r"\?(\d*)")


class Statement(str):
    """A named statement; `numbered`: its placeholders are numbered (?1), so its parameters go by name on
    PostgreSQL."""

    name: str
    numbered: bool


class Queries:
    """The named statements of one dialect, as attributes: `q.claim`."""

    def __init__(self, dialect: str, statements: dict[str, Statement]) -> None:
        self.dialect = dialect
        self.param = "%s" if dialect == "postgres" else "?"  # a placeholder in a condition added to a statement
        self.__dict__.update(statements)
        self.names = frozenset(statements)

    def __getattr__(self, name: str) -> Statement:  # only for names that are not there
        raise AttributeError(f"no statement {name!r} for {self.dialect} in daemon/store/queries")


def read_blocks(text: str, source: str) -> dict[str, str]:
    """`-- name: x` blocks of a .sql file; a name given twice is an error (it names the file)."""
    out: dict[str, str] = {}
    pieces = _NAME.split(text)
    for name, body in zip(pieces[1::2], pieces[2::2], strict=True):
        if name in out:
            raise ValueError(f"{source}: the statement {name!r} is named twice")
        lines = body.strip().split("\n")
        ends = [i for i, line in enumerate(lines) if line.rstrip().endswith(";")]
        if ends:  # what follows the statement's `;` is a comment on the next one
            lines = lines[: ends[-1] + 1]
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if not sql:
            raise ValueError(f"{source}: the statement {name!r} is empty")
        out[name] = sql
    return out


def _file(name: str) -> str:
    return (resources.files("daemon.store") / "queries" / name).read_text(encoding="utf-8")


def sources(dialect: str) -> dict[str, str]:
    """The statements of `dialect` as written: the shared ones, with the dialect's own added or put instead."""
    shared = read_blocks(_file("common.sql"), "common.sql")
    own = read_blocks(_file(f"{dialect}.sql"), f"{dialect}.sql")
    clash = sorted(set(shared) & set(own))
    if clash:
        raise ValueError(f"{dialect}.sql: {', '.join(clash)} also in common.sql (a statement has one home)")
    return shared | own


_COMPOSE = "-- compose:"


def compose(name: str, parts: list[str], written: dict[str, str]) -> str:
    """`-- compose: a b c`: the statements a, b and c (each returning at most one row) as one, side by side: a's
    columns, then b's, then c's, NULL where one found no row. Their parameters follow each other in that order
    (numbered anew); each part runs as written (a lock it takes, it takes)."""
    ctes, offset = [], 0
    for k, part in enumerate(parts):
        sql = written.get(part)
        if sql is None or sql.startswith(_COMPOSE):
            raise ValueError(f"{name}: composes {part!r}, which is not a statement written in a .sql file")
        numbers = [int(n) for n in re.findall(r"\?(\d+)", sql)]
        if numbers and re.search(r"\?(?!\d)", sql):
            raise ValueError(f"{name}: {part!r} has numbered and unnumbered placeholders")
        count = max(numbers) if numbers else sql.count("?")
        bare = iter(range(1, count + 1))

        def renumbered(m: re.Match[str], first: int = offset, bare: Iterator[int] = bare) -> str:
            return f"?{first + (int(m.group(1)) if m.group(1) else next(bare))}"

        ctes.append(f"q{k} AS ({_PLACEHOLDER.sub(renumbered, sql)})")
        offset += count
    joined = " ".join(f"LEFT JOIN q{k} ON true" for k in range(len(parts)))
    columns = ", ".join(f"q{k}.*" for k in range(len(parts)))
    return f"WITH {', '.join(ctes)} SELECT {columns} FROM (SELECT 1) AS one {joined}"


def load(dialect: str) -> Queries:
    """The statements of `dialect`, ready for its driver (a composed one made once, here: see `compose`)."""
    statements: dict[str, Statement] = {}
    written = sources(dialect)
    for name, sql in written.items():
        if sql.startswith(_COMPOSE):
            sql = compose(name, sql.removeprefix(_COMPOSE).split(), written)
        numbered = bool(re.search(r"\?\d", sql))
        if dialect == "postgres":
            sql = _PLACEHOLDER.sub(lambda m: f"%(p{m.group(1)})s" if m.group(1) else "%s", sql.replace("%", "%%"))
        statement = Statement(sql)
        statement.name, statement.numbered = name, numbered
        statements[name] = statement
    return Queries(dialect, statements)


class Rows(Protocol):
    """What a statement returns: a cursor whose fetches raise the store's errors."""

    rowcount: int

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Engine(Protocol):
    """One connection to one database, as the store uses it. Every method raises the store's errors
    (daemon.errors: StoreBusy, StoreUnavailable, StoreDamaged), never its driver's."""

    q: Queries
    where: Path | str  # what an error names (a file, or a URL without its password)
    shared: bool  # True on PostgreSQL: several daemons, each sending for the mailboxes it leases
    counts_by_hand: bool  # no counting triggers on this connection (SQLite's group commit)
    pipelines: bool  # statements go without waiting for their answers (`write`, `pipelined`): PostgreSQL

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose answer nobody reads: in a pipeline, sent with the next statement that is read."""

    def pipelined(self) -> AbstractContextManager[None]:
        """A batch of transactions in pipeline mode (PostgreSQL), where `write`s are not waited for."""
        ...

    def sync(self, quiet: bool = False) -> None:
        """Everything sent in the pipeline answered, its first error raised (`quiet`: dropped)."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int: ...

    def transaction(self) -> AbstractContextManager[None]: ...

    def enrolling(self) -> AbstractContextManager[None]: ...

    def staging(self) -> AbstractContextManager[None]: ...

    def rollback(self) -> None: ...

    def data_version(self) -> int: ...

    def tell(self, mailboxes: Iterable[str]) -> None:
        """This transaction changes what is due for `mailboxes` (told to the other daemons at its commit)."""

    def heard_mailboxes(self) -> set[str] | None:
        """The mailboxes other processes' commits named since the last call (None: any)."""

    def check_integrity(self) -> None: ...

    def list_param(self, values: Sequence[Any]) -> Any: ...

    def holding(self, mailbox: str) -> Callable[[], bool]:
        """Fencing: asks (and, on PostgreSQL, locks for the transaction) this daemon's lease on `mailbox`; the
        answer is read when the returned function is called."""
        ...

    def lease_check(self, mailbox: str) -> tuple[str, str, float] | None:
        """holds_lease's parameters for `mailbox` on a fenced PostgreSQL session (None: nothing to hold)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Leasing(Protocol):
    """What an engine shared by several daemons adds (PostgreSQL): leases on mailboxes, fenced claims."""

    node: str | None
    lease_ttl: float

    def lease_round(
        self, node: str, mailboxes: Sequence[str], ttl: float, release: Sequence[str], first: bool
    ) -> tuple[list[str], list[str], list[int], list[str]]: ...

    def release_all(self, node: str) -> None: ...

    def leases(self) -> dict[str, tuple[str, float]]: ...

    def daemons(self, ttl: float) -> list[dict[str, Any]]: ...

    def server(self) -> tuple[str, int]: ...


class CommitHooks:
    """Told how long each transaction took, BEGIN to COMMIT (lock wait, work, fsync): the API's /metrics
    subscribes while it serves."""

    def __init__(self) -> None:
        self._observers: list[Callable[[float], None]] = []
        self._lock = threading.Lock()

    def add(self, observer: Callable[[float], None]) -> Callable[[], None]:
        """`observer` told of every commit of this process from now on; returns what stops it."""
        with self._lock:
            self._observers = [*self._observers, observer]

        def remove() -> None:
            with self._lock:
                self._observers = [o for o in self._observers if o is not observer]

        return remove

    def committed(self, seconds: float) -> None:
        for observer in self._observers:
            observer(seconds)


commits = CommitHooks()
