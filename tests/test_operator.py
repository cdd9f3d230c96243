"""Operator actions do what they say: reload, one daemon per database, the config the daemon runs."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query, states
from tests.servers import Authenticator, SmtpServer


def test_reload_with_a_fixed_password_reconnects(project: Project, tmp_path: Path) -> None:
    """The seed's flow: fix the password, reload, and the held emails go out, from the same mailbox."""
    auth = Authenticator("mb1@alice.example", "the-new-one")
    server = SmtpServer(auth=auth).start()
    try:
        secret = tmp_path / "pw"
        secret.write_text("the-old-one")
        project.data["defaults"]["gap"] = "0s"
        project.data["daemon"]["probe_backoff"] = "30m-30m"  # only the reload can bring it back in time
        project.add_mailboxes(
            1,
            smtp=server.smtp_config(username="mb1@alice.example", password_file=str(secret), allow_plaintext=True),
        )
        project.add_cadence()
        project.enroll(project.people(3))
        daemon = DaemonProcess(project.config_path)
        try:
            daemon.wait_event("mailbox.disconnected")
            secret.write_text("the-new-one")
            # The file on disk is the same, but what it points to changed: the daemon still runs the old secret.
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("config.reloaded", after=mark, mailboxes_changed=["mb1@alice.example"])
            daemon.wait_event("mailbox.reconnected", after=mark)
            server.recorder.wait_for(3)
            eventually(lambda: states(project.root / "cadenced.db") == {"sent": 3})
            # The reverse: a password changed away from the good one is used from the next transaction on.
            secret.write_text("wrong-again")
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("config.reloaded", after=mark)
            project.enroll(project.people(1, start=10, name="more.csv"))
            daemon.wait_event("mailbox.disconnected", after=mark)
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        assert len(server.recorder.deliveries) == 3
    finally:
        server.stop()


def test_a_second_daemon_on_the_same_database_is_refused(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.write()
        first = DaemonProcess(project.config_path)
        try:
            first.wait_event("daemon.started")
            second = DaemonProcess(project.config_path)
            assert second.wait(within=20) == 1
            assert f"another cadenced run (pid {first.proc.pid}) already runs on" in "\n".join(second.lines)
            assert first.proc.poll() is None
        finally:
            first.signal(signal.SIGTERM)
            assert first.wait() == 0
        # Once the first is gone, a new one starts.
        third = DaemonProcess(project.config_path)
        try:
            third.wait_event("daemon.started")
        finally:
            third.signal(signal.SIGTERM)
            assert third.wait() == 0
    finally:
        server.stop()


def test_commands_warn_when_the_daemon_runs_another_config(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.write()
        daemon = DaemonProcess(project.config_path)
        try:
            daemon.wait_event("daemon.started")
            assert "reload to apply" not in project.run("status", write=False).err
            project.add_mailboxes(1, smtp=server.smtp_config())
            for command in (["status"], ["outbox"], ["enroll", "--cadence", "c1", "--as", "alice", "x.csv"]):
                project.people(1, name="x.csv")
                result = project.run(*command)
                assert f"the running daemon (pid {daemon.proc.pid}) runs an older version" in result.err, command
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("config.reloaded", after=mark)
            assert "reload to apply" not in project.run("status", write=False).err
            # A change of database is refused on reload: the old config keeps running.
            project.data["daemon"]["database"] = str(project.root / "other.db")
            project.write()
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            failed = daemon.wait_event("config.reload_failed", after=mark)
            assert any("restart to change the database" in e for e in failed["errors"])
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
    finally:
        server.stop()


def test_sigterm_cuts_a_slow_transaction_at_the_end_of_the_grace(project: Project) -> None:
    """A 20 s DATA and a 2 s grace: the stop takes about 2 s, and the message is recorded `uncertain`."""
    server = SmtpServer()
    in_data, release = threading.Event(), threading.Event()

    def slow(rcpt: str) -> None:
        in_data.set()
        release.wait(20)

    server.recorder.on_data = slow
    server.start()
    try:
        project.data["daemon"]["shutdown_grace"] = "2s"
        project.add_mailboxes(1, smtp=server.smtp_config(timeout="60s"))
        project.add_cadence()
        project.enroll(project.people(1))
        daemon = DaemonProcess(project.config_path)
        try:
            assert in_data.wait(20)
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            took = time.monotonic() - started
        finally:
            release.set()
            daemon.kill()
        assert 1.5 < took < 10, took
        cut = [e for e in daemon.events() if e["event"] == "message.error"]
        assert cut and cut[0]["reason"] == "uncertain" and "shutdown_grace (2s)" in cut[0]["detail"]
        assert daemon.events()[-1]["in_flight_cancelled"] == 1
        assert query(project.root / "cadenced.db", "SELECT state, reason FROM messages") == [("error", "uncertain")]
    finally:
        server.stop()
