"""One prospect or one cadence under the team's hand (SPEC §8a): look an address up, stop it, change its fields,
mark an outcome, pause a cadence; an unknown name is an error that says the nearest one."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from daemon import compose, lifecycle
from daemon.errors import NotFound, Refused, UsageError
from daemon.headers import FIELD_NAME
from daemon.model import Config
from daemon.readside import iso
from daemon.store import OUTCOMES, Store

_LINE_BREAK = re.compile(r"[\r\n\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def unknown(kind: str, name: str, known: Iterable[str]) -> NotFound:
    """`no mailbox bob@acme.exmaple; did you mean bob@acme.example?` (or without a guess when none is near)."""
    cutoff = 0.75 if len(name) > 6 else 0.5  # a short name differs by a larger share for one wrong character
    near = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=cutoff)
    return NotFound(f"no {kind} {name}" + (f"; did you mean {near[0]}?" if near else ""))


def check_filters(config: Config, store: Store, mailbox: str | None, cadence: str | None) -> None:
    """A mailbox or cadence named in a filter is one the config or the database knows, or NotFound."""
    if mailbox is not None:
        known = {m.address for m in config.mailboxes} | set(store.mailbox_states())
        if mailbox not in known:
            raise unknown("mailbox", mailbox, known)
    if cadence is not None:
        known_cadence(config, store, cadence)


def known_cadence(config: Config, store: Store, name: str) -> str:
    """`name`, a cadence of the config or of the database (a removed one with enrollments), or NotFound."""
    known = {c.name for c in config.cadences} | set(store.enrollment_counts())
    if name not in known:
        raise unknown("cadence", name, known)
    return name


def pause_cadence(store: Store, config: Config, name: str, reason: str, now: float) -> bool:
    """`cadence pause` (the CLI's and the API's): False when it was paused already."""
    return store.pause_cadence(known_cadence(config, store, name), reason, now)


def resume_cadence(store: Store, config: Config, name: str) -> int:
    """`cadence resume`: how many held messages are due again; Refused when it was not paused."""
    released = store.resume_cadence(known_cadence(config, store, name))
    if released is None:
        raise Refused(f"{name}: not paused")
    return released


def find(store: Store, email: str) -> dict[str, Any]:
    """The address's record (Store.prospect), or NotFound naming the nearest enrolled address."""
    address = email.strip().lower()
    found = store.prospect(address)
    if found is None:
        raise unknown("prospect", address, store.emails_from(address[:2]) if len(address) >= 2 else [])
    return found


def chosen(found: dict[str, Any], cadence: str | None) -> list[dict[str, Any]]:
    """The enrollments an action is about: all of the address's, or the one in `cadence` (else NotFound)."""
    enrollments: list[dict[str, Any]] = found["enrollments"]
    if cadence is None:
        if not enrollments:
            raise Refused(f"{found['email']} is in no cadence (it is only suppressed)")
        return enrollments
    picked = [e for e in enrollments if e["cadence"] == cadence]
    if not picked:
        names = ", ".join(e["cadence"] for e in enrollments) or "none"
        raise NotFound(f"{found['email']} is not in cadence {cadence} (its cadences: {names})")
    return picked


def _active(found: dict[str, Any], picked: list[dict[str, Any]], verb: str) -> list[dict[str, Any]]:
    active = [e for e in picked if e["state"] == "active"]
    if not active:
        states = ", ".join(f"{e['cadence']}: {e['state']}" for e in picked)
        raise Refused(f"{found['email']} has no active enrollment to {verb} ({states}); nothing was changed")
    return active


def stop(store: Store, email: str, cadence: str | None, reason: str, now: float) -> dict[str, Any]:
    found = find(store, email)
    active = _active(found, chosen(found, cadence), "stop")
    detail = f"stopped by the operator: {reason}" if reason else "stopped by the operator"
    cancelled = store.stop_enrollments([e["id"] for e in active], detail[:500], now)
    return {"email": found["email"], "stopped": [e["cadence"] for e in active], "cancelled": cancelled}


