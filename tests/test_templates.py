"""Templates a sales team writes (SPEC §6a), at a real SMTP server: a signature per mailbox, spintax fixed by the
enrollment and step, a step that starts a new thread."""

from __future__ import annotations

import signal

import pytest

from daemon import compose
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess
from tests.servers import SmtpServer

pytestmark = [pytest.mark.both_stores]


def test_spin_is_fixed_by_the_seed_and_spread_over_seeds() -> None:
    template = compose.compile_template('{{ spin("Hi|Hello|Hey") }} {{ first_name }}')
    assert template.required == {"first_name"}  # spin is a function, not a field
    render = [template.render({"first_name": "Ann", compose.SPIN_SEED: f"{e}:1"}) for e in range(300)]
    assert render[7] == template.render({"first_name": "Ann", compose.SPIN_SEED: "7:1"})  # a retry: the same
    counts = {word: sum(r.startswith(word + " ") for r in render) for word in ("Hi", "Hello", "Hey")}
    assert all(70 <= n <= 130 for n in counts.values()), counts


@pytest.mark.slow
def test_signature_spin_and_a_new_thread_at_the_server(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.data["defaults"].update({"gap": "0s", "signature": "-- \n{{ sender_name }} | {{ sender_address }}"})
        a, b = project.add_mailboxes(2, smtp=server.smtp_config())
        project.data["mailboxes"][1]["signature"] = "Best, {{ sender_name }} (Bee team)"
        cadence = project.add_cadence(steps=3)
        cadence["steps"] = [
            {
                "wait": "0s",
                "subject": "First {{ company }}",
                "body": '{{ spin("Hi|Hello") }} {{ first_name }}\n{{ signature }}',
            },
            {
                "wait": "1s",
                "subject": "A new idea for {{ company }}",
                "thread": "new",
                "body": "Step 2\n{{ signature }}",
            },
            {"wait": "1s", "body": '{{ spin("Bye|Cheers") }}, step 3'},
        ]
        project.write()
        enrolled = project.enroll(project.people(4))
        assert enrolled.code == 0, enrolled.err
        daemon = DaemonProcess(project.config_path)
        try:
            got = server.recorder.wait_for(12)
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        by = {(d.recipient, n): d for d in got for n in [1 + [x for x in got if x.recipient == d.recipient].index(d)]}
        for i in range(4):
            p = f"p{i}@prospects.example"
            first, second, third = by[(p, 1)], by[(p, 2)], by[(p, 3)]
            body1 = first.headers.get_body().get_content().replace("\r\n", "\n")
            sender = first.sender
            signed = "-- \nMb1 | mb1@alice.example" if sender == a else "Best, Mb2 (Bee team)"
            assert signed in body1 and signed in second.headers.get_body().get_content().replace("\r\n", "\n")
            assert body1.split(" ")[0] in ("Hi", "Hello")
            assert first["In-Reply-To"] == ""
            assert second["Subject"] == f"A new idea for Co{i}" and second["In-Reply-To"] == ""
            assert third["Subject"] == f"Re: A new idea for Co{i}"  # replies to the newest thread
            assert third["In-Reply-To"] == second["Message-ID"] and third["References"] == second["Message-ID"]
        assert {d.sender for d in got} == {a, b}
    finally:
        server.stop()


def test_a_new_thread_needs_its_own_subject(project: Project) -> None:
    project.add_mailboxes(1)
    cadence = project.add_cadence(steps=2)
    cadence["steps"][1]["thread"] = "new"
    r = project.run("check")
    assert r.code == 2 and 'steps[1].thread: "new" needs the step\'s own subject' in r.err
    project.data["mailboxes"][0]["signature"] = "{{ first_name }}"
    cadence["steps"][1]["subject"] = "Again"
    r = project.run("check")
    assert r.code == 2 and "signature: template error" in r.err and "sender_name and sender_address" in r.err


def test_check_warns_of_a_sender_name_a_mailbox_lacks(project: Project) -> None:
    (box,) = project.add_mailboxes(1)
    del project.data["mailboxes"][0]["name"]
    cadence = project.add_cadence()
    cadence["steps"][0]["body"] = "Hi {{ first_name | default('there') }}, {{ sender_name }} here"
    r = project.run("check")
    assert r.code == 0 and f"mailboxes.\"{box}\": no name, and cadence 'c1' writes {{{{ sender_name }}}}" in r.err
    project.data["mailboxes"][0]["name"] = "Ann"
    assert "no name" not in project.run("check").err


@pytest.mark.slow
def test_a_markdown_step_arrives_as_text_and_html(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(1, smtp=server.smtp_config())
        cadence = project.add_cadence()
        cadence["format"] = "markdown"
        cadence["steps"][0]["body"] = (
            "Hi **{{ first_name }}**,\n\n- one\n- two\n\nSee [our page](https://acme.example/p)."
        )
        project.write()
        rows = [
            "p0@prospects.example,<script>alert(1)</script>,Co",
            "p1@prospects.example,[Zed](https://evil.example),Co",
        ]
        enrolled = project.enroll(project.csv(rows))
        assert enrolled.code == 0, enrolled.err
        daemon = DaemonProcess(project.config_path)
        try:
            got = server.recorder.wait_for(2)
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        for d in got:
            assert d.headers.get_content_type() == "multipart/alternative"
            text = d.headers.get_body(("plain",)).get_content()
            html = d.headers.get_body(("html",)).get_content()
            for word in ("one", "two", "See", "our page"):
                assert word in text and word in html
            assert '<a href="https://acme.example/p">our page</a>' in html and "<li>one</li>" in html
        by = {d.recipient: d.headers.get_body(("html",)).get_content() for d in got}
        assert "<script>" not in by["p0@prospects.example"]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in by["p0@prospects.example"]
        assert 'evil.example">' not in by["p1@prospects.example"]  # a field cannot make a link
        assert "[Zed](https://evil.example)" in by["p1@prospects.example"]
    finally:
        server.stop()
