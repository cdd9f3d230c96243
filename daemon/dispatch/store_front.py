"""The daemon's front to the store: calls that never make the event loop wait on a lock, and the sender
loops' turns committed together (group commit)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from daemon.errors import (
    StoreBusy,
    StoreUnavailable,
)
from daemon.store import Store

T = TypeVar("T")


CALL_MARGIN = 15.0  # seconds a PostgreSQL call may run past its lock wait before its connection is interrupted
WATCH_EVERY = 0.5  # seconds between the watchdog's looks at the calls in flight (their bounds are tens of seconds)
GATHER_PASSES = 8  # event loop passes a group commit waits at most for more calls (bench/throughput.py)


class AsyncStore:
    """The daemon's database calls, made so that the event loop never waits on a lock.

    A call runs first on the event loop on a connection with no busy timeout:
    SQLite in WAL mode answers in well under a millisecond, and handing every
    call to a worker thread made each one wait for the GIL several times over.
    Only when another process holds the write lock (an import, a retry) does
    the call fail at once with SQLITE_BUSY; it then runs again, in a worker
    thread, on a second connection that waits for the lock. The sender loops'
    turns go through `grouped`: a third connection commits them in batches.
    """

    def __init__(self, path: Path | str, busy_timeout: float = 30.0) -> None:
        self.busy_timeout = busy_timeout
        self.fast = Store.open(path, wait=False)
        self.slow = Store.open(path, busy_timeout=busy_timeout)
        self.group = Store.open(path, wait=False, counts_by_hand=True)
        # A PostgreSQL server is a round trip away: every call waits in a worker thread, never on the loop.
        self.remote = isinstance(path, str)
        if self.remote:
            own = {s.conn.pid for s in (self.fast, self.slow, self.group)}  # type: ignore[attr-defined]
            for s in (self.fast, self.slow, self.group):
                s.conn.own = own  # type: ignore[attr-defined]  # one set: a connection opened again joins it
                # The daemon's own commits (sends, heartbeats, lease rounds) are news to nobody: only what makes
                # a message due on a mailbox (a follow-up, a hand-over) is told, naming it.
                s.conn.loud = False  # type: ignore[attr-defined]
        self.limiter = anyio.CapacityLimiter(1)
        self.group_limiter = anyio.CapacityLimiter(1)
        self.waited = 0
        self._watchdog = _Watchdog()
        self._queue: list[_Call] = []
        self._pending = anyio.Event()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(store, *args)`: every write in it is one transaction, so a busy retry repeats nothing.

        Raises StoreUnavailable when the database cannot do it now.
        """
        if not self.remote:
            try:
                return fn(self.fast, *args)
            except StoreBusy:
                self.waited += 1
        return await anyio.to_thread.run_sync(
            self._bounded(self.slow, functools.partial(fn, self.slow, *args)), limiter=self.limiter
        )

    async def grouped(self, fn: Callable[..., T], *args: Any, ahead: Callable[..., Any] | None = None) -> T:
        """`fn(store, *args)` inside a transaction shared with the other mailboxes' calls.

        Group commit: while one batch commits, the next calls queue up, and each
        batch costs one BEGIN/COMMIT. Each call is its own savepoint, so one that
        fails is rolled back alone. A caller resumes only after the commit.

        `ahead` (PostgreSQL): `ahead(store, *args)` runs first for every call of the batch, its reads asked and
        not read, and then `fn(store, *args, asked=its answer)` (asked=None where it did not run): the batch's
        reads travel together.
        """
        if ahead is None:
            call = _Call(lambda store, _: fn(store, *args))
        else:
            call = _Call(lambda store, asked: fn(store, *args, asked=asked), lambda store: ahead(store, *args))
        self._queue.append(call)
        self._pending.set()
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    async def committer(self) -> None:
        """Commits the queued calls in batches; a database failure fails the batch, never the daemon.

        A batch commits on the event loop, on a connection of its own (so that
        `others_version` can tell the daemon's commits from other processes).
        Measured again with the batches gathered: the COMMIT (and its fsync) in
        a worker thread cost 6% more CPU per message for no more throughput
        (thread hops and the GIL), so only a batch that finds the write lock
        taken waits for it in a thread.
        """
        while True:
            await self._pending.wait()
            # The sender loops woken in the same pass (their replies read together) queue their turns before
            # the batch closes: more calls per fsync. While the queue grows, it waits a pass more.
            queued = 0
            for _ in range(GATHER_PASSES):
                if len(self._queue) == queued:
                    break
                queued = len(self._queue)
                await anyio.lowlevel.checkpoint()
            self._pending = anyio.Event()
            batch, self._queue = self._queue, []
            try:
                try:
                    if self.remote:
                        run = self._bounded(self.group, functools.partial(self._run_batch, self.group, batch))
                        await anyio.to_thread.run_sync(run, limiter=self.group_limiter)
                    else:
                        self._run_batch(self.group, batch)
                except StoreBusy:
                    self.waited += 1
                    run = self._bounded(self.slow, functools.partial(self._run_batch, self.slow, batch))
                    await anyio.to_thread.run_sync(run, limiter=self.limiter)
            except StoreUnavailable as failure:
                for call in batch:
                    call.result, call.error = None, failure
            for call in batch:
                call.done.set()

    def _bounded(self, store: Store, call: Callable[[], T]) -> Callable[[], T]:
        """`call` in a worker thread, bounded on PostgreSQL: past the lock wait and a margin, its connection is
        interrupted (a server that answers nothing never holds a thread, a shutdown or the leases forever)."""
        if not self.remote:
            return call
        bound = self.busy_timeout + CALL_MARGIN
        interrupt = store.conn.interrupt  # type: ignore[attr-defined]

        def bounded() -> T:
            token = self._watchdog.watch(bound, interrupt)
            try:
                return call()
            finally:
                self._watchdog.done(token)

        return bounded

    @staticmethod
    def _run_batch(store: Store, batch: list[_Call]) -> None:
        """The batch's calls in one transaction. Their results (counted by hand on SQLite) are summed over the
        batch and written once before the commit: three statements per send and end were 6% of its CPU. On
        PostgreSQL in pipeline mode: a send's writes go with the turn's first read, not a round trip each."""
        store.hold_results()
        try:
            with store.conn.pipelined():
                AsyncStore._run_calls(store, batch)
        finally:
            store.release_results()

    @staticmethod
    def _run_calls(store: Store, batch: list[_Call]) -> None:
        if len(batch) == 1:  # alone, a call needs no savepoint: its failure rolls back only its own writes
            AsyncStore._run_alone(store, batch[0])
            return
        if store.conn.pipelines:
            AsyncStore._run_together(store, batch)
            return
        with store.transaction():
            conn = store.conn
            for i, call in enumerate(batch):
                call.result, call.error = None, None
                conn.write(f"SAVEPOINT call{i}")  # each call a savepoint: one that fails is rolled back alone
                try:
                    call.result = call.fn(store, None)
                    conn.sync()  # in a pipeline: the call's writes answered, so that their errors are its own
                    store.keep_results()
                except Exception as exc:
                    store.drop_results()
                    conn.sync(quiet=True)  # a pipeline stopped by the error: what the call sent after it dropped
                    if not conn.in_transaction:
                        raise  # the transaction itself is gone (a full disk): the whole batch fails
                    conn.run(f"ROLLBACK TO call{i}")
                    call.error = exc
                conn.write(f"RELEASE call{i}")
            store.write_held_results()

    @staticmethod
    def _run_alone(store: Store, call: _Call) -> None:
        call.result, call.error = None, None
        try:
            with store.transaction():
                ahead = call.ahead if store.conn.pipelines else None  # SQLite reads at once: nothing gained
                call.result = call.fn(store, ahead(store) if ahead is not None else None)
                store.keep_results()
                store.write_held_results()
        except StoreUnavailable:
            raise  # the batch fails as a batch (the committer retries or reports it)
        except Exception as exc:
            call.error = exc

    @staticmethod
    def _run_together(store: Store, batch: list[_Call]) -> None:
        """PostgreSQL, in a pipeline: the calls in one transaction without savepoints (a SAVEPOINT, a RELEASE
        and a wait for the call's answers each were three round trips per message). A call that fails, whose
        error may come to light in a later call's read, rolls the batch back, and then each call runs alone in a
        transaction of its own: each a function of the database and its arguments, none is half done twice."""
        try:
            with store.transaction():
                asked = [call.ahead(store) if call.ahead is not None else None for call in batch]
                for call, answer in zip(batch, asked, strict=True):
                    call.result, call.error = None, None
                    call.result = call.fn(store, answer)
                    store.keep_results()
                store.write_held_results()
        except StoreUnavailable:
            raise  # the batch fails as a batch (the committer retries or reports it)
        except Exception:
            store.hold_results()  # what the batch counted was rolled back with it
            for call in batch:
                AsyncStore._run_alone(store, call)

    async def others_version(self) -> tuple[int, set[str] | None]:
        """(PRAGMA data_version seen by the group-commit connection, the mailboxes named): it moves when another
        connection commits; on PostgreSQL the commit names the mailboxes whose queues it changed (None: any).

        Read there, the daemon's own sends (the bulk of its commits) do not count as news.
        """
        if self.remote:

            def read() -> tuple[int, set[str] | None]:
                return self.group.data_version(), self.group.conn.heard_mailboxes()

            return await anyio.to_thread.run_sync(self._bounded(self.group, read), limiter=self.group_limiter)
        return self.group.data_version(), None

    def close(self) -> None:
        self.fast.close()
        self.slow.close()
        self.group.close()


class _Watchdog:
    """Interrupts the calls that run past their bounds: one thread, looking twice a second. A timer thread per
    call, as before, started and ended a thread for every batch of the group commit (py-spy found the timers in
    3% of its samples of a sending daemon)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None

    def watch(self, bound: float, interrupt: Callable[[], None]) -> int:
        with self._lock:
            self._next += 1
            self._calls[self._next] = (time.monotonic() + bound, interrupt)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store watchdog", daemon=True)
                self._thread.start()
            return self._next

    def done(self, token: int) -> None:
        with self._lock:
            self._calls.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_EVERY)
            now = time.monotonic()
            with self._lock:
                late = [(k, interrupt) for k, (deadline, interrupt) in self._calls.items() if deadline <= now]
                for k, _ in late:
                    del self._calls[k]
            for _, interrupt in late:
                interrupt()


class _Call:
    __slots__ = ("ahead", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[[Store, Any], Any], ahead: Callable[[Store], Any] | None = None) -> None:
        self.fn = fn  # fn(store, what `ahead` asked, or None)
        self.ahead = ahead
        self.done = anyio.Event()
        self.result: Any = None
        self.error: Exception | None = None
