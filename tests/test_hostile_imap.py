"""A hostile IMAP server cannot stop sending, grow the daemon, or keep the watcher down."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, query
from tests.hostile_imap import SCENARIOS, HostileImap
from tests.servers import SmtpServer

pytestmark = [pytest.mark.both_stores, pytest.mark.slow]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_hostile_imap_answers_are_contained(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_PW", "hostile-pw")
    imap = HostileImap().start()
    smtp = SmtpServer().start()
    try:
        project.data["defaults"]["gap"] = "0s"
        imap_config = {
            "host": "127.0.0.1",
            "port": imap.port,
            "security": "none",
            "allow_plaintext": True,
            "username": "u",
            "password_env": "HOSTILE_PW",
            "timeout": "5s",
        }
        [watched] = project.add_mailboxes(1, smtp=smtp.smtp_config(), imap=imap_config, sent_copies="provider")
        project.add_mailboxes(1, smtp=smtp.smtp_config())
        project.data["daemon"]["settle_after"] = "0s"
        project.add_cadence(rotate_among="cadence")
        project.enroll(project.people(6))
        db = project.database
        # One message of the watched mailbox was caught mid-send: the provider filed it in "Sent Items".
        query(
            db,
            "UPDATE messages SET state = 'error', reason = 'uncertain', message_id = '<cadenced.1.1.aa@alice.example>' "
            "WHERE id = 1",
        )
        assert query(db, "SELECT mailbox FROM messages WHERE id = 1") == [(watched,)]
        daemon = DaemonProcess(project.config_path)
        try:
            daemon.wait_event("daemon.started")
            smtp.recorder.wait_for(5, timeout=30)

            # Each scenario in turn: the watcher backs off 1, 2, 4, 8 s and reaches the well-behaved one.
            def recovered() -> bool:
                names = [e["event"] for e in daemon.events()]
                errors = [i for i, n in enumerate(names) if n == "imap.error"]
                return len(errors) >= 4 and "imap.watching" in names[errors[3] :]

            deadline = time.monotonic() + 60
            while not recovered():
                assert time.monotonic() < deadline, "the watcher did not get back to a well-behaved session"
                time.sleep(0.1)
            daemon.wait_event("message.settled", within=10, sent=True)
            peak = peak_rss_mb(daemon.proc.pid)
            assert daemon.proc.poll() is None
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        errors = [e["detail"] for e in daemon.events() if e["event"] == "imap.error"]
        assert any("number out of range" in e for e in errors), errors
        assert any("announced a literal of 10000000000 bytes" in e for e in errors), errors
        assert any("a line longer than" in e for e in errors), errors
        assert imap.seen[: len(SCENARIOS)] == list(SCENARIOS)  # reconnected after each
        assert '"Sent Items"' in imap.selected  # taken exactly as listed, quoted
        assert peak < 100, f"peak RSS {peak:.0f} MB"
        assert imap.streamed < 64 * 1024 * 1024  # it stopped reading long before the server stopped writing
        assert len(smtp.recorder.deliveries) == 5  # every mailbox went on sending; the settled one not again
        assert query(db, "SELECT state, count(*) FROM messages GROUP BY state") == [("sent", 6)]
    finally:
        smtp.stop()
        imap.stop()
