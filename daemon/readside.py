"""What `status` and `plan` report, computed from config and the database."""

from __future__ import annotations

import bisect
import heapq
import itertools
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from daemon import lifecycle, oauth, timing
from daemon.config import config_digest
from daemon.model import Config, Mailbox, Schedule
from daemon.store import ENROLLMENT_STATES, Store, domain_of


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def mailbox_state(paused: bool, health: dict[str, Any] | None) -> str:
    """lifecycle.mailbox_state of a mailbox and its health row as `Store.health` gives it."""
    h = health or {}
    return lifecycle.mailbox_state(paused, h.get("state"), h.get("paused_reason") or None)


def next_send(
    mailbox: Mailbox,
    health: dict[str, Any] | None,
    sent_today: int,
    now: float,
    at: float | None = None,
    first_day: str | None = None,
) -> timing.Decision:
    """When a connected mailbox may send at or after `at` (default now): window, gap, throttle, limits.

    `sent_today` is the count of `now`'s local day; `first_day` the day of its first send ever (warm-up).
    """
    h = health or {}
    return lifecycle.may_send(
        mailbox.schedule,
        now,
        timing.local_day(now, mailbox.schedule.timezone),
        at=at,
        sent_today=sent_today,
        quota_day=h.get("quota_day"),
        gap_until=h.get("not_before"),
        throttled_until=h.get("throttled_until"),
        first_day=first_day,
    )


def next_skipped(s: Schedule, today: str) -> str | None:
    """The next local day (today included, a year ahead at most) with no sends: skip_dates and holidays."""
    first = date.fromisoformat(today)
    own = min((d for d in s.skip_dates if d >= today), default=None)
    if not s.holidays:
        return own
    for i in range(366):
        day = (first + timedelta(days=i)).isoformat()
        if own is not None and day >= own:
            return own
        if timing.skipped(s, day):
            return day
    return own


def safeguards(
    store: Store, m: Mailbox, h: dict[str, Any] | None, state: str, first_day: str | None, now: float
) -> dict[str, Any]:
    """SPEC §11 for one mailbox, as `status` shows it: each rule with where the mailbox stands against it."""
    s = m.schedule
    today = timing.local_day(now, s.timezone)
    out: dict[str, Any] = {
        "warmup": None,
        "skip_today": timing.skipped(s, today),
        "next_skip_date": next_skipped(s, today),
        "domain_daily_limit": s.domain_daily_limit or None,
        "pause_on": None,
        "reassign_after": m.reassign_after or None,
        "reassign_at": None,
    }
    if s.warmup is not None:
        since = (date.fromisoformat(today) - date.fromisoformat(first_day)).days if first_day else 0
        out["warmup"] = {
            "day": since + 1,
            "allowance": timing.allowance(s, today, first_day)[0],
            "ceiling": s.warmup.ceiling,
        }
    if m.pause_on is not None:
        window = timing.first_day_of(now, m.pause_on.window_days, s.timezone)
        sends, bounces, blocks = store.reputation(m.address, window)
        out["pause_on"] = {
            "sends": sends,
            "bounces": bounces,
            "blocks": blocks,
            "bounce_rate": round(bounces / sends, 4) if sends else 0.0,
            "block_rate": round(blocks / sends, 4) if sends else 0.0,
            "limits": {"bounce_rate": m.pause_on.bounce_rate, "block_rate": m.pause_on.block_rate},
            "min_sends": m.pause_on.min_sends,
            "window_days": m.pause_on.window_days,
        }
    if m.reassign_after and h and state in ("disconnected", "refused") and h.get("since") is not None:
        out["reassign_at"] = iso(float(h["since"]) + m.reassign_after)
    return out


