"""Pure: whose problem an SMTP reply is, by stage, reply code and RFC 3463 enhanced code (SPEC §5).

One table, first matching row wins. The same table classifies a DSN's
per-recipient `Status` (stage `dsn`). Every row is tested with real texts of
Gmail, Microsoft 365, Postfix, Exim and Dovecot LMTP (tests/unit/test_outcomes.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.errors import (
    AddressRejected,
    Blocked,
    MailboxDown,
    MailboxRefused,
    MessageDeferred,
    ProviderQuota,
    SmtpFailure,
    Throttled,
    Uncertain,
)

# Stages of one transaction, in order.
CONNECT, EHLO, AUTH, MAIL, RCPT, DATA, END, DSN = "connect", "ehlo", "auth", "mail", "rcpt", "data", "end", "dsn"
BEFORE_DATA = frozenset({CONNECT, EHLO, AUTH, MAIL, RCPT, DATA})
SESSION = frozenset({CONNECT, EHLO})
RECIPIENT = frozenset({RCPT, DATA, END, DSN})
ANY = frozenset({CONNECT, EHLO, AUTH, MAIL, RCPT, DATA, END, DSN})

STREAK = 3  # the same policy refusal for recipients at this many different domains in a row: the mailbox's problem

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@dataclass(frozen=True, slots=True)
class Rule:
    """One row: where, which codes, which enhanced code, which wording → whose problem, and why."""

    stages: frozenset[str]
    codes: str  # "4", "5", "45" (first digit of the reply code) or an exact code such as "421"
    enhanced: str  # a regex matched against "c.s.d" from its start, or "" for any (or none)
    text: str  # a regex searched case-insensitively in the reply text, or "" for any
    outcome: type[SmtpFailure]
    why: str

    def matches(self, stage: str, code: int, enhanced: str, text: str) -> bool:
        if stage not in self.stages:
            return False
        digits = str(code)
        if len(self.codes) == 3:
            if digits != self.codes:
                return False
        elif digits[:1] not in self.codes:
            return False
        if self.enhanced and not re.match(self.enhanced + r"$", enhanced):
            return False
        return not self.text or re.search(self.text, text, re.IGNORECASE) is not None


_UNKNOWN_USER = (
    r"user unknown|unknown user|no such user|no such mailbox|mailbox not found|recipient not found|"
    r"unknown recipient|invalid recipient|recipient address rejected: user unknown|does not exist|"
    r"address rejected: undeliverable address|no mailbox here by that name"
)
_SENDER = (
    r"sender address rejected|sender rejected|sender .*not owned|not owned by user|"
    r"send(ing)? as (this )?(sender|user)|send as denied|not permitted to send|"
    r"helo command rejected|client host .*(rejected|blocked)|blocked using|relay access denied|relaying denied|"
    r"sender verify failed|"
    r"not authorized to send|client does not have permissions to send"
)

# Postfix's smtpd_client_*_rate_limit and anvil, Exim's ratelimit ACLs, Microsoft's and Yahoo's throttles: a
# temporary refusal at RCPT that names the client, a count or a rate is about the sender's pace, not the recipient.
_RATE = (
    r"too many (recipients|messages|connections|errors|mails?)\b[^\n]{0,40}\bfrom\b|"
    r"rate[ -]?limit|ratelimit|sending rate|message rate|recipient rate|connection rate|"
    r"too (many|much) (mail|messages) (from|sent)|exceeded the (rate|maximum number)"
)
_CLIENT_IP = r"\bfrom\b[^\n]{0,60}\b\d{1,3}(\.\d{1,3}){3}\b|\[\d{1,3}(\.\d{1,3}){3}\]|\[ipv6:[0-9a-f:]+\]"

TABLE: tuple[Rule, ...] = (
    # --- the provider's own quota for this sender: the day is full (never a bounce) ----------------
    Rule(ANY, "45", r"[45]\.4\.5", r"daily|limit|quota|exceeded", ProviderQuota, "Gmail daily sending limit"),
    Rule(
        ANY,
        "45",
        "",
        r"SubmissionQuotaExceeded|quota exceeded for (this )?sender",
        ProviderQuota,
        "Microsoft 365 submission quota",
    ),
    Rule(ANY, "45", r"[45]\.1\.90", "", ProviderQuota, "Microsoft 365 daily recipient limit"),
    Rule(ANY, "45", r"4\.7\.28", "", ProviderQuota, "rate limit for this sender (4.7.28)"),
    # --- the session: connect, TLS, EHLO, AUTH ------------------------------------------------------
    Rule(SESSION | {AUTH, MAIL}, "4", "", "", Throttled, "the server asks the client to wait"),
    Rule(SESSION, "5", "", "", MailboxDown, "the server refuses the session"),
    Rule(frozenset({AUTH}), "5", "", "", MailboxDown, "login refused"),
    # --- MAIL FROM: every 5xx is about the sender ---------------------------------------------------
    Rule(frozenset({MAIL}), "530", "", "", MailboxDown, "authentication required"),
    Rule(frozenset({MAIL}), "5", "", "", MailboxRefused, "sender refused at MAIL FROM"),
    # --- 421 anywhere: the server closes the session, nothing was delivered ------------------------
    Rule(frozenset({RCPT, DATA, END}), "421", "", "", Throttled, "the server closes the session"),
    # --- refusals that name the sender, at any later stage -----------------------------------------
    Rule(RECIPIENT, "5", r"5\.7\.(60|57|708|750|705)", "", MailboxRefused, "send-as or client denied"),
    Rule(RECIPIENT, "5", r"5\.1\.[78]", "", MailboxRefused, "the sender's address is bad"),
    Rule(RECIPIENT, "5", r"5\.5\.\d+", r"helo|ehlo", MailboxRefused, "the EHLO name is refused"),
    Rule(RECIPIENT - {DSN}, "5", "", _SENDER, MailboxRefused, "a refusal that names the sender"),
    # --- a rate limit on this client or sender, said at RCPT: the whole mailbox waits, no retry is spent ----
    Rule(frozenset({RCPT, DATA}), "4", "", _RATE, Throttled, "a rate limit on this client (said at RCPT)"),
    Rule(frozenset({RCPT, DATA}), "4", r"4\.7\.[01]", _CLIENT_IP, Throttled, "a refusal of this client's address"),
    Rule(frozenset({RCPT, DATA}), "4", r"4\.7\.[5-7]\d\d", "", Throttled, "Microsoft 365 throttles this sender"),
    # --- the message's, for now: 4xx for this recipient --------------------------------------------
    Rule(RECIPIENT, "4", "", "", MessageDeferred, "temporary failure for this recipient"),
    # --- the address's: it does not exist or is disabled -------------------------------------------
    Rule(RECIPIENT, "5", r"5\.1\.\d+", "", AddressRejected, "no such user or domain"),
    Rule(RECIPIENT, "5", r"5\.2\.1", "", AddressRejected, "the mailbox is disabled"),
    Rule(RECIPIENT, "5", r"(5\.0\.0)?", _UNKNOWN_USER, AddressRejected, "user unknown (no enhanced code)"),
    # --- blocked: every other permanent refusal ----------------------------------------------------
    Rule(RECIPIENT, "5", "", "", Blocked, "refused for policy, reputation, size or a full mailbox"),
)


def enhanced_code(text: str, code: int | None = None) -> str:
    """The RFC 3463 code at the start of a reply text ("5.1.1"), or ""; it must agree with the reply's class."""
    match = _ENHANCED.search(text[:40])
    if match is None:
        return ""
    found = ".".join(match.groups())
    if code is not None and str(code)[:1] != found[:1]:
        return ""
    return found


