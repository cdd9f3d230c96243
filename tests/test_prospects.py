"""Prospects and cadences under the team's hand (SPEC §8a), against a real daemon and a real SMTP server: stop one
prospect, change its fields, mark an outcome, pause a cadence while another goes on; look one prospect up;
typos in names are errors that say the nearest name."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query
from tests.servers import Delivery, SmtpServer

pytestmark = [pytest.mark.both_stores]

STEP_WAIT = "3s"


def three_steps(project: Project, name: str) -> None:
    cadence = project.add_cadence(name, steps=3)
    for step in cadence["steps"][1:]:
        step["wait"] = STEP_WAIT
    cadence["steps"][0]["subject"] = f"{name}: hello {{{{ company | default('you') }}}}"


def to(server: SmtpServer, address: str) -> list[Delivery]:
    return [d for d in server.recorder.deliveries if d.recipient == address]


@pytest.mark.slow
def test_stop_set_and_pause_at_the_server(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(2, smtp=server.smtp_config())
        three_steps(project, "c1")
        three_steps(project, "c2")
        project.write()
        assert project.enroll(project.people(3)).json()["enrolled"] == 3  # p0, p1, p2 in c1
        c2 = project.csv(["q0@prospects.example,Q0,Qco"], name="q.csv")
        assert project.enroll(c2, cadence="c2").json()["enrolled"] == 1
        daemon = DaemonProcess(project.config_path)
        try:
            server.recorder.wait_for(4)  # every step 1
            stopped = project.run("prospect", "stop", "p0@prospects.example", "--reason", "asked by phone")
            assert stopped.code == 0, stopped.err
            assert "stopped in c1; 1 waiting message(s) cancelled (the address is not suppressed)" in stopped.out
            changed = project.run("prospect", "set", "P1@prospects.example", "first_name=Zed", "company=Zco")
            assert changed.code == 0, changed.err
            # Step 2 of p1, p2 and q0 (not of p0): p1's says what its fields now say.
            server.recorder.wait_for(7)
            assert len(to(server, "p0@prospects.example")) == 1
            (p1_step2,) = to(server, "p1@prospects.example")[1:]
            assert "Hi Zed, note 2" in p1_step2.headers.get_body().get_content()
            assert p1_step2["Subject"] == "Re: c1: hello Co1"  # the thread keeps the subject it began with

            paused = project.run("cadence", "pause", "c1", "--reason", "copy review")
            assert paused.code == 0 and "c1: paused" in paused.out, paused.err
            # c2 goes on: q0's step 3 arrives; c1's step 3, due at the same time, is held and says why.
            eventually(lambda: len(to(server, "q0@prospects.example")) == 3, what="q0's step 3")
            eventually(lambda: held(project) == 2, what="c1's step 3 held")
            assert len(to(server, "p1@prospects.example")) == 2 and len(to(server, "p2@prospects.example")) == 2
            outbox = project.run("outbox", "--cadence", "c1", "--state", "scheduled", "--json").json()["messages"]
            assert {m["detail"] for m in outbox} == {"deferred: cadence paused until `cadenced cadence resume c1`"}
            status = project.run("status", "--json").json()
            assert [c["paused"] for c in status["cadences"]] == [True, False]
            assert project.run("plan", "--json").json()["paused_cadences"] == ["c1"]

            resumed = project.run("cadence", "resume", "c1")
            assert resumed.code == 0 and "2 held message(s) due again" in resumed.out, resumed.out
            server.recorder.wait_for(10)
            assert len(to(server, "p1@prospects.example")) == 3 and len(to(server, "p2@prospects.example")) == 3
            assert len(to(server, "p0@prospects.example")) == 1
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        # What `prospect show` says was sent is what the server received, in order.
        for address in ("p0@prospects.example", "p1@prospects.example"):
            shown = project.run("prospect", "show", address, "--json").json()
            sent = [(t["step"], t["mailbox"], t["message_id"]) for t in shown["timeline"] if t["kind"] == "sent"]
            got = [(n, d.sender, d["Message-ID"]) for n, d in enumerate(to(server, address), 1)]
            assert sent == got
        p0 = project.run("prospect", "show", "p0@prospects.example", "--json").json()
        (enrollment,) = p0["enrollments"]
        assert enrollment["state"] == "stopped" and p0["suppressed"] is None
        assert [m["state"] for m in enrollment["messages"]] == ["sent", "cancelled"]
        kinds = [t["kind"] for t in p0["timeline"]]
        assert kinds == ["enrolled", "sent", "stopped"]
        assert p0["timeline"][-1]["detail"] == "stopped by the operator: asked by phone"
        text = project.run("prospect", "show", "p1@prospects.example").out
        assert "fields changed by the operator: company, first_name" in text and "step 3  sent" in text
    finally:
        server.stop()


def held(project: Project) -> int:
    return int(query(project.database, "SELECT count(*) FROM messages WHERE held_due IS NOT NULL")[0][0])


def test_mark_an_outcome_and_names_that_are_not_known(project: Project) -> None:
    project.add_mailboxes(2)
    three_steps(project, "c1")
    project.write()
    project.enroll(project.people(60))
    marked = project.run("prospect", "mark", "p3@prospects.example", "--outcome", "meeting_booked", "--json")
    assert marked.code == 0, marked.err
    assert marked.json()["ended"] == ["c1"] and len(marked.json()["cancelled"]) == 1
    shown = project.run("prospect", "show", "p3@prospects.example", "--json").json()
    assert shown["enrollments"][0]["state"] == "replied" and shown["enrollments"][0]["outcome"] == "meeting_booked"
    again = project.run("prospect", "mark", "p3@prospects.example", "--outcome", "not_interested", "--json")
    assert again.code == 0 and again.json()["ended"] == []
    assert project.run("prospect", "show", "p3@prospects.example", "--json").json()["enrollments"][0]["outcome"] == (
        "not_interested"
    )
    stop_again = project.run("prospect", "stop", "p3@prospects.example")
    assert stop_again.code == 1 and "no active enrollment to stop (c1: replied)" in stop_again.err

    for command, said in [
        (
            ["prospect", "show", "p3@prospects.exmaple"],
            "no prospect p3@prospects.exmaple; did you mean p3@prospects.example?",
        ),
        (["prospect", "stop", "nobody@else.example"], "no prospect nobody@else.example"),
        (["outbox", "--mailbox", "mb1@alice.exmaple"], "no mailbox mb1@alice.exmaple; did you mean mb1@alice.example?"),
        (["outbox", "--cadence", "c2"], "no cadence c2; did you mean c1?"),
        (["outbox", "--prospect", "p44@prospects.exampel"], "did you mean p44@prospects.example?"),
        (["cadence", "pause", "cl"], "no cadence cl; did you mean c1?"),
        (["prospect", "stop", "p4@prospects.example", "--cadence", "c9"], "not in cadence c9 (its cadences: c1)"),
    ]:
        r = project.run(*command)
        assert r.code == 1 and said in r.err, (command, r.err)

    page = project.run("outbox")
    assert page.code == 0
    assert page.out.count("prospects.example") == 50 and "10 more (use --limit N or --all)" in page.out
    assert project.run("outbox", "--all").out.count("prospects.example") == 60
    js = project.run("outbox", "--limit", "5", "--json").json()
    assert len(js["messages"]) == 5 and js["more"] == 55
    mine = project.run("outbox", "--prospect", "P7@prospects.example", "--json").json()["messages"]
    assert [(m["prospect"], m["step"]) for m in mine] == [("p7@prospects.example", 1)]
    listed = project.run("cadence", "list", "--json").json()["cadences"]
    assert listed == [
        {
            "name": "c1",
            "configured": True,
            "paused": False,
            "paused_at": None,
            "paused_reason": None,
            "enrollments": {"active": 59, "replied": 1},
        }
    ]


def test_set_refuses_what_a_template_cannot_use(project: Project) -> None:
    project.add_mailboxes(1)
    three_steps(project, "c1")
    project.write()
    project.enroll(project.people(1))
    for assignment, said in [
        ("company=Line\nbreak", "company: a line break in a field a subject of c1 reads"),
        ("email=x@y.example", "email: not a field to change here"),
        ("First Name=x", "write FIELD=VALUE"),
    ]:
        r = project.run("prospect", "set", "p0@prospects.example", assignment)
        assert r.code in (1, 2) and said in r.err, (assignment, r.err)
    ok = project.run("prospect", "set", "p0@prospects.example", "notes=line one\nline two", "--json")
    assert ok.code == 0, ok.err
    fields = json.loads(query(project.database, "SELECT fields FROM enrollments")[0][0])
    assert fields["notes"] == "line one\nline two"


def test_check_judges_templates_against_the_enrolled(project: Project) -> None:
    project.add_mailboxes(1)
    three_steps(project, "c1")
    three_steps(project, "gone")
    project.write()
    project.enroll(project.people(3))
    project.enroll(project.people(2, name="g.csv"), cadence="gone")
    project.data["cadences"][0]["fields"] = ["industry"]
    project.data["cadences"][0]["steps"][2]["body"] = "In {{ industry }}, note 3"
    project.data["cadences"].pop()
    r = project.run("check")
    assert r.code == 0, r.err
    assert (
        "cadences.\"c1\": a template needs 'industry', which 3 active enrollment(s) lack (such as p0@prospects.example)"
        in r.err
    )
    assert 'cadences."gone": no longer in the config, with 2 active enrollment(s)' in r.err


def test_stop_on_reply_takes_company(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence(stop_on_reply="company")
    project.add_cadence("c2", stop_on_reply="yes")
    r = project.run("check")
    assert r.code == 2 and 'cadences."c2".stop_on_reply: must be true, false or "company", got \'yes\'' in r.err
    project.data["cadences"].pop()
    printed = project.run("check", "--print")
    assert printed.code == 0 and 'stop_on_reply = "company"' in printed.out


def test_a_held_message_that_went_to_the_error_section_comes_back_at_its_own_time(project: Project) -> None:
    """Held by a paused cadence, then moved to error by its mailbox going down: after resume and a retry it is
    due at its own time again (not the hold's), and the claim takes it."""
    from daemon.store import HELD_DUE, Store

    (box,) = project.add_mailboxes(1)
    three_steps(project, "c1")
    project.write()
    project.enroll(project.people(1))
    store = Store.open(project.database)
    try:
        (due,) = [r[0] for r in query(project.database, "SELECT due_at FROM messages")]
        assert store.pause_cadence("c1", "test", due)
        with store.transaction():
            assert store.claim(box, due + 1, lambda i, a: f"<{i}.{a}@x>") is None  # held, not claimed
        assert query(project.database, "SELECT due_at, held_due FROM messages") == [(HELD_DUE, due)]
        store.disconnect(box, due + 2, "down", due + 60)
        assert query(project.database, "SELECT state FROM messages") == [("error",)]
        assert store.resume_cadence("c1") == 0  # nothing scheduled was held: the one held is in error
        with store.transaction():
            assert store.retry([1]) == 1
        assert query(project.database, "SELECT state, due_at, held_due FROM messages") == [("scheduled", due, None)]
        with store.transaction():
            claimed = store.claim(box, due + 3, lambda i, a: f"<{i}.{a}@x>")
        assert claimed is not None and claimed.email == "p0@prospects.example"
    finally:
        store.close()