def status(config: Config, store: Store, now: float, only: Collection[str] | None = None) -> dict[str, Any]:
    """`status --json`; `only`: these mailboxes' rows alone (a page of the dashboard's)."""
    health = store.health()
    counts = store.message_counts()
    mailboxes = []
    for m in config.mailboxes if only is None else (m for m in config.mailboxes if m.address in only):
        h = health.get(m.address)
        state = mailbox_state(m.paused, h)
        scheduled = counts.get((m.address, "scheduled"), 0) + counts.get((m.address, "sending"), 0)
        errors = counts.get((m.address, "error"), 0)
        today = timing.local_day(now, m.schedule.timezone)
        sent_today = store.sent_today(m.address, today, timing.local_day_start(now, m.schedule.timezone))
        new_today = store.first_emails_on(m.address, today)
        next_send_at: float | None = None
        waiting_for: str | None = None
        next_message: str | None = None  # "follow_up" or "new": the kind it sends next
        earliest = store.earliest_due(m.address) if scheduled else None
        first_day = store.first_send_day(m.address) if m.schedule.warmup is not None else None
        allowance = 0 if timing.skipped(m.schedule, today) else timing.allowance(m.schedule, today, first_day)[0]
        if state in ("disconnected", "refused"):
            waiting_for = "reconnect" if state == "disconnected" else "operator"
            if h and str(h["reason"] or "").startswith(oauth.REAUTHORISE):
                waiting_for = oauth.REAUTHORISE  # a revoked OAuth grant: `cadenced mailbox authorize`, then reload
            next_send_at = h["next_probe_at"] if h else None
        elif state == "paused":
            waiting_for = None if m.paused else "operator"  # `cadenced mailbox resume`
        elif earliest is not None:  # what goes next, by the claim's rule (prioritize, new_per_day)
            follow_up, first = store.oldest_of_kinds(m.address)
            new_ok = not m.schedule.new_per_day or new_today < m.schedule.new_per_day
            if new_ok:
                decision = next_send(m, h, sent_today, now, earliest, first_day)
            else:  # the day's first emails are sent: follow-ups go on, first emails wait for the next sending day
                tomorrow = timing.next_sending_day(now, m.schedule, first_day)
                later = max(first[0], tomorrow) if first else None
                at = min(t for t in (follow_up[0] if follow_up else None, later) if t is not None)
                decision = next_send(m, h, sent_today, now, at, first_day)
                if first and first[0] < tomorrow and at == later:
                    decision = timing.Decision(decision.at, "new_per_day")  # what holds the mailbox back
                new_ok = decision.at is not None and decision.at >= tomorrow
            next_send_at = decision.at
            waiting_for = decision.waiting_for
            if next_send_at is not None:
                next_message = lifecycle.goes_first(m.schedule.prioritize, follow_up, first, next_send_at, new_ok)
        mailboxes.append(
            {
                "address": m.address,
                "state": state,
                "sent_today": sent_today,
                "daily_limit": m.schedule.daily_limit,
                "new_today": new_today,  # first emails (step 1) sent today
                "new_per_day": m.schedule.new_per_day,  # 0: first emails are capped by daily_limit only
                "allowance_today": allowance,  # warm-up and skip dates applied
                "next_send_at": iso(next_send_at),
                "next_message": next_message,
                "waiting_for": waiting_for,
                "scheduled": scheduled,
                "error": errors,
                "owner": m.owner,
                "timezone": m.schedule.timezone,
                "reason": h["reason"]
                if h and state in ("disconnected", "refused")
                else (h.get("paused_reason") if h and not m.paused else None),
                "blocks": h["blocks"] if h else 0,
                "safeguards": safeguards(store, m, h, state, first_day, now),
            }
        )
    if store.shared:  # PostgreSQL: who sends for each mailbox, and which daemons are live
        leases = store.leases()
        for row in mailboxes:
            lease = leases.get(str(row["address"]))
            row["holder"], row["lease_expires_at"] = (lease[0], iso(lease[1])) if lease else (None, None)
    enrollments = store.enrollment_counts()
    paused = store.cadence_pauses()
    cadences = []
    for c in config.cadences:
        mine = enrollments.get(c.name, {})
        pause = paused.get(c.name)
        cadences.append(
            {
                "name": c.name,
                "enrollments": {s: mine.get(s, 0) for s in ENROLLMENT_STATES},
                "paused": pause is not None,
                "paused_at": iso(pause[0]) if pause else None,
            }
        )
    out: dict[str, Any] = {
        "mailboxes": mailboxes,
        "cadences": cadences,
        "daemon": daemon(store, now),
        "generated_at": iso(now),
    }
    if store.shared:
        daemons = [
            {**d, "started_at": iso(d["started_at"]), "seen_at": iso(d["seen_at"])}
            for d in store.daemons(config.daemon.lease)
        ]
        out["daemons"] = daemons
        # A pid says nothing across machines: the daemons are running when one of them is live.
        live = [d for d in daemons if d["live"]]
        running: dict[str, Any] = out["daemon"]
        running["running"] = bool(live)
        running["pid"] = live[0]["pid"] if len(live) == 1 else None
        if live and running["store"] is None:
            running["store"] = "ok"
    return out


