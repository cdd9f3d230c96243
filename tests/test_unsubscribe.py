"""Unsubscribe (SPEC §11): the headers every message carries, the mail that comes back, the operator's list."""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from daemon import unsubscribe
from daemon.imap import says_unsubscribe
from tests.conftest import Project
from tests.daemon_helpers import query, running, until
from tests.imap_server import Dovecot, needs_dovecot
from tests.servers import Pki, SmtpServer
from tests.test_imap import mail

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores, pytest.mark.slow]
LAYOUTS = sorted((Path(__file__).resolve().parent / "unit" / "replies").glob("*.txt"))  # test_replies.py's corpus


def db(project: Project) -> Path | str:
    return project.database


def test_a_token_names_its_enrollment_and_cannot_be_made_for_another() -> None:
    key = bytes(range(32))
    t = unsubscribe.token(key, 42)
    assert unsubscribe.found(key, f"Re: unsubscribe-{t}") == 42
    assert unsubscribe.found(key, f"UNSUBSCRIBE-{t.upper()}") == 42  # a client may change the case
    forged = t.replace("42-", "43-", 1)
    assert unsubscribe.found(key, f"unsubscribe-{forged}") is None
    assert unsubscribe.found(bytes(32), f"unsubscribe-{t}") is None  # another database's key
    assert unsubscribe.found(key, "unsubscribe-42-" + "a" * 26) is None
    # The token of the first release (base64.b32encode of the whole HMAC): tokens already sent stay good.
    for enrollment in (1, 42, 10**17):
        digest = hmac.new(key, f"enrollment:{enrollment}".encode(), hashlib.sha256).digest()
        first = f"{enrollment}-{base64.b32encode(digest).decode().lower()[:26]}"
        assert unsubscribe.token(key, enrollment) == first


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("Unsubscribe\r\n", True),
        ("remove me.\r\n\r\nOn Mon, 1 Dec 2026, Sam wrote:\r\n> Hi Pat\r\n", True),
        ("Abmelden!\r\n-- \r\nPat\r\n", True),
        ("STOP\r\n", True),
        ("Please stop by next week, we can talk then.\r\n", False),
        ("Sounds good.\r\n> unsubscribe\r\n", False),
        ("", False),
    ],
)
def test_a_reply_that_only_asks_to_unsubscribe(body: str, expected: bool) -> None:
    raw = mail("p0@prospects.example", "mb1@alice.example", "Re: hi").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert says_unsubscribe(raw + body.encode()) is expected


@pytest.fixture
def stack(project: Project, tmp_path: Path) -> Iterator[tuple[SmtpServer, Dovecot]]:
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}, idle=False).start()
    smtp = SmtpServer().start()
    (tmp_path / "imap-pw").write_text("imap-pw")
    project.data["defaults"].update({"gap": "0s", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]})
    project.data["defaults"]["hours"] = ["00:00-24:00"]
    project.add_mailboxes(
        1,
        smtp=smtp.smtp_config(),
        imap=dovecot.imap_config("alice", tmp_path / "imap-pw", pki.ca_file, poll="1s"),
        unsubscribe_url="https://acme.example/unsubscribe?t={{ token }}&e={{ email | urlencode }}",
    )
    cadence = project.add_cadence(steps=2)
    cadence["steps"][0]["body"] = "Hi {{ first_name }}\n\nNot for you? {{ unsubscribe_url }}\n"
    cadence["steps"][1]["wait"] = "3s"
    try:
        yield smtp, dovecot
    finally:
        smtp.stop()
        dovecot.cleanup()


