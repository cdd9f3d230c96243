"""A sender loop's turn, in one transaction: the last send recorded, the mailbox looked at, the next message
claimed; and what a send the server accepted records. Synchronous, so that a test can take turns on a
virtual clock (plan = run)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon import lifecycle, timing
from daemon.model import Config, Mailbox
from daemon.readside import iso
from daemon.store import Claimed, SentRecord, Snapshot, Store


@dataclass(frozen=True, slots=True)
class Turn:
    snap: Snapshot
    day: str
    decision: timing.Decision | None
    claimed: Claimed | None
    thread: list[tuple[int, str, str]]
    # (message, domain, until): domain_limit; (message, "cadence NAME", until): a cadence's new_per_day
    deferred: list[tuple[int, str, str]] = field(default_factory=list)
    token_first: bool = False  # a message may go now, but the mailbox's access token must be had before the claim


@dataclass(frozen=True, slots=True)
class Asked:
    """A turn's reads asked ahead (PostgreSQL, in the group commit's pipeline), read when the turn runs: every
    turn of a batch asks first, so that their reads travel to the server together, one round trip a batch."""

    holds: Callable[[], bool]
    snap: Callable[[], Snapshot]
    next_due: Callable[[], Any] | None  # the row a claim in the mailbox's own order would take (None: not asked)


def ask_turn(
    store: Store,
    mailbox: Mailbox,
    clock: timing.SenderClock,
    day: str,
    now: float,
    pending: SentRecord | None,
    claiming: bool = False,
) -> Asked:
    """The first half of a turn, in its transaction: the last send recorded, then the lease, the snapshot and
    (`claiming`: the turn may claim) the next due message asked. The send is written before the reads that
    count it; nothing is read yet."""
    if pending is not None:
        store.record_sent(pending)
    # Fenced twice on PostgreSQL: by this daemon's own clock since its last renewal (`leased`), and by the
    # lease row, read and held in this transaction (a takeover waits for it): asked here, so that it goes
    # with the send's record and the snapshot in one round trip, read before any claim.
    prioritize = mailbox.schedule.prioritize if claiming else None
    return Asked(*store.ask_turn_reads(mailbox.address, day, clock.day_start(now), now, prioritize))


DOMAIN_LOOKS = 20  # full recipient domains passed over in one turn (domain_daily_limit)


def defer_full_domains(
    store: Store, mailbox: Mailbox, now: float, day: str, first_day: str | None, prioritize: str = ""
) -> list[tuple[int, str, str]] | None:
    """domain_daily_limit: the next due message's domain has had its sends today? Its due messages wait for the
    mailbox's next sending day, in their order, and the next domain is looked at. Returns (message, domain,
    until) of those deferred, or None when DOMAIN_LOOKS domains in a row were full (the next turn looks again)."""
    schedule = mailbox.schedule
    deferred: list[tuple[int, str, str]] = []
    for _ in range(DOMAIN_LOOKS):
        domain = store.next_due_domain(mailbox.address, now, prioritize or schedule.prioritize)
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


def take_turn(
    store: Store,
    mailbox: Mailbox,
    clock: timing.SenderClock,
    day: str,
    now: float,
    pending: SentRecord | None,
    message_id: Callable[[int, int], str],
    may_claim: bool = True,
    leased: bool = True,
    cadence_caps: Mapping[str, int] | None = None,
    asked: Asked | None = None,
) -> Turn:
    """In one transaction: record the last send, look, and claim the next.

    The send just made is committed before the next one is claimed, so every state change is durable before
    the next action, at one commit per message. When the mailbox may send is lifecycle.may_send's rule.
    `may_claim` False: everything but the claim (the OAuth2 token is fetched first, with no message in hand).
    `asked`: ask_turn ran first in this transaction (it recorded `pending`; its reads are read here).
    """
    with store.transaction():
        if asked is None:
            asked = ask_turn(store, mailbox, clock, day, now, pending)
        holds = asked.holds
        snap = asked.snap()
        state = lifecycle.mailbox_state(mailbox.paused, snap.state, snap.paused_reason)
        if state != "connected" or snap.earliest_due is None:
            return Turn(snap, day, None, None, [])
        decision = lifecycle.may_send(
            mailbox.schedule,
            now,
            day,
            at=snap.earliest_due,
            sent_today=snap.sent_today,
            quota_day=snap.quota_day,
            gap_until=snap.gap_until,
            throttled_until=snap.throttled_until,
            first_day=snap.first_day,
            clock=clock,
        )
        if decision.at is None or decision.at > now:
            return Turn(snap, day, decision, None, [])
        prioritize = mailbox.schedule.prioritize
        cap = mailbox.schedule.new_per_day
        if cap:  # new_per_day: the day's first emails are sent; follow-ups go on, the first emails wait
            new_today, follow_up = store.new_per_day_state(mailbox.address, day)
            if new_today >= cap:
                prioritize = "follow_ups_only"
                if follow_up is None or follow_up > now:
                    tomorrow = timing.next_sending_day(now, mailbox.schedule, snap.first_day)
                    at = tomorrow if follow_up is None else min(follow_up, tomorrow)
                    return Turn(snap, day, timing.Decision(at, "new_per_day"), None, [])
        held_back: list[tuple[int, str, str]] = []  # [[cadences]] new_per_day: (message, "cadence NAME", until)
        for cadence, limit in (cadence_caps or {}).items():
            if store.cadence_first_emails(mailbox.address, cadence, day) >= limit:
                until = timing.next_sending_day(now, mailbox.schedule, snap.first_day)
                detail = f"deferred: new_per_day of cadence {cadence!r} until {iso(until)} ({limit} a day)"
                moved = store.defer_cadence_new(mailbox.address, cadence, now, until, detail)
                held_back += [(m, f"cadence {cadence}", iso(until) or "") for m in moved]
        deferred = (
            defer_full_domains(store, mailbox, now, day, snap.first_day, prioritize)
            if mailbox.schedule.domain_daily_limit
            else []
        )
        if deferred is not None:
            deferred = held_back + deferred
        if deferred is None or not leased or not holds():
            return Turn(snap, day, decision if deferred is None else None, None, [])
        if not may_claim:
            return Turn(snap, day, decision, None, [], deferred, token_first=True)
        # The row asked ahead is the one to take unless the order changed or messages were deferred since.
        ahead = asked.next_due if prioritize == mailbox.schedule.prioritize and not deferred else None
        claimed = store.claim(mailbox.address, now, message_id, prioritize, ahead)
        thread: list[tuple[int, str, str]] = []
        if claimed is not None and claimed.step > 1:
            known = claimed.thread
            thread = list(known) if known is not None else store.thread(claimed.enrollment_id, claimed.step)
        return Turn(snap, day, decision, claimed, thread, deferred)


def sent_record(
    config: Config,
    mailbox: Mailbox,
    c: Claimed,
    now: float,
    day: str,
    code: int,
    text: str,
    subject: str,
    rng: random.Random,
    copy: bytes | None = None,
    variant: str | None = None,
) -> SentRecord:
    """What a delivery the server accepted at `now` commits: the mailbox's gap drawn, the step that follows
    (lifecycle.next_step), the copy for Sent, whether domain_daily_limit counts it."""
    return SentRecord(
        c,
        now,
        code,
        text,
        subject,
        day,
        now + timing.draw_gap(mailbox.schedule, rng),
        lifecycle.next_step(config, c.cadence, c.step, c.sticky, now),
        copy,
        mailbox.schedule.domain_daily_limit > 0,
        c.step == 1 and any(k.name == c.cadence and k.new_per_day for k in config.cadences),
        variant,
    )
