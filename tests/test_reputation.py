"""pause_on (SPEC §11): a mailbox whose bounces or blocks climb pauses itself, says why, and resumes on the
operator's word; bounces at SMTP time and by DSN both count."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import structlog

from daemon.config import PauseRule
from tests.conftest import Project
from tests.daemon_helpers import query, running, states, until
from tests.imap_server import Dovecot, needs_dovecot
from tests.servers import Pki, SmtpServer
from tests.test_imap import dsn

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores, pytest.mark.slow]


def db(project: Project) -> Path | str:
    return project.database


def test_the_rule_needs_enough_sends_and_a_rate_over_the_limit() -> None:
    rule = PauseRule(0.05, 0.1, 50, 7)
    assert rule.reason(49, 10, 10) is None  # too few sends to judge
    assert rule.reason(100, 5, 10) is None  # at the limits is not over them
    assert rule.reason(100, 6, 0) == "bounce rate 6.0% (6 of 100 sends in 7d) over pause_on.bounce_rate 5.0%"
    assert rule.reason(100, 0, 11) == "block rate 11.0% (11 of 100 sends in 7d) over pause_on.block_rate 10.0%"


def setup(project: Project, server: SmtpServer, **pause_on: object) -> str:
    project.data["defaults"].update(
        {"gap": "0s", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "hours": ["00:00-24:00"]}
    )
    project.data["defaults"]["pause_on"] = pause_on
    (box,) = project.add_mailboxes(1, smtp=server.smtp_config())
    return box


async def test_smtp_bounces_pause_the_mailbox_until_it_is_resumed(project: Project) -> None:
    server = SmtpServer().start()
    try:
        box = setup(project, server, bounce_rate=0.2, min_sends=5, window="7d")  # a midnight in the run changes nothing
        project.add_cadence()
        for i in (4, 5):
            server.recorder.fail_rcpt[f"p{i}@prospects.example"] = "550 5.1.1 No such user here"
        project.enroll(project.people(10))
        with structlog.testing.capture_logs() as logs:
            async with running(project.write()):
                await until(lambda: [e for e in logs if e["event"] == "mailbox.auto_paused"], what="the pause")
                await until(lambda: states(db(project)) == {"sent": 4, "failed": 2, "scheduled": 4})
                await until(
                    lambda: len(query(db(project), "SELECT 1 FROM messages WHERE detail LIKE 'deferred: paused%'")) == 4
                )
        (paused,) = [e for e in logs if e["event"] == "mailbox.auto_paused"]
        reason = "bounce rate 33.3% (2 of 6 sends in 7d) over pause_on.bounce_rate 20.0%"
        assert (paused["detail"], paused["sends"], paused["bounces"]) == (reason, 6, 2)
        status = project.run("status", "--json").json()["mailboxes"][0]
        assert (status["state"], status["waiting_for"], status["reason"]) == (
            "paused",
            "operator",
            f"auto-paused: {reason}",
        )
        standing = status["safeguards"]["pause_on"]
        assert (standing["sends"], standing["bounces"], standing["bounce_rate"]) == (6, 2, 0.3333)
        # Paused, it takes no new enrollments while another mailbox can.
        (other,) = project.add_mailboxes(1, smtp=server.smtp_config())
        project.data["cadences"][0]["mailboxes"] = [box, other]
        project.data["cadences"][0]["users"] = []
        assert project.enroll(project.people(2, start=20, name="more.csv")).json()["assignments"] == {other: 2}
        resumed = project.run("mailbox", "resume", box)
        assert resumed.code == 0 and "resumed (was auto-paused: bounce rate 33.3%" in resumed.out
        assert project.run("mailbox", "resume", box).code == 1
        # Resumed, nothing still says it waits for `mailbox resume`.
        assert query(db(project), "SELECT count(*) FROM messages WHERE detail LIKE 'deferred: paused%'") == [(0,)]
        async with running(project.write()):
            await until(lambda: states(db(project)) == {"sent": 10, "failed": 2})
        assert project.run("status", "--json").json()["mailboxes"][0]["state"] == "connected"
    finally:
        server.stop()


async def test_the_operator_pauses_without_touching_the_config(project: Project) -> None:
    server = SmtpServer().start()
    try:
        box = setup(project, server)
        project.add_cadence()
        paused = project.run("mailbox", "pause", box, "--reason", "new domain being checked")
        assert paused.code == 0
        project.enroll(project.people(2))
        async with running(project.write()):
            await until(
                lambda: len(query(db(project), "SELECT 1 FROM messages WHERE detail LIKE 'deferred: paused%'")) == 2
            )
            assert server.recorder.deliveries == []
            await anyio.to_thread.run_sync(project.run, "mailbox", "resume", box)  # the running daemon notices
            await until(lambda: states(db(project)) == {"sent": 2})
    finally:
        server.stop()


@needs_dovecot
async def test_dsn_bounces_count_too(project: Project, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}, idle=False).start()
    server = SmtpServer().start()
    try:
        (tmp_path / "imap-pw").write_text("imap-pw")
        setup(project, server, bounce_rate=0.3, min_sends=3, window="7d")
        project.data["mailboxes"][0]["imap"] = dovecot.imap_config(
            "alice", tmp_path / "imap-pw", pki.ca_file, poll="1s"
        )
        cadence = project.add_cadence(steps=2)
        cadence["steps"][1]["wait"] = "1h"
        project.enroll(project.people(4))
        box = project.data["mailboxes"][0]["address"]
        with structlog.testing.capture_logs() as logs:
            async with running(project.write()):
                await until(lambda: [e for e in logs if e["event"] == "imap.watching"], what="the watcher")
                firsts = await anyio.to_thread.run_sync(server.recorder.wait_for, 4)
                mid = {d.recipient: d["Message-ID"] for d in firsts}
                for prospect in ("p0@prospects.example", "p1@prospects.example"):
                    dovecot.deliver("alice", dsn(box, mid[prospect], prospect))
                await until(lambda: [e for e in logs if e["event"] == "mailbox.auto_paused"], what="the pause")
        (paused,) = [e for e in logs if e["event"] == "mailbox.auto_paused"]
        assert paused["detail"] == "bounce rate 50.0% (2 of 4 sends in 7d) over pause_on.bounce_rate 30.0%"
        assert project.run("status", "--json").json()["mailboxes"][0]["state"] == "paused"
    finally:
        server.stop()
        dovecot.cleanup()


async def test_a_mailbox_down_too_long_hands_over_who_never_heard_from_it(project: Project) -> None:
    """reassign_after: past it, the down mailbox's never-contacted enrollments go to the healthy one; a thread
    it started stays with it (its follow-up waits in the retry queue)."""
    first, second = SmtpServer().start(), SmtpServer().start()
    try:
        project.data["defaults"].update(
            {"gap": "0s", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "hours": ["00:00-24:00"]}
        )
        project.data["daemon"].update({"probe_backoff": "1s-2s", "retry_delays": ["1s"]})
        project.data["defaults"]["reassign_after"] = "2s"
        (a,) = project.add_mailboxes(1, smtp=first.smtp_config())
        (b,) = project.add_mailboxes(1, smtp=second.smtp_config())
        cadence = project.add_cadence(steps=2, mailboxes=[a, b], users=[], rotate_among="cadence")
        cadence["steps"][1]["wait"] = "1h"
        project.enroll(project.people(2))  # p0 → a, p1 → b
        with structlog.testing.capture_logs() as logs:
            async with running(project.write()):
                await anyio.to_thread.run_sync(first.recorder.wait_for, 1)
                await anyio.to_thread.run_sync(second.recorder.wait_for, 1)
                first.stop()  # a's server goes away for good
                await anyio.to_thread.run_sync(project.enroll, project.people(2, start=2, name="more.csv"))  # p2 → a
                await until(lambda: [e for e in logs if e["event"] == "enrollment.reassigned"], within=30)
                await anyio.to_thread.run_sync(second.recorder.wait_for, 3)
        (moved,) = [e for e in logs if e["event"] == "enrollment.reassigned"]
        assert moved["to"] == b and moved["reason"].startswith(f"{a} disconnected for")
        owners = dict(query(db(project), "SELECT email, mailbox FROM enrollments"))
        assert owners == {
            "p0@prospects.example": a,  # a thread a started stays with a
            "p1@prospects.example": b,
            "p2@prospects.example": b,  # never heard from a: handed over
            "p3@prospects.example": b,
        }
        assert sorted(d.recipient for d in second.recorder.deliveries) == [
            "p1@prospects.example",
            "p2@prospects.example",
            "p3@prospects.example",
        ]
        waiting = query(
            db(project),
            "SELECT e.email, m.step, m.state FROM messages m JOIN enrollments e "
            "ON e.id = m.enrollment_id WHERE m.mailbox = ?",
            a,
        )
        assert waiting == [("p0@prospects.example", 1, "sent"), ("p0@prospects.example", 2, "error")]
    finally:
        first.stop()
        second.stop()