def gauges(config: Config, store: Store, now: float) -> list[tuple[str, str, int, int]]:
    """(address, state, sent today, allowance today) of every mailbox, as `status` has them, for /metrics:
    a few statements for all mailboxes, not several for each (a scrape of 10,000 every 15 s)."""
    health = store.health()
    days: dict[str, str] = {}
    for m in config.mailboxes:
        if m.schedule.timezone not in days:
            days[m.schedule.timezone] = timing.local_day(now, m.schedule.timezone)
    sent = store.sent_on_days([(m.address, days[m.schedule.timezone]) for m in config.mailboxes])
    first = store.first_send_days([m.address for m in config.mailboxes if m.schedule.warmup is not None])
    out = []
    for m in config.mailboxes:
        today = days[m.schedule.timezone]
        skipped = timing.skipped(m.schedule, today)
        allowance = 0 if skipped else timing.allowance(m.schedule, today, first.get(m.address))[0]
        out.append((m.address, mailbox_state(m.paused, health.get(m.address)), sent.get(m.address, 0), allowance))
    return out


HEARTBEAT = 5.0  # seconds between the running daemon's heartbeat commits
STALE = 30.0  # a heartbeat older than this while the daemon runs: its commits are failing


def daemon(store: Store, now: float) -> dict[str, Any]:
    """Is a daemon running on this database, and can it commit? From its heartbeat row."""
    state = store.daemon_state()
    pid = int(state.get("pid") or 0)
    heartbeat = float(state.get("heartbeat_at") or 0)
    alive = pid > 0 and _pid_alive(pid) and state.get("stopped_at") is None
    out: dict[str, Any] = {"pid": pid if alive else None, "running": alive, "heartbeat_at": iso(heartbeat or None)}
    if alive and now - heartbeat > STALE:
        out["store"] = f"no commit for {round(now - heartbeat)} s: sending is paused (see store.error in its log)"
    else:
        out["store"] = "ok" if alive else None
    out["last_store_error"] = state.get("store_error")
    return out


def stored_warnings(config: Config, store: Store, cadences: Iterable[str] | None = None) -> list[str]:
    """What the config does to the prospects already enrolled (`check`, and a reload for the cadences it
    changed): a cadence removed with active enrollments; a template field that active enrollments lack."""
    counts = store.enrollment_counts()
    configured = {c.name for c in config.cadences}
    warnings = [
        f'cadences."{name}": no longer in the config, with {active} active enrollment(s): their messages go '
        "to the error outbox (cadence_removed) at the daemon's next start or reload"
        for name in sorted(set(counts) - configured)
        if (active := counts[name].get("active", 0))
    ]
    wanted = set(configured if cadences is None else cadences)
    for c in config.cadences:
        if c.name not in wanted or not counts.get(c.name, {}).get("active"):
            continue
        for field in sorted(c.required_fields() - {"email", "unsubscribe_url"}):
            lacking, sample = store.lacking_field(c.name, field)
            if lacking:
                warnings.append(
                    f'cadences."{c.name}": a template needs {field!r}, which {lacking} active enrollment(s) lack '
                    f"(such as {sample}): their messages would go to the error outbox (template); use "
                    f"default(...), or `cadenced prospect set EMAIL {field}=…`"
                )
    return warnings


