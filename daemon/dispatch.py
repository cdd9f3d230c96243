"""Per-mailbox sender loops: claim → compose → send → record; the retry queue.

APScheduler holds one date job per mailbox (when that mailbox may next send)
and one housekeeping job that notices commits by other processes. Jobs only
set an event; the SMTP work runs in the dispatcher's task group, where
shutdown can drain it. The outbox in the database is the truth: there is no
timer per message, and a wake costs one indexed look-up of what is due.
"""

from __future__ import annotations

import functools
import random
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from daemon import compose, lifecycle, logs, oauth, outcomes, smtp, timing, unsubscribe
from daemon.config import UNSUBSCRIBE_LINK, Cadence, Config, Mailbox, Step
from daemon.errors import (
    AddressRejected,
    Blocked,
    MailboxDown,
    MailboxRefused,
    MessageDeferred,
    ProviderQuota,
    SmtpFailure,
    StoreUnavailable,
    Throttled,
    Uncertain,
)
from daemon.readside import iso
from daemon.store import Claimed, SentRecord, Snapshot, Store, describe_store_error, is_busy

T = TypeVar("T")
CHANGE_POLL = 1.0  # seconds between checks for commits by other commands
IMAP_OPENING = 16  # IMAP sessions being opened (TLS, LOGIN, SELECT) at once
GATHER_PASSES = 8  # event loop passes a group commit waits at most for more calls (bench/throughput.py)
LOOP_ERRORS_UNHEALTHY = 3  # a sender loop failing this many times in a row starves the watchdog


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
        self.fast = Store.open(path, wait=False)
        self.slow = Store.open(path, busy_timeout=busy_timeout)
        self.group = Store.open(path, wait=False, counts_by_hand=True)
        # A PostgreSQL server is a round trip away: every call waits in a worker thread, never on the loop.
        self.remote = isinstance(path, str)
        if self.remote:
            self.group.conn.own = {s.conn.pid for s in (self.fast, self.slow, self.group)}  # type: ignore[attr-defined]
        self.limiter = anyio.CapacityLimiter(1)
        self.group_limiter = anyio.CapacityLimiter(1)
        self.waited = 0
        self._queue: list[_Call] = []
        self._pending = anyio.Event()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(store, *args)`: every write in it is one transaction, so a busy retry repeats nothing.

        Raises StoreUnavailable (never a raw sqlite3 error) when the database cannot do it now.
        """
        if not self.remote:
            try:
                return fn(self.fast, *args)
            except sqlite3.Error as exc:
                if not is_busy(exc):
                    raise StoreUnavailable(describe_store_error(exc)) from None
            self.waited += 1
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, self.slow, *args), limiter=self.limiter)
        except sqlite3.Error as exc:
            raise StoreUnavailable(describe_store_error(exc)) from None

    async def grouped(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(store, *args)` inside a transaction shared with the other mailboxes' calls.

        Group commit: while one batch commits, the next calls queue up, and each
        batch costs one BEGIN/COMMIT. Each call is its own savepoint, so one that
        fails is rolled back alone. A caller resumes only after the commit.
        """
        call = _Call(lambda store: fn(store, *args))
        self._queue.append(call)
        self._pending.set()
        await call.done.wait()
        if isinstance(call.error, sqlite3.Error):
            raise StoreUnavailable(describe_store_error(call.error))
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
                        await anyio.to_thread.run_sync(self._run_batch, self.group, batch, limiter=self.group_limiter)
                    else:
                        self._run_batch(self.group, batch)
                except sqlite3.Error as exc:
                    if not is_busy(exc):
                        raise
                    self.waited += 1
                    await anyio.to_thread.run_sync(self._run_batch, self.slow, batch, limiter=self.limiter)
            except sqlite3.Error as exc:
                failure = StoreUnavailable(describe_store_error(exc))
                for call in batch:
                    call.result, call.error = None, failure
            for call in batch:
                call.done.set()

    @staticmethod
    def _run_batch(store: Store, batch: list[_Call]) -> None:
        with store.transaction():
            for i, call in enumerate(batch):
                call.result, call.error = None, None
                store.conn.execute(f"SAVEPOINT call{i}")
                try:
                    call.result = call.fn(store)
                except Exception as exc:
                    store.conn.execute(f"ROLLBACK TO call{i}")
                    call.error = exc
                store.conn.execute(f"RELEASE call{i}")

    async def others_version(self) -> int:
        """PRAGMA data_version seen by the group-commit connection: it moves when another connection commits.

        Read there, the daemon's own sends (the bulk of its commits) do not count as news.
        """
        try:
            if self.remote:
                return await anyio.to_thread.run_sync(self.group.data_version, limiter=self.group_limiter)
            return self.group.data_version()
        except sqlite3.Error as exc:
            raise StoreUnavailable(describe_store_error(exc)) from None

    def close(self) -> None:
        self.fast.close()
        self.slow.close()
        self.group.close()


class _Call:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[Store], Any]) -> None:
        self.fn = fn
        self.done = anyio.Event()
        self.result: Any = None
        self.error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    snap: Snapshot
    day: str
    decision: timing.Decision | None
    claimed: Claimed | None
    thread: list[tuple[int, str, str]]
    deferred: list[tuple[int, str, str]] = field(default_factory=list)  # (message, domain, until): domain_limit
    token_first: bool = False  # a message may go now, but the mailbox's access token must be had before the claim


DOMAIN_LOOKS = 20  # full recipient domains passed over in one turn (domain_daily_limit)


def defer_full_domains(
    store: Store, mailbox: Mailbox, now: float, day: str, first_day: str | None
) -> list[tuple[int, str, str]] | None:
    """domain_daily_limit: the next due message's domain has had its sends today? Its due messages wait for the
    mailbox's next sending day, in their order, and the next domain is looked at. Returns (message, domain,
    until) of those deferred, or None when DOMAIN_LOOKS domains in a row were full (the next turn looks again)."""
    schedule = mailbox.schedule
    deferred: list[tuple[int, str, str]] = []
    for _ in range(DOMAIN_LOOKS):
        domain = store.next_due_domain(mailbox.address, now)
        if domain is None or store.domain_sent(mailbox.address, day, domain) < schedule.domain_daily_limit:
            return deferred
        until = timing.next_sending_day(now, schedule, first_day)
        detail = f"deferred: domain_limit until {iso(until)} ({schedule.domain_daily_limit} to {domain} today)"
        moved = store.defer_domain(mailbox.address, domain, now, until, detail)
        deferred += [(m, domain, iso(until) or "") for m in moved]
    return None


@dataclass(frozen=True, slots=True)
class Sent:
    """A delivery accepted by the server, to be committed by the next turn."""

    record: SentRecord
    log: Any
    code: int
    subject: str


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.errors = 0
        self.in_flight = 0
        self.cut = 0


class Dispatcher:
    def __init__(self, config: Config, database: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.db = AsyncStore(database, config.daemon.busy_timeout)
        self.clock = clock
        self.rng = random.Random()
        self.log = logs.get()
        self.stats = Stats()
        self.watchers: dict[str, Any] = {}  # address → its IMAP watcher (imap.Watcher)
        self.stopping = False
        self.runners: dict[str, MailboxRunner] = {}
        # PostgreSQL: the mailboxes this daemon leases (None: all, one daemon per SQLite database), and those
        # whose loops it stopped to hand them to another daemon (released once the loop has finished).
        self.held: set[str] | None = None
        self._stop_requested = anyio.Event()
        self.draining: dict[str, MailboxRunner | _Idle] = {}
        self.connections = anyio.CapacityLimiter(config.daemon.max_connections)
        self.imap_opening = anyio.CapacityLimiter(IMAP_OPENING)
        self.tokens = oauth.Tokens(clock)  # OAuth2 access tokens, one per mailbox for its SMTP and IMAP sessions
        self.unsubscribe_key = b""  # of the tokens in List-Unsubscribe: read from the database by serve()
        self.scheduler = AsyncIOScheduler(
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1}
        )
        self._tg: TaskGroup | None = None
        self._config_changed = anyio.Event()
        self._housekeeping = anyio.Event()
        self._data_version = -1
        self.alive_at = time.monotonic()
        self.deadline = float("inf")  # monotonic: when a stop stops waiting for the store
        self.cut_at: float | None = None  # anyio clock: when a stop cuts the transactions in flight
        self.shields: set[anyio.CancelScope] = set()
        self.store_trouble: tuple[float, str] | None = None  # (since, what) while commits fail
        self._store_logged = 0.0
        self.last_store_error: str | None = None

    def store_failed(self, exc: StoreUnavailable) -> None:
        """Sends pause while the database refuses writes; said once, then every minute."""
        now = time.monotonic()
        if self.store_trouble is None:
            self.store_trouble = (now, str(exc))
            self._store_logged = now
            self.log.error("store.error", detail=str(exc), action="sending paused; the commit is retried")
        elif now - self._store_logged >= 60:
            self._store_logged = now
            since = round(now - self.store_trouble[0])
            self.log.error("store.error", detail=str(exc), failing_for_seconds=since)

    def store_ok(self) -> None:
        if self.store_trouble is not None:
            since, what = self.store_trouble
            self.store_trouble = None
            outage = round(time.monotonic() - since, 1)
            self.last_store_error = f"{iso(self.clock())}: {what} (sending paused {outage} s)"
            self.log.info("store.recovered", outage_seconds=outage, was=what)

    def stuck_loops(self) -> list[str]:
        """Sender loops that fail again and again, or hang in one step past every bound they have."""
        now = time.monotonic()
        stuck = []
        for address, runner in self.runners.items():
            limit = runner.mailbox.smtp.timeout * 7 + 60  # open (3 timeouts) + one transaction (4) + slack
            hung = runner.busy_since is not None and now - runner.busy_since > limit
            if runner.errors_in_row >= LOOP_ERRORS_UNHEALTHY or hung:
                stuck.append(address)
        return stuck

    def past_deadline(self) -> bool:
        return self.stopping and time.monotonic() >= self.deadline

    # --- lifecycle ---------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every mailbox's loop until stop(); returns when all in-flight sends are recorded."""
        self._data_version = await self.db.others_version()
        self.unsubscribe_key = await self.db(Store.unsubscribe_key)
        self.scheduler.start()
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self.db.committer, name="group commit")
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    if self.db.slow.shared:
                        await self._lease_round(first=True)
                        outer.start_soon(self._leases, name="leases")
                        # Holding no mailbox (yet) is no reason to stop: the group lives until stop().
                        tg.start_soon(self._stop_requested.wait, name="until stopped")
                    for mailbox in self.config.mailboxes:
                        if self.held is None or mailbox.address in self.held:
                            self._start(mailbox)
                    outer.start_soon(self._watch_replies, name="imap watchers")
                    outer.start_soon(self._notice_changes, name="housekeeping")
                    self.scheduler.add_job(
                        self._housekeeping_job, "interval", seconds=CHANGE_POLL, id="housekeeping:changes"
                    )
                    task_status.started()
                if self.held is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                        try:
                            await self.db(_release_all, self.config.daemon.node)
                        except StoreUnavailable:
                            pass  # its leases expire by themselves
                outer.cancel_scope.cancel()  # every loop has returned: nothing more to commit
        finally:
            self.scheduler.shutdown(wait=False)
            with anyio.CancelScope(shield=True):
                await self.tokens.aclose()

    async def _watch_replies(self) -> None:
        """One IMAP watcher per mailbox with [imap]; restarted when its settings change by reload."""
        from daemon.imap import Watcher

        running: dict[str, tuple[Any, anyio.CancelScope]] = {}
        async with anyio.create_task_group() as tg:
            while True:
                wanted = {
                    m.address: m
                    for m in self.config.mailboxes
                    if m.imap is not None and (self.held is None or m.address in self.held)
                }
                for address, (imap, scope) in list(running.items()):
                    if address not in wanted or wanted[address].imap != imap:
                        scope.cancel()
                        del running[address]
                        self.watchers.pop(address, None)
                for address, mailbox in wanted.items():
                    if address not in running:
                        scope = anyio.CancelScope()
                        running[address] = (mailbox.imap, scope)
                        watcher = Watcher(
                            mailbox,
                            self.db,
                            lambda: self.config,
                            self._waker(address),
                            self.clock,
                            self.imap_opening,
                            self.tokens,
                            self.wake,
                        )
                        self.watchers[address] = watcher
                        tg.start_soon(self._run_watcher, watcher, scope)
                await self._config_changed.wait()
                self._config_changed = anyio.Event()

    def _waker(self, address: str) -> Callable[[], None]:
        def wake() -> None:
            runner = self.runners.get(address)
            if runner is not None:
                runner.wake()

        return wake

    @staticmethod
    async def _run_watcher(watcher: Any, scope: anyio.CancelScope) -> None:
        with scope:
            await watcher.run()

    def _start(self, mailbox: Mailbox) -> None:
        runner = MailboxRunner(self, mailbox)
        self.runners[mailbox.address] = runner
        assert self._tg is not None
        self._tg.start_soon(runner.run, name=f"mailbox {mailbox.address}")

    def stop(self, grace: float = float("inf")) -> None:
        """Take no new message; transactions in flight get `grace`, then they are cut."""
        self.stopping = True
        self._stop_requested.set()
        self.deadline = time.monotonic() + grace
        self.cut_at = anyio.current_time() + grace
        for shield in self.shields:
            shield.deadline = self.cut_at
        for runner in self.runners.values():
            runner.wake()

    def apply(self, config: Config) -> list[str]:
        """Switch to a new (already validated) config; returns the removed mailbox addresses."""
        old = {m.address for m in self.config.mailboxes}
        self.config = config
        self._config_changed.set()
        new = {m.address: m for m in config.mailboxes}
        self.tokens.forget({(m.address, m.oauth2) for m in config.mailboxes if m.oauth2 is not None})
        removed = sorted(old - set(new))
        for address in removed:
            runner = self.runners.pop(address)
            runner.removed = True
            runner.wake()
            self._unschedule(address)
        for address, mailbox in new.items():
            runner_or_none = self.runners.get(address)
            if runner_or_none is None:
                if self.held is None or address in self.held:
                    self._start(mailbox)
            else:
                runner_or_none.reconfigure(mailbox)
        return removed

    # --- leases (PostgreSQL) -----------------------------------------------------------------

    async def _leases(self) -> None:
        """Renew this daemon's leases and take its share, several times per lease: a missed round or two
        costs nothing; a daemon that cannot renew is fenced off by its claims' own lease check."""
        while True:
            await anyio.sleep(self.config.daemon.lease / 6)
            if self.stopping:
                return
            try:
                await self._lease_round(first=False)
            except StoreUnavailable as exc:
                self.store_failed(exc)

    async def _lease_round(self, *, first: bool) -> None:
        d = self.config.daemon
        for store in (self.db.slow, self.db.group, self.db.fast):
            store.node, store.lease_ttl = d.node, d.lease  # type: ignore[attr-defined]
        finished = [a for a, r in self.draining.items() if r.done]
        held, taken, uncertain, extra = await self.db(
            _lease_round, d.node, [m.address for m in self.config.mailboxes], d.lease, finished, first
        )
        for address in finished:
            del self.draining[address]
        for message in uncertain:
            self.log.warning(
                "message.error", message=message, reason="uncertain", detail="found in sending at takeover"
            )
        before = self.held if self.held is not None else set()
        self.held = set(held) - set(extra) - set(self.draining)
        lost = (before - set(held)) | set(extra)
        for address in sorted(lost):
            runner = self.runners.pop(address, None)
            if runner is not None:
                runner.removed = True
                runner.wake()
                self._unschedule(address)
                if address in extra:
                    self.draining[address] = runner
            elif address in extra and address not in self.draining:
                self.draining[address] = _Idle()
        # A mailbox still draining is not started again before its lease is let go of (two loops at once).
        gained = sorted(self.held - before - set(self.runners) - set(self.draining))
        if first:
            return  # serve() starts the held mailboxes' loops
        for address in gained:
            try:
                self._start(self.config.mailbox(address))
            except KeyError:
                continue
        if lost or gained:
            self.log.info("daemon.leases", node=d.node, held=len(self.held), taken=taken, released=sorted(lost))
            self._config_changed.set()  # the IMAP watchers follow

    def wake(self, address: str) -> None:
        """A commit changed `address`'s queue: its loop looks again (on PostgreSQL a mailbox another daemon holds
        hears of it by the store's notification)."""
        runner = self.runners.get(address)
        if runner is not None:
            runner.wake()

    def wake_all(self) -> None:
        """Every sender loop looks again (the API enrolled): new messages may be due now."""
        for runner in self.runners.values():
            runner.wake()

    async def _housekeeping_job(self) -> None:
        """APScheduler's housekeeping job: only signals (the work runs in the dispatcher's task group)."""
        self._housekeeping.set()

    async def _notice_changes(self) -> None:
        """Another process committed (an enrollment, a retry): wake every loop."""
        while True:
            await self._housekeeping.wait()
            self._housekeeping = anyio.Event()
            self.alive_at = time.monotonic()
            try:
                version = await self.db.others_version()
            except StoreUnavailable as exc:
                self.store_failed(exc)
                continue
            if version != self._data_version:
                self._data_version = version
                for runner in self.runners.values():
                    runner.wake()

    # --- scheduling ------------------------------------------------------------------------

    def schedule(self, address: str, at: float | None) -> None:
        job_id = f"mailbox:{address}"
        if at is None:
            self._unschedule(address)
            return
        runner = self.runners.get(address)
        if runner is None:
            return
        self.scheduler.add_job(runner.wake_job, "date", run_date=_aware(at), id=job_id, replace_existing=True)

    def _unschedule(self, address: str) -> None:
        job = self.scheduler.get_job(f"mailbox:{address}")
        if job is not None:
            job.remove()


