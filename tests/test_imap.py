"""Replies and bounces over IMAP stop the follow-ups: the daemon against a real Dovecot."""

from __future__ import annotations

from collections.abc import Iterator
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from daemon.imap import classify_bounce, classify_headers
from tests.conftest import Project
from tests.daemon_helpers import query, running, until
from tests.imap_server import Dovecot, needs_dovecot
from tests.servers import Pki, SmtpServer

OWN = frozenset({"mb1@alice.example"})


pytestmark = [pytest.mark.both_stores, pytest.mark.slow]


def mail(sender: str, to: str, subject: str, *, in_reply_to: str = "", **headers: str) -> bytes:
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {formatdate()}",
        f"Message-ID: {make_msgid(domain='prospects.example')}",
    ]
    if in_reply_to:
        lines += [f"In-Reply-To: {in_reply_to}", f"References: {in_reply_to}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\nThanks, sounds good.\r\n").encode()


def dsn(
    to: str, original_id: str, recipient: str, action: str = "failed", status: str = "5.1.1", original: str = ""
) -> bytes:
    """A Postfix-style RFC 3464 report about one recipient of one of our messages (`original`: the address it was
    sent to, before an alias or a forward made it `recipient`)."""
    original_line = f"Original-Recipient: rfc822;{original}\r\n" if original else ""
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@mx.example>\r\nTo: {to}\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\nDate: {formatdate()}\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n{original_line}Action: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {status[0]}50 {status} refused\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {to}\r\nTo: {recipient}\r\nMessage-ID: {original_id}\r\n--B--\r\n"
    ).encode()


def test_classification_rules() -> None:
    ours = "<cadenced.7.1.abcdef12@alice.example>"
    assert classify_headers(mail("p@x.example", "mb1@alice.example", "Re: hi", in_reply_to=ours), OWN).message_ids == (
        ours,
    )
    assert classify_headers(mail("p@x.example", "mb1@alice.example", "hello"), OWN).kind == "reply"
    for headers in ({"Auto_Submitted": "auto-replied"}, {"X_Autoreply": "yes"}, {"Precedence": "auto_reply"}):
        assert classify_headers(mail("p@x.example", "mb1@alice.example", "Re: hi", **headers), OWN).kind == "ignore"
    assert classify_headers(mail("p@x.example", "m@a.example", "Out of Office: back Monday"), OWN).kind == "ignore"
    assert classify_headers(mail("p@x.example", "m@a.example", "hi", Auto_Submitted="no"), OWN).kind == "reply"
    assert classify_headers(mail("MB1@alice.example", "p@x.example", "hi"), OWN).kind == "ignore"
    assert classify_headers(dsn("mb1@alice.example", ours, "p@x.example"), OWN).kind == "bounce?"
    [failed] = classify_bounce(dsn("mb1@alice.example", ours, "p@x.example"))
    assert (failed.kind, failed.message_ids, failed.recipient, failed.status) == (
        "bounce",
        (ours,),
        "p@x.example",
        "5.1.1",
    )
    [other] = classify_bounce(dsn("mb1@alice.example", "<other@x.example>", "p@x.example"))
    assert other.kind == "ignore"


def test_a_from_that_fails_dmarc_stops_no_one() -> None:
    """Anyone can put a prospect's address in From: where the provider says DMARC failed (its own, topmost
    Authentication-Results), the mail is not believed; a pass, or a fail the sender wrote lower down, is."""
    ours = "<cadenced.7.1.abcdef12@alice.example>"
    forged = "mx.alice.example; spf=fail smtp.mailfrom=x.example; dmarc=fail (p=NONE) header.from=x.example"
    passed = "mx.alice.example; spf=pass smtp.mailfrom=x.example; dmarc=pass (p=REJECT) header.from=x.example"
    reply = mail("p@x.example", "mb1@alice.example", "Re: hi", in_reply_to=ours, Authentication_Results=forged)
    verdict = classify_headers(reply, OWN)
    assert (verdict.kind, verdict.why) == ("ignore", "the From fails DMARC (Authentication-Results): maybe forged")
    reply = mail("p@x.example", "mb1@alice.example", "Re: hi", in_reply_to=ours, Authentication_Results=passed)
    assert classify_headers(reply, OWN).kind == "reply"
    lower = reply.replace(b"\r\n\r\n", b"\r\nAuthentication-Results: evil; dmarc=fail\r\n\r\n", 1)
    assert classify_headers(lower, OWN).kind == "reply"


