"""Each outcome class end to end: aiosmtpd answers as real servers do, and the daemon blames the right party."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.conftest import Project
from tests.daemon_helpers import query, running, states, until
from tests.servers import SmtpServer
from tests.test_faults import db, setup

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores]


def two_mailboxes(project: Project, bad: SmtpServer, good: SmtpServer) -> tuple[str, str]:
    """mb1 on `bad`, mb2 on `good`; one cadence over both; 6 prospects enrolled, 3 each."""
    project.data["defaults"]["gap"] = "0s"
    project.data["daemon"].update({"retry_delays": ["1s", "1s"], "probe_backoff": "1s-2s"})
    [a] = project.add_mailboxes(1, smtp=bad.smtp_config())
    [b] = project.add_mailboxes(1, smtp=good.smtp_config())
    project.add_cadence(rotate_among="cadence")
    result = project.enroll(project.people(6))
    assert result.json()["assignments"] == {a: 3, b: 3}
    return a, b


def by_mailbox(project: Project) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for mailbox, state, reason in query(db(project), "SELECT mailbox, state, reason FROM messages"):
        out.setdefault(mailbox, Counter())[f"{state}/{reason}" if reason else state] += 1
    return out


async def test_sender_refused_at_rcpt_stops_the_mailbox_and_blames_no_prospect(project: Project) -> None:
    """Postfix rejects the sender at RCPT time: the mailbox is refused, its prospects wait, the other one sends."""
    bad, good = SmtpServer().start(), SmtpServer().start()
    try:
        a, b = two_mailboxes(project, bad, good)
        for i in range(6):
            bad.recorder.fail_rcpt[f"p{i}@prospects.example"] = (
                f"553 5.7.1 <{a}>: Sender address rejected: not owned by user {a}"
            )
        async with running(project.config_path):
            await until(lambda: by_mailbox(project).get(b) == Counter({"sent": 3}))
            await until(lambda: by_mailbox(project).get(a) == Counter({"error/refused": 3}))
            status = project.run("status", "--json").json()
            box = next(m for m in status["mailboxes"] if m["address"] == a)
            assert (box["state"], box["waiting_for"]) == ("refused", "operator")
            assert "Sender address rejected" in box["reason"]
            assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
            assert set(dict(query(db(project), "SELECT state, count(*) FROM enrollments GROUP BY state"))) == {
                "active",
                "finished",
            }
            # The operator fixes the mailbox and says so: everything it held goes out, once.
            bad.recorder.fail_rcpt.clear()
            assert project.run("outbox", "retry", "--mailbox", a).code == 0
            await until(lambda: by_mailbox(project).get(a) == Counter({"sent": 3}), within=30)
        assert len(bad.recorder.deliveries) == 3 and len(good.recorder.deliveries) == 3
    finally:
        bad.stop()
        good.stop()


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.7.1 <{rcpt}>: Recipient address rejected: Access denied",
        "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
    ],
    ids=["blocked", "unknown"],
)
async def test_the_same_refusal_for_three_recipients_is_the_mailboxes(project: Project, reply: str) -> None:
    """A relay that refuses everyone looks like three bad addresses; it is the sender's problem, undone on them."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        project.add_cadence("other")
        for i in range(4):
            server.recorder.fail_rcpt[f"p{i}@prospects.example"] = reply.format(rcpt=f"p{i}@prospects.example")
        project.enroll(project.people(4))
        project.enroll(project.people(4), cadence="other")
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"error": 8}, within=30)
        assert query(db(project), "SELECT DISTINCT reason FROM messages") == [("refused",)]
        assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
        assert query(db(project), "SELECT DISTINCT state FROM enrollments") == [("active",)]
        assert query(db(project), "SELECT state FROM mailbox_health") == [("refused",)]
    finally:
        server.stop()


async def test_a_full_recipient_mailbox_is_that_messages_problem(project: Project) -> None:
    """452 4.2.2 for one recipient: that message retries; the sender's day goes on for the others."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_rcpt["p0@prospects.example"] = "452 4.2.2 <p0@prospects.example>: Mailbox full, over quota"
        project.enroll(project.people(5))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"sent": 4, "error": 1}, within=30)
        assert query(db(project), "SELECT reason, transient_failures FROM messages WHERE state = 'error'") == [
            ("retries_exhausted", 2)
        ]
        assert query(db(project), "SELECT quota_day, limit_logged_day FROM mailbox_health") == [(None, None)]
        assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
    finally:
        server.stop()


async def test_a_throttle_at_mail_from_waits_without_costing_retries(project: Project) -> None:
    """450 4.7.1 too much mail: the whole mailbox waits and retries the same message; nobody loses a retry."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_mail += ["450 4.7.1 <mb1@alice.example>: Sender address rejected: too much mail"] * 3
        project.enroll(project.people(3))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"sent": 3}, within=30)
        assert query(db(project), "SELECT max(transient_failures) FROM messages") == [(0,)]
        assert query(db(project), "SELECT throttled_until FROM mailbox_health") == [(None,)]  # cleared by the send
    finally:
        server.stop()


async def test_a_malformed_reply_is_never_a_bounce(project: Project) -> None:
    """A reply with no valid code at RCPT: the connection is lost there (the mailbox's); nobody is suppressed."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_rcpt["p0@prospects.example"] = "hello, this is not SMTP"
        project.enroll(project.people(2))
        async with running(project.config_path):
            await until(lambda: query(db(project), "SELECT state FROM mailbox_health") == [("disconnected",)])
            assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
            del server.recorder.fail_rcpt["p0@prospects.example"]
            await until(lambda: states(db(project)) == {"sent": 2}, within=30)
        assert Counter(d.recipient for d in server.recorder.deliveries) == {
            "p0@prospects.example": 1,
            "p1@prospects.example": 1,
        }
    finally:
        server.stop()


async def test_blocked_stops_the_enrollment_and_keeps_the_address(project: Project) -> None:
    server = SmtpServer().start()
    try:
        setup(project, server, steps=2)
        server.recorder.fail_data["p0@prospects.example"] = "550 5.7.1 Message rejected as spam by content filter"
        project.enroll(project.people(3))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"failed": 1, "sent": 4}, within=30)
        assert query(db(project), "SELECT reason FROM messages WHERE state = 'failed'") == [("blocked",)]
        enrollments = dict(query(db(project), "SELECT email, state FROM enrollments"))
        assert enrollments["p0@prospects.example"] == "stopped"
        assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
        assert query(db(project), "SELECT blocks FROM mailbox_health") == [(1,)]
    finally:
        server.stop()