class _Idle:
    """A mailbox given up before its loop started: nothing to wait for."""

    done = True


def _lease_round(store: Store, *args: Any) -> Any:
    return store.lease_round(*args)  # type: ignore[attr-defined]


def _release_all(store: Store, node: str) -> None:
    store.release_all(node)  # type: ignore[attr-defined]


def _aware(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


STREAK_KEPT = 50  # refusals of one streak remembered (a domain that refuses many prospects in a row)


class MailboxRunner:
    """The sender loop of one mailbox: its window, gap, limit, connection and retry queue."""

    def __init__(self, dispatcher: Dispatcher, mailbox: Mailbox) -> None:
        self.d = dispatcher
        self.mailbox = mailbox
        self.address = mailbox.address
        self.conn = smtp.Connection(mailbox, dispatcher.tokens)
        self.holds_slot = False
        self.removed = False
        self.done = False  # its loop has returned (a released lease may then go to another daemon)
        self._event = anyio.Event()
        self.next_wake: float | None = None
        self._pending: Sent | None = None
        self._streak: list[tuple[tuple[Any, ...], int, str]] = []  # (refusal, message, recipient) in a row
        self._throttles = 0
        self._store_backoff = 1.0
        self.errors_in_row = 0  # loop errors since the last good step: the watchdog's view of this loop
        self.busy_since: float | None = None  # monotonic, while a step runs
        self.log = dispatcher.log.bind(mailbox=mailbox.address)
        self.domain = mailbox.address.rpartition("@")[2]
        self.clock = timing.SenderClock(mailbox.schedule)

    def wake(self) -> None:
        self._event.set()

    def reconfigure(self, mailbox: Mailbox) -> None:
        """A reload: new limits and windows at once; new SMTP settings from the next transaction on."""
        self.mailbox = mailbox
        self.wake()

    async def _apply_settings(self) -> None:
        """Between transactions: a connection opened with old settings (password, host, CA) is closed."""
        if self.conn.mailbox.smtp != self.mailbox.smtp or self.conn.mailbox.helo_name != self.mailbox.helo_name:
            await self._close()
            self.conn = smtp.Connection(self.mailbox, self.d.tokens)
            self.log.info("mailbox.settings_applied", detail="new SMTP settings from the next transaction")

    async def wake_job(self) -> None:
        """APScheduler's job for this mailbox: only signals."""
        self.wake()

    async def run(self) -> None:
        try:
            while not self.d.stopping and not self.removed:
                self._event = anyio.Event()
                self.busy_since = time.monotonic()
                try:
                    acted = await self.step()
                    self.errors_in_row = 0
                except StoreUnavailable as exc:
                    self.d.store_failed(exc)
                    acted = False
                    self.next_wake = self.d.clock() + self._next_store_backoff()
                except Exception:
                    self.errors_in_row += 1
                    self.log.exception("mailbox.loop_error", errors_in_row=self.errors_in_row)
                    acted = False
                    self.next_wake = self.d.clock() + 5
                finally:
                    self.busy_since = None
                if acted:
                    continue
                if self.d.stopping or self.removed:
                    break
                await self.sleep()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()
                await self._close()
            self.done = True

    def _next_store_backoff(self) -> float:
        delay, self._store_backoff = self._store_backoff, min(self._store_backoff * 2, 30.0)
        return delay

    async def sleep(self) -> None:
        now = self.d.clock()
        if self.next_wake is not None and self.next_wake <= now:
            return
        self.d.schedule(self.address, self.next_wake)
        if self.conn.is_open:
            with anyio.move_on_after(self.d.config.daemon.idle_close):
                await self._event.wait()
                return
            await self._close()
        await self._event.wait()

    async def _close(self) -> None:
        await self.conn.close()
        if self.holds_slot:
            self.d.connections.release_on_behalf_of(self)
            self.holds_slot = False

    async def _commit(self, fn: Callable[..., T], *args: Any) -> T:
        """A state change that must not be lost: retried while the database refuses it.

        Sending pauses meanwhile (the message in hand keeps its state). On the way
        out, the retries end at the shutdown deadline: the message is then still
        `sending` in the database and becomes `uncertain` at the next start.
        """
        while True:
            try:
                result = await self.d.db(fn, *args)
            except StoreUnavailable as exc:
                self.d.store_failed(exc)
                if self.d.past_deadline():
                    raise
                delay = self._next_store_backoff()
                if self.d.stopping:
                    delay = min(delay, max(self.d.deadline - time.monotonic(), 0.05))
                await anyio.sleep(delay)
                continue
            self._store_backoff = 1.0
            self.d.store_ok()
            return result

    # --- one decision ----------------------------------------------------------------------

    async def step(self) -> bool:
        """Send one message if one may go now; else set next_wake. True when something happened."""
        await self._apply_settings()
        now = self.d.clock()
        pending, self._pending = self._pending, None
        may_claim = pending is not None or self._has_token()
        try:
            turn = await self.d.db.grouped(self._turn, now, pending, may_claim)
        except StoreUnavailable:
            self._pending = pending  # accepted by the server: kept in memory until it is recorded
            raise
        self._store_backoff = 1.0
        self.d.store_ok()
        if pending is not None:
            self._sent(pending)
            following = pending.record.next_step
            if following is not None and following[1] != self.address:
                self.d.wake(following[1])  # its queue changed: a follow-up of a thread begun here
        self.next_wake = None
        snap, day = turn.snap, turn.day
        state = lifecycle.mailbox_state(self.mailbox.paused, snap.state, snap.paused_reason)
        if self.mailbox.paused:
            return False  # the config says so: nothing to tell the messages, `status` says it
        if state == "paused":
            # Kept in the database (pause_on, `mailbox pause`): what is due says why it waits, once.
            if snap.earliest_due is not None and snap.earliest_due <= now:
                detail = f"deferred: paused ({snap.paused_reason}) until `cadenced mailbox resume {self.address}`"
                for message in await self.d.db(Store.mark_deferred, self.address, float("inf"), detail):
                    self.log.info("message.deferred", message=message, reason="paused")
            return False
        if state != "connected":
            await self._hand_over(snap, now)
            hand_over_at = self.next_wake
            back = await self._retry_queue(snap, now)
            if hand_over_at is not None and (self.next_wake is None or hand_over_at < self.next_wake):
                self.next_wake = hand_over_at  # wake for the hand-over even when the next probe is later
            return back
        for message, domain, until in turn.deferred:
            self.log.info("message.deferred", message=message, reason="domain_limit", domain=domain, until=until)
        if turn.token_first:
            return await self._fetch_token(now)
        if turn.claimed is not None:
            await self._send(turn.claimed, turn.thread)
            return True
        if snap.earliest_due is None or turn.decision is None:
            return False
        decision = turn.decision
        if decision.at is not None and decision.at <= now:
            return True  # raced with a retry or reassign: look again
        if snap.earliest_due <= now:
            self.next_wake = decision.at
            await self._explain_wait(decision, snap, day, now)
        else:
            # Wake when it comes due, to say on it why it waits; then sleep until allowed.
            self.next_wake = snap.earliest_due
        return False

    def _turn(self, store: Store, now: float, pending: Sent | None, may_claim: bool = True) -> Turn:
        """In one transaction (a worker thread): record the last send, look, and claim the next.

        The send just made is committed before the next one is claimed, so every
        state change is durable before the next action, at one commit per message.
        `may_claim` False: everything but the claim (the OAuth2 token is fetched first, with no message in hand).
        """
        schedule = self.mailbox.schedule
        day = self._local_day(now)
        with store.transaction():
            if pending is not None:
                store.record_sent(pending.record)
            snap = store.snapshot(self.address, day)
            state = lifecycle.mailbox_state(self.mailbox.paused, snap.state, snap.paused_reason)
            if state != "connected" or snap.earliest_due is None:
                return Turn(snap, day, None, None, [])
            full = timing.day_count(snap.sent_today, schedule.daily_limit, snap.quota_day, day)
            decision = self.clock.next_allowed(
                max(now, snap.earliest_due), snap.gap_until, {day: full}, snap.throttled_until, snap.first_day
            )
            if decision.at is None or decision.at > now:
                return Turn(snap, day, decision, None, [])
            deferred = (
                defer_full_domains(store, self.mailbox, now, day, snap.first_day) if schedule.domain_daily_limit else []
            )
            if deferred is None or not store.holds(self.address):
                return Turn(snap, day, decision if deferred is None else None, None, [])
            if not may_claim:
                return Turn(snap, day, decision, None, [], deferred, token_first=True)
            claimed = store.claim(self.address, now, self._message_id)
            thread = store.thread(claimed.enrollment_id, claimed.step) if claimed and claimed.step > 1 else []
            return Turn(snap, day, decision, claimed, thread, deferred)

    def _has_token(self) -> bool:
        """Nothing to fetch before a claim: not OAuth2, a connection already logged in, or a cached token."""
        auth = self.mailbox.smtp.auth
        if auth.mechanism != "oauth2" or auth.oauth2 is None or self.conn.is_open:
            return True
        return self.d.tokens.fresh(self.address, auth.oauth2)

    async def _fetch_token(self, now: float) -> bool:
        """The access token, before any message is claimed: an endpoint that is down, revoked or hostile stops
        the mailbox (its messages wait in the error section, none is left `sending`). True: go on at once."""
        oauth2 = self.mailbox.smtp.auth.oauth2
        assert oauth2 is not None
        try:
            await smtp.access_token(self.d.tokens, self.address, oauth2)
        except SmtpFailure as failure:
            await self._mailbox_stops(failure, now, self.log)
            return False
        return True

    def _local_day(self, now: float) -> str:
        if self.clock.s is not self.mailbox.schedule:  # a reload changed it
            self.clock = timing.SenderClock(self.mailbox.schedule)
        return self.clock.local_day(now)

    def _sent(self, pending: Sent) -> None:
        self.d.stats.sent += 1
        pending.log.info("message.sent", smtp_code=pending.code, subject=pending.subject)

    async def flush(self) -> None:
        """Commit a send not yet recorded (on the way out, retried until the shutdown deadline)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await self._commit(self._record_only, pending)
        except StoreUnavailable as exc:
            pending.log.error(
                "message.error",
                reason="uncertain",
                detail=f"accepted by the server ({pending.code}) but not recorded: {exc}; "
                "it is `uncertain` at the next start",
            )
            return
        self._sent(pending)

    @staticmethod
    def _record_only(store: Store, pending: Sent) -> None:
        with store.transaction():
            store.record_sent(pending.record)

    def _message_id(self, outbox_id: int, attempt: int) -> str:
        return compose.make_message_id(outbox_id, f"{attempt}.{secrets.token_hex(16)}", self.address)

    async def _explain_wait(self, decision: timing.Decision, snap: Snapshot, day: str, now: float) -> None:
        """Every waiting message says why (SPEC: `deferred: daily_limit until <time>`)."""
        reason = decision.waiting_for or "window"
        until = iso(decision.at) if decision.at is not None else "further notice (daily_limit = 0)"
        if reason in ("daily_limit", "warmup") and snap.limit_logged_day != day:
            if await self.d.db(Store.note_limit, self.address, day, False, now):
                self.log.info(
                    "mailbox.limit_reached",
                    sent_today=snap.sent_today,
                    daily_limit=self.mailbox.schedule.daily_limit,
                    allowance=timing.allowance(self.mailbox.schedule, day, snap.first_day)[0],
                    rule=reason,
                    next_send_at=until,
                )
        if reason == "gap":
            return  # a pause of minutes is not worth a line per message
        # Everything due before the mailbox may send again waits for the same reason.
        horizon = decision.at if decision.at is not None else float("inf")
        ids = await self.d.db(Store.mark_deferred, self.address, horizon, f"deferred: {reason} until {until}")
        for message in ids:
            self.log.info("message.deferred", message=message, reason=reason, until=until)

    # --- sending ------------------------------------------------------------------------------

    async def _send(self, c: Claimed, thread: list[tuple[int, str, str]]) -> None:
        self.d.stats.in_flight += 1
        try:
            # Shielded: a shutdown lets the transaction in hand finish, until the end of shutdown_grace.
            with anyio.CancelScope(shield=True) as shield:
                if self.d.cut_at is not None:
                    shield.deadline = self.d.cut_at
                self.d.shields.add(shield)
                try:
                    await self._send_shielded(c, thread)
                finally:
                    self.d.shields.discard(shield)
            if shield.cancelled_caught:
                await self._cut(c)
        finally:
            self.d.stats.in_flight -= 1

    async def _cut(self, c: Claimed) -> None:
        """Cut at the end of shutdown_grace: the server may have the message, so it is `uncertain`."""
        grace = self.d.config.daemon.shutdown_grace
        detail = f"cut at shutdown after shutdown_grace ({grace:g}s): the server may have it"
        # Shielded as a whole: the task group is being cancelled at this same moment.
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self.conn.close()
            if await self.d.db(Store.cut_uncertain, c.id, self.d.clock(), detail):
                self.d.stats.cut += 1
                self.log.warning(
                    "message.error",
                    message=c.id,
                    prospect=c.email,
                    cadence=c.cadence,
                    reason="uncertain",
                    detail=detail,
                )

    async def _send_shielded(self, c: Claimed, thread: list[tuple[int, str, str]]) -> None:
        log = self.log.bind(cadence=c.cadence, prospect=c.email, step=c.step, message=c.id, message_id=c.message_id)
        composed = await self._compose(c, thread, log)
        if composed is None:
            return
        message, subject = composed
        if not self.holds_slot:
            await self.d.connections.acquire_on_behalf_of(self)
            self.holds_slot = True
        reused = self.conn.is_open
        if not reused:
            try:
                await self.conn.open()  # connect, TLS, EHLO, AUTH: nothing of the message has left yet
            except SmtpFailure as failure:
                await self._close()
                await self._failed(c, failure, log)
                return
            except Exception:
                # Not an answer we know (a bug, or something hostile we did not foresee): nothing was sent, so the
                # claim is released and the message waits as it was, rather than `sending` and then `uncertain`.
                await self._close()
                detail = "not sent: the connection failed before the transaction (see mailbox.loop_error)"
                await self._commit(Store.reschedule, c.id, c.due_at, None, detail, False)
                raise
        try:
            try:
                accepted = await self.conn.send(message, self.address, c.email)
            except SmtpFailure as failure:
                if not smtp.is_stale_connection(failure, reused):
                    raise
                # The server closed an idle connection under us; nothing was sent: one fresh try.
                accepted = await self.conn.send(message, self.address, c.email)
        except SmtpFailure as failure:
            if not self.conn.is_open:
                await self._close()
            await self._failed(c, failure, log)
            return
        self._streak.clear()
        self._throttles = 0
        now = self.d.clock()
        schedule = self.mailbox.schedule
        gap_until = now + timing.draw_gap(schedule, self.d.rng)
        record = SentRecord(
            c,
            now,
            accepted.code,
            accepted.text,
            subject,
            self._local_day(now),
            gap_until,
            self._next_step(c, now),
            message if self.mailbox.sent_copies == "append" else None,
            schedule.domain_daily_limit > 0,
        )
        # Committed by the next turn, before anything else is claimed or sent.
        self._pending = Sent(record, log, accepted.code, subject)

    def _next_step(self, c: Claimed, now: float) -> lifecycle.Next | None:
        return lifecycle.next_step(self.d.config, c.cadence, c.step, c.sticky, now)

    async def _compose(self, c: Claimed, thread: list[tuple[int, str, str]], log: Any) -> tuple[bytes, str] | None:
        cadence, step = self._step_of(c)
        if cadence is None or step is None:
            detail = "its cadence is no longer in the config" if cadence is None else "its step was removed"
            await self._commit(Store.record_error, c.id, "config_changed", None, detail)
            self.d.stats.errors += 1
            log.warning("message.error", reason="config_changed", detail=detail)
            return None
        key = self.d.unsubscribe_key
        links: tuple[str, ...] = (unsubscribe.mailto(self.address, key, c.enrollment_id),)
        try:
            if self.mailbox.unsubscribe_url is not None:
                url = self.mailbox.unsubscribe_url.render(
                    {"token": unsubscribe.token(key, c.enrollment_id), "email": c.email, "mailbox": self.address}
                )
                if not UNSUBSCRIBE_LINK.fullmatch(url):
                    raise compose.TemplateProblem(f"unsubscribe_url made {url[:80]!r}, not an https:// link")
                links = (links[0], url)
            variables = compose.prospect_variables(c.fields, self.mailbox.name, self.address, links[-1])
            body = step.body.render(variables)
            if step.subject is not None:
                subject = step.subject.render(variables)
            else:
                first = thread[0][2] if thread else None
                if first is None:
                    first_step = cadence.steps[0]
                    first = first_step.subject.render(variables) if first_step.subject else ""
                subject = compose.thread_subject(first, None)
        except compose.TemplateProblem as exc:
            await self._commit(Store.record_error, c.id, "template", None, str(exc))
            self.d.stats.errors += 1
            log.warning("message.error", reason="template", detail=str(exc))
            return None
        subject = " ".join(subject.split())
        references = tuple(mid for _, mid, _ in thread if mid)
        out = compose.Outgoing(
            from_name=self.mailbox.name,
            from_address=self.address,
            to_address=c.email,
            subject=subject,
            body=body,
            message_id=c.message_id,
            date=self.d.clock(),
            in_reply_to=references[-1] if references else None,
            references=references,
            unsubscribe=links,
        )
        return compose.build_message(out), subject

    def _step_of(self, c: Claimed) -> tuple[Cadence | None, Step | None]:
        try:
            cadence = self.d.config.cadence(c.cadence)
        except KeyError:
            return None, None
        if c.step > len(cadence.steps):
            return cadence, None
        return cadence, cadence.steps[c.step - 1]

    # --- outcomes (SPEC §5): dispatch on the failure's type -----------------------------------

    async def _failed(self, c: Claimed, f: SmtpFailure, log: Any) -> None:
        """What a classified failure does (SPEC §5): one match over outcomes.py's classes."""
        now = self.d.clock()
        log = log.bind(smtp_code=f.code, stage=f.stage, **({"enhanced": f.enhanced} if f.enhanced else {}))
        if not isinstance(f, AddressRejected | Blocked):
            self._streak.clear()  # only a refusal of the recipient may continue a streak
        match f:
            case AddressRejected() | Blocked():
                await self._refused_recipient(c, f, now, log)
            case MailboxDown() | MailboxRefused():
                await self._mailbox_stops(f, now, log, c.id)
            case Throttled():
                await self._throttled(c, f, now, log)
            case Uncertain():
                await self._commit(Store.record_error, c.id, "uncertain", f.code, f.text, now)
                self.d.stats.errors += 1
                log.warning("message.error", reason="uncertain", detail=f.text)
            case MessageDeferred():
                await self._deferred(c, f, now, log)
            case ProviderQuota():
                await self._provider_quota(c, f, now, log)
            case _:  # every class is handled above; a new one must not pass silently
                raise TypeError(f"unhandled SMTP outcome {type(f).__name__}")

    async def _mailbox_stops(self, f: SmtpFailure, now: float, log: Any, message: int | None = None) -> None:
        """The mailbox's problem: no prospect is blamed; its messages wait in the error section."""
        refused = isinstance(f, MailboxRefused)
        state = "refused" if refused else "disconnected"
        first_probe = None if refused else now + self.d.config.daemon.probe_backoff[0]
        ids = await self._commit(Store.disconnect, self.address, now, f.text, first_probe, state)
        self.d.stats.errors += 1
        log.warning(
            "mailbox.disconnected",
            state=state,
            detail=f.text,
            moved_to_error=len(ids),
            action="fix the mailbox, then reload or `cadenced outbox retry --mailbox`" if refused else "probing",
        )
        if message is not None:
            log.info("message.error", reason=state)
        self.next_wake = first_probe

    async def _throttled(self, c: Claimed, f: SmtpFailure, now: float, log: Any) -> None:
        low, high = self.d.config.daemon.probe_backoff
        until = now + min(low * 2**self._throttles, high)
        self._throttles += 1
        detail = f"throttled by the server until {iso(until)}: {f.code} {f.text}"
        await self._commit(Store.throttle, c.id, self.address, until, f.code, detail)
        await self._close()
        log.warning("mailbox.throttled", detail=f.text, until=iso(until))
        log.info("message.deferred", reason="throttled", until=iso(until))

    async def _deferred(self, c: Claimed, f: SmtpFailure, now: float, log: Any) -> None:
        delays = self.d.config.daemon.retry_delays
        if c.transient_failures < len(delays):
            due = now + delays[c.transient_failures]
            detail = f"{f.code} {f.text}; retry {c.transient_failures + 1} of {len(delays)} at {iso(due)}"
            await self._commit(Store.reschedule, c.id, due, f.code, detail, True)
            log.info("message.deferred", reason="transient", until=iso(due), detail=f.text)
        else:
            await self._commit(Store.record_error, c.id, "retries_exhausted", f.code, f.text)
            self.d.stats.errors += 1
            log.warning("message.error", reason="retries_exhausted", detail=f.text)

    async def _provider_quota(self, c: Claimed, f: SmtpFailure, now: float, log: Any) -> None:
        schedule = self.mailbox.schedule
        day = timing.local_day(now, schedule.timezone)
        decision = timing.next_allowed(now, schedule, None, {day: schedule.daily_limit})
        until = iso(decision.at) if decision.at else "further notice"
        detail = f"deferred: daily_limit until {until} (provider quota: {f.code} {f.text})"
        await self._commit(Store.reschedule, c.id, c.due_at, f.code, detail, False)
        if await self._commit(Store.note_limit, self.address, day, True, now):
            log.warning("mailbox.limit_reached", detail=f.text, next_send_at=until)
        log.info("message.deferred", reason="daily_limit", until=until)

    async def _refused_recipient(self, c: Claimed, f: SmtpFailure, now: float, log: Any) -> None:
        """5xx for this recipient: suppress (address) or stop (blocked), unless it is the mailbox's in disguise."""
        suppress = isinstance(f, AddressRejected)
        day = timing.local_day(now, self.mailbox.schedule.timezone)
        cancelled = await self._commit(Store.record_failed, c, now, f.code, f.text, suppress, day)
        self.d.stats.errors += 1
        log.warning("message.failed", reason=f.reason, detail=f.text)
        if suppress:
            log.info("bounce.detected", source="smtp")
        for message in cancelled:
            self.log.info("message.cancelled", message=message, prospect=c.email, reason=f.reason)
        await self._judge_reputation(now)
        key = outcomes.refusal_key(f)
        if key is None:
            return  # an address-class answer (no such user, full, disabled) is that address's: no streak either way
        if self._streak and self._streak[-1][0] != key:
            self._streak = []
        self._streak = [*self._streak[-(STREAK_KEPT - 1) :], (key, c.id, c.email)]
        domains = {email.rpartition("@")[2] for _, _, email in self._streak}
        if len(domains) < outcomes.STREAK:
            return
        # The same policy refusal for recipients at several domains in a row: the sender is the problem.
        streak, self._streak = self._streak, []
        detail = f"the same refusal for {len(streak)} recipients at {len(domains)} domains in a row: {f.code} {f.text}"
        undone = await self._commit(Store.unblame, self.address, [m for _, m, _ in streak], now, detail, day)
        log.warning("mailbox.refusal_streak", recipients=[e for _, _, e in streak], moved_to_error=undone)
        await self._mailbox_stops(MailboxRefused(f.code, detail, stage=f.stage, enhanced=f.enhanced), now, log)

    async def _judge_reputation(self, now: float) -> None:
        """pause_on: past a bounce or block rate over its window, the mailbox pauses itself."""
        rule = self.mailbox.pause_on
        if rule is None:
            return
        since = timing.first_day_of(now, rule.window_days, self.mailbox.schedule.timezone)
        paused = await self._commit(Store.pause_if, self.address, rule, since, now)
        if paused is not None:
            reason, (attempts, bounces, blocks) = paused
            self.log.warning(
                "mailbox.auto_paused",
                detail=reason,
                sends=attempts,
                bounces=bounces,
                blocks=blocks,
                since=since,
                action=f"find the cause (the list? the domain?), then `cadenced mailbox resume {self.address}`",
            )
            self.wake()

    # --- the retry queue ----------------------------------------------------------------------

    async def _hand_over(self, snap: Snapshot, now: float) -> None:
        """reassign_after: down that long, the enrollments nobody has heard from yet leave for healthy mailboxes."""
        after = self.mailbox.reassign_after
        if not after or snap.since is None:
            return
        if now - snap.since < after:
            self.next_wake = snap.since + after
            return
        from daemon.enroll import hand_over

        moved = await self._commit(hand_over, self.d.config, self.address)
        for enrollment, to, messages in moved:
            self.log.info(
                "enrollment.reassigned",
                enrollment=enrollment,
                to=to,
                messages=messages,
                reason=f"{self.address} {snap.state} for {round(now - snap.since)} s (reassign_after)",
            )
        for to in {to for _, to, _ in moved}:
            runner = self.d.runners.get(to)
            if runner is not None:
                runner.wake()

    async def _retry_queue(self, snap: Snapshot, now: float) -> bool:
        caught = await self._commit(Store.catch_due_while_down, self.address, now)
        for message in caught:
            self.log.info("message.error", message=message, reason=snap.state)
        if snap.next_probe_at is None or snap.next_probe_at > now:
            # `refused` has no probe of its own: it waits for the operator (reload, retry, restart).
            self.next_wake = snap.next_probe_at
            if snap.earliest_due is not None and snap.earliest_due > now:
                self.next_wake = min(snap.next_probe_at or snap.earliest_due, snap.earliest_due)
            return False
        try:
            await self.conn.probe()
        except SmtpFailure as f:
            low, high = self.d.config.daemon.probe_backoff
            delay = min(low * 2 ** max(snap.failures, 0), high)
            await self._commit(Store.set_probe, self.address, now + delay, f.text)
            self.next_wake = now + delay
            self.log.info("mailbox.probe_failed", smtp_code=f.code, detail=f.text, next_probe_at=iso(now + delay))
            return False
        back = await self._commit(Store.reconnect, self.address, now)
        self.log.info("mailbox.reconnected", returned_to_scheduled=len(back))
        for message in back:
            self.log.info("message.retried", message=message, reason="reconnected")
        return True
