"""Logs that summarize: a mailbox that waits says so once, with how many messages wait, whatever the backlog
(journald drops a service's lines past 10,000 in 30 s, `mailbox.disconnected` with them)."""

from __future__ import annotations

import signal
from datetime import UTC, datetime

import pytest

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, states
from tests.servers import SmtpServer

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes


def closed_window() -> str:
    """An hour of the day that begins two hours from now (UTC): the window is shut for a while yet."""
    hour = (datetime.now(UTC).hour + 2) % 24
    return f"{hour:02d}:00-{hour + 1:02d}:00"


def test_a_daemon_started_outside_its_window_with_100000_due_writes_a_few_lines(project: Project) -> None:
    project.add_mailboxes(2, hours=[closed_window()])
    project.add_cadence()
    project.write()
    assert project.enroll(project.people(100_000)).code == 0
    daemon = DaemonProcess(project.config_path)
    try:
        for address in ("mb1@alice.example", "mb2@alice.example"):
            waiting = daemon.wait_event("mailbox.waiting", within=60, mailbox=address, reason="window")
            assert waiting["deferred"] == 50_000
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        daemon.kill()
    assert len(daemon.lines) < 50, "\n".join(daemon.lines[:60])
    assert not [e for e in daemon.events() if e["event"] == "message.deferred"]  # per message: debug only


def test_reaching_a_limit_with_5000_waiting_is_one_line(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config(), daily_limit=3, gap="0s")
        project.add_cadence()
        project.write()
        assert project.enroll(project.people(5_000)).code == 0
        daemon = DaemonProcess(project.config_path)
        try:
            reached = daemon.wait_event("mailbox.limit_reached", within=60)
            assert reached["deferred"] == 4_997 and reached["sent_today"] == 3
            eventually(lambda: states(project.database).get("sent") == 3)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        finally:
            daemon.kill()
    finally:
        server.stop()
    events = [e["event"] for e in daemon.events()]
    assert events.count("mailbox.limit_reached") == 1
    assert "message.deferred" not in events
    assert len(events) < 40, events