@pytest.fixture
def stack(project: Project, tmp_path: Path) -> Iterator[tuple[SmtpServer, Dovecot]]:
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}).start()
    smtp = SmtpServer().start()
    (tmp_path / "imap-pw").write_text("imap-pw")
    project.data["defaults"]["gap"] = "0s"
    project.add_mailboxes(
        1,
        smtp=smtp.smtp_config(),
        imap=dovecot.imap_config("alice", tmp_path / "imap-pw", pki.ca_file, poll="60s"),
    )
    cadence = project.add_cadence(steps=2)
    cadence["steps"][1]["wait"] = "4s"
    try:
        yield smtp, dovecot
    finally:
        smtp.stop()
        dovecot.cleanup()


def enrollment_states(project: Project) -> dict[str, str]:
    return dict(query(project.database, "SELECT email, state FROM enrollments"))  # type: ignore[arg-type]


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@needs_dovecot
@pytest.mark.anyio
async def test_replies_and_bounces_stop_the_follow_ups(project: Project, stack: tuple[SmtpServer, Dovecot]) -> None:
    smtp, dovecot = stack
    project.enroll(project.people(6))
    db = project.database
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            await until(lambda: events(logs, "imap.watching"), what="the watcher")
            assert events(logs, "imap.watching")[0]["idle"] is True
            firsts = await anyio.to_thread.run_sync(smtp.recorder.wait_for, 6)
            mid = {d.recipient: d["Message-ID"] for d in firsts}
            box = "mb1@alice.example"
            deliver = dovecot.deliver
            deliver("alice", mail("p0@prospects.example", box, "Re: Hello", in_reply_to=mid["p0@prospects.example"]))
            deliver("alice", mail("P1@Prospects.example", box, "a question"))  # by sender alone
            deliver("alice", mail("p2@prospects.example", box, "Automatic reply", Auto_Submitted="auto-replied"))
            deliver("alice", mail(box, "p3@prospects.example", "Hello Co3"))  # a copy of our own send
            deliver("alice", dsn(box, mid["p4@prospects.example"], "p4@prospects.example"))
            await until(lambda: len(events(logs, "reply.detected")) == 2 and events(logs, "bounce.detected"))
            await until(lambda: query(db, "SELECT count(*) FROM messages WHERE state = 'sent' AND step = 2")[0][0] == 3)
        states = enrollment_states(project)
        assert states["p0@prospects.example"] == "replied"
        assert states["p1@prospects.example"] == "replied"
        assert states["p4@prospects.example"] == "bounced"
        assert {states[f"p{i}@prospects.example"] for i in (2, 3, 5)} == {"finished"}
        assert query(db, "SELECT email FROM suppressions") == [("p4@prospects.example",)]
        second = {d.recipient for d in smtp.recorder.deliveries if d["In-Reply-To"]}
        assert second == {"p2@prospects.example", "p3@prospects.example", "p5@prospects.example"}
        assert {e["prospect"] for e in events(logs, "reply.detected")} == {
            "p0@prospects.example",
            "p1@prospects.example",
        }
        assert len(events(logs, "message.cancelled")) == 3


@needs_dovecot
@pytest.mark.anyio
async def test_a_reply_from_the_company_stops_it_there(project: Project, stack: tuple[SmtpServer, Dovecot]) -> None:
    """stop_on_reply = "company": a colleague writing from the prospects' domain, without reply headers, stops
    every prospect there; a reply from a free-mail address stops no neighbour."""
    smtp, dovecot = stack
    project.data["cadences"][0]["stop_on_reply"] = "company"
    project.data["cadences"][0]["steps"][1]["wait"] = "1h"
    people = ["a@acme.example,A,Acme", "b@acme.example,B,Acme", "c@other.example,C,Other"]
    people += ["x@gmail.com,X,Home", "y@gmail.com,Y,Home"]
    project.enroll(project.csv(people))
    box = "mb1@alice.example"
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            await until(lambda: events(logs, "imap.watching"), what="the watcher")
            await anyio.to_thread.run_sync(smtp.recorder.wait_for, 5)
            dovecot.deliver("alice", mail("boss@ACME.example", box, "please stop writing to my team"))
            dovecot.deliver("alice", mail("x@gmail.com", box, "not interested"))
            await until(lambda: len(events(logs, "reply.detected")) == 3, what="three replies")
    states = enrollment_states(project)
    assert states == {
        "a@acme.example": "replied",
        "b@acme.example": "replied",
        "c@other.example": "active",
        "x@gmail.com": "replied",
        "y@gmail.com": "active",
    }
    how = {e["prospect"]: e["how"] for e in events(logs, "reply.detected")}
    assert how == {"a@acme.example": "company", "b@acme.example": "company", "x@gmail.com": "from the address itself"}
    shown = project.run("prospect", "show", "b@acme.example", "--json").json()
    assert shown["timeline"][-1]["detail"] == "a reply from acme.example (stop_on_reply = company)"


