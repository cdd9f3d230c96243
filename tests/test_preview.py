"""`cadenced preview` (SPEC §6a): a step's email as it would leave, for an enrolled prospect or a CSV row; it equals,
header by header and part by part, what the server then receives, and it sends and writes nothing."""

from __future__ import annotations

import signal
import sqlite3
from typing import Any

import pytest

from daemon import compose
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess
from tests.servers import Delivery, SmtpServer

pytestmark = [pytest.mark.both_stores]

COMPARED = ("From", "To", "Subject", "In-Reply-To", "References", "List-Unsubscribe")


def _cadence(project: Project, smtp: dict[str, Any] | None = None) -> list[str]:
    project.data["defaults"].update({"gap": "0s", "signature": "-- \n{{ sender_name }} | {{ sender_address }}"})
    boxes = project.add_mailboxes(2, **({"smtp": smtp} if smtp else {}))
    cadence = project.add_cadence(steps=2)
    cadence["format"] = "markdown"
    cadence["steps"][0]["body"] = '{{ spin("Hi|Hello|Hey") }} **{{ first_name }}**,\n\nA note.\n{{ signature }}'
    cadence["steps"][0]["variants"] = [
        {"name": "short", "subject": "{{ company }}?"},
        {"name": "long", "subject": "An idea for {{ company }}", "body": "Dear {{ first_name }},\n{{ signature }}"},
    ]
    cadence["steps"][1].update({"wait": "1s", "body": "Bumping this, {{ first_name }}.\n{{ signature }}"})
    return boxes


def _preview(project: Project, *args: str) -> dict[str, Any]:
    r = project.run("preview", "--cadence", "c1", "--json", *args)
    assert r.code == 0, r.err
    document: dict[str, Any] = r.json()
    assert document["sent"] is False
    return document


def _parts(document: dict[str, Any]) -> dict[str, str]:
    return {p["type"]: p["content"].replace("\r\n", "\n") for p in document["parts"]}


def _delivered_parts(d: Delivery) -> dict[str, str]:
    return {
        part.get_content_type(): part.get_content().replace("\r\n", "\n")
        for part in d.headers.walk()
        if not part.is_multipart()
    }


def _dump(project: Project) -> list[str]:
    with sqlite3.connect(project.root / "cadenced.db") as conn:
        return list(conn.iterdump())


@pytest.mark.slow
def test_a_preview_is_what_the_server_receives_and_writes_nothing(project: Project) -> None:
    server = SmtpServer().start()
    try:
        a, b = _cadence(project, server.smtp_config())
        project.write()
        people = project.people(4)
        sqlite = not project.database
        # Before anything is enrolled: each row from each mailbox, the database not made by it.
        before = {
            (row, box): _preview(project, "--csv", str(people), "--row", str(row), "--mailbox", box)
            for row in range(1, 5)
            for box in (a, b)
        }
        if sqlite:
            assert not (project.root / "cadenced.db").exists()
        assert {d["variant"] for d in before.values()} == {"short", "long"}
        enrolled = project.enroll(people)
        assert enrolled.code == 0, enrolled.err
        daemon = DaemonProcess(project.config_path)
        try:
            got = server.recorder.wait_for(8)
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        dump = _dump(project) if sqlite else []
        for i in range(4):
            to = f"p{i}@prospects.example"
            first, second = [d for d in got if d.recipient == to]
            for step, delivered in ((1, first), (2, second)):
                shown = _preview(project, "--prospect", to, "--step", str(step))
                headers = dict(shown["headers"])
                for name in COMPARED:
                    assert headers.get(name, "") == delivered[name], (to, step, name)
                assert _parts(shown) == _delivered_parts(delivered), (to, step)
                assert shown["mailbox"] == delivered.sender
            # The CSV row's preview, from the mailbox rotation then gave it, is the first email it received.
            row = before[(i + 1, first.sender)]
            assert dict(row["headers"])["Subject"] == first["Subject"]
            assert _parts(row) == _delivered_parts(first)
            html = _delivered_parts(first)["text/html"]
            assert "<h2>" not in html and "-- <br />" in html  # the signature's delimiter is not a heading
        assert {d["Subject"] for d in got if d["Subject"].endswith("?")}  # both variants were sent
        assert any(d["Subject"].startswith("An idea") for d in got)
        if sqlite:
            assert _dump(project) == dump  # the previews wrote nothing
        assert len(server.recorder.deliveries) == 8  # and sent nothing
    finally:
        server.stop()


def test_preview_says_what_is_wrong_and_where(project: Project) -> None:
    _cadence(project)
    project.write()
    people = project.csv(["p0@prospects.example,Ann,Co", "not-an-address,Bo,Co", "", "p2@prospects.example,Cy,Co"])
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--row", "2")
    assert r.code == 2 and f"{people}:3: not a valid email address" in r.err
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--row", "3", "--json")
    assert r.code == 0, r.err
    assert r.json()["to"] == "p2@prospects.example" and r.json()["prospect"]["line"] == 5  # the blank line skipped
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--row", "4")
    assert r.code == 1 and "no row 4" in r.err
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--variant", "tall")
    assert r.code == 2 and "no variant 'tall' (its variants: short, long)" in r.err
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--step", "3")
    assert r.code == 2 and "cadence 'c1' has steps 1 to 2" in r.err
    r = project.run("preview", "--cadence", "c2", "--csv", str(people))
    assert r.code == 1 and "no cadence c2; did you mean c1?" in r.err
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--variant", "long")
    assert r.code == 0 and "Subject: An idea for Co" in r.out and "Dear Ann," in r.out
    r = project.run("preview", "--cadence", "c1", "--csv", str(people), "--variant", "short", "--raw")
    assert r.code == 0 and r.out.startswith("From: Mb1 <mb1@alice.example>\r\n") and "Subject: Co?\r\n" in r.out
    assert project.enroll(project.people(1)).code == 0
    r = project.run("preview", "--cadence", "c1", "--prospect", "p0@prospect.example")
    assert r.code == 1 and "no prospect p0@prospect.example; did you mean p0@prospects.example?" in r.err
    r = project.run("preview", "--cadence", "c1", "--prospect", "p0@prospects.example", "--row", "1")
    assert r.code == 2 and "--row and --mailbox go with --csv" in r.err
    r = project.run("preview", "--cadence", "c1", "--prospect", "p0@prospects.example")
    assert r.code == 0, r.err
    assert "# the unsubscribe link is made at the send" in r.out and "step 1 variant" in r.out


def test_a_signature_in_markdown_keeps_its_lines() -> None:
    signature = compose.markdown_signature("-- \nSam **Sender**\nsam@x.example\n\n===\nP.S.")
    html = compose.markdown_html("Hi there\n" + signature)
    assert "<h1>" not in html and "<h2>" not in html
    assert "-- <br />\nSam <strong>Sender</strong><br />\nsam@x.example</p>" in html
    assert "<p>===<br />\nP.S.</p>" in html
