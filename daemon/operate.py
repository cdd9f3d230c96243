"""Operator actions on the outbox: retry and reassign, each all-or-nothing with a clear refusal."""

from __future__ import annotations

import time
from dataclasses import dataclass

from daemon import timing
from daemon.errors import Refused, UsageError
from daemon.model import Config, Mailbox
from daemon.readside import iso, mailbox_state, next_send
from daemon.store import Store


@dataclass(frozen=True, slots=True)
class Outcome:
    messages: list[int]
    enrollments: int = 0
    goes_at: str | None = None  # reassign: when the target may send, if not now
    waiting_for: str | None = None


def _check_ids(store: Store, ids: list[int], allowed: tuple[str, ...], verb: str) -> dict[int, dict[str, object]]:
    found = store.messages_by_id(ids)
    problems = []
    for message_id in ids:
        row = found.get(message_id)
        if row is None:
            problems.append(f"no message {message_id}")
        elif row["state"] not in allowed:
            reason = f" ({row['reason']})" if row["reason"] else ""
            problems.append(
                f"message {message_id} is {row['state']}{reason}: only {' or '.join(allowed)} messages can be {verb}"
            )
    if problems:
        raise Refused("; ".join(problems) + "; nothing was changed")
    return found


def retry(
    store: Store,
    config: Config,
    ids: list[int] | None,
    mailbox: str | None,
    every: bool,
    *,
    include_uncertain: bool = False,
) -> Outcome:
    """error → scheduled for the chosen messages.

    `uncertain` ones (the prospect may already have them) go only when named by id
    with include_uncertain; bulk selections leave them where they are. A mailbox
    that the server refused (`refused`) is tried again at once: the operator says
    it is fixed.
    """
    now = time.time()
    with store.transaction():
        if ids:
            rows = _check_ids(store, ids, ("error",), "retried")
            _uncertain_needs_consent(rows, include_uncertain)
            chosen = ids
        else:
            chosen = store.error_ids(None if every else mailbox, exclude_uncertain=True)
            if not chosen:
                where = "" if every else f" for {mailbox}"
                raise Refused(f"no messages in the error section{where} (uncertain ones are retried by id only)")
            rows = store.messages_by_id(chosen)
        _can_send(store, config, rows)
        store.retry(chosen)
        for box in sorted({str(r["mailbox"]) for r in rows.values()}):
            store.probe_now(box, now)
    return Outcome(sorted(chosen))


def _can_send(store: Store, config: Config, rows: dict[int, dict[str, object]]) -> None:
    """A retry that cannot send is refused: its mailbox left the config, is paused, or is still disconnected."""
    health = store.health()
    known = {m.address: m for m in config.mailboxes}
    problems = []
    for box in sorted({str(r["mailbox"]) for r in rows.values()}):
        ids = sorted(i for i, r in rows.items() if r["mailbox"] == box)
        mailbox = known.get(box)
        if mailbox is None:
            why = "is no longer in the config: move them with `outbox reassign --from` to a mailbox that is"
        elif mailbox.paused:
            why = "is paused: unpause it (and reload), or reassign them"
        elif (health.get(box) or {}).get("state") == "disconnected":
            probe = iso((health.get(box) or {}).get("next_probe_at"))
            why = (
                f"is still disconnected (next probe {probe}): its messages return by themselves when a probe "
                "succeeds; fix the mailbox and reload to probe now, or reassign them"
            )
        else:
            continue
        problems.append(f"message(s) {id_list(ids)}: {box} {why}")
    if problems:
        raise Refused("; ".join(problems) + "; nothing was changed")


def when_it_sends(store: Store, mailbox: Mailbox, now: float) -> tuple[str | None, str | None]:
    """(when, why) the mailbox may send next, when that is later than now: what a reassign should say."""
    today = timing.local_day(now, mailbox.schedule.timezone)
    sent = store.sent_today(mailbox.address, today, timing.local_day_start(now, mailbox.schedule.timezone))
    decision = next_send(
        mailbox, store.health().get(mailbox.address), sent, now, None, store.first_send_day(mailbox.address)
    )
    if decision.at is not None and decision.at <= now + 1:
        return None, None
    return iso(decision.at) if decision.at is not None else "never (daily_limit = 0)", decision.waiting_for


def _uncertain_needs_consent(rows: dict[int, dict[str, object]], include_uncertain: bool) -> None:
    """An uncertain message goes again only when named, with --include-uncertain: the prospect may have it."""
    uncertain = sorted(i for i, r in rows.items() if r["reason"] == "uncertain")
    if uncertain and not include_uncertain:
        raise Refused(
            f"message(s) {id_list(uncertain)} are uncertain: the prospect may already have them; "
            "add --include-uncertain once you have checked; nothing was changed"
        )


def id_list(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


def reassign(
    store: Store,
    config: Config,
    ids: list[int] | None,
    source: str | None,
    to: str,
    *,
    include_uncertain: bool = False,
) -> Outcome:
    """Change the sticky sender of the chosen messages' enrollments: this and every later step."""
    try:
        target = config.mailbox(to)
    except KeyError:
        raise UsageError(f"unknown mailbox {to!r} (not in {config.path})") from None
    health = store.health()
    state = mailbox_state(target.paused, health.get(to))
    if state != "connected":
        raise Refused(f"{to} is {state}: reassign to a connected mailbox; nothing was changed")
    with store.transaction():
        if ids:
            rows = _check_ids(store, ids, ("scheduled", "error"), "reassigned")
            _uncertain_needs_consent(rows, include_uncertain)
        else:
            assert source is not None
            chosen = store.pending_ids(source, exclude_uncertain=True)
            if not chosen:
                raise Refused(f"{source} has no messages waiting to be sent (uncertain ones move by id only)")
            rows = _check_ids(store, chosen, ("scheduled", "error"), "reassigned")
        problems = []
        for row in rows.values():
            cadence_name = str(row["cadence"])
            try:
                pool = config.cadence(cadence_name).pool
            except KeyError:
                pool = ()
            if to not in pool:
                problems.append(f"message {row['id']}: {to} is not in the pool of cadence {cadence_name!r}")
        if problems:
            raise Refused("; ".join(sorted(set(problems))) + "; nothing was changed")
        enrollments = sorted({int(str(row["enrollment_id"])) for row in rows.values()})
        moved = store.reassign(enrollments, to)
    goes_at, waiting_for = when_it_sends(store, target, time.time())
    return Outcome(moved, len(enrollments), goes_at, waiting_for)
