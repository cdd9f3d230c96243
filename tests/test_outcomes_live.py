"""Each outcome class end to end: aiosmtpd answers as real servers do, and the daemon blames the right party."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.conftest import Project
from tests.daemon_helpers import query, running, states, until
from tests.servers import SmtpServer
from tests.test_faults import db, setup

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores, pytest.mark.slow]


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


async def test_the_same_policy_refusal_at_three_domains_is_the_mailboxes(project: Project) -> None:
    """A relay that refuses everyone looks like three blocked prospects; it is the sender's problem, undone on them."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        project.add_cadence("other")
        people = [f"p{i}@d{i}.example" for i in range(4)]
        for rcpt in people:
            server.recorder.fail_rcpt[rcpt] = f"550 5.7.1 <{rcpt}>: Recipient address rejected: Access denied"
        project.enroll(project.csv([f"{p},P,Co" for p in people]))
        project.enroll(project.csv([f"{p},P,Co" for p in people], "again.csv"), cadence="other")
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"error": 8}, within=30)
        assert query(db(project), "SELECT DISTINCT reason FROM messages") == [("refused",)]
        assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
        assert query(db(project), "SELECT DISTINCT state FROM enrollments") == [("active",)]
        assert query(db(project), "SELECT state FROM mailbox_health") == [("refused",)]
    finally:
        server.stop()


async def test_one_domain_refusing_several_prospects_is_not_the_senders(project: Project) -> None:
    """One company's filter blocks every prospect there: those are blocks, and the mailbox goes on."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        people = [f"p{i}@strict.example" for i in range(4)] + ["ok@fine.example"]
        for rcpt in people[:4]:
            server.recorder.fail_rcpt[rcpt] = f"550 5.7.1 <{rcpt}>: Recipient address rejected: Access denied"
        project.enroll(project.csv([f"{p},P,Co" for p in people]))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"failed": 4, "sent": 1}, within=30)
        assert query(db(project), "SELECT state FROM mailbox_health") == [("connected",)]
    finally:
        server.stop()


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "552 5.2.2 <{rcpt}>: Recipient address rejected: Mailbox full",
    ],
    ids=["postfix-unknown", "m365-not-found", "full"],
)
async def test_dead_addresses_in_a_row_are_bounces_and_the_good_ones_go(project: Project, reply: str) -> None:
    """A cold list sorted by company: four dead addresses in a row, then good ones. Each dead one is that address's
    (bounced and suppressed, or blocked when full); the mailbox keeps sending to the rest."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        dead = [f"dead{i}@oldco{i}.example" for i in range(4)]
        good = [f"good{i}@newco.example" for i in range(3)]
        for rcpt in dead:
            server.recorder.fail_rcpt[rcpt] = reply.format(rcpt=rcpt)
        project.enroll(project.csv([f"{p},P,Co" for p in dead + good]))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"failed": 4, "sent": 3}, within=30)
        assert query(db(project), "SELECT state FROM mailbox_health") == [("connected",)]
        assert sorted(d.recipient for d in server.recorder.deliveries) == good
        suppressed = {r[0] for r in query(db(project), "SELECT email FROM suppressions")}
        if "5.2.2" in reply:
            assert suppressed == set()  # a full mailbox is blocked for good, the address kept
        else:
            assert suppressed == set(dead)
    finally:
        server.stop()


async def test_a_rate_limit_at_rcpt_is_a_throttle_and_costs_no_retry(project: Project) -> None:
    """Postfix's smtpd_client_recipient_rate_limit answers at RCPT: the mailbox waits, no message loses a retry."""
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_rcpt_seq += ["450 4.7.1 Error: too many recipients from 127.0.0.1"] * 4
        project.enroll(project.people(3))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"sent": 3}, within=30)
        assert query(db(project), "SELECT max(transient_failures) FROM messages") == [(0,)]
        assert not server.recorder.fail_rcpt_seq
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
