"""The database never kills the daemon: busy past the timeout, disk full, a damaged file."""

from __future__ import annotations

import resource
import signal
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import anyio
import pytest

from daemon.config import load_config
from daemon.errors import StoreError
from daemon.service import INTEGRITY_WAIT_SIZE, Daemon, integrity_wait
from daemon.store import IntegrityCheck
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query, states
from tests.servers import SmtpServer

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes


def setup(project: Project, server: SmtpServer, n: int) -> Path:
    project.data["defaults"]["gap"] = "0s"
    project.data["daemon"]["busy_timeout"] = "1s"
    project.add_mailboxes(1, smtp=server.smtp_config())
    project.add_cadence()
    project.enroll(project.people(n))
    return project.root / "cadenced.db"


def test_a_write_lock_held_past_the_timeout_pauses_sending_and_loses_nothing(project: Project) -> None:
    server = SmtpServer().start()
    db = setup(project, server, 6)
    release = threading.Event()
    holder: list[sqlite3.Connection] = []

    def lock_on_second_send(recipient: str) -> None:
        # Another process takes the write lock just as the server accepts message 2: its commit must wait.
        if recipient == "p1@prospects.example" and not holder:
            conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN IMMEDIATE")
            holder.append(conn)
            threading.Timer(4.0, release.set).start()

    server.recorder.on_data = lock_on_second_send
    daemon = DaemonProcess(project.config_path)
    try:
        daemon.wait_event("store.error", within=30)
        assert "another process holds the write lock" in daemon.wait_event("store.error")["detail"]
        assert daemon.proc.poll() is None
        release.wait(10)
        holder[0].execute("ROLLBACK")
        holder[0].close()
        daemon.wait_event("store.recovered", within=30)
        server.recorder.wait_for(6, timeout=30)
        eventually(lambda: states(db) == {"sent": 6}, what="every accepted send recorded")
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        server.stop()
    assert states(db) == {"sent": 6}
    assert Counter(d.recipient for d in server.recorder.deliveries) == {f"p{i}@prospects.example": 1 for i in range(6)}
    assert query(db, "SELECT count(*) FROM daily_counts WHERE sent = 6") == [(1,)]


def test_a_full_disk_pauses_sending_and_records_what_the_server_accepted(project: Project) -> None:
    """RLIMIT_FSIZE on the daemon makes every database write fail as on a full disk (EFBIG)."""
    server = SmtpServer().start()
    db = setup(project, server, 5)
    daemon = DaemonProcess(project.config_path)
    limited = threading.Event()

    def fill_the_disk(recipient: str) -> None:
        if recipient == "p2@prospects.example" and not limited.is_set():
            resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
            limited.set()

    server.recorder.on_data = fill_the_disk
    try:
        error = daemon.wait_event("store.error", within=30)
        assert "full" in error["detail"] or "I/O" in error["detail"], error
        assert daemon.proc.poll() is None
        accepted = len(server.recorder.deliveries)
        assert accepted == 3  # p2 was accepted; nothing more is sent while its commit fails
        status = project.run("status", "--json").json()["daemon"]
        assert status["running"] is True
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        daemon.wait_event("store.recovered", within=30)
        server.recorder.wait_for(5, timeout=30)
        eventually(lambda: states(db) == {"sent": 5}, what="every accepted send recorded")
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        server.stop()
    assert states(db) == {"sent": 5}
    assert Counter(d.recipient for d in server.recorder.deliveries) == {f"p{i}@prospects.example": 1 for i in range(5)}


def damage(db: Path, number: int | None = None) -> None:
    """Overwrite a page (page `number`, else one near the end), as a bad disk would."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 4
    with db.open("r+b") as f:
        f.seek(page * ((number or pages - 1) - 1))
        f.write(b"\xde\xad\xbe\xef" * (page // 4))


def test_a_damaged_database_is_refused_before_anything_is_sent(project: Project) -> None:
    server = SmtpServer().start()
    try:
        db = setup(project, server, 300)
        damage(db)
        daemon = DaemonProcess(project.config_path)
        code = daemon.wait(within=30)
        assert code == 2
        assert "damaged" in "\n".join(daemon.lines)
        assert server.recorder.deliveries == []
        check = project.run("check")
        assert check.code == 2 and "damaged" in check.err
    finally:
        server.stop()


@pytest.mark.anyio
async def test_damage_found_while_sending_stops_the_daemon(project: Project) -> None:
    """A large database is checked beside sending (the check reads the whole file); damage found then stops
    the daemon as at start. `integrity_wait=0` stands for a file too large to check within the wait."""
    server = SmtpServer().start()
    try:
        db = setup(project, server, 300)
        with sqlite3.connect(db) as conn:  # the prospects' table: start-up does not read it, a send does
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'enrollments'").fetchone()[0]
        damage(db, root)
        daemon = Daemon(project.config_path, load_config(project.config_path), handle_signals=False, integrity_wait=0)
        with anyio.fail_after(30), pytest.raises(StoreError, match="damaged"):
            await daemon.run()
        assert daemon._lock is None  # stopped and let go of the database
        assert daemon.dispatcher is not None  # it had started sending beside the check
    finally:
        server.stop()


def test_only_a_database_the_check_reads_quickly_holds_up_the_first_send(tmp_path: Path) -> None:
    small, large = tmp_path / "small.db", tmp_path / "large.db"
    small.write_bytes(b"\0" * 4096)
    with large.open("wb") as f:
        f.truncate(INTEGRITY_WAIT_SIZE + 1)  # sparse: the size is what counts
    assert integrity_wait(small, 0.25) == 0.25
    assert integrity_wait(large, 0.25) == 0.0
    assert integrity_wait(tmp_path / "not-yet.db", 0.25) == 0.25
    assert integrity_wait("postgresql://db.example/cadenced", 0.25) == 0.25


def test_a_check_interrupted_at_shutdown_ends_without_a_verdict(project: Project) -> None:
    """A stop during the check ends it at once (it could read gigabytes), and says nothing of damage."""
    server = SmtpServer().start()
    try:
        db = setup(project, server, 50)
        damage(db)
        with pytest.raises(StoreError, match="damaged"):
            IntegrityCheck(db).run()
        stopped = IntegrityCheck(db)
        stopped.interrupt()  # before the thread opened its connection: it does not open one
        stopped.run()
    finally:
        server.stop()


def test_a_template_that_explodes_on_reload_keeps_the_old_config(project: Project) -> None:
    """`{{ 99999 ** 99999 }}` once killed the daemon on SIGHUP; now it is a reload_failed like any other error."""
    server = SmtpServer().start()
    try:
        setup(project, server, 1)
        daemon = DaemonProcess(project.config_path)
        try:
            daemon.wait_event("daemon.started")
            server.recorder.wait_for(1)
            project.data["cadences"][0]["steps"][0]["body"] = "{{ 99999 ** 99999 }} and {{ 'x' * 999999999 }}"
            project.write()
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            failed = daemon.wait_event("config.reload_failed", after=mark)
            assert any("too large for a template" in e for e in failed["errors"]), failed
            assert daemon.proc.poll() is None
        finally:
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
    finally:
        server.stop()
