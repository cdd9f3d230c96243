"""Operator actions do what they say: reload, one daemon per database, the config the daemon runs."""

from __future__ import annotations

import encodings.idna  # noqa: F401 (looked up lazily by socket.getfqdn, after the uid can no longer read it)
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest
import tomli_w

from daemon.cli import main
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query, states
from tests.servers import Authenticator, SmtpServer

pytestmark = [pytest.mark.both_stores, pytest.mark.slow]


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
            eventually(lambda: states(project.database) == {"sent": 3})
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
            assert f"another cadenced run (pid {first.proc.pid}" in "\n".join(second.lines)
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
        assert query(project.database, "SELECT state, reason FROM messages") == [("error", "uncertain")]
    finally:
        server.stop()


def run_as(uid: int, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`cadenced ARGS` in a child that has dropped to `uid` (as setpriv --reuid does), with what it printed.

    A fork of this interpreter, not a new one: the Python installation may sit where that uid cannot read.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, then run the command
        os.close(read)
        sys.stdout = sys.stderr = os.fdopen(write, "w", encoding="utf-8")
        code = 70
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.environ.update(env)
            code = main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, encoding="utf-8", errors="replace") as out:
        text = out.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.mark.skipif(os.geteuid() != 0, reason="changing to an unprivileged uid needs root")
@pytest.mark.parametrize("config_dir_mode", [0o755, 0o750], ids=["as-documented", "the-old-0750"])
def test_the_documented_install_works_for_an_unprivileged_dynamic_user(config_dir_mode: int) -> None:
    """README's steps, replayed in a temporary root; the service's uid is an unprivileged one (as DynamicUser)."""
    root = Path(tempfile.mkdtemp(prefix="cadenced-install-"))
    try:
        root.chmod(0o755)
        etc, secrets, creds, state = root / "etc", root / "etc" / "secrets", root / "creds", root / "state"
        etc.mkdir(mode=config_dir_mode)
        etc.chmod(config_dir_mode)
        secrets.mkdir(mode=0o700)
        (secrets / "alice").write_text("the-smtp-password\n")
        (secrets / "alice").chmod(0o600)
        config = etc / "config.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "daemon": {"database": str(state / "cadenced.db")},
                    "users": [{"name": "alice"}],
                    "mailboxes": [
                        {
                            "address": "alice@acme.example",
                            "owner": "alice",
                            "helo_name": "mail.acme.example",
                            "smtp": {"host": "smtp.acme.example", "username": "alice", "credential": "smtp-alice"},
                        }
                    ],
                    "cadences": [{"name": "q4", "users": ["alice"], "steps": [{"subject": "Hi", "body": "Hello"}]}],
                }
            )
        )
        config.chmod(0o644)
        # What systemd does: LoadCredential= copies the root-only secret to a folder the service's uid can read.
        creds.mkdir(mode=0o500)
        shutil.copy(secrets / "alice", creds / "smtp-alice")
        (creds / "smtp-alice").chmod(0o400)
        state.mkdir(mode=0o700)
        for path in (creds, creds / "smtp-alice", state):
            os.chown(path, NOBODY, NOBODY)
        code, err = run_as(NOBODY, ["--config", str(config), "check"], {"CREDENTIALS_DIRECTORY": str(creds)})
        if config_dir_mode == 0o755:
            assert code == 0, err
            assert "the-smtp-password" not in err
        else:
            assert code == 2 and "Permission denied" in err, err
    finally:
        shutil.rmtree(root)


NOBODY = 65534


def test_a_sender_loop_that_fails_forever_starves_the_watchdog(project: Project, tmp_path: Path) -> None:
    server = SmtpServer().start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)
    try:
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.enroll(project.people(1))
        query(project.database, "UPDATE enrollments SET fields = '{broken'")  # a damaged row
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
        daemon = DaemonProcess(project.config_path, env=env)
        try:
            unhealthy = daemon.wait_event("daemon.unhealthy", within=30)
            assert unhealthy["stuck_mailboxes"] == ["mb1@alice.example"]
            # From then on: no WATCHDOG=1 in three watchdog intervals (systemd would restart the unit).
            sock.setblocking(False)
            while True:  # what was sent before it was found stuck
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
            sock.settimeout(0.2)
            pings, deadline = 0, time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    pings += sock.recv(4096).decode().split("\n").count("WATCHDOG=1")
                except TimeoutError:
                    pass
            assert pings <= 1  # one may have been on its way when the loop was found stuck
        finally:
            daemon.signal(signal.SIGTERM)
            daemon.wait()
    finally:
        sock.close()
        server.stop()


def test_the_small_things(project: Project) -> None:
    """plan --days must be at least 1; check tries the database folder; a closed pipe ends `status` quietly."""
    project.add_mailboxes(1)
    project.add_cadence()
    with pytest.raises(SystemExit) as usage:
        project.run("plan", "--days", "-5")
    assert usage.value.code == 2
    project.data["daemon"]["database"] = "/proc/nope/x.db"
    check = project.run("check")
    assert check.code == 2 and "daemon.database: cannot create /proc/nope/x.db" in check.err
    project.data["daemon"]["database"] = str(project.database)
    project.enroll(project.people(200))
    cmd = [sys.executable, "-m", "daemon", "--config", str(project.config_path), "outbox"]
    run = subprocess.run(f"{' '.join(cmd)} | head -3", shell=True, capture_output=True, text=True, check=False)
    assert run.stdout.count("\n") == 3 and run.stderr == "", run.stderr
    assert run.stdout.split()[:7] == ["ID", "STATE", "CADENCE", "MAILBOX", "PROSPECT", "WHEN", "WHY"]


def test_read_commands_use_the_running_config_when_the_file_is_broken_or_differs(project: Project) -> None:
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config(), daily_limit=200)
        project.add_cadence()
        project.write()
        project.enroll(project.people(3))
        daemon = DaemonProcess(project.config_path)
        try:
            daemon.wait_event("daemon.started")
            # Edited, not reloaded: the commands read what the daemon runs, and say so first.
            project.data["mailboxes"][0]["daily_limit"] = 199
            project.write()
            status = project.run("status", "--json", write=False)
            assert status.code == 0, status.err
            assert status.err.startswith(f"note: the running daemon (pid {daemon.proc.pid}) runs an older version")
            assert "until then this reads the configuration it runs" in status.err
            assert status.json()["mailboxes"][0]["daily_limit"] == 200
            # Broken on disk: status, outbox, plan, prospect show and cadence list still answer.
            project.config_path.write_text(project.config_path.read_text() + "\n[[cadences]\nname = 'x'\n")
            for command in (
                ["status", "--json"],
                ["outbox", "--json"],
                ["plan", "--json"],
                ["prospect", "show", "p1@prospects.example", "--json"],
                ["cadence", "list", "--json"],
            ):
                r = project.run(*command, write=False)
                assert r.code == 0, (command, r.err)
                assert r.err.startswith("note: ") and "cannot be used (invalid TOML" in r.err, (command, r.err)
                json.loads(r.out)
            # A command that changes something still needs the file.
            r = project.run("cadence", "pause", "c1", write=False)
            assert r.code == 2 and "invalid TOML" in r.err
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
    finally:
        server.stop()
