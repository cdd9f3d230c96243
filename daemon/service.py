"""Lifecycle: startup → serve (signals, reload) → shutdown."""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from daemon import enroll, logs, readside
from daemon.config import accepted_state, load_config, shown_database
from daemon.dispatch import Dispatcher
from daemon.errors import (
    CadencedError,
    ConfigError,
    Refused,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    StoreUnreachable,
)
from daemon.model import Automation, Cadence, Config
from daemon.store import IntegrityCheck, Store, startup_failure
from daemon.systemd import Notifier, watchdog_interval

T = TypeVar("T")
STARTUP_BACKOFF_MAX = 30.0  # seconds between tries to reach a PostgreSQL server that does not answer
INTEGRITY_WAIT = 0.25  # seconds the first send waits for the database check (it reads the whole file)
# A larger file takes the check longer than the wait (about 350 MB/s measured), so sending starts beside it
# at once: 1,000,000 enrollments are 330 MB, and waiting for nothing cost their first send a quarter second.
INTEGRITY_WAIT_SIZE = 64 * 1024 * 1024


def integrity_wait(database: Path | str, most: float, size: int = INTEGRITY_WAIT_SIZE) -> float:
    """How long the first send waits for the check of `database`: `most`, or nothing for a file over `size`."""
    if isinstance(database, str):
        return most  # PostgreSQL: nothing to read, the check returns at once
    try:
        return most if database.stat().st_size <= size else 0.0
    except OSError:
        return most  # not made yet: nothing to read either


def hold_lock(database: Path | str, node: str = "") -> Callable[[], None]:
    """For the process's life: on SQLite an exclusive lock on `<database>.lock` (one daemon per database), on
    PostgreSQL a session advisory lock on the node name (one process per node). Returns what releases it."""
    if isinstance(database, str):
        from daemon.store import postgres

        return postgres.hold_daemon_lock(database, node)
    path = database.with_name(database.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise Refused(f"another cadenced run (pid {holder}) already runs on {database}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return functools.partial(os.close, fd)


def describe_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """What a reload changed, by name, for `config.reloaded`."""
    changes: dict[str, list[str]] = {}
    for kind, before, after in (
        ("mailboxes", {m.address: m for m in old.mailboxes}, {m.address: m for m in new.mailboxes}),
        ("cadences", {c.name: c for c in old.cadences}, {c.name: c for c in new.cadences}),
        ("automations", {a.name: a for a in old.automations}, {a.name: a for a in new.automations}),
    ):
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(before) & set(after) if _differs(before[k], after[k]))
        for label, items in (("added", added), ("removed", removed), ("changed", changed)):
            if items:
                changes[f"{kind}_{label}"] = items
    if old.daemon != new.daemon:
        changes["daemon_changed"] = [
            f for f in old.daemon.__slots__ if getattr(old.daemon, f) != getattr(new.daemon, f)
        ]
    return changes


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, Cadence) and isinstance(b, Cadence):
        return _cadence_shape(a) != _cadence_shape(b)  # templates compare by identity: compare sources
    return bool(a != b)


def _cadence_shape(c: Cadence) -> tuple[Any, ...]:
    steps = tuple((s.wait, s.subject.source if s.subject else None, s.body.source, s.sender) for s in c.steps)
    return (c.users, c.mailboxes, c.pool, c.auto_rotate, c.rotate_among, c.sender, c.stop_on_reply, steps)


