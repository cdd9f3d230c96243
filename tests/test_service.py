"""Operating it: the unit file, sd_notify, SIGHUP reload, SIGTERM drain, JSON logs, secrets kept out."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, query
from tests.servers import Authenticator, Pki, SmtpServer

pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "cadenced.service"
SECRET = "s3cret-Pa55-do-not-log"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian: systemd)"
)
def test_unit_file_is_hardened_and_valid(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True, text=True, check=False
    )
    line = next(x for x in result.stdout.splitlines() if "Overall exposure level" in x)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.0, line
    # verify also checks that ExecStart= exists: point it at this installation's entry point.
    unit = tmp_path / "cadenced.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/cadenced", str(Path(sys.executable).parent / "cadenced")))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    text = UNIT.read_text()
    for expected in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "LoadCredential="):
        assert expected in text
    stop = int(next(x for x in text.splitlines() if x.startswith("TimeoutStopSec=")).split("=")[1].rstrip("s"))
    assert stop > 30  # the default shutdown_grace


def notify_socket(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"@cadenced-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name[1:])
    else:
        name = str(tmp_path / "notify.sock")
        sock.bind(name)
    sock.settimeout(20)
    return sock, name


def receive_until(sock: socket.socket, wanted: str, got: list[str]) -> list[str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        message = sock.recv(4096).decode()
        got.append(message)
        if wanted in message.split("\n"):
            return got
    raise AssertionError(f"no {wanted} in {got}")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_over_a_real_socket(project: Project, tmp_path: Path, abstract: bool) -> None:
    server = SmtpServer().start()
    sock, address = notify_socket(tmp_path, abstract)
    try:
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.write()
        daemon = DaemonProcess(project.config_path, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
        try:
            got: list[str] = []
            receive_until(sock, "READY=1", got)
            assert any(line.startswith("STATUS=1 mailboxes") for line in got[-1].split("\n"))
            receive_until(sock, "WATCHDOG=1", got)
            daemon.signal(signal.SIGHUP)
            receive_until(sock, "RELOADING=1", got)
            reloading = got[-1].split("\n")
            usec = int(next(x for x in reloading if x.startswith("MONOTONIC_USEC=")).split("=")[1])
            assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            receive_until(sock, "READY=1", got)
            daemon.signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1", got)
            assert daemon.wait() == 0
        finally:
            daemon.kill()
    finally:
        sock.close()
        server.stop()


def test_reload_applies_valid_config_and_keeps_the_old_one_otherwise(project: Project, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    auth = Authenticator("sender", SECRET)
    server = SmtpServer("starttls", pki=pki, auth=auth).start()
    try:
        (project.root / "pw").write_text(SECRET)
        smtp = server.smtp_config(username="sender", password_file="pw", ca_file=str(pki.ca_file))
        project.data["defaults"]["gap"] = "0s"
        (mb1,) = project.add_mailboxes(1, smtp=smtp)
        project.add_cadence()
        project.enroll(project.people(2))
        daemon = DaemonProcess(project.config_path)
        try:
            daemon.wait_event("daemon.started")
            server.recorder.wait_for(2)

            # Invalid TOML: the old config keeps running and sending.
            good = project.config_path.read_text()
            project.config_path.write_text(good + "\n[[mailboxes]\n")
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            failed = daemon.wait_event("config.reload_failed", after=mark)
            assert any("invalid TOML" in e for e in failed["errors"])
            project.config_path.write_text(good)
            assert project.enroll(project.people(1, start=10, name="more.csv")).code == 0
            server.recorder.wait_for(3)

            # Turning auto-rotate off on a cadence in use: refused with the count that pins it.
            project.data["cadences"][0]["auto_rotate"] = False
            project.write()
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            failed = daemon.wait_event("config.reload_failed", after=mark)
            assert any("fixed by 3 enrollments" in e for e in failed["errors"])
            project.data["cadences"][0]["auto_rotate"] = True

            # A new mailbox by reload takes its turn in the rotation (it is not flooded to catch up).
            (mb2,) = project.add_mailboxes(1, prefix="new", smtp=smtp)
            mark = daemon.mark()
            project.write()
            daemon.signal(signal.SIGHUP)
            reloaded = daemon.wait_event("config.reloaded", after=mark)
            assert reloaded["mailboxes_added"] == [mb2]
            result = project.enroll(project.people(2, start=20, name="again.csv"))
            assert result.json()["assignments"] == {project.data["mailboxes"][0]["address"]: 1, mb2: 1}
            server.recorder.wait_for(5)
            assert sum(d.sender == mb2 for d in server.recorder.deliveries) == 1

            # A removed mailbox's pending messages go to the error section, ready to reassign.
            later = (datetime.now(UTC).hour + 2) % 24  # mb2's window opens hours from now: its message waits
            project.data["mailboxes"][1]["hours"] = [f"{later:02d}:00-{later + 1:02d}:00"]
            project.write()
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("config.reloaded", after=mark)
            project.enroll(project.people(2, start=30, name="late.csv"))
            db = project.database
            stuck = query(db, "SELECT id FROM messages WHERE mailbox = ? AND state = 'scheduled'", mb2)
            assert len(stuck) == 1
            del project.data["mailboxes"][1]
            project.write()
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            reloaded = daemon.wait_event("config.reloaded", after=mark)
            assert reloaded["mailboxes_removed"] == [mb2]
            daemon.wait_event("message.error", after=mark, reason="mailbox_removed")
            assert query(db, "SELECT state, reason FROM messages WHERE id = ?", stuck[0][0]) == [
                ("error", "mailbox_removed")
            ]
            assert project.run("outbox", "reassign", "--id", str(stuck[0][0]), "--to", mb1).code == 0
            server.recorder.wait_for(7)

            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
        finally:
            daemon.kill()
        events = daemon.events()  # every line parses as JSON
        assert events[-1]["event"] == "daemon.stopped"
        assert all({"timestamp", "level", "event"} <= set(e) for e in events)
        assert not [line for line in daemon.lines if SECRET in line]
    finally:
        server.stop()


def test_sigterm_lets_a_slow_transaction_finish(project: Project) -> None:
    server = SmtpServer()
    in_data, release = threading.Event(), threading.Event()

    def slow(rcpt: str) -> None:
        in_data.set()
        release.wait(20)  # the server holds its answer until the daemon is stopping: in flight across SIGTERM

    server.recorder.on_data = slow
    server.start()
    try:
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.enroll(project.people(1))
        daemon = DaemonProcess(project.config_path)
        try:
            assert in_data.wait(20)
            daemon.signal(signal.SIGTERM)
            daemon.wait_event("daemon.stopping")
            release.set()
            assert daemon.wait() == 0
        finally:
            daemon.kill()
        stopped = daemon.events()[-1]
        assert stopped["event"] == "daemon.stopped"
        assert (stopped["sent"], stopped["in_flight_cancelled"]) == (1, 0)
        assert query(project.database, "SELECT state FROM messages") == [("sent",)]
        assert len(server.recorder.deliveries) == 1
    finally:
        server.stop()


def test_console_and_journald_formats(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.data["daemon"]["log_format"] = "console"
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.write()
        env = {"JOURNAL_STREAM": "8:12345"}
        cmd = [sys.executable, "-m", "daemon", "--config", str(project.config_path), "run"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert first.startswith("<6>") and "daemon.started" in first
        assert not first.lstrip("<6>").startswith("{")
        assert any(line.startswith("<6>") and "daemon.stopped" in line for line in rest.splitlines())
    finally:
        server.stop()
