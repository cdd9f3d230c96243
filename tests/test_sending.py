"""The daemon over real SMTP: security modes, rotation, stickiness, threads, limits, restarts."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from daemon import readside
from daemon.config import load_config
from daemon.store import Store
from tests.conftest import Project
from tests.daemon_helpers import next_weekday_at, query, running, shifted_clock, states, until
from tests.servers import Authenticator, Pki, SmtpServer

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores, pytest.mark.slow]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def fast(project: Project, **extra: object) -> None:
    project.data["defaults"].update({"gap": "0s", **extra})


@pytest.mark.parametrize("security", ["tls", "starttls", "none"])
async def test_each_security_mode_delivers(project: Project, pki: Pki, security: str) -> None:
    auth = Authenticator("mb1@alice.example", "pw-" + security) if security != "none" else None
    server = SmtpServer(security, pki=pki, auth=auth).start()
    try:
        (project.root / "pw").write_text("pw-" + security)
        extra = {"ca_file": str(pki.ca_file), "username": "mb1@alice.example", "password_file": "pw"} if auth else {}
        project.add_mailboxes(1, smtp=server.smtp_config(**extra))
        project.add_cadence()
        fast(project)
        project.enroll(project.people(2))
        async with running(project.config_path):
            got = await anyio.to_thread.run_sync(server.recorder.wait_for, 2)
        assert {d.recipient for d in got} == {"p0@prospects.example", "p1@prospects.example"}
        assert states(project.database) == {"sent": 2}
        if auth:
            assert auth.logins == 1  # one connection reused for both sends
    finally:
        server.stop()


async def test_plaintext_auth_only_when_allowed(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authenticator("u", "plain-pw")
    server = SmtpServer("none", auth=auth).start()
    try:
        smtp = server.smtp_config(username="u", password_env="PLAIN_PW", allow_plaintext=True)
        project.add_mailboxes(1, smtp=smtp)
        project.add_cadence()
        fast(project)
        monkeypatch.setenv("PLAIN_PW", "plain-pw")
        project.enroll(project.people(1))
        async with running(project.config_path):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 1)
        assert auth.logins == 1
    finally:
        server.stop()


@pytest.mark.parametrize("problem", ["downgrade", "untrusted"])
async def test_tls_is_never_skipped(project: Project, pki: Pki, problem: str) -> None:
    """STARTTLS not offered, or a certificate nobody vouches for: nothing goes out in clear."""
    server = SmtpServer("none" if problem == "downgrade" else "tls", pki=pki).start()
    try:
        smtp = server.smtp_config(security="starttls" if problem == "downgrade" else "tls")
        project.add_mailboxes(1, smtp=smtp)
        project.add_cadence()
        fast(project)
        project.enroll(project.people(2))
        db = project.database
        async with running(project.config_path):
            await until(lambda: states(db).get("error") == 2, what="messages in the error section")
        assert server.recorder.deliveries == []
        rows = query(db, "SELECT reason, detail FROM messages")
        assert {r[0] for r in rows} == {"disconnected"}
        status = project.run("status", "--json").json()["mailboxes"][0]
        assert (status["state"], status["waiting_for"], status["error"]) == ("disconnected", "reconnect", 2)
    finally:
        server.stop()


async def test_rotation_stickiness_and_threads_at_the_server(project: Project) -> None:
    server = SmtpServer().start()
    try:
        boxes = project.add_mailboxes(2, smtp=server.smtp_config())
        cadence = project.add_cadence(steps=3)
        for step in cadence["steps"][1:]:
            step["wait"] = "1s"
        fast(project)
        project.enroll(project.people(10))
        async with running(project.config_path):
            got = await anyio.to_thread.run_sync(server.recorder.wait_for, 30)
        assert len(got) == 30
        firsts = [d for d in got if not d["In-Reply-To"]]
        assert Counter(d.sender for d in firsts) == {boxes[0]: 5, boxes[1]: 5}
        by_prospect: dict[str, list] = {}
        for d in got:
            by_prospect.setdefault(d.recipient, []).append(d)
        for prospect, thread in by_prospect.items():
            assert len(thread) == 3, prospect
            assert len({d.sender for d in thread}) == 1  # sticky
            first, second, third = thread
            domain = first.sender.split("@")[1]
            assert first["Message-ID"].endswith(f"@{domain}>")
            # 128 random bits: a Message-ID cannot be guessed to forge a reply or a bounce that stops a prospect
            assert len(first["Message-ID"].split("@")[0].rsplit(".", 1)[1]) == 32
            assert first["From"] == f"{first.sender.split('@')[0].title()} <{first.sender}>"
            assert second["Subject"] == f"Re: {first['Subject']}" == third["Subject"]
            assert second["In-Reply-To"] == first["Message-ID"]
            assert second["References"] == first["Message-ID"]
            assert third["In-Reply-To"] == second["Message-ID"]
            assert third["References"].split() == [first["Message-ID"], second["Message-ID"]]
        db = project.database
        assert states(db) == {"sent": 30}
        assert query(db, "SELECT state, count(*) FROM enrollments GROUP BY state") == [("finished", 10)]
    finally:
        server.stop()


async def test_daily_limit_defers_to_the_next_window_day_and_survives_restart(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.data["defaults"].update(
            {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"], "hours": ["09:00-17:00"]}
        )
        fast(project, daily_limit=3)
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.enroll(project.people(5))
        friday = next_weekday_at(4, 15, "Europe/Berlin")
        clock = shifted_clock(friday)
        db = project.database
        async with running(project.config_path, clock=clock):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 3)
            await until(
                lambda: len(query(db, "SELECT id FROM messages WHERE detail LIKE 'deferred: daily_limit%'")) == 2,
                what="two deferred messages",
            )
        monday = next_weekday_at(0, 9, "Europe/Berlin", after=friday)
        monday_iso = datetime.fromtimestamp(monday, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert len(server.recorder.deliveries) == 3
        assert {r[0] for r in query(db, "SELECT detail FROM messages WHERE state = 'scheduled'")} == {
            f"deferred: daily_limit until {monday_iso}"
        }
        config = load_config(project.config_path)
        store = Store.open(config.daemon.database)
        try:
            mailbox = readside.status(config, store, clock())["mailboxes"][0]
        finally:
            store.close()
        assert (mailbox["sent_today"], mailbox["waiting_for"], mailbox["next_send_at"]) == (
            3,
            "daily_limit",
            monday_iso,
        )
        # A restart the same day keeps the count: nothing more goes out.
        async with running(project.config_path, clock=clock) as daemon:
            await until(lambda: daemon.dispatcher is not None and daemon.dispatcher.runners, what="runners")
            runner = next(iter(daemon.dispatcher.runners.values()))
            await until(
                lambda: runner.next_wake is not None and runner.next_wake >= monday - 1, what="a wake on Monday"
            )
        assert len(server.recorder.deliveries) == 3
    finally:
        server.stop()


async def test_restart_mid_day_keeps_the_count(project: Project) -> None:
    server = SmtpServer().start()
    try:
        fast(project, daily_limit=3)
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.enroll(project.people(2))
        async with running(project.config_path):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 2)
        project.enroll(project.people(3, start=2, name="more.csv"))
        db = project.database
        async with running(project.config_path):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 3)
            await until(lambda: len(query(db, "SELECT 1 FROM messages WHERE detail LIKE 'deferred:%'")) == 2)
        assert len(server.recorder.deliveries) == 3
        assert states(db) == {"sent": 3, "scheduled": 2}
    finally:
        server.stop()


async def test_enrollment_while_running_is_noticed_quickly(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.add_mailboxes(2, smtp=server.smtp_config())
        project.add_cadence()
        fast(project)
        project.write()
        async with running(project.config_path) as daemon:
            await until(lambda: daemon.dispatcher is not None and len(daemon.dispatcher.runners) == 2)
            started = time.monotonic()
            result = await anyio.to_thread.run_sync(lambda: project.enroll(project.people(2)))
            assert result.code == 0
            await anyio.to_thread.run_sync(server.recorder.wait_for, 2, 10.0)
            assert time.monotonic() - started < 5.0
    finally:
        server.stop()


async def test_plan_forecasts_with_the_same_rules(project: Project) -> None:
    project.data["defaults"].update(
        {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"], "hours": ["09:00-17:00"]}
    )
    fast(project, daily_limit=3)
    (a,) = project.add_mailboxes(1)
    cadence = project.add_cadence(steps=2)
    cadence["steps"][1]["wait"] = "1h"
    project.enroll(project.people(5))
    friday = next_weekday_at(4, 15, "Europe/Berlin")
    config = load_config(project.config_path)
    store = Store.open(config.daemon.database)
    try:
        days = readside.plan(config, store, friday, 7)["days"]
    finally:
        store.close()
    by_date = {row["date"]: row["sends"] for row in days}
    assert list(by_date.values()) == [3, 3, 3, 1]  # 10 sends (5 x 2 steps) at 3 a day, weekend skipped
    first = datetime.fromtimestamp(friday, ZoneInfo("Europe/Berlin")).date()
    assert sorted(by_date) == [(first + timedelta(days=d)).isoformat() for d in (0, 3, 4, 5)]
    assert all(row["mailbox"] == a for row in days)
    result = project.run("plan", "--days", "3", "--json")
    assert result.code == 0 and "days" in result.json()


async def test_message_left_sending_becomes_uncertain(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        fast(project)
        project.enroll(project.people(2))
        db = project.database
        query(db, "UPDATE messages SET state = 'sending' WHERE id = 1")
        async with running(project.config_path):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 1)
            await until(lambda: states(db) == {"sent": 1, "error": 1})
        assert query(db, "SELECT reason FROM messages WHERE id = 1") == [("uncertain",)]
        assert [d.recipient for d in server.recorder.deliveries] == ["p1@prospects.example"]
    finally:
        server.stop()


async def test_warmup_and_skip_dates_hold_sends_and_say_why(project: Project) -> None:
    """A new mailbox sends its warm-up allowance and no more, the rest say `deferred: warmup until`; a skipped
    date sends nothing (`deferred: skip_date until`); status, plan and the run agree."""
    server = SmtpServer().start()
    try:
        project.data["defaults"].update(
            {"timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "hours": ["00:00-24:00"]}
        )
        fast(project, daily_limit=10)
        warm, holiday = project.add_mailboxes(2, smtp=server.smtp_config())
        # Noon of a day two days ahead: far from any midnight while the test runs, after the enrollment's time.
        today = datetime.now(UTC).date() + timedelta(days=2)
        clock = shifted_clock(datetime(today.year, today.month, today.day, 12, tzinfo=UTC).timestamp())
        project.data["mailboxes"][0]["warmup"] = {"start": 2, "step": 2, "every": "1d", "ceiling": 8}
        project.data["mailboxes"][1]["skip_dates"] = [today.isoformat()]
        project.add_cadence(mailboxes=[warm, holiday], users=[])
        project.enroll(project.people(8))  # 4 each
        async with running(project.write(), clock):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 2)
            await until(
                lambda: len(query(project.database, "SELECT id FROM messages WHERE detail LIKE 'deferred:%'")) == 6
            )
        assert {d.sender for d in server.recorder.deliveries} == {warm}
        tomorrow = (today + timedelta(days=1)).isoformat()
        rows = query(project.database, "SELECT DISTINCT mailbox, detail FROM messages WHERE state = 'scheduled'")
        details = dict(rows)
        assert len(details) == len(rows)  # one reason per mailbox
        assert details[warm] == f"deferred: warmup until {tomorrow}T00:00:00Z"
        assert details[holiday] == f"deferred: skip_date until {tomorrow}T00:00:00Z"
        config = load_config(project.config_path)
        store = Store.open(config.daemon.database)
        try:
            status = {m["address"]: m for m in readside.status(config, store, clock())["mailboxes"]}
            plan = readside.plan(config, store, clock(), 3)["days"]
        finally:
            store.close()
        assert (status[warm]["waiting_for"], status[warm]["allowance_today"], status[warm]["sent_today"]) == (
            "warmup",
            2,
            2,
        )
        assert (status[holiday]["waiting_for"], status[holiday]["allowance_today"]) == ("skip_date", 0)
        assert status[warm]["safeguards"]["warmup"] == {"day": 1, "allowance": 2, "ceiling": 8}
        assert status[holiday]["safeguards"]["skip_today"] is True
        assert status[holiday]["safeguards"]["next_skip_date"] == today.isoformat()
        by = {(row["date"], row["mailbox"]): row["sends"] for row in plan}
        assert by.get((tomorrow, warm)) == 2 and by.get((tomorrow, holiday)) == 4  # 2 left, the ramp allows 4
        assert (today.isoformat(), holiday) not in by
    finally:
        server.stop()


async def test_a_domain_gets_its_daily_share_and_the_others_go_on(project: Project) -> None:
    """domain_daily_limit = 2: the third message to a domain waits for the next day, oldest first, while the
    other domain's messages behind it go today; plan forecasts the same."""
    server = SmtpServer().start()
    try:
        project.data["defaults"].update(
            {"timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "hours": ["00:00-24:00"]}
        )
        fast(project, daily_limit=10, domain_daily_limit=2)
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        order = ["a1@a.example", "a2@a.example", "a3@a.example", "b1@b.example", "a4@a.example", "b2@b.example"]
        project.enroll(project.csv([f"{e},P,Co" for e in order]))
        today = datetime.now(UTC).date() + timedelta(days=2)  # noon, two days ahead: no midnight in the run
        clock = shifted_clock(datetime(today.year, today.month, today.day, 12, tzinfo=UTC).timestamp())
        async with running(project.write(), clock):
            await anyio.to_thread.run_sync(server.recorder.wait_for, 4)
            await until(
                lambda: (
                    len(
                        query(
                            project.database,
                            "SELECT 1 FROM messages WHERE detail LIKE 'deferred: domain_limit%'",
                        )
                    )
                    == 2
                )
            )
        assert [d.recipient for d in server.recorder.deliveries] == [
            "a1@a.example",
            "a2@a.example",
            "b1@b.example",
            "b2@b.example",
        ]
        tomorrow = (today + timedelta(days=1)).isoformat()
        waiting = query(
            project.database,
            "SELECT e.email, m.detail FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
            "WHERE m.state = 'scheduled' ORDER BY m.due_at, m.id",
        )
        assert [w[0] for w in waiting] == ["a3@a.example", "a4@a.example"]  # oldest first, tomorrow
        assert all(w[1] == f"deferred: domain_limit until {tomorrow}T00:00:00Z (2 to a.example today)" for w in waiting)
        config = load_config(project.config_path)
        store = Store.open(config.daemon.database)
        try:
            plan = readside.plan(config, store, clock(), 3)["days"]
        finally:
            store.close()
        assert [(row["date"], row["sends"]) for row in plan] == [(tomorrow, 2)]
    finally:
        server.stop()


def test_plan_keeps_each_domain_to_its_daily_share(project: Project) -> None:
    project.data["defaults"].update(
        {"timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "hours": ["00:00-24:00"]}
    )
    fast(project, daily_limit=10, domain_daily_limit=2)
    project.add_mailboxes(1)
    project.add_cadence()
    emails = [f"a{i}@a.example" for i in range(5)] + ["b0@b.example"]
    project.enroll(project.csv([f"{e},P,Co" for e in emails]))
    plan = project.run("plan", "--days", "4", "--json").json()["days"]
    assert [row["sends"] for row in plan] == [3, 2, 1]  # a a b | a a | a


async def test_a_step_without_a_sender_leaves_from_the_enrollments_own_at_its_due_time(project: Project) -> None:
    """auto_rotate = false, step 1 from mb1, step 2 from mb2, step 3 with no sender: step 3 is the enrollment's
    (mb1), as `plan` says beforehand, and it leaves at its due time though mb2 sent the step before it (nothing
    else wakes mb1: the send of step 2 must)."""
    server = SmtpServer().start()
    try:
        project.data["defaults"]["gap"] = "0s"
        mb1, mb2 = project.add_mailboxes(2, smtp=server.smtp_config())
        cadence = project.add_cadence(steps=3, auto_rotate=False)
        cadence["steps"][0]["sender"] = mb1
        cadence["steps"][1] |= {"sender": mb2, "wait": "1s"}
        cadence["steps"][2]["wait"] = "2s"
        project.enroll(project.people(1))
        planned = project.run("plan", "--days", "1", "--json").json()["days"]
        assert {row["mailbox"]: row["sends"] for row in planned} == {mb1: 2, mb2: 1}
        async with running(project.write()):
            deliveries = await anyio.to_thread.run_sync(server.recorder.wait_for, 3)
        assert [d.sender for d in deliveries] == [mb1, mb2, mb1]
        sent = dict(query(project.database, "SELECT step, sent_at FROM messages"))
        assert sent[3] - sent[2] < 2 + 1.5  # its wait, and at most a moment more
    finally:
        server.stop()
