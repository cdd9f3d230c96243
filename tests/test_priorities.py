"""Follow-ups before new prospects (SPEC §4 `prioritize`), over a real daemon and aiosmtpd: each follow-up
leaves at its due time, before the first emails still waiting; `prioritize = "due"` keeps the old order."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, query
from tests.servers import SmtpServer

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes

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
