"""The sender loop of one mailbox: its turns, its SMTP connection, what each failure makes happen, its retry
queue and its hand-over."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from daemon import compose, lifecycle, outcomes, smtp, timing
from daemon.dispatch.store_front import T
from daemon.dispatch.turn import Asked, Sent, Turn, ask_turn, sent_record, take_turn
from daemon.errors import (
    AddressRejected,
    Blocked,
    LeaseExpired,
    MailboxDown,
    MailboxRefused,
    MessageDeferred,
    ProviderQuota,
    SmtpFailure,
    StoreUnavailable,
    Throttled,
    Uncertain,
)
from daemon.model import Config, Mailbox
from daemon.readside import iso
from daemon.store import Claimed, Snapshot, Store

if TYPE_CHECKING:
    from daemon.dispatch.dispatcher import Dispatcher

LEASE_MARGIN = 0.5  # a claim needs the lease to last half a lease more by this daemon's clock (PostgreSQL)
END_OF_DATA_MARGIN = 2.0  # seconds of lease left, by this daemon's clock, to end a DATA (PostgreSQL)
STREAK_KEPT = 50  # refusals of one streak remembered (a domain that refuses many prospects in a row)


class MailboxRunner:
    """The sender loop of one mailbox: its window, gap, limit, connection and retry queue."""

    def __init__(self, dispatcher: Dispatcher, mailbox: Mailbox) -> None:
        self.d = dispatcher
        self.mailbox = mailbox
        self.address = mailbox.address
        self.conn = smtp.Connection(mailbox, dispatcher.tokens)
        self._caps: tuple[Config | None, dict[str, int]] = (None, {})  # [[cadences]] new_per_day, per config
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
            turn = await self.d.db.grouped(self._turn, now, pending, may_claim, ahead=self._ask)
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
                told = await self.d.db(Store.mark_deferred, self.address, float("inf"), detail)
                for message in told:
                    self.log.debug("message.deferred", message=message, reason="paused")
                if told:
                    self.log.info("mailbox.waiting", reason="paused", deferred=len(told), detail=snap.paused_reason)
            return False
        if state != "connected":
            await self._hand_over(snap, now)
            hand_over_at = self.next_wake
            back = await self._retry_queue(snap, now)
            if hand_over_at is not None and (self.next_wake is None or hand_over_at < self.next_wake):
                self.next_wake = hand_over_at  # wake for the hand-over even when the next probe is later
            return back
        for kind in ("new_per_day", "domain_limit"):  # one line per event, whatever the backlog
            held = [d for d in turn.deferred if d[1].startswith("cadence ") == (kind == "new_per_day")]
            for message, what, until in held:
                self.log.debug("message.deferred", message=message, reason=kind, domain=what, until=until)
            if held:
                names = sorted({what.removeprefix("cadence ") for _, what, _ in held})
                named = {"cadences": names[:10]} if kind == "new_per_day" else {"domains": names[:10]}
                self.log.info("mailbox.waiting", reason=kind, deferred=len(held), next_send_at=held[0][2], **named)
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

    def _ask(self, store: Store, now: float, pending: Sent | None, may_claim: bool = True) -> Asked:
        """ask_turn for this mailbox (PostgreSQL: the batch's turns ask first, then each takes its turn)."""
        record = pending.record if pending is not None else None
        claiming = may_claim and self._leased()
        return ask_turn(store, self.mailbox, self.clock, self._local_day(now), now, record, claiming)

    def _turn(
        self, store: Store, now: float, pending: Sent | None, may_claim: bool = True, asked: Asked | None = None
    ) -> Turn:
        """take_turn for this mailbox (in the group commit's transaction); `asked`: _ask ran first."""
        day = self._local_day(now)
        record = pending.record if pending is not None else None
        if self._caps[0] is not self.d.config:  # worked out once per config, not once per message
            self._caps = (self.d.config, {c.name: c.new_per_day for c in self.d.config.cadences if c.new_per_day})
        caps = self._caps[1]
        leased = self._leased()
        return take_turn(
            store, self.mailbox, self.clock, day, now, record, self._message_id, may_claim, leased, caps, asked
        )

    def _leased(self) -> bool:
        return self.d.lease_left() >= self.d.config.daemon.lease * LEASE_MARGIN

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
        variant = pending.record.variant
        pending.log.info(
            "message.sent", smtp_code=pending.code, subject=pending.subject, **({"variant": variant} if variant else {})
        )

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
        """Every waiting message says why, in the outbox (SPEC: `deferred: daily_limit until <time>`); the log
        says it once per mailbox and event, with how many wait: a backlog of 100,000 is one line, not 100,000
        (per message at debug)."""
        reason = decision.waiting_for or "window"
        until = iso(decision.at) if decision.at is not None else "further notice (daily_limit = 0)"
        if reason == "gap":
            return  # a pause of minutes is not worth a line
        # Everything due before the mailbox may send again waits for the same reason.
        horizon = decision.at if decision.at is not None else float("inf")
        ids = await self.d.db(Store.mark_deferred, self.address, horizon, f"deferred: {reason} until {until}")
        for message in ids:
            self.log.debug("message.deferred", message=message, reason=reason, until=until)
        if reason in ("daily_limit", "warmup"):
            if snap.limit_logged_day != day and await self.d.db(Store.note_limit, self.address, day, False, now):
                self.log.info(
                    "mailbox.limit_reached",
                    sent_today=snap.sent_today,
                    daily_limit=self.mailbox.schedule.daily_limit,
                    allowance=timing.allowance(self.mailbox.schedule, day, snap.first_day)[0],
                    rule=reason,
                    next_send_at=until,
                    deferred=len(ids),
                )
            return
        if ids:
            self.log.info("mailbox.waiting", reason=reason, deferred=len(ids), next_send_at=until)

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
        message, subject, variant = composed
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
                accepted = await self.conn.send(message, self.address, c.email, self._still_leased)
            except SmtpFailure as failure:
                if not smtp.is_stale_connection(failure, reused):
                    raise
                # The server closed an idle connection under us; nothing was sent: one fresh try.
                accepted = await self.conn.send(message, self.address, c.email, self._still_leased)
        except LeaseExpired as lost:
            # Abandoned before the end of DATA: not delivered. Back to scheduled for whoever holds the mailbox
            # (a takeover may have made it uncertain meanwhile: it was not sent after all).
            await self._close()
            await self._commit(Store.release_claim, c.id, c.attempts, f"not sent: {lost}")
            log.warning("message.released", reason="lease", detail=str(lost))
            return
        except SmtpFailure as failure:
            if not self.conn.is_open:
                await self._close()
            await self._failed(c, failure, log)
            return
        self._streak.clear()
        self._throttles = 0
        now = self.d.clock()
        copy = message if self.mailbox.sent_copies == "append" else None
        record = sent_record(
            self.d.config,
            self.mailbox,
            c,
            now,
            self._local_day(now),
            accepted.code,
            accepted.text,
            subject,
            self.d.rng,
            copy,
            variant,
        )
        # Committed by the next turn, before anything else is claimed or sent.
        self._pending = Sent(record, log, accepted.code, subject)

    def _still_leased(self) -> bool:
        """Just before the end of DATA: the lease lasts a little longer by this daemon's clock (PostgreSQL)."""
        return self.d.lease_left() > END_OF_DATA_MARGIN

    async def _compose(
        self, c: Claimed, thread: list[tuple[int, str, str]], log: Any
    ) -> tuple[bytes, str, str | None] | None:
        cadence, step = lifecycle.step_of(self.d.config, c.cadence, c.step)
        if cadence is None or step is None:
            # A cadence removed: its messages wait in the error section, as a removed mailbox's do (a reload
            # that brings it back lets them be retried); a step removed is a change of the cadence itself.
            reason = "cadence_removed" if cadence is None else "config_changed"
            detail = f"cadence {c.cadence!r} is no longer in the config" if cadence is None else "its step was removed"
            await self._commit(Store.record_error, c.id, reason, None, detail)
            self.d.stats.errors += 1
            log.warning("message.error", reason=reason, detail=detail)
            return None
        try:
            links = lifecycle.unsubscribe_links(self.mailbox, self.d.unsubscribe_key, c.enrollment_id, c.email)
            out, variant = lifecycle.compose_step(
                cadence,
                step,
                self.mailbox,
                c.fields,
                enrollment=c.enrollment_id,
                seq=c.seq,
                thread=thread,
                links=links,
                message_id=c.message_id,
                date=self.d.clock(),
            )
        except compose.TemplateProblem as exc:
            await self._commit(Store.record_error, c.id, "template", None, str(exc))
            self.d.stats.errors += 1
            log.warning("message.error", reason="template", detail=str(exc))
            return None
        return compose.build_message(out), out.subject, variant

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
            self.log.debug("message.error", message=message, reason=snap.state)
        if caught:
            self.log.info("mailbox.waiting", reason=snap.state, moved_to_error=len(caught))
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
            self.log.debug("message.retried", message=message, reason="reconnected")
        return True
