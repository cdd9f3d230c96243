"""A server that echoes the password: it appears nowhere. One AUTH per login; the EHLO name is ours to set."""

from __future__ import annotations

import base64
import re
import signal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import redact
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess
from tests.servers import EchoingAuthenticator, SmtpServer

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes

SECRET = "Wr0ng-Secret-42!"


def forms(user: str) -> list[str]:
    raw = SECRET.encode()
    return [
        SECRET,
        base64.b64encode(raw).decode(),
        base64.b64encode(b"\0" + user.encode() + b"\0" + raw).decode(),
    ]


def test_an_echoed_password_reaches_no_log_database_or_output(project: Project, tmp_path: Path) -> None:
    auth = EchoingAuthenticator("mb1@alice.example", "the-right-one")
    server = SmtpServer(auth=auth).start()
    try:
        (tmp_path / "pw").write_text(SECRET + "\n")
        project.data["defaults"]["gap"] = "0s"
        project.data["daemon"]["probe_backoff"] = "1s-1s"
        project.add_mailboxes(
            1,
            helo_name="mail.acme.example",
            smtp=server.smtp_config(
                username="mb1@alice.example", password_file=str(tmp_path / "pw"), allow_plaintext=True
            ),
        )
        project.add_cadence()
        project.enroll(project.people(2))
        daemon = DaemonProcess(project.config_path)
        try:
            down = daemon.wait_event("mailbox.disconnected")
            daemon.wait_event("mailbox.probe_failed")
            daemon.wait_event("mailbox.probe_failed", after=daemon.mark())
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        assert "***" in down["detail"]  # the server did echo, and what it echoed was masked
        outputs = {
            "log": "\n".join(daemon.lines),
            "outbox": project.run("outbox", "--json").out,
            "status": project.run("status", "--json").out,
        }
        test = project.run("mailbox", "test", "mb1@alice.example")
        assert test.code == 1 and "***" in test.err
        outputs["mailbox test"] = test.out + test.err
        stored = b"".join(p.read_bytes() for p in project.root.glob("cadenced.db*"))
        for form in forms("mb1@alice.example"):
            for where, text in outputs.items():
                assert form not in text, f"{form!r} in {where}"
            assert form.encode() not in stored, f"{form!r} in the database files"
        # One AUTH per connection, with one mechanism: a wrong password costs one failed login, not two.
        assert len(auth.attempts) == len(server.recorder.helo_names) >= 3
        assert set(auth.attempts) == {"PLAIN"}
        assert set(server.recorder.helo_names) == {"mail.acme.example"}
    finally:
        server.stop()


def test_redaction_covers_the_wire_forms() -> None:
    redact.register("user@example.com", "p4ss-word-xyz")
    plain = base64.b64encode(b"\0user@example.com\0p4ss-word-xyz").decode()
    login = base64.b64encode(b"p4ss-word-xyz").decode()
    text = f"535 bad {plain} / {login} / p4ss-word-xyz / fine"
    assert redact.clean(text) == "535 bad *** / *** / *** / fine"


def test_a_helo_name_that_is_no_host_name_is_refused(project: Project) -> None:
    project.add_mailboxes(1, helo_name="localhost")
    project.add_cadence()
    result = project.run("check")
    assert result.code == 2
    assert "mailboxes[0].helo_name: must be a fully qualified host name" in result.err


@settings(max_examples=300, deadline=None)
@given(
    words=st.sets(st.text(alphabet="ab+/=Zz0\\.*()[", min_size=4, max_size=9), min_size=1, max_size=40),
    text=st.text(alphabet="ab+/=Zz0\\.*()[ x", max_size=80),
)
def test_the_prefix_tree_pattern_masks_what_an_alternation_of_the_words_masks(words: set[str], text: str) -> None:
    """redact's one regex for thousands of secrets matches as the plain alternation, longest first, would."""
    plain = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    tree = re.compile(redact.trie_pattern(words))
    assert tree.sub("*", text) == plain.sub("*", text)
    for word in words:
        assert tree.fullmatch(word)


def test_two_thousand_mailboxes_secrets_are_all_masked() -> None:
    """2,000 mailboxes' secrets (14,000 forms) in one prefix-tree regex, compiled once when first needed."""
    saved = set(redact._forms)
    try:
        for i in range(2000):
            redact.register(f"user{i}@big.example", f"secret-{i:05d}-{'q' * (i % 7)}")
        assert redact._pattern is None  # registering compiles nothing
        plain = redact._b64(b"\0user7@big.example\0secret-00007-")
        line = f"535 auth failed for user1999@big.example: {plain}; echo secret-01234-qq back"
        assert redact.redact(line) == "535 auth failed for user1999@big.example: ***; echo *** back"
    finally:
        with redact._lock:
            redact._forms.clear()
            redact._forms.update(saved)
            redact._pattern = None
