"""The store's records as the engine and the commands see them, and the names of its states."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 21

MESSAGE_STATES = ("scheduled", "sending", "sent", "error", "failed", "cancelled")
ENROLLMENT_STATES = ("active", "finished", "replied", "bounced", "stopped")
PENDING = ("scheduled", "sending", "error")
COUNTED_STATES = ("scheduled", "sending", "error")  # of messages, kept in message_counts as they change
HELD_DUE = 1e11  # the due time of a paused cadence's held message (its own kept in held_due): never reached
OUTCOMES = ("interested", "meeting_booked", "not_interested", "wrong_person")  # `prospect mark`
IDEMPOTENCY_KEPT = 7 * 86400.0  # an Idempotency-Key is remembered this long (webhooks retry for up to days)


@dataclass(frozen=True, slots=True)
class Pin:
    cadence: str
    auto_rotate: bool
    rotate_among: str
    enrollments: int


@dataclass(frozen=True, slots=True)
class SentRecord:
    """A delivery the server accepted, as `record_sent` commits it (by the sender loop's next turn)."""

    claimed: Claimed
    at: float
    code: int
    text: str  # the server's reply, secrets masked
    subject: str
    day: str  # the mailbox's local day of `at`: the day it counts in
    gap_until: float  # no send of this mailbox before
    next_step: tuple[int, str, float] | None  # (step, sender, due) of lifecycle.next_step, None: the last
    copy: bytes | None = None  # the message, for sent_copies = "append"
    count_domain: bool = False  # domain_daily_limit counts it
    count_cadence: bool = False  # a first email of a cadence with new_per_day: counted per mailbox and day
    variant: str | None = None  # the step's variant it was sent in (None: the step has none)


@dataclass(frozen=True, slots=True)
class Snapshot:
    earliest_due: float | None
    sent_today: int
    gap_until: float | None
    state: str
    quota_day: str | None
    limit_logged_day: str | None
    next_probe_at: float | None
    failures: int
    throttled_until: float | None = None
    first_day: str | None = None  # the local day of its first send ever
    paused_reason: str | None = None  # paused by pause_on or `mailbox pause`, until `mailbox resume`
    since: float | None = None  # when it entered its state (disconnected: since when it is down)


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    enrollment_id: int
    step: int
    mailbox: str
    cadence: str
    email: str
    fields: dict[str, str]
    due_at: float
    attempts: int
    transient_failures: int
    sticky: str
    message_id: str
    seq: int = 0  # the enrollment's number in its cadence (lifecycle.variant_of)
    # (step, Message-ID, subject) of the steps sent before, when the claim read them (PostgreSQL); else None
    thread: tuple[tuple[int, str, str], ...] | None = None


def domain_of(email: str) -> str:
    """The recipient domain domain_daily_limit counts by (addresses are stored lower-cased)."""
    return email.rpartition("@")[2]


SUPPRESSED_BY = "address suppressed after a bounce of message"
BLOCKED_BY = "enrollment stopped after a block of message"