def classify(stage: str, code: int | None, text: str) -> SmtpFailure:
    """The failure of a reply `code text` at `stage`; code None (or -1) is no valid reply at all."""
    if code is None or code < 200 or code > 599:
        # No reply, or not a valid one (malformed, too long): the connection is lost at that stage.
        if stage in BEFORE_DATA:
            return MailboxDown(None, text or "no valid reply", stage=stage)
        return Uncertain(None, text or "no valid reply", stage=stage)
    enhanced = enhanced_code(text, code)
    for rule in TABLE:
        if rule.matches(stage, code, enhanced, text):
            return rule.outcome(code, text, stage=stage, enhanced=enhanced)
    # A reply that fits nowhere (a 2xx/3xx where it makes no sense): a protocol error of the session.
    if stage in BEFORE_DATA:
        return MailboxDown(code, text, stage=stage, enhanced=enhanced)
    return Uncertain(code, text, stage=stage, enhanced=enhanced)


def rule_for(stage: str, code: int, text: str) -> Rule | None:
    """The table row that decides a reply (for tests and for `why` in the log)."""
    enhanced = enhanced_code(text, code)
    return next((r for r in TABLE if r.matches(stage, code, enhanced, text)), None)


_VARIABLE = re.compile(r"<[^>]*>|[\w.+-]+@[\w.-]+|\d+")


def refusal_key(failure: SmtpFailure) -> tuple[int | None, str, str] | None:
    """What makes two refusals "the same" whatever the recipient (code, enhanced code, text without addresses),
    or None for a refusal that cannot be the sender's in disguise.

    Only a policy refusal (`5.7.x`) or one with no class (`5xx` without an enhanced code, or `5.0.0`, that does
    not say the user is unknown) can form a streak. An address-class answer (`5.1.x` no such user, `5.2.1`
    disabled, `5.2.2` full, user unknown) is about that address whatever its wording: three dead addresses in a
    row are three bounces, and the bounce-rate auto-pause is what protects a mailbox from a bad list.
    """
    if isinstance(failure, AddressRejected):
        return None
    if failure.enhanced and not failure.enhanced.startswith("5.7.") and failure.enhanced != "5.0.0":
        return None
    if re.search(_UNKNOWN_USER + r"|mailbox (is )?full|over quota|quota exceeded", failure.text, re.IGNORECASE):
        return None
    return failure.code, failure.enhanced, _VARIABLE.sub("#", failure.text.lower())