def stale_config(store: Store, config: Config, now: float) -> str | None:
    """A warning when the running daemon runs another version of the config file than the one on disk."""
    running = daemon(store, now)
    digest = store.daemon_state().get("config_digest")
    if not running["running"] or not digest or digest == config_digest(config.path):
        return None
    return (
        f"the running daemon (pid {running['pid']}) runs an older version of {config.path}: "
        "reload to apply it (systemctl reload cadenced, or kill -HUP)"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Rank = tuple[int, int]  # a stored message (0, its id), or one the plan makes (1, in the order it makes them)


class _Kind:
    """One kind of a mailbox's messages (follow-ups, or first emails) as `plan` takes them: the scheduled ones read
    from the store in due order as they are needed, merged with those the plan makes (follow-ups) or moves (a
    full domain's). A head is (due, rank, step, enrollment, route): the claim's order is (due_at, id), and a
    message the plan makes would get an id above every stored one."""

    def __init__(self, rows: Iterator[tuple[float, int, int, int]]) -> None:
        self.rows = rows
        self.row = next(rows, None)
        self.made: list[tuple[float, Rank, int, int, tuple[str, str] | None]] = []

    def _stored_first(self) -> bool:
        row, made = self.row, self.made[0] if self.made else None
        return row is not None and (made is None or (row[0], (0, row[3])) <= made[:2])

    def head(self) -> tuple[float, Rank, int, int, tuple[str, str] | None] | None:
        if self._stored_first():
            assert self.row is not None
            return (self.row[0], (0, self.row[3]), self.row[1], self.row[2], None)
        return self.made[0] if self.made else None

    def pop(self) -> None:
        if self._stored_first():
            self.row = next(self.rows, None)
        else:
            heapq.heappop(self.made)

    def push(self, due: float, rank: Rank, step: int, enrollment: int, route: tuple[str, str] | None) -> None:
        heapq.heappush(self.made, (due, rank, step, enrollment, route))


def _held_until(turns: list[tuple[float, float]], due: float) -> float:
    """When a first email due at `due` is due after the turns (when, until), in time order, that found its
    cadence's first emails of the day all sent: each moved it on, as Store.defer_cadence_new does, if it was due
    by then."""
    i = 0
    while (i := bisect.bisect_left(turns, (due,), i)) < len(turns):
        when, until = turns[i]
        due = until + (due - when) / 1e6
        i += 1
    return due


def plan(config: Config, store: Store, now: float, days: int) -> dict[str, Any]:
    """Forecast sends per mailbox per local day, with the daemon's own rules (lifecycle, timing).

    Each mailbox sends, at each slot its window, gap and limits allow, the message its `prioritize` picks
    among those due then (follow-ups first by default), as the sender loop's claim does; the follow-ups its
    sends make join their sender's queue. Each mailbox's gap is taken at the middle of its range. Scheduled
    messages are read from the store one kind at a time in due order as the plan reaches them, a mailbox
    with no room left in the horizon drops out, and a message's cadence is looked up only when its send
    could make a follow-up inside the horizon: the plan costs what can be sent.
    """
    horizon = now + days * 86400
    health = store.health()
    live = {m.address: m for m in config.mailboxes if mailbox_state(m.paused, health.get(m.address)) == "connected"}
    longest = max((len(c.steps) for c in config.cadences), default=0)
    shortest = min((len(c.steps) for c in config.cadences), default=0)
    # Messages of a cadence no longer in the config (or of a step it lost) are not sent (config_changed): their
    # routes are looked up only when such a cadence has enrollments, or a step may be past a cadence's end.
    gone = set(store.enrollment_counts()) - {c.name for c in config.cadences}
    paused = set(store.cadence_pauses())  # `cadence pause`: its messages are held, not sent
    soonest = min((s.wait for c in config.cadences for s in c.steps[1:]), default=float("inf"))
    queues: dict[str, tuple[_Kind, _Kind]] = {}  # (follow-ups, first emails)
    counts: dict[str, dict[str, int]] = {}
    new_counts: dict[str, dict[str, int]] = {}  # first emails by day, where new_per_day caps them
    free_at: dict[str, float] = {}
    for address, m in live.items():
        queues[address] = (
            _Kind(store.scheduled_in_order(address, horizon, "follow_ups")),
            _Kind(store.scheduled_in_order(address, horizon, "new")),
        )
        today = timing.local_day(now, m.schedule.timezone)
        counts[address] = {today: store.sent_today(address, today, timing.local_day_start(now, m.schedule.timezone))}
        new_counts[address] = {today: store.first_emails_on(address, today)} if m.schedule.new_per_day else {}
        free_at[address] = max(now, (health.get(address) or {}).get("not_before") or now)
    stretches = {
        address: timing.Stretches(m.schedule, store.first_send_day(address) if m.schedule.warmup else None)
        for address, m in live.items()
    }
    domains: dict[int, str] = {}  # enrollment → recipient domain, looked up only for a domain_daily_limit
    domain_counts: dict[tuple[str, str, str], int] = {
        (address, day, domain): n
        for address, m in live.items()
        if m.schedule.domain_daily_limit
        for day, domain, n in store.domain_counts_on(address, timing.local_day(now, m.schedule.timezone))
    }
    # (mailbox, domain) → (when, until): the run moves every due message of a full domain at once, to the
    # mailbox's next sending day; those the plan has not reached yet follow when it does.
    moved: dict[tuple[str, str], tuple[float, float]] = {}
    # [[cadences]] new_per_day: (mailbox, day, cadence) → first emails, today's as the store counted them
    caps = {c.name: c.new_per_day for c in config.cadences if c.new_per_day}
    # (mailbox, cadence) → the turns (when, until) that found the cadence's first emails of the day all sent:
    # each moved all its due first emails on, whether or not one was next (take_turn)
    held: dict[tuple[str, str], list[tuple[float, float]]] = {}
    cadence_counts: dict[tuple[str, str, str], int] = {
        (address, timing.local_day(now, m.schedule.timezone), cadence): store.cadence_first_emails(
            address, cadence, timing.local_day(now, m.schedule.timezone)
        )
        for address, m in live.items()
        for cadence in caps
    }
    forecast: dict[tuple[str, str], list[int]] = {}  # (day, mailbox) → [first emails, follow-ups]
    seq = itertools.count()
    version: dict[str, int] = dict.fromkeys(live, 0)
    slots: list[tuple[float, int, str, int, str]] = []  # (when a mailbox may next send, seq, it, version, day)

    def look(address: str) -> None:
        """When `address` sends next (its queues or free time changed): a new entry; older ones go stale."""
        version[address] += 1
        f, n = queues[address][0].head(), queues[address][1].head()
        clock, done = stretches[address], counts[address]
        found = [] if f is None else [clock.next_allowed(max(f[0], free_at[address]), done)]
        if n is not None:
            slot = clock.next_allowed(max(n[0], free_at[address]), done)
            cap = live[address].schedule.new_per_day
            # new_per_day: a day whose first emails are all sent lets them go again on the next sending day
            while cap and slot is not None and slot[0] < horizon and new_counts[address].get(slot[1], 0) >= cap:
                tomorrow = timing.next_sending_day(slot[0], live[address].schedule, clock.first_day)
                slot = clock.next_allowed(max(n[0], free_at[address], tomorrow), done)
            found.append(slot)
        slot = min((s for s in found if s is not None), default=None)
        # Sends of one mailbox come in order and free_at only grows: a slot past the horizon stays past it.
        if slot is not None and slot[0] < horizon:
            heapq.heappush(slots, (slot[0], next(seq), address, version[address], slot[1]))

    for address in live:
        look(address)
    while slots:
        at, _, address, seen, day = heapq.heappop(slots)
        if seen != version[address]:
            continue
        m = live[address]
        follow_ups, new = queues[address]
        cap = m.schedule.new_per_day
        kind = _pick(m.schedule.prioritize, follow_ups, new, at, not cap or new_counts[address].get(day, 0) < cap)
        head = kind.head()
        assert head is not None  # the slot was found from a head due by then
        due, rank, step, enrollment, route = head
        kind.pop()
        if step == 1 and caps:  # a cadence's new_per_day: moved on by the turns that found its cadence full
            route = route or store.route_of(enrollment)
            turns = held.get((address, route[0]), []) if route is not None and route[0] in caps else None
            if turns is not None and (later := _held_until(turns, due)) != due:
                kind.push(later, rank, step, enrollment, route)  # a turn before this one moved it: not one now
                look(address)
                continue
        moved_now = None
        for cadence, limit in caps.items():  # this turn may send: every full cadence's due first emails move on
            if cadence_counts.get((address, day, cadence), 0) >= limit:
                until = timing.next_sending_day(at, m.schedule, stretches[address].first_day)
                held.setdefault((address, cadence), []).append((at, until))
                if step == 1 and route is not None and route[0] == cadence:
                    moved_now = until + (due - at) / 1e6  # as Store.defer_cadence_new: in order, before `until`
        if moved_now is not None:
            kind.push(moved_now, rank, step, enrollment, route)
            look(address)
            continue
        cap = m.schedule.domain_daily_limit
        if cap:  # domain_daily_limit: a full domain's due messages wait for the next sending day; the others go on
            domain = domains.setdefault(enrollment, domain_of(store.email_of(enrollment)))
            when, until = moved.get((address, domain), (0.0, 0.0))
            if due > when:  # not among the due messages the run moved
                if domain_counts.get((address, day, domain), 0) < cap:
                    when = until = 0.0  # it goes now
                else:  # as defer_full_domains does it
                    when = at
                    until = timing.next_sending_day(at, m.schedule, stretches[address].first_day)
                    moved[(address, domain)] = (when, until)
            if until:  # due again as Store.defer_domain makes it: in their order, just before `until`
                kind.push(until + (due - when) / 1e6, rank, step, enrollment, route)  # it keeps its id
                look(address)
                continue
        if gone or paused or step > shortest:
            route = route or store.route_of(enrollment)
            if route is None or route[0] in paused or lifecycle.step_of(config, route[0], step)[1] is None:
                look(address)
                continue  # not sent: the sender loop records it as config_changed and goes on at once
        if cap:
            domain_counts[(address, day, domain)] = domain_counts.get((address, day, domain), 0) + 1
        counts[address][day] = counts[address].get(day, 0) + 1
        if step == 1 and m.schedule.new_per_day:
            new_counts[address][day] = new_counts[address].get(day, 0) + 1
        if step == 1 and route is not None and route[0] in caps:
            cadence_counts[(address, day, route[0])] = cadence_counts.get((address, day, route[0]), 0) + 1
        forecast.setdefault((day, address), [0, 0])[step > 1] += 1
        free_at[address] = at + sum(m.schedule.gap) / 2
        look(address)
        if step >= longest or at + soonest >= horizon:
            continue  # no follow-up of it can land in the horizon
        route = route or store.route_of(enrollment)
        following = lifecycle.next_step(config, route[0], step, route[1], at) if route else None
        if following is not None and following.sender in live and following.due < horizon:
            queues[following.sender][0].push(following.due, (1, next(seq)), following.step, enrollment, route)
            look(following.sender)
    rows = [
        {"date": day, "mailbox": address, "sends": n + f, "new": n, "follow_ups": f}
        for (day, address), (n, f) in sorted(forecast.items())
    ]
    left = _left_over(store, queues, horizon)
    return {
        "days": rows,
        "generated_at": iso(now),
        "horizon_days": days,
        "past_horizon": left,
        "paused_cadences": sorted(paused),
    }


def _left_over(store: Store, queues: dict[str, tuple[_Kind, _Kind]], horizon: float) -> list[dict[str, Any]]:
    """The backlog past the horizon: per cadence and mailbox, the messages due before the horizon that the plan
    does not send before it (the stored ones from where the plan stopped reading, and the follow-ups it made)."""
    left: dict[tuple[str, str], list[int]] = {}  # (cadence, mailbox) → [first emails, follow-ups]
    for address, kinds in queues.items():
        for index, kind in enumerate(kinds):
            if kind.row is not None:
                due, _, _, id_ = kind.row
                for cadence, n in store.left_in_order(address, due, id_, horizon, "new" if index else "follow_ups"):
                    left.setdefault((cadence, address), [0, 0])[1 - index] += n
            for due, _, _, enrollment, route in kind.made:
                if due < horizon and (route := route or store.route_of(enrollment)) is not None:
                    left.setdefault((route[0], address), [0, 0])[1 - index] += 1
    return [
        {"cadence": cadence, "mailbox": address, "new": n, "follow_ups": f}
        for (cadence, address), (n, f) in sorted(left.items())
    ]


BACKLOG_DAYS = 366  # how far `enroll` looks for the last first email of a backlog


def first_emails_by(config: Config, store: Store, now: float, mailboxes: Iterable[str]) -> dict[str, str | None]:
    """The local day each mailbox sends the last first email now scheduled on it, as `plan` forecasts it under
    today's limits, windows, warm-up, skip dates and follow-ups first; None past BACKLOG_DAYS days (or never:
    a mailbox that is paused or down sends nothing until it is back)."""
    horizon = now + BACKLOG_DAYS * 86400
    wanted = set(mailboxes)
    last: dict[str, str] = {}
    sent: dict[str, int] = dict.fromkeys(wanted, 0)
    for row in plan(config, store, now, BACKLOG_DAYS)["days"]:
        if row["mailbox"] in wanted and row["new"]:
            last[row["mailbox"]] = row["date"]
            sent[row["mailbox"]] += row["new"]
    zones = {m.address: m.schedule.timezone for m in config.mailboxes}
    told: dict[str, str | None] = {}
    for mailbox in sorted(wanted):
        waiting = store.first_emails_waiting(mailbox, horizon)
        if not waiting and mailbox in zones:  # every first email has gone already: by today
            told[mailbox] = timing.local_day(now, zones[mailbox])
        else:
            told[mailbox] = last.get(mailbox) if sent[mailbox] >= waiting else None
    return told


def _pick(prioritize: str, follow_ups: _Kind, new: _Kind, at: float, new_ok: bool = True) -> _Kind:
    """The kind of message a mailbox sends at `at` (lifecycle.goes_first); `new_ok` False: the day's first
    emails are sent (new_per_day)."""
    f, n = follow_ups.head(), new.head()
    kind = lifecycle.goes_first(prioritize, f[:2] if f else None, n[:2] if n else None, at, new_ok)
    return new if kind == "new" else follow_ups


COUNT_CAP = 100_000  # `outbox` counts the messages past its page up to this many


def outbox_messages(rows: list[dict[str, Any]], paused: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """`outbox --json`'s messages (the CLI and the API's GET /v1/outbox); a scheduled message of a paused cadence
    (`paused`) says so."""
    paused = paused or {}
    return [
        {
            "id": r["id"],
            "cadence": r["cadence"],
            "prospect": r["prospect"],
            "step": r["step"],
            "mailbox": r["mailbox"],
            "state": r["state"],
            "reason": r["reason"],
            "due_at": iso(r["due_at"]),
            "sent_at": iso(r["sent_at"]),
            "message_id": r["message_id"],
            "attempts": r["attempts"],
            "smtp_code": r["smtp_code"],
            "detail": r["detail"]
            or ("deferred: cadence paused" if r["state"] == "scheduled" and r["cadence"] in paused else None),
            "variant": r["variant"],
        }
        for r in rows
    ]