@needs_dovecot
async def test_headers_and_the_mail_that_comes_back_stop_the_cadence(
    project: Project, stack: tuple[SmtpServer, Dovecot]
) -> None:
    smtp, dovecot = stack
    box = "mb1@alice.example"
    project.enroll(project.people(4))
    with structlog.testing.capture_logs() as logs:
        async with running(project.write()):
            await until(lambda: [e for e in logs if e["event"] == "imap.watching"], what="the watcher")
            firsts = await anyio.to_thread.run_sync(smtp.recorder.wait_for, 4)
            sent = {d.recipient: d.headers for d in firsts}  # the whole message, parsed
            mailtos = {}
            for prospect, message in sent.items():
                mailto, link = (u.strip(" <>") for u in str(message["List-Unsubscribe"]).split(","))
                assert mailto.startswith(f"mailto:{box}?subject=unsubscribe-")
                assert link.startswith("https://acme.example/unsubscribe?t=")
                assert urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["e"] == [prospect]
                assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
                assert link in message.get_content()  # {{ unsubscribe_url }} in the body
                mailtos[prospect] = mailto
            # p0 presses the client's unsubscribe button; p1 replies "Unsubscribe"; p2 replies something else.
            subject = urllib.parse.parse_qs(urllib.parse.urlsplit(mailtos["p0@prospects.example"]).query)["subject"]
            dovecot.deliver("alice", mail("p0@prospects.example", box, subject[0]))
            p1 = mail("p1@prospects.example", box, "Re: hi", in_reply_to=sent["p1@prospects.example"]["Message-ID"])
            dovecot.deliver("alice", p1.replace(b"Thanks, sounds good.", b"Unsubscribe"))
            dovecot.deliver(
                "alice",
                mail("p2@prospects.example", box, "Re: hi", in_reply_to=sent["p2@prospects.example"]["Message-ID"]),
            )
            await until(lambda: len([e for e in logs if e["event"] == "unsubscribe.detected"]) == 2)
            await anyio.to_thread.run_sync(smtp.recorder.wait_for, 5)  # p3's follow-up, and no one else's
    states = dict(query(db(project), "SELECT email, state FROM enrollments"))
    assert states == {
        "p0@prospects.example": "stopped",
        "p1@prospects.example": "stopped",
        "p2@prospects.example": "replied",
        "p3@prospects.example": "finished",
    }
    suppressed = project.run("suppressions", "--json").json()["suppressions"]
    assert sorted((s["email"], s["reason"]) for s in suppressed) == [
        ("p0@prospects.example", "unsubscribed"),
        ("p1@prospects.example", "unsubscribed"),
    ]
    assert [d.recipient for d in smtp.recorder.deliveries[4:]] == ["p3@prospects.example"]
    assert {e["how"] for e in logs if e["event"] == "unsubscribe.detected"} == {
        "List-Unsubscribe mailto",
        "a reply that says only to unsubscribe",
    }


def test_the_operator_suppresses_and_lifts(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence(steps=2)
    project.enroll(project.people(3))
    done = project.run(
        "suppress", "P0@prospects.example", "p1@prospects.example", "--reason", "asked by phone", "--json"
    )
    assert done.code == 0, done.err
    assert {a: len(ids) for a, ids in done.json()["cancelled"].items()} == {
        "p0@prospects.example": 1,
        "p1@prospects.example": 1,
    }
    listed = project.run("suppressions", "--json").json()["suppressions"]
    assert [(s["email"], s["reason"]) for s in listed] == [
        ("p0@prospects.example", "asked by phone"),
        ("p1@prospects.example", "asked by phone"),
    ]
    again = project.enroll(project.people(3))
    assert again.json()["enrolled"] == 0  # suppressed, and p2 already enrolled
    bad = project.run("unsuppress", "p0@prospects.example", "not an address")
    assert bad.code == 2 and "not an email address: 'not an address'" in bad.err
    lifted = project.run("unsuppress", "p0@prospects.example", "p9@prospects.example", "--json").json()
    assert lifted == {"unsuppressed": ["p0@prospects.example"], "not_suppressed": ["p9@prospects.example"]}
    assert [s["email"] for s in project.run("suppressions", "--json").json()["suppressions"]] == [
        "p1@prospects.example"
    ]


@needs_dovecot
async def test_unsubscribe_replies_of_every_client_layout_suppress(
    project: Project, stack: tuple[SmtpServer, Dovecot]
) -> None:
    """Each layout of tests/unit/replies/ sent back through Dovecot by its own prospect: the ones that only say
    "unsubscribe" (under a phone signature, Outlook's block, a wrapped attribution…) suppress; the others reply."""
    smtp, dovecot = stack
    box = "mb1@alice.example"
    layouts = LAYOUTS
    project.data["cadences"][0]["steps"][1]["wait"] = "1d"
    project.enroll(project.people(len(layouts)))
    with structlog.testing.capture_logs() as logs:
        async with running(project.write()):
            await until(lambda: [e for e in logs if e["event"] == "imap.watching"], what="the watcher")
            firsts = await anyio.to_thread.run_sync(smtp.recorder.wait_for, len(layouts))
            ids = {d.recipient: d.headers["Message-ID"] for d in firsts}
            for i, layout in enumerate(layouts):
                prospect = f"p{i}@prospects.example"
                head = mail(prospect, box, "Re: hi", in_reply_to=ids[prospect]).split(b"\r\n\r\n")[0]
                head += b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8"
                dovecot.deliver("alice", head + b"\r\n\r\n" + layout.read_bytes())
            done = {"unsubscribe.detected", "reply.detected"}
            await until(lambda: len([e for e in logs if e["event"] in done]) == len(layouts), within=30)
    states = dict(query(db(project), "SELECT email, state FROM enrollments"))
    suppressed = {s["email"] for s in project.run("suppressions", "--json").json()["suppressions"]}
    for i, layout in enumerate(layouts):
        prospect = f"p{i}@prospects.example"
        wanted = ("replied", False) if layout.stem.startswith("not-") else ("stopped", True)
        assert (states[prospect], prospect in suppressed) == wanted, layout.stem