class Daemon:
    """`cadenced run`: reload() and stop() are callable directly; signals call them too."""

    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        notifier: Notifier | None = None,
        handle_signals: bool = True,
        clock: Callable[[], float] = time.time,
        integrity_wait: float = INTEGRITY_WAIT,
    ) -> None:
        self.handle_signals = handle_signals
        self.integrity_wait = integrity_wait
        self.clock = clock
        self.config_path = config_path
        self.config = config
        self.notifier = notifier or Notifier()
        self.log = logs.get()
        self.store: Store | None = None
        self._lock: Callable[[], None] | None = None
        self._fatal: Refused | None = None  # why the daemon stopped itself (the node's lock taken by another)
        self.dispatcher: Dispatcher | None = None
        self._stop = anyio.Event()
        self._api_stop = anyio.Event()  # the [api] listener closes when it is set
        self._api_done = anyio.Event()  # and sets this once closed
        self._served = anyio.Event()
        self.started_at = time.time()

    # --- phases ---------------------------------------------------------------------------

    def startup(self) -> Dispatcher:
        config = self.config
        if self._lock is None:
            # One daemon per database (per node name on PostgreSQL), for the process's life.
            self._lock = hold_lock(config.daemon.database, config.daemon.node)
        try:
            store = Store.open(config.daemon.database)
        except StoreError:
            self._release()
            raise
        try:
            self._prepare(store)
            dispatcher = Dispatcher(config, config.daemon.database, clock=self.clock)
        except (StoreUnavailable, ConfigError, StoreUnreachable) as exc:
            store.close()
            self._release()
            if isinstance(exc, StoreUnavailable) and store.shared and not isinstance(exc, StoreDamaged):
                raise StoreUnreachable(f"{shown_database(config.daemon.database)}: {exc}") from None  # waited for
            if isinstance(exc, StoreUnavailable):
                raise startup_failure(config.daemon.database, exc) from None
            raise
        self.store = store
        self.dispatcher = dispatcher
        return dispatcher

    async def _reach(self, fn: Callable[[], T]) -> T:
        """`fn` done once the database answers: a PostgreSQL server that is down, restarting or cut off is waited
        for (with backoff, saying so in the log and to systemd), never a reason to exit."""
        delay = 1.0
        while True:
            try:
                return fn()
            except StoreUnreachable as exc:
                self.log.error("store.error", detail=str(exc), action=f"waiting for the database: again in {delay:g} s")
                self.notifier.status(f"waiting for the database: {exc}")
                self.notifier.send(f"EXTEND_TIMEOUT_USEC={int((delay + 15) * 1_000_000)}")  # not a failed start
                await anyio.sleep(delay)
                delay = min(delay * 2, STARTUP_BACKOFF_MAX)

    def _prepare(self, store: Store) -> None:
        """Before the first send: pins checked, crashed sends made uncertain, probes due, liveness recorded."""
        config = self.config
        problems = enroll.pin_problems(config, store.pins())
        if problems:
            raise ConfigError(problems, str(self.config_path))
        now = self.clock()
        # On PostgreSQL another daemon may be sending right now: what is left in `sending` is settled for each
        # mailbox as this daemon takes its lease over (Dispatcher._lease_round), never all at once.
        for message in [] if store.shared else store.recover_sending(now):
            self.log.warning(
                "message.error", message=message, reason="uncertain", detail="found in sending at start-up"
            )
        for address, message in store.orphan_removed_mailboxes({m.address for m in config.mailboxes}, now):
            self.log.warning("message.error", message=message, mailbox=address, reason="mailbox_removed")
        for cadence, message in store.orphan_removed_cadences({c.name for c in config.cadences}):
            self.log.warning("message.error", message=message, cadence=cadence, reason="cadence_removed")
        with store.transaction():
            for m in config.mailboxes:
                store.probe_now(m.address, now)  # the password may have changed while we were down
        store.set_daemon_state(
            {
                "pid": str(os.getpid()),
                "started_at": str(time.time()),  # liveness facts in real time (see _heartbeat)
                "heartbeat_at": str(time.time()),
                "stopped_at": None,
                **accepted_state(self.config_path),
            }
        )

    async def run(self) -> None:
        """Check the database, start, serve until stopped; a damaged database ends it with StoreError (exit 2).

        The check reads the whole file: on a small database it is done before
        anything is sent; past INTEGRITY_WAIT (at once for a file over
        INTEGRITY_WAIT_SIZE) sending starts beside it, and
        damage found then stops the daemon as damage found at start does
        (`integrity_wait`, INTEGRITY_WAIT seconds by default).
        """
        if self._lock is None:
            # Before anything else: one daemon per database (per node name on PostgreSQL).
            database, node = self.config.daemon.database, self.config.daemon.node
            self._lock = await self._reach(lambda: hold_lock(database, node))
        integrity = IntegrityCheck(self.config.daemon.database)  # nothing to read on PostgreSQL
        checked = anyio.Event()
        failure: list[StoreError] = []

        async def check() -> None:
            try:
                await anyio.to_thread.run_sync(integrity.run, abandon_on_cancel=True)
            except StoreError as exc:
                failure.append(exc)
                if self.dispatcher is not None:  # found while sending: stop, as at start
                    self.log.error("store.damaged", detail=str(exc), action="stopping: nothing more is sent")
                    self.stop()
            finally:
                checked.set()

        raised: list[Exception] = []  # raised again outside the task group, so not wrapped in a group
        async with anyio.create_task_group() as checking:
            checking.start_soon(check)
            with anyio.move_on_after(integrity_wait(self.config.daemon.database, self.integrity_wait)):
                await checked.wait()
            if not failure:  # else refused before anything is sent
                if not checked.is_set():
                    self.log.info("store.checking", detail="PRAGMA quick_check goes on beside sending (large database)")
                try:
                    await self._run()
                except Exception as exc:
                    raised.append(exc)
                finally:
                    integrity.interrupt()
                    checking.cancel_scope.cancel()
        if failure:
            self._release()
            raise failure[0]
        if raised:
            raise raised[0]
        if self._fatal is not None:
            self._release()
            raise self._fatal

    async def _run(self) -> None:
        if self.config.api is not None:
            from daemon import api

            api.check_listen(self.config.api)  # before anything starts: a port taken is said, not a traceback
        dispatcher = await self._reach(self.startup)
        try:
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    await tg.start(self._signals)
                await tg.start(self._serve, dispatcher)
                check = getattr(self._lock, "check", None)  # PostgreSQL: the node's lock, kept
                if check is not None:
                    tg.start_soon(self._keep_node_lock, check)
                api_running = self.config.api is not None  # [api] is read at start: a reload does not move it
                if self.config.api is not None:
                    from daemon import api

                    await tg.start(
                        api.run,
                        self.config.api,
                        lambda: self.config,
                        lambda: dispatcher,
                        dispatcher.wake_all,
                        self._api_stop,
                        self._api_done,
                    )
                self.log.info(
                    "daemon.started",
                    pid=os.getpid(),
                    config=str(self.config_path),
                    database=shown_database(self.config.daemon.database),
                    mailboxes=len(self.config.mailboxes),
                    cadences=len(self.config.cadences),
                )
                self.notifier.ready(self.status_line())
                tg.start_soon(self._automations, dispatcher)
                dispatcher.scheduler.add_job(
                    self._heartbeat, "interval", seconds=readside.HEARTBEAT, id="housekeeping:heartbeat"
                )
                interval = watchdog_interval()
                if interval:
                    tg.start_soon(self._watchdog, interval)
                await self._stop.wait()
                await self._drain(dispatcher)
                self._api_stop.set()
                if api_running:
                    with anyio.move_on_after(5):
                        await self._api_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.shutdown()

    async def _keep_node_lock(self, check: Callable[[], bool]) -> None:
        """PostgreSQL: the node's lock (one process per node name) is checked every few seconds, since a server
        restart ends it: taken again; or, when another process of this node name took it meanwhile, this one
        stops (both would pass the lease fence, which knows the node, not the process)."""
        every = max(1.0, min(self.config.daemon.lease / 3, 5.0))
        while not self._stop.is_set():
            await anyio.sleep(every)
            try:
                again = await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
            except StoreUnavailable:
                continue  # the server is away: nobody takes the lock there meanwhile; asked again next time
            except Refused as exc:
                self.log.error("daemon.node_lock_lost", detail=str(exc), action="stopping: nothing more is sent")
                self._fatal = exc
                self.stop()
                return
            if again:
                self.log.info("daemon.node_lock_retaken", node=self.config.daemon.node)

    async def _serve(self, dispatcher: Dispatcher, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await dispatcher.serve(task_status=task_status)
        finally:
            self._served.set()

    async def _drain(self, dispatcher: Dispatcher) -> None:
        grace = self.config.daemon.shutdown_grace
        self.log.info("daemon.stopping", in_flight=dispatcher.stats.in_flight, grace_seconds=grace)
        self.notifier.stopping("stopping: finishing SMTP transactions in flight")
        dispatcher.stop(grace)
        with anyio.move_on_after(grace):
            await self._served.wait()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock()
            self._lock = None

    def shutdown(self) -> None:
        d = self.dispatcher
        if self.store is not None:
            try:
                self.store.set_daemon_state({"stopped_at": str(time.time())})
            except StoreUnavailable:
                pass  # the store is failing: `status` tells from the stale heartbeat and the dead pid
            self.store.close()
        if d is not None:
            d.db.close()
        self._release()
        if d is not None:
            self.log.info(
                "daemon.stopped",
                sent=d.stats.sent,
                errors=d.stats.errors,
                in_flight_cancelled=d.stats.cut,
                uptime_seconds=round(time.time() - self.started_at, 1),
                summary=f"sent {d.stats.sent}, errors {d.stats.errors}, cut at the grace's end {d.stats.cut}",
            )

    # --- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def reload(self) -> bool:
        """Read and validate the whole file (off the event loop); apply it at once, or keep the old one."""
        self.notifier.reloading()
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
            assert self.store is not None
            problems = enroll.pin_problems(new, self.store.pins())
            if new.daemon.database != self.config.daemon.database:
                problems.append(
                    f"daemon.database: changed from {shown_database(self.config.daemon.database)} to "
                    f"{shown_database(new.daemon.database)}; "
                    "restart to change the database"
                )
            if problems:
                raise ConfigError(problems, str(self.config_path))
        except ConfigError as exc:
            self.log.error("config.reload_failed", config=str(self.config_path), errors=exc.problems)
            self.notifier.ready(self.status_line())
            return False
        except (StoreUnavailable, OSError, ValueError, RecursionError, MemoryError) as exc:
            # Whatever the new file does, the old config keeps running.
            detail = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.log.error("config.reload_failed", config=str(self.config_path), errors=[detail])
            self.notifier.ready(self.status_line())
            return False
        old, self.config = self.config, new
        if (old.daemon.log_format, old.daemon.log_level) != (new.daemon.log_format, new.daemon.log_level):
            logs.configure(new.daemon.log_format, new.daemon.log_level)
            self.log = logs.get()
        changes = describe_changes(old, new)
        assert self.dispatcher is not None
        removed = self.dispatcher.apply(new)
        now = self.clock()
        for address, message in self.store.orphan_removed_mailboxes({m.address for m in new.mailboxes}, now):
            self.log.warning("message.error", message=message, mailbox=address, reason="mailbox_removed")
        for cadence, message in self.store.orphan_removed_cadences({c.name for c in new.cadences}):
            self.log.warning("message.error", message=message, cadence=cadence, reason="cadence_removed")
        before = {m.address: m.smtp for m in old.mailboxes}
        with self.store.transaction():
            for m in new.mailboxes:
                if before.get(m.address) not in (None, m.smtp):
                    self.store.probe_now(m.address, now)  # new credentials or server: try at once
        self.store.set_daemon_state(accepted_state(self.config_path))
        # Templates that changed, judged against the prospects enrolled (a field they lack is an error at send).
        was = {c.name: c.required_fields() for c in old.cadences}
        changed = [c.name for c in new.cadences if was.get(c.name) != c.required_fields()]
        warnings = readside.stored_warnings(new, self.store, changed) if changed else []
        told = {"warnings": warnings} if warnings else {}
        self.log.info("config.reloaded", config=str(self.config_path), removed_mailboxes=removed, **changes, **told)
        self.notifier.ready(self.status_line())
        return True

    def status_line(self) -> str:
        d = self.dispatcher
        sent = d.stats.sent if d else 0
        errors = d.stats.errors if d else 0
        line = f"{len(self.config.mailboxes)} mailboxes, sent {sent}, errors {errors}"
        if d is not None and d.store_trouble is not None:
            line += f"; STORE FAILING, sending paused: {d.store_trouble[1]}"
        return line

    async def _heartbeat(self) -> None:
        """Housekeeping job: a commit every few seconds, so `status` can tell a daemon that cannot commit."""
        d = self.dispatcher
        if d is None:
            return
        # Real time, not the daemon's clock: `status` compares it with its own wall clock to tell a stuck daemon.
        state: dict[str, str | None] = {"heartbeat_at": str(time.time())}
        if d.last_store_error is not None:
            state["store_error"] = d.last_store_error
        try:
            await d.db.grouped(Store.set_daemon_state, state)  # with the sends: not news to the daemon itself
        except StoreUnavailable as exc:
            d.store_failed(exc)
        self.notifier.status(self.status_line())

    async def _signals(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                elif self._stop.is_set():
                    if signum == signal.SIGINT:
                        # The operator insists: leave now. A message caught in `sending` is
                        # settled as uncertain at the next start, so nothing is sent twice.
                        self.log.warning("daemon.forced_exit", detail="second SIGINT: not waiting any longer")
                        sys.stdout.flush()
                        os._exit(130)
                else:
                    self.stop()

    async def _automations(self, dispatcher: Dispatcher) -> None:
        """List automations: an APScheduler job signals every second; CSVs that are complete are enrolled."""
        wake = anyio.Event()
        folders: dict[str, enroll.FolderState] = {}

        async def signal_scan() -> None:
            wake.set()

        dispatcher.scheduler.add_job(signal_scan, "interval", seconds=1, id="housekeeping:automations")
        while True:
            await wake.wait()
            wake = anyio.Event()
            for automation in self.config.automations:
                state = folders.setdefault(automation.name, enroll.FolderState())
                if not self._folder_usable(automation, state):
                    continue
                for path in enroll.ready_files(automation.watch, state, self.clock(), automation.settle):
                    await self._import(automation, state, path)

    def _folder_usable(self, automation: Automation, state: enroll.FolderState) -> bool:
        """The folder exists and we can write in it; a problem is reported once, until the folder changes."""
        folder = automation.watch
        try:
            folder.mkdir(parents=True, exist_ok=True)
            mtime = folder.stat().st_mtime
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{folder}: cannot write here (files could not be filed away)")
        except OSError as exc:
            try:
                mtime = folder.stat().st_mtime
            except OSError:
                mtime = -1.0
            what = str(exc)
            if state.problem != (what, mtime):
                state.problem = (what, mtime)
                self.log.error("automation.error", automation=automation.name, detail=what, action="skipped")
            return False
        if state.problem is not None and state.problem[1] != mtime:
            state.problem = None
        return state.problem is None

    async def _import(self, automation: Automation, state: enroll.FolderState, path: Path) -> None:
        config = self.config
        name, cadence, owner = automation.name, automation.cadence, automation.owner

        def work() -> enroll.Imported:
            store = Store.open(config.daemon.database, busy_timeout=config.daemon.busy_timeout)
            try:
                dialect = enroll.Dialect(automation.delimiter, automation.encoding, automation.mapping)
                return enroll.import_dropped(
                    store, config, cadence, owner, path, self.clock(), automation.max_file_size, dialect
                )
            finally:
                store.close()

        try:
            result = await anyio.to_thread.run_sync(work)
        except (OSError, CadencedError) as exc:
            # Imported (or not) but not filed away: do not read it again until it changes.
            try:
                st = os.lstat(path)
                state.stuck[path.name] = (st.st_size, st.st_mtime)
            except OSError:
                pass
            self.log.error("automation.error", automation=name, file=path.name, detail=str(exc)[:300])
            return
        if result.report is None:
            self.log.warning(
                "automation.imported", automation=name, file=result.file, moved_to=result.moved_to, error=result.error
            )
            return
        report = result.report
        self.log.info(
            "automation.imported",
            automation=name,
            cadence=cadence,
            file=result.file,
            moved_to=result.moved_to,
            enrolled=report.enrolled,
            skipped=report.skipped,
            rejected=report.rejected_total,
            assignments=report.assignments,
        )

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only while every sender loop makes progress or waits by design; else systemd restarts us."""
        said: list[str] = []
        while True:
            d = self.dispatcher
            if d is not None:
                stuck = d.stuck_loops()
                housekeeping = time.monotonic() - d.alive_at < max(interval * 2, 5)
                if housekeeping and not stuck:
                    self.notifier.watchdog()
                    said = []
                elif stuck != said:
                    said = stuck
                    self.log.error("daemon.unhealthy", stuck_mailboxes=stuck, action="watchdog not fed")
                    self.notifier.status(f"unhealthy: sender loops failing: {', '.join(stuck)}")
            await anyio.sleep(interval)
