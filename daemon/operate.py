"""Operator actions on the outbox: retry and reassign, each all-or-nothing with a clear refusal."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config import Config
from daemon.errors import Refused, UsageError
from daemon.readside import mailbox_state
from daemon.store import Store


@dataclass(frozen=True, slots=True)
class Outcome:
    messages: list[int]
    enrollments: int = 0


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


def retry(store: Store, ids: list[int] | None, mailbox: str | None, every: bool) -> Outcome:
    """error → scheduled for the chosen messages (uncertain ones too: the operator has checked)."""
    with store.transaction():
        if ids:
            _check_ids(store, ids, ("error",), "retried")
            chosen = ids
        else:
            chosen = store.error_ids(None if every else mailbox)
            if not chosen:
                where = "" if every else f" for {mailbox}"
                raise Refused(f"no messages in the error section{where}; nothing was changed")
        store.retry(chosen)
    return Outcome(sorted(chosen))


def reassign(store: Store, config: Config, ids: list[int] | None, source: str | None, to: str) -> Outcome:
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
        else:
            assert source is not None
            chosen = [i for i in store.pending_ids(source)]
            if not chosen:
                raise Refused(f"{source} has no messages waiting to be sent; nothing was changed")
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
    return Outcome(moved, len(enrollments))