@needs_dovecot
@pytest.mark.anyio
async def test_restart_and_server_restart_miss_nothing_and_reread_nothing(
    project: Project, stack: tuple[SmtpServer, Dovecot]
) -> None:
    smtp, dovecot = stack
    project.data["cadences"][0]["steps"][1]["wait"] = "1h"
    project.enroll(project.people(4))
    box = "mb1@alice.example"
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            await until(lambda: events(logs, "imap.watching"))
            await anyio.to_thread.run_sync(smtp.recorder.wait_for, 4)
            dovecot.deliver("alice", mail("p0@prospects.example", box, "hi"))
            await until(lambda: len(events(logs, "reply.detected")) == 1)
        # Mail that arrives while the daemon is down is read at the next start; p0's is not read again.
        dovecot.deliver("alice", mail("p1@prospects.example", box, "hi"))
        async with running(project.config_path):
            # A start under a loaded CI (the whole suite on every core) took more than 20 s once.
            await until(lambda: len(events(logs, "reply.detected")) == 2, within=45)
            # The IMAP server restarts mid-session: the watcher reconnects and goes on.
            dovecot.stop()
            await until(lambda: events(logs, "imap.error"))
            dovecot.start()
            dovecot.deliver("alice", mail("p2@prospects.example", box, "hi"))
            await until(lambda: len(events(logs, "reply.detected")) == 3, within=30)
    assert [e["prospect"] for e in events(logs, "reply.detected")] == [f"p{i}@prospects.example" for i in range(3)]
    assert enrollment_states(project)["p3@prospects.example"] == "active"


@needs_dovecot
@pytest.mark.anyio
async def test_uncertain_sends_are_settled_from_the_sent_folder(
    project: Project, stack: tuple[SmtpServer, Dovecot]
) -> None:
    smtp, dovecot = stack
    project.enroll(project.people(3))
    db = project.database
    project.data["mailboxes"][0]["sent_copies"] = "provider"
    project.data["daemon"]["settle_after"] = "0s"
    project.write()
    query(
        db,
        "UPDATE messages SET state = 'error', reason = 'uncertain', "
        "message_id = '<cadenced.' || id || '.1.aa@alice.example>'",
    )
    # Orphaned by a takeover (PostgreSQL): the daemon that claimed it may be stopped, not dead, and deliver it
    # late; not in Sent, it is never sent again by itself.
    orphan = "found in sending when b took the mailbox over: its daemon stopped mid-send"
    query(db, f"UPDATE messages SET detail = '{orphan}' WHERE id = 3")
    delivered = "<cadenced.1.1.aa@alice.example>"
    dovecot.deliver("alice", mail("mb1@alice.example", "p0@prospects.example", "Hello", Message_ID=delivered), "Sent")
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            await until(lambda: len(events(logs, "message.settled")) == 2)
            await anyio.to_thread.run_sync(smtp.recorder.wait_for, 1)
    assert query(db, "SELECT id, state, step FROM messages ORDER BY id")[:3] == [
        (1, "sent", 1),
        (2, "sent", 1),
        (3, "error", 1),
    ]
    # Message 1 was found in Sent (its step 2 is scheduled); message 2 was not, and went out once; 3 waits.
    assert [d.recipient for d in smtp.recorder.deliveries] == ["p1@prospects.example"]
    assert query(db, "SELECT count(*) FROM messages WHERE step = 2")[0][0] == 2


@needs_dovecot
@pytest.mark.anyio
async def test_a_server_without_idle_is_polled(project: Project, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}, idle=False).start()
    smtp = SmtpServer().start()
    try:
        (tmp_path / "imap-pw").write_text("imap-pw")
        imap = dovecot.imap_config("alice", tmp_path / "imap-pw", pki.ca_file, poll="1s")
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(1, smtp=smtp.smtp_config(), imap=imap)
        project.add_cadence(steps=2)["steps"][1]["wait"] = "1h"
        project.enroll(project.people(1))
        with structlog.testing.capture_logs() as logs:
            async with running(project.config_path):
                await until(lambda: events(logs, "imap.watching"))
                await anyio.to_thread.run_sync(smtp.recorder.wait_for, 1)
                dovecot.deliver("alice", mail("p0@prospects.example", "mb1@alice.example", "yes please"))
                await until(lambda: events(logs, "reply.detected"))
        assert enrollment_states(project) == {"p0@prospects.example": "replied"}
        assert [e["idle"] for e in events(logs, "imap.watching")] == [False]
        assert not events(logs, "imap.error")
    finally:
        smtp.stop()
        dovecot.cleanup()


