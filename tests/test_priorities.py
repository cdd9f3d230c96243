"""Follow-ups before new prospects (SPEC §4 `prioritize`), over a real daemon and aiosmtpd: each follow-up
leaves at its due time, before the first emails still waiting; `prioritize = "due"` keeps the old order."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query, states
from tests.servers import SmtpServer

pytestmark = [pytest.mark.slow, pytest.mark.both_stores]  # end to end: a daemon, its servers, real processes

PROSPECTS = "ABCDEFGH"


def _send(project: Project, prioritize: str, deliveries: int) -> list[tuple[str, int]]:
    """(prospect, step) in the order the server got them, A…H enrolled at once, gap 1 s, step 2 after 1 s."""
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config(), gap="1s", prioritize=prioritize)
        project.add_cadence(steps=2)
        project.data["cadences"][0]["steps"][1]["wait"] = "1s"
        project.write()
        people = project.csv([f"{p.lower()}@prospects.example,{p},Co" for p in PROSPECTS])
        assert project.enroll(people).code == 0
        daemon = DaemonProcess(project.config_path)
        try:
            server.recorder.wait_for(deliveries, timeout=60)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        finally:
            daemon.kill()
    finally:
        server.stop()
    return [(d.recipient[0].upper(), 2 if d["In-Reply-To"] else 1) for d in server.recorder.deliveries[:deliveries]]


def test_follow_ups_leave_at_their_due_time_before_the_waiting_first_emails(project: Project) -> None:
    order = _send(project, "follow_ups", 16)
    # A's follow-up is due one second after A's first email: it goes next, before B's first email, and so on.
    assert order == [(p, step) for p in PROSPECTS for step in (1, 2)]
    late = query(
        project.database,
        "SELECT max(sent_at - due_at) FROM messages WHERE step = 2 AND state = 'sent'",
    )[0][0]
    assert late < 1.0 + 0.5  # within one gap of its due time (and a little for the machine)


def test_prioritize_due_sends_the_oldest_due_first(project: Project) -> None:
    order = _send(project, "due", 9)
    assert order == [(p, 1) for p in PROSPECTS] + [("A", 2)]


def _until_capped(project: Project, server: SmtpServer, sends: int) -> dict[str, Any]:
    """A daemon runs until `sends` are delivered and recorded and a new_per_day cap has said what waits; then
    it stops cleanly. Returns that `mailbox.waiting` event."""
    daemon = DaemonProcess(project.config_path)
    try:
        server.recorder.wait_for(sends, timeout=60)
        waiting = daemon.wait_event("mailbox.waiting", within=30, reason="new_per_day")
        eventually(lambda: states(project.database).get("sent") == sends, 30, "the sends to be recorded")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        daemon.kill()
    return waiting


def test_new_per_day_caps_first_emails_and_lets_follow_ups_go(project: Project) -> None:
    """new_per_day = 3 with 20 new prospects: 3 first emails today, each of their follow-ups as it comes
    due, and the other 17 wait, saying why; status counts them and plan sends the next 3 tomorrow."""
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config(), gap="0s", new_per_day=3)
        project.add_cadence(steps=2)
        project.data["cadences"][0]["steps"][1]["wait"] = "1s"
        project.write()
        assert project.enroll(project.people(20)).code == 0
        assert _until_capped(project, server, 6)["deferred"] == 17
    finally:
        server.stop()
    steps = sorted(2 if d["In-Reply-To"] else 1 for d in server.recorder.deliveries)
    assert steps == [1, 1, 1, 2, 2, 2]
    details = query(project.database, "SELECT detail FROM messages WHERE state = 'scheduled'")
    assert len(details) == 17 and all(d[0].startswith("deferred: new_per_day until ") for d in details)
    mailbox = project.run("status", "--json").json()["mailboxes"][0]
    assert (mailbox["new_today"], mailbox["new_per_day"]) == (3, 3)
    assert (mailbox["waiting_for"], mailbox["next_message"]) == ("new_per_day", "new")  # tomorrow's first email
    assert mailbox["next_send_at"][:10] > datetime.now(UTC).date().isoformat()
    plan = project.run("plan", "--days", "2", "--json").json()
    days = plan["days"]
    left = 17 - sum(row["new"] for row in days)  # due now, sent after the horizon: the plan names their cadence
    assert plan["past_horizon"] == [{"cadence": "c1", "mailbox": mailbox["address"], "new": left, "follow_ups": 0}]
    today = datetime.now(UTC).date().isoformat()
    assert days and today not in [row["date"] for row in days]  # no room left today
    assert {(row["new"], row["follow_ups"]) for row in days} == {(3, 3)}  # 3 a day, each with its follow-up


@pytest.mark.parametrize(("prioritize", "goes"), [("follow_ups", "follow_up"), ("new", "new"), ("due", "new")])
def test_status_says_which_kind_goes_next_by_the_claims_rule(project: Project, prioritize: str, goes: str) -> None:
    """One first email sent, its follow-up due now, three first emails due since before it: `status` names
    the kind the claim takes next (the first emails are the older: "due" takes them)."""
    from daemon import readside
    from daemon.config import load_config
    from daemon.store import SentRecord, Store

    address = project.add_mailboxes(1, gap="0s", prioritize=prioritize)[0]
    project.add_cadence(steps=2)
    assert project.enroll(project.people(4)).code == 0
    config = load_config(project.write())
    store = Store.open(config.daemon.database)
    try:
        now = time.time()
        claimed = store.claim(address, now, lambda i, a: f"<{i}@send.example>")
        assert claimed is not None and claimed.step == 1
        day = datetime.now(UTC).date().isoformat()
        with store.transaction():
            store.record_sent(SentRecord(claimed, now, 250, "ok", "s", day, now, (2, address, now + 1)))
        row = readside.status(config, store, now + 2)["mailboxes"][0]
        assert (row["next_message"], row["waiting_for"]) == (goes, None)
    finally:
        store.close()


def test_a_cadences_new_per_day_is_a_share_of_each_mailbox(project: Project) -> None:
    """`[[cadences]] new_per_day = 2`: each mailbox starts 2 of its prospects a day; another cadence on the same
    mailbox goes on. The rest say why they wait, one line says so, and plan sends them on the next days."""
    server = SmtpServer().start()
    try:
        address = project.add_mailboxes(1, smtp=server.smtp_config(), gap="0s")[0]
        project.add_cadence("c1", new_per_day=2)
        project.add_cadence("c2")
        project.write()
        assert project.enroll(project.people(5), "c1").code == 0
        assert project.enroll(project.people(5, 100, "others.csv"), "c2").code == 0
        waiting = _until_capped(project, server, 7)
        assert (waiting["deferred"], waiting["cadences"]) == (3, ["c1"])
    finally:
        server.stop()
    firsts = Counter(int(d.recipient[1:].split("@")[0]) >= 100 for d in server.recorder.deliveries)
    assert firsts == {False: 2, True: 5}  # c1's two, all five of c2
    details = query(project.database, "SELECT detail FROM messages WHERE state = 'scheduled'")
    assert len(details) == 3 and all(d[0].startswith("deferred: new_per_day of cadence 'c1' until ") for d in details)
    plan = project.run("plan", "--days", "3", "--json").json()["days"]
    today = datetime.now(UTC).date().isoformat()
    assert [(row["mailbox"], row["new"]) for row in plan if row["date"] > today] == [(address, 2), (address, 1)]
