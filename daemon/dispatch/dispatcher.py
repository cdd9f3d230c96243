"""Per-mailbox sender loops: claim → compose → send → record; the retry queue.

APScheduler holds one date job per mailbox (when that mailbox may next send)
and one housekeeping job that notices commits by other processes. Jobs only
set an event; the SMTP work runs in the dispatcher's task group, where
shutdown can drain it. The outbox in the database is the truth: there is no
timer per message, and a wake costs one indexed look-up of what is due.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from daemon import logs, oauth
from daemon.dispatch.runner import MailboxRunner
from daemon.dispatch.store_front import AsyncStore
from daemon.errors import (
    StoreUnavailable,
)
from daemon.model import Config, Mailbox
from daemon.readside import iso
from daemon.store import Store

CHANGE_POLL = 1.0  # seconds between checks for commits by other commands


IMAP_OPENING = 16  # IMAP sessions being opened (TLS, LOGIN, SELECT) at once


LOOP_ERRORS_UNHEALTHY = 3  # a sender loop failing this many times in a row starves the watchdog


def _aware(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


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
        self.lease_until: float | None = None  # PostgreSQL: when the leases run out by boot_clock (lease_left)
        self._settle_until = 0.0  # PostgreSQL: lease rounds come every second until then (shares moving)
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
        self._data_version, _ = await self.db.others_version()
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
            lease = self.config.daemon.lease
            # While the shares move (a daemon came or went, this one just started): a round a second, so a
            # share-out takes seconds, not several lease rounds; settled, a few rounds per lease.
            settling = boot_clock() < self._settle_until
            await anyio.sleep(min(1.0, lease / 6) if settling else lease / 6)
            if self.stopping:
                return
            try:
                await self._lease_round(first=False)
            except StoreUnavailable as exc:
                self.store_failed(exc)

    def lease_left(self) -> float:
        """Seconds this daemon's leases last by its own clock: from when the last renewal was asked (the server
        set them to its time then, or later, plus a lease), on a clock that goes on while the process is
        stopped or the machine suspended (CLOCK_BOOTTIME). Unbounded on SQLite (no leases)."""
        if self.lease_until is None:
            return float("inf")
        return self.lease_until - boot_clock()

    async def _lease_round(self, *, first: bool) -> None:
        d = self.config.daemon
        for store in (self.db.slow, self.db.group, self.db.fast):
            store.fence(d.node, d.lease)
        finished = [a for a, r in self.draining.items() if r.done]
        asked = boot_clock()
        held, taken, uncertain, extra = await self.db(
            _lease_round, d.node, [m.address for m in self.config.mailboxes], d.lease, finished, first
        )
        fenced = self.lease_left() < d.lease / 2
        self.lease_until = asked + d.lease
        if first or taken or extra or self.draining or set(held) != (self.held or set()):
            self._settle_until = boot_clock() + d.lease  # the shares move: rounds come faster for a lease
        if fenced and not first:  # renewed after a while without: the loops that stopped claiming go on
            self.wake_all()
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
        """Another process committed (an enrollment, a retry): wake the loops of the mailboxes it names (every
        loop when it does not say)."""
        while True:
            await self._housekeeping.wait()
            self._housekeeping = anyio.Event()
            self.alive_at = time.monotonic()
            try:
                version, named = await self.db.others_version()
            except StoreUnavailable as exc:
                self.store_failed(exc)
                continue
            if version != self._data_version:
                self._data_version = version
                for address, runner in self.runners.items():
                    if named is None or address in named:
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


def boot_clock() -> float:
    """Seconds on a clock that never goes back and counts a suspend (Linux CLOCK_BOOTTIME; else monotonic)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _lease_round(store: Store, *args: Any) -> Any:
    return store.lease_round(*args)


def _release_all(store: Store, node: str) -> None:
    store.release_all(node)
