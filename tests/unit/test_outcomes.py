"""The outcome table, row by row, with the real reply lines of Gmail, Microsoft 365, Postfix, Exim and Dovecot."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import outcomes
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
from daemon.outcomes import AUTH, CONNECT, DATA, DSN, EHLO, END, MAIL, RCPT

# (stage, code, text as the server sends it, whose problem)
REAL = [
    # --- Gmail ---------------------------------------------------------------------------------------
    (
        MAIL,
        550,
        "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to",
        ProviderQuota,
    ),
    (END, 550, "5.4.5 Daily user sending limit exceeded.", ProviderQuota),
    (RCPT, 421, "4.7.0 [203.0.113.9] Our system has detected an unusual rate of unsolicited mail", Throttled),
    (CONNECT, 421, "4.7.0 Try again later, closing connection. (EHLO)", Throttled),
    (END, 421, "4.7.28 Gmail has detected an unusual rate of mail originating from your IP", ProviderQuota),
    (RCPT, 550, "5.1.1 The email account that you tried to reach does not exist. Please try", AddressRejected),
    (RCPT, 452, "4.2.2 The email account that you tried to reach is over quota. Please direct", MessageDeferred),
    (RCPT, 552, "5.2.2 The email account that you tried to reach is over quota and inactive.", Blocked),
    (END, 550, "5.7.1 [203.0.113.9] Our system has detected that this message is likely unsolicited mail.", Blocked),
    (
        END,
        550,
        "5.7.26 This mail is unauthenticated, which poses a security risk to the sender and Gmail users",
        Blocked,
    ),
    (
        AUTH,
        535,
        "5.7.8 Username and Password not accepted. Learn more at https://support.google.com/mail/",
        MailboxDown,
    ),
    (AUTH, 534, "5.7.9 Application-specific password required.", MailboxDown),
    (AUTH, 454, "4.7.0 Too many login attempts, please try again later.", Throttled),
    (RCPT, 550, "5.2.1 The email account that you tried to reach is disabled.", AddressRejected),
    (END, 552, "5.3.4 Your message exceeded Google's message size limits.", Blocked),
    (RCPT, 450, "4.2.1 The user you are trying to contact is receiving mail too quickly.", MessageDeferred),
    # --- Microsoft 365 -------------------------------------------------------------------------------
    (
        END,
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message",
        ProviderQuota,
    ),
    (END, 550, "5.7.60 SMTP; Client does not have permissions to send as this sender", MailboxRefused),
    (AUTH, 535, "5.7.139 Authentication unsuccessful, the user credentials were incorrect.", MailboxDown),
    (
        AUTH,
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        MailboxDown,
    ),
    (MAIL, 530, "5.7.57 Client not authenticated to send mail. Error: 535 5.7.139", MailboxDown),
    (RCPT, 550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", AddressRejected),
    (
        END,
        550,
        "5.1.90 Your message can't be sent because you've reached your daily limit for message recipients",
        ProviderQuota,
    ),
    (END, 550, "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.", MailboxRefused),
    (RCPT, 550, "5.7.606 Access denied, banned sending IP [203.0.113.9].", Blocked),
    (RCPT, 452, "4.5.3 Too many recipients", MessageDeferred),
    (RCPT, 451, "4.7.500 Server busy. Please try again later from [203.0.113.9]. (S77714)", Throttled),
    (
        END,
        451,
        "4.4.4 Mail received as unauthenticated, incoming to a recipient domain configured in a hosted tenant",
        MessageDeferred,
    ),
    # --- Postfix -------------------------------------------------------------------------------------
    (
        RCPT,
        553,
        "5.7.1 <alice@acme.example>: Sender address rejected: not owned by user alice@acme.example",
        MailboxRefused,
    ),
    (RCPT, 504, "5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname", MailboxRefused),
    (MAIL, 450, "4.7.1 <alice@acme.example>: Sender address rejected: too much mail from 203.0.113.9", Throttled),
    (RCPT, 452, "4.2.2 <bob@acme.example>: Recipient address rejected: Mailbox full, over quota", MessageDeferred),
    (
        RCPT,
        550,
        "5.1.1 <nobody@acme.example>: Recipient address rejected: User unknown in local recipient table",
        AddressRejected,
    ),
    (
        RCPT,
        450,
        "4.2.0 <bob@acme.example>: Recipient address rejected: Greylisted, see http://postgrey",
        MessageDeferred,
    ),
    (RCPT, 554, "5.7.1 <bob@other.example>: Relay access denied", MailboxRefused),
    (RCPT, 450, "4.1.2 <bob@nowhere.example>: Recipient address rejected: Domain not found", MessageDeferred),
    # smtpd_client_recipient_rate_limit: the client's pace, not the recipient (no retry may be spent on it)
    (RCPT, 450, "4.7.1 Error: too many recipients from 127.0.0.1", Throttled),
    (RCPT, 450, "4.7.1 <bob@acme.example>: Client host rejected: cannot find your hostname, [203.0.113.9]", Throttled),
    (RCPT, 550, "5.1.2 <bob@nowhere.example>: Recipient address rejected: Domain not found", AddressRejected),
    (RCPT, 554, "5.7.1 Service unavailable; Client host [203.0.113.9] blocked using zen.spamhaus.org", MailboxRefused),
    (END, 552, "5.3.4 Message size exceeds fixed limit", Blocked),
    (CONNECT, 554, "5.7.1 <unknown[203.0.113.9]>: Client host rejected: Access denied", MailboxDown),
    (MAIL, 553, "5.1.8 <alice@bad>: Sender address rejected: Domain not found", MailboxRefused),
    (RCPT, 553, "5.1.8 <alice@bad>: Sender address rejected: Domain not found", MailboxRefused),
    (DATA, 554, "5.5.1 Error: no valid recipients", Blocked),
    (CONNECT, 421, "4.3.2 Service shutting down", Throttled),
    # --- Exim ----------------------------------------------------------------------------------------
    (RCPT, 550, "Unrouteable address", Blocked),
    (RCPT, 550, "No such user here", AddressRejected),
    (RCPT, 451, "Temporary local problem - please try later", MessageDeferred),
    (RCPT, 450, "Ratelimit exceeded for 203.0.113.9; try again later", Throttled),
    (END, 550, "Administrative prohibition", Blocked),
    (EHLO, 550, "Administrative prohibition", MailboxDown),
    (MAIL, 550, "Submission mode requires authentication", MailboxRefused),
    (RCPT, 550, "5.7.1 Sender verify failed", MailboxRefused),
    # --- Dovecot LMTP (Postfix relays its words) ------------------------------------------------------
    (RCPT, 550, "5.1.1 <nobody@acme.example> User doesn't exist: nobody@acme.example", AddressRejected),
    (RCPT, 452, "4.2.2 <bob@acme.example> Quota exceeded (mailbox for user is full)", MessageDeferred),
    (END, 552, "5.2.2 <bob@acme.example> Quota exceeded (mailbox for user is full)", Blocked),
    # --- no valid reply at all -------------------------------------------------------------------------
    (RCPT, -1, "Malformed SMTP response line: hello there", MailboxDown),
    (END, -1, "Malformed SMTP response line: ok", Uncertain),
    (MAIL, -1, "Response too long", MailboxDown),
    (END, None, "timed out during END", Uncertain),
    (DATA, None, "Unexpected EOF received during DATA", MailboxDown),
    # --- DSN status codes ------------------------------------------------------------------------------
    (DSN, 550, "5.1.1 User unknown", AddressRejected),
    (DSN, 550, "5.7.1 Message rejected as spam", Blocked),
    (DSN, 550, "5.7.1 Sender address rejected: not owned by user", Blocked),
]


@pytest.mark.parametrize(("stage", "code", "text", "expected"), REAL, ids=[f"{r[0]}-{r[1]}-{r[2][:30]}" for r in REAL])
def test_real_replies(stage: str, code: int | None, text: str, expected: type[SmtpFailure]) -> None:
    failure = outcomes.classify(stage, code, text)
    assert type(failure) is expected, outcomes.rule_for(stage, code or 0, text)
    assert failure.stage == stage
    if code is not None and code > 0:
        assert failure.code == code


def test_every_stage_and_every_row_is_exercised() -> None:
    stages = {r[0] for r in REAL}
    assert stages == {CONNECT, EHLO, AUTH, MAIL, RCPT, DATA, END, DSN}
    used = {outcomes.rule_for(s, c, t) for s, c, t, _ in REAL if c is not None and c > 0}
    unused = [r.why for r in outcomes.TABLE if r not in used]
    assert not unused, f"rows with no real reply in this test: {unused}"
    assert len(REAL) >= 40


def test_the_word_quota_alone_is_not_the_senders_quota() -> None:
    """A recipient's full mailbox says "quota" too: it is that message's problem, not the sender's day."""
    for code, text in ((452, "4.2.2 Mailbox full, over quota"), (552, "5.2.2 Quota exceeded")):
        assert not isinstance(outcomes.classify(RCPT, code, text), ProviderQuota)


