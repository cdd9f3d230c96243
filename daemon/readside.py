"""What `status` and `plan` report, computed from config and the database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from daemon import timing
from daemon.config import Config
from daemon.store import ENROLLMENT_STATES, Store


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def mailbox_state(paused: bool, health: dict[str, Any] | None) -> str:
    if paused:
        return "paused"
    if health and health["state"] == "disconnected":
        return "disconnected"
    return "connected"


def status(config: Config, store: Store, now: float) -> dict[str, Any]:
    health = store.health()
    counts = store.message_counts()
    mailboxes = []
    for m in config.mailboxes:
        h = health.get(m.address)
        state = mailbox_state(m.paused, h)
        scheduled = counts.get((m.address, "scheduled"), 0) + counts.get((m.address, "sending"), 0)
        errors = counts.get((m.address, "error"), 0)
        today = timing.local_day(now, m.schedule.timezone)
        sent_today = store.sent_on(m.address, today)
        next_send_at: float | None = None
        waiting_for: str | None = None
        earliest = store.earliest_due(m.address) if scheduled else None
        if state == "disconnected":
            waiting_for = "reconnect"
            next_send_at = h["next_probe_at"] if h else None
        elif state == "paused":
            waiting_for = None
        elif earliest is not None:
            gap_until = h["not_before"] if h else None
            decision = timing.next_allowed(max(now, earliest), m.schedule, gap_until, {today: sent_today})
            next_send_at = decision.at
            waiting_for = decision.waiting_for
        mailboxes.append(
            {
                "address": m.address,
                "state": state,
                "sent_today": sent_today,
                "daily_limit": m.schedule.daily_limit,
                "next_send_at": iso(next_send_at),
                "waiting_for": waiting_for,
                "scheduled": scheduled,
                "error": errors,
                "owner": m.owner,
                "timezone": m.schedule.timezone,
            }
        )
    enrollments = store.enrollment_counts()
    cadences = []
    for c in config.cadences:
        mine = enrollments.get(c.name, {})
        cadences.append({"name": c.name, "enrollments": {s: mine.get(s, 0) for s in ENROLLMENT_STATES}})
    return {"mailboxes": mailboxes, "cadences": cadences, "generated_at": iso(now)}
