"""Faults lose nothing: SMTP error classes, the retry queue, retry and reassign."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from tests.conftest import Project
from tests.daemon_helpers import query, running, states, until
from tests.servers import Authenticator, Pki, SmtpServer

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores, pytest.mark.slow]


def setup(project: Project, server: SmtpServer, n: int = 1, steps: int = 1, **smtp: object) -> list[str]:
    project.data["defaults"]["gap"] = "0s"
    project.data["daemon"].update({"retry_delays": ["1s", "1s"], "probe_backoff": "1s-2s"})
    boxes = project.add_mailboxes(n, smtp=server.smtp_config(**smtp))
    cadence = project.add_cadence(steps=steps)
    for step in cadence["steps"][1:]:
        step["wait"] = "1s"
    return boxes


def db(project: Project) -> Path | str:
    return project.database


async def test_4xx_is_retried_then_exhausted(project: Project) -> None:
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_rcpt["p0@prospects.example"] = "450 4.2.0 Mailbox busy"
        server.recorder.fail_once["p1@prospects.example"] = "451 4.3.0 Try again later"
        project.enroll(project.people(2))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"sent": 1, "error": 1}, within=30)
        row = query(db(project), "SELECT reason, smtp_code, attempts, transient_failures FROM messages WHERE id = 1")
        assert row == [("retries_exhausted", 450, 3, 2)]  # first try + the two retry_delays
        retried = query(db(project), "SELECT attempts, transient_failures FROM messages WHERE id = 2")
        assert retried == [(2, 1)]
        assert [d.recipient for d in server.recorder.deliveries] == ["p1@prospects.example"]
    finally:
        server.stop()


async def test_421_throttles_the_mailbox_without_costing_a_retry(project: Project) -> None:
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_once["p0@prospects.example"] = "421 4.7.0 Too busy, closing"
        project.enroll(project.people(1))
        async with running(project.config_path):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 1)
            await until(lambda: states(db(project)) == {"sent": 1})
        assert query(db(project), "SELECT transient_failures, attempts FROM messages") == [(0, 2)]
    finally:
        server.stop()


async def test_5xx_recipient_bounces_and_suppresses(project: Project) -> None:
    server = SmtpServer().start()
    try:
        setup(project, server, steps=2)
        project.add_cadence("other", steps=1)
        server.recorder.fail_rcpt["p0@prospects.example"] = "550 5.1.1 No such user"
        project.enroll(project.people(2))
        project.data["defaults"]["hours"] = ["00:00-24:00"]
        async with running(project.config_path):
            await until(lambda: query(db(project), "SELECT state FROM messages WHERE id = 1") == [("failed",)])
            # The same address in another cadence is cancelled: no cadence writes to it again.
            result = project.enroll(project.people(1), cadence="other")
            assert result.json()["rejected"][0]["reason"].startswith("address is suppressed (bounced 550")
            await anyio.to_thread.run_sync(server.recorder.wait_for, 2)
        enrollments = dict(query(db(project), "SELECT email, state FROM enrollments WHERE cadence = 'c1'"))
        assert enrollments["p0@prospects.example"] == "bounced"
        assert query(db(project), "SELECT smtp_code FROM messages WHERE id = 1") == [(550,)]
        assert {d.recipient for d in server.recorder.deliveries} == {"p1@prospects.example"}
    finally:
        server.stop()


async def test_provider_quota_defers_without_bouncing(project: Project) -> None:
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.fail_data["p1@prospects.example"] = "550 5.4.5 Daily user sending quota exceeded"
        project.enroll(project.people(3))
        async with running(project.config_path):
            await until(lambda: len(server.recorder.deliveries) == 1)
            await until(
                lambda: (
                    len(query(db(project), "SELECT 1 FROM messages WHERE detail LIKE 'deferred: daily_limit%'")) == 2
                )
            )
        assert states(db(project)) == {"sent": 1, "scheduled": 2}
        assert query(db(project), "SELECT count(*) FROM suppressions") == [(0,)]
        assert dict(query(db(project), "SELECT state, count(*) FROM enrollments GROUP BY state")) == {
            "active": 2,
            "finished": 1,
        }
        mailbox = project.run("status", "--json").json()["mailboxes"][0]
        assert mailbox["waiting_for"] == "daily_limit"
    finally:
        server.stop()


async def test_auth_failure_disconnects_and_reports(project: Project, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    auth = Authenticator("u", "right")
    server = SmtpServer("starttls", pki=pki, auth=auth).start()
    try:
        (project.root / "pw").write_text("wrong")
        (box,) = setup(project, server, username="u", password_file="pw", ca_file=str(pki.ca_file))
        project.enroll(project.people(2))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"error": 2})
        assert {r[0] for r in query(db(project), "SELECT reason FROM messages")} == {"disconnected"}
        result = await anyio.to_thread.run_sync(project.run, "mailbox", "test", box)
        assert result.code == 1 and "535" in result.err and "wrong" not in result.err
        # The password is fixed and the daemon restarted: probed at once, the queue drains.
        (project.root / "pw").write_text("right")
        assert (await anyio.to_thread.run_sync(project.run, "mailbox", "test", box)).code == 0
        async with running(project.config_path):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 2)
            await until(lambda: states(db(project)) == {"sent": 2})
    finally:
        server.stop()


async def test_drop_before_data_is_safe_and_after_data_is_uncertain(project: Project) -> None:
    server = SmtpServer().start()
    try:
        setup(project, server)
        server.recorder.drop["p0@prospects.example"] = "data"
        project.enroll(project.people(1))
        async with running(project.config_path):
            await until(lambda: states(db(project)) == {"error": 1})
        assert query(db(project), "SELECT reason FROM messages") == [("uncertain",)]
        assert len(server.recorder.deliveries) == 1  # it did arrive; the daemon could not know
        # Never retried by itself, nor by a bulk retry; only by id, on the operator's word.
        bulk = project.run("outbox", "retry", "--all")
        assert bulk.code == 1 and "uncertain ones are retried by id only" in bulk.err
        named = project.run("outbox", "retry", "--id", "1")
        assert named.code == 1 and "--include-uncertain" in named.err
        assert query(db(project), "SELECT state FROM messages WHERE id = 1") == [("error",)]
        result = project.run("outbox", "retry", "--id", "1", "--include-uncertain")
        assert result.code == 0, result.err
        del server.recorder.drop["p0@prospects.example"]
        server.recorder.drop["p1@prospects.example"] = "rcpt"
        project.enroll(project.people(1, start=1, name="p1.csv"))
        async with running(project.config_path):
            await until(lambda: query(db(project), "SELECT state, reason FROM messages WHERE id = 2")[0][0] == "error")
            assert query(db(project), "SELECT reason FROM messages WHERE id = 2") == [("disconnected",)]
            del server.recorder.drop["p1@prospects.example"]
            await until(lambda: states(db(project)) == {"sent": 2}, within=30)
        assert Counter(d.recipient for d in server.recorder.deliveries) == {
            "p0@prospects.example": 2,  # the uncertain one plus the operator's retry
            "p1@prospects.example": 1,
        }
    finally:
        server.stop()


async def test_server_down_and_back_delivers_each_once_from_its_sticky_sender(project: Project) -> None:
    a = SmtpServer().start()
    b = SmtpServer().start()
    try:
        project.data["defaults"]["gap"] = "0s"
        project.data["daemon"].update({"probe_backoff": "1s-2s"})
        box_a = project.add_mailboxes(1, smtp=a.smtp_config())[0]
        box_b = project.add_mailboxes(1, prefix="other", smtp=b.smtp_config())[0]
        cadence = project.add_cadence(steps=3)
        for step in cadence["steps"][1:]:
            step["wait"] = "1s"
        project.enroll(project.people(10))
        async with running(project.config_path):
            # b sends its five first emails, then its server goes away with the follow-ups still due.
            await anyio.to_thread.run_sync(b.recorder.wait_for, 5)
            b.stop()
            await until(
                lambda: project.run("status", "--json").json()["mailboxes"][1]["state"] == "disconnected", within=30
            )
            await anyio.to_thread.run_sync(a.recorder.wait_for, 15, 30.0)
            assert len(b.recorder.deliveries) < 15
            b_again = SmtpServer(port=b.port, recorder=b.recorder).start()
            try:
                await anyio.to_thread.run_sync(b.recorder.wait_for, 15, 30.0)
                await until(lambda: states(db(project)) == {"sent": 30}, within=30)
            finally:
                b_again.stop()
        for recorder, box in ((a.recorder, box_a), (b.recorder, box_b)):
            assert {d.sender for d in recorder.deliveries} == {box}
            per_step = Counter((d.recipient, d["Subject"], d["In-Reply-To"]) for d in recorder.deliveries)
            assert max(per_step.values()) == 1
            assert len(recorder.deliveries) == 15
    finally:
        a.stop()
        b.stop()


def garbage_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HELLO THERE, I AM NOT SMTP\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_probe_of_a_server_that_answers_garbage(project: Project) -> None:
    listener, _ = garbage_server()
    try:
        port = listener.getsockname()[1]
        project.add_mailboxes(1, smtp={"host": "127.0.0.1", "port": port, "security": "none", "timeout": "3s"})
        project.add_cadence()
        result = project.run("mailbox", "test", "mb1@alice.example")
        assert result.code == 1
        assert f"127.0.0.1:{port}" in result.err
        assert project.run("mailbox", "test", "nobody@x.example").code == 2
    finally:
        listener.close()


def test_retry_and_reassign_refuse_the_impossible(project: Project) -> None:
    _, a2, a3 = project.add_mailboxes(3)
    (b1,) = project.add_mailboxes(1, owner="bob")
    project.add_cadence(users=["alice"])
    project.data["mailboxes"][2]["paused"] = True
    project.enroll(project.people(4))
    path = db(project)
    query(path, "UPDATE messages SET state = 'sent', sent_at = 1 WHERE id = 1")
    query(path, "UPDATE messages SET state = 'error', reason = 'disconnected' WHERE id IN (2, 3)")

    def refused(*args: str, code: int = 1) -> str:
        before = query(path, "SELECT * FROM messages ORDER BY id")
        result = project.run("outbox", *args)
        assert result.code == code, (args, result.out, result.err)
        assert query(path, "SELECT * FROM messages ORDER BY id") == before
        return result.err

    assert "no message 99" in refused("retry", "--id", "2", "99")
    assert "message 1 is sent: only error messages can be retried" in refused("retry", "--id", "1")
    assert f"no messages in the error section for {a3}" in refused("retry", "--mailbox", a3)
    assert "message 1 is sent" in refused("reassign", "--id", "1", "--to", a2)
    assert f"{b1} is not in the pool of cadence 'c1'" in refused("reassign", "--id", "2", "--to", b1)
    assert f"{a3} is paused" in refused("reassign", "--id", "2", "--to", a3)
    assert "unknown mailbox 'ghost@x.example'" in refused("reassign", "--id", "2", "--to", "ghost@x.example", code=2)
    query(path, "INSERT INTO mailbox_health (mailbox, state, since) VALUES (?, 'disconnected', 0)", a2)
    assert f"{a2} is disconnected" in refused("reassign", "--id", "2", "--to", a2)
    query(path, "DELETE FROM mailbox_health")

    # A retry that cannot send is refused, all or nothing, with the reason.
    query(
        path, "INSERT INTO mailbox_health (mailbox, state, since, next_probe_at) VALUES (?, 'disconnected', 0, 9e9)", a2
    )
    query(path, "UPDATE messages SET mailbox = ? WHERE id = 3", a2)
    assert f"message(s) 2, 3: {a2} is still disconnected" in refused("retry", "--id", "2", "3")
    query(path, "UPDATE messages SET mailbox = 'gone@alice.example' WHERE id = 3")
    assert "gone@alice.example is no longer in the config" in refused("retry", "--all")
    query(path, "UPDATE messages SET mailbox = ? WHERE id = 3", a3)
    assert f"{a3} is paused" in refused("retry", "--id", "3")
    query(path, "UPDATE messages SET mailbox = (SELECT mailbox FROM enrollments e WHERE e.id = enrollment_id)")
    query(path, "DELETE FROM mailbox_health")

    result = project.run("outbox", "retry", "--id", "2", "--json")
    assert result.code == 0 and result.json() == {"retried": [2]}
    assert query(path, "SELECT state, reason FROM messages WHERE id = 2") == [("scheduled", None)]
    result = project.run("outbox", "retry", "--all")
    assert result.code == 0 and "retried 1 message(s): 3" in result.out


def test_reassign_moves_the_sticky_sender(project: Project) -> None:
    a1, a2 = project.add_mailboxes(2)
    project.add_cadence(steps=2)
    project.enroll(project.people(4))
    path = db(project)
    source = query(path, "SELECT mailbox FROM messages WHERE id = 1")[0][0]
    target = a2 if source == a1 else a1
    result = project.run("outbox", "reassign", "--id", "1", "--to", target, "--json")
    assert result.code == 0, result.err
    assert result.json() == {"reassigned": [1], "enrollments": 1, "to": target, "goes_at": None, "waiting_for": None}
    assert query(
        path, "SELECT e.mailbox, m.mailbox FROM enrollments e JOIN messages m ON m.enrollment_id = e.id WHERE m.id = 1"
    ) == [(target, target)]
    counts = dict(query(path, "SELECT mailbox, enrollments FROM rotation_counts"))
    assert counts == {source: 1, target: 3}
    result = project.run("outbox", "reassign", "--from", source, "--to", target)
    assert result.code == 0 and "reassigned 1 enrollment(s)" in result.out
    assert query(path, "SELECT DISTINCT mailbox FROM enrollments") == [(target,)]
    # A target at its daily limit: the reassign says when the messages will go, and why they wait.
    today = datetime.now(UTC).date().isoformat()
    query(path, "INSERT INTO daily_counts (mailbox, day, sent) VALUES (?, ?, 50)", source, today)
    result = project.run("outbox", "reassign", "--from", target, "--to", source)
    assert result.code == 0, result.err
    assert f"{source} waits for daily_limit: they go from {today}" not in result.out
    assert f"{source} waits for daily_limit: they go from " in result.out