@needs_dovecot
@pytest.mark.anyio
async def test_uncertain_stays_uncertain_where_the_provider_files_nothing(
    project: Project, stack: tuple[SmtpServer, Dovecot]
) -> None:
    """A self-hosted server never files submitted mail in Sent: not finding it there proves nothing."""
    smtp, _dovecot = stack
    project.enroll(project.people(1))
    db = project.database
    query(
        db, "UPDATE messages SET state = 'error', reason = 'uncertain', message_id = '<cadenced.1.1.aa@alice.example>'"
    )
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            await until(lambda: events(logs, "imap.watching"))
            await until(lambda: query(db, "SELECT count(*) FROM imap_state")[0][0] == 1)
    assert not events(logs, "message.settled")
    assert query(db, "SELECT state, reason FROM messages") == [("error", "uncertain")]
    assert smtp.recorder.deliveries == []


@needs_dovecot
@pytest.mark.anyio
async def test_dsns_are_read_as_rfc_3464_says(project: Project, stack: tuple[SmtpServer, Dovecot]) -> None:
    """A delay notice changes nothing; 5.1.1 suppresses; 5.7.1 stops the enrollment and keeps the address; a bounce
    of a forwarded address is known by its Original-Recipient; a failed 4.x.x (the relay's queue expired) stops the
    enrollment and keeps the address; a DSN that changes nothing says why at debug."""
    smtp, dovecot = stack
    project.data["cadences"][0]["steps"][1]["wait"] = "1h"
    project.data["daemon"]["log_level"] = "debug"
    project.enroll(project.people(6))
    db = project.database
    box = "mb1@alice.example"
    with structlog.testing.capture_logs() as logs:
        async with running(project.write()):
            await until(lambda: events(logs, "imap.watching"))
            firsts = await anyio.to_thread.run_sync(smtp.recorder.wait_for, 6)
            mid = {d.recipient: d["Message-ID"] for d in firsts}
            p = [f"p{i}@prospects.example" for i in range(6)]
            dovecot.deliver("alice", dsn(box, mid[p[0]], p[0], action="delayed", status="4.4.7"))
            dovecot.deliver("alice", dsn(box, mid[p[1]], p[1], status="5.1.1"))
            dovecot.deliver("alice", dsn(box, mid[p[2]], p[2], status="5.7.1"))
            # A report naming our message but another recipient than the one we sent it to: not p3's bounce.
            dovecot.deliver("alice", dsn(box, mid[p[3]], "someone-else@prospects.example", status="5.1.1"))
            # p4's address forwards to a mailbox that is gone: Final-Recipient is the target, Original is p4.
            dovecot.deliver("alice", dsn(box, mid[p[4]], "departed@elsewhere.example", original=p[4]))
            dovecot.deliver("alice", dsn(box, mid[p[5]], p[5], status="4.4.7"))
            await until(lambda: len(events(logs, "bounce.detected")) == 4)
            await until(lambda: query(db, "SELECT uidvalidity FROM imap_state") and len(events(logs, "imap.watching")))
    states = enrollment_states(project)
    assert states == dict(zip(p, ["active", "bounced", "stopped", "active", "bounced", "stopped"], strict=True))
    assert sorted(query(db, "SELECT email FROM suppressions")) == [(p[1],), (p[4],)]
    assert dict(
        query(
            db,
            "SELECT e.email, m.reason FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
            "WHERE m.state = 'failed'",
        )
    ) == {p[1]: "bounced", p[2]: "blocked", p[4]: "bounced", p[5]: "expired"}
    assert sorted(e["kind"] for e in events(logs, "bounce.detected")) == ["blocked", "bounced", "bounced", "expired"]
    ignored = [e["why"] for e in events(logs, "imap.ignored")]
    assert "Action: delayed" in ignored
    assert any("someone-else@prospects.example" in why and p[3] in why for why in ignored), ignored
    assert query(db, "SELECT sum(blocks) FROM daily_counts") == [(1,)]  # the expired one is no block