def mark(store: Store, email: str, cadence: str | None, outcome: str, now: float) -> dict[str, Any]:
    if outcome not in OUTCOMES:
        raise UsageError(f"--outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
    found = find(store, email)
    picked = chosen(found, cadence)
    ended_before = [e["id"] for e in picked if e["state"] != "active"]
    cancelled = store.mark_outcome([e["id"] for e in picked], outcome, now, f"marked {outcome}", ended_before)
    ended = [e["cadence"] for e in picked if e["state"] == "active"]
    return {"email": found["email"], "outcome": outcome, "ended": ended, "cancelled": cancelled}


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """FIELD=VALUE arguments; UsageError names a bad one (`email` and `owner` are not fields to change)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not FIELD_NAME.fullmatch(name):
            raise UsageError(f"{item!r}: write FIELD=VALUE (a field name in lower case, as a template reads it)")
        if name in ("email", "owner"):
            raise UsageError(f"{name}: not a field to change here (an address is the prospect itself)")
        if _CONTROL.search(value):
            raise UsageError(f"{name}: a control character in the value")
        out[name] = value.strip()
    if not out:
        raise UsageError("give at least one FIELD=VALUE")
    return out


def set_fields(
    store: Store, config: Config, email: str, cadence: str | None, changes: dict[str, str], now: float
) -> dict[str, Any]:
    """The fields of the address's active enrollments change (an empty value removes the field); refused when
    a cadence's templates could not be filled with them, or a line break would reach a subject."""
    found = find(store, email)
    active = _active(found, chosen(found, cadence), "change")
    updates = []
    for enrollment in active:
        fields = {**enrollment["fields"], **changes}
        fields = {k: v for k, v in fields.items() if v != ""}
        try:
            steps = config.cadence(enrollment["cadence"]).steps
            headed = config.cadence(enrollment["cadence"]).subject_fields()
        except KeyError:
            steps, headed = (), frozenset()
        broken = sorted(n for n in changes if n in headed and _LINE_BREAK.search(changes[n]))
        if broken:
            raise Refused(f"{broken[0]}: a line break in a field a subject of {enrollment['cadence']} reads")
        variables = compose.prospect_variables({"email": found["email"], **fields}, "sender", "sender@example.com")
        problems = lifecycle.unfilled(steps, variables)
        if problems:
            step, part, exc = problems[0]
            raise Refused(
                f"{enrollment['cadence']} step {step.number} {part} could not be filled with these fields: {exc}; "
                "nothing was changed"
            )
        updates.append((int(enrollment["id"]), fields))
    detail = "fields changed by the operator: " + ", ".join(sorted(changes))
    store.set_fields(updates, now, detail)
    return {"email": found["email"], "changed": [e["cadence"] for e in active], "fields": sorted(changes)}


def timeline(found: dict[str, Any]) -> list[dict[str, Any]]:
    """What happened to the address, in time order: enrolled, each email sent (what the server accepted), what
    ended or changed an enrollment, the suppression."""
    events: list[tuple[float, int, dict[str, Any]]] = []
    for e in found["enrollments"]:
        cadence = e["cadence"]
        events.append((e["created_at"], 0, {"kind": "enrolled", "cadence": cadence, "mailbox": e["mailbox"]}))
        for m in e["messages"]:
            if m["sent_at"] is not None and m["state"] == "sent":
                sent = {"kind": "sent", "cadence": cadence, "step": m["step"], "mailbox": m["mailbox"]}
                events.append((m["sent_at"], 1, {**sent, "subject": m["subject"], "message_id": m["message_id"]}))
        logged = {ev["kind"] for ev in e["events"]}
        events.extend(
            (ev["at"], 2, {"kind": ev["kind"], "cadence": cadence, "detail": ev["detail"]}) for ev in e["events"]
        )
        if e["ended_at"] is not None and e["state"] not in logged:
            events.append((e["ended_at"], 2, {"kind": e["state"], "cadence": cadence}))
    if found["suppressed"]:
        s = found["suppressed"]
        events.append((s["at"], 3, {"kind": "suppressed", "detail": s["reason"]}))
    events.sort(key=lambda t: (t[0], t[1]))
    return [{"at": iso(at), **event} for at, _, event in events]


def show(found: dict[str, Any], paused: dict[str, tuple[float, str]]) -> dict[str, Any]:
    """`prospect show --json`: the enrollments with their messages, and the timeline."""
    enrollments = []
    for e in found["enrollments"]:
        messages = [
            {
                **{
                    k: m[k]
                    for k in (
                        "id",
                        "step",
                        "mailbox",
                        "state",
                        "reason",
                        "message_id",
                        "subject",
                        "attempts",
                        "variant",
                    )
                },
                "due_at": iso(m["due_at"]) if m["state"] in ("scheduled", "error") else None,
                "sent_at": iso(m["sent_at"]),
                "detail": m["detail"]
                or ("deferred: cadence paused" if m["state"] == "scheduled" and e["cadence"] in paused else None),
            }
            for m in e["messages"]
        ]
        enrollments.append(
            {
                **{k: e[k] for k in ("id", "cadence", "mailbox", "owner", "adder", "state", "outcome", "fields")},
                "created_at": iso(e["created_at"]),
                "ended_at": iso(e["ended_at"]),
                "cadence_paused": e["cadence"] in paused,
                "messages": messages,
            }
        )
    suppressed = found["suppressed"]
    return {
        "email": found["email"],
        "suppressed": None if suppressed is None else {"reason": suppressed["reason"], "at": iso(suppressed["at"])},
        "enrollments": enrollments,
        "timeline": timeline(found),
    }