def test_enhanced_codes_must_agree_with_the_reply() -> None:
    assert outcomes.enhanced_code("5.1.1 User unknown", 550) == "5.1.1"
    assert outcomes.enhanced_code("4.1.1 odd", 550) == ""  # a 4.x.x on a 5xx reply is not believed
    assert outcomes.enhanced_code("version 10.5.1.2 of the server", 550) == ""
    assert outcomes.enhanced_code("", 550) == ""


def test_refusals_are_the_same_whatever_the_recipient() -> None:
    a = outcomes.classify(RCPT, 550, "5.7.1 <p1@x.example>: Recipient address rejected: Access denied (id 123)")
    b = outcomes.classify(RCPT, 550, "5.7.1 <p2@y.example>: Recipient address rejected: Access denied (id 456)")
    c = outcomes.classify(RCPT, 550, "5.1.1 <p3@y.example>: User unknown")
    assert outcomes.refusal_key(a) == outcomes.refusal_key(b) is not None
    assert outcomes.refusal_key(c) is None


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (550, "5.1.1 <dead1@oldco.example>: Recipient address rejected: User unknown in virtual mailbox table"),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"),
        (552, "5.2.2 <bob@acme.example> Mailbox full"),
        (550, "5.2.1 The email account that you tried to reach is disabled."),
        (550, "No such user here"),
        (550, "Mailbox full, over quota"),
        (552, "5.3.4 Message size exceeds fixed limit"),
    ],
)
def test_address_class_answers_never_form_a_streak(code: int, text: str) -> None:
    """SPEC §5: three dead addresses in a row are three bounces, never the sender's refusal in disguise."""
    assert outcomes.refusal_key(outcomes.classify(RCPT, code, text)) is None


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (550, "5.7.1 <p1@x.example>: Recipient address rejected: Access denied"),
        (554, "5.7.1 Message rejected as spam by content filter"),
        (550, "Administrative prohibition"),
        (550, "5.0.0 Rejected by policy"),
    ],
)
def test_policy_and_unclassed_refusals_may_form_a_streak(code: int, text: str) -> None:
    assert outcomes.refusal_key(outcomes.classify(RCPT, code, text)) is not None


def test_the_readme_table_is_the_outcome_table() -> None:
    """README's "When things go wrong" names every row of the table, in the table's order."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## When things go wrong") : readme.index("### When the database fails")]
    places = [section.find(f"| {rule.why} |") for rule in outcomes.TABLE]
    assert -1 not in places, [r.why for r, p in zip(outcomes.TABLE, places, strict=True) if p == -1]
    assert places == sorted(places)
