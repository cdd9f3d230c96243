"""CSV files and watched folders are hostile until parsed: all or nothing per file, bounded, never through a link."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
import structlog

from tests.conftest import Project
from tests.daemon_helpers import query, running, until

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes


def enrolled(project: Project) -> int:
    db = project.root / "cadenced.db"
    return query(db, "SELECT count(*) FROM enrollments")[0][0] if db.exists() else 0


def big_file(project: Project, bad_line: int, bad: str) -> Path:
    rows = [f"p{i}@prospects.example,P{i},Co{i}" for i in range(bad_line - 2)]
    return project.csv([*rows, bad, *(f"q{i}@prospects.example,Q,Co" for i in range(50))], name="big.csv")


def test_a_file_broken_at_line_6002_enrolls_nothing(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    result = project.enroll(big_file(project, 6002, 'x@prospects.example,"never closed,Co'))
    assert result.code == 2
    assert "big.csv:6002: a quote that is never closed" in result.err
    assert enrolled(project) == 0


def test_an_oversized_field_enrolls_nothing(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    result = project.enroll(big_file(project, 7000, "x@prospects.example," + "A" * 200_000 + ",Co"))
    assert result.code == 2
    assert "big.csv:7000: a field longer than 131072 characters" in result.err
    assert enrolled(project) == 0


def test_addresses_and_control_characters_are_checked(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    path = project.root / "people.csv"
    path.write_bytes(
        b"email,first_name,company\n"
        b"a\x00b@example.com,A,Co\n"
        b".dot@example.com,B,Co\n"
        b"i@example..com,C,Co\n"
        b"ok@prospects.example,D\x07D,Co\n"
        b"ok2@prospects.example,E,Co\x1b[31m\n"
        b"fine@prospects.example,F,Co\n"
    )
    result = project.enroll(path)
    assert result.code == 0, result.err
    report = result.json()
    assert report["enrolled"] == 1
    reasons = {r["line"]: r["reason"] for r in report["rejected"]}
    assert reasons[2] == "a control character in field 'email'"
    assert all(reasons[n].startswith("not a valid email address: ") for n in (3, 4))
    assert reasons[5] == "a control character in field 'first_name'"
    assert reasons[6] == "a control character in field 'company'"


def test_a_file_whose_rows_are_all_rejected_exits_1(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    result = project.enroll(project.csv(["not-an-address,A,Co", "also bad,B,Co"]))
    assert result.code == 1
    assert result.json()["rejected_total"] == 2


def test_a_200_mb_file_is_read_in_bounded_memory(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    path = project.root / "huge.csv"
    field = "x" * 100_000 + "\x07"  # every row is rejected for its control character: nothing is kept per row
    with path.open("w", encoding="utf-8") as out:
        out.write("email,first_name,company\n")
        for i in range(2_100):
            out.write(f"p{i}@prospects.example,{field},Co\n")
    assert path.stat().st_size > 200 * 1024 * 1024
    cmd = [sys.executable, "-m", "daemon", "--config", str(project.config_path), "enroll", "--cadence", "c1"]
    proc = subprocess.Popen([*cmd, "--as", "alice", "--json", str(path)], stdout=subprocess.PIPE)
    # The peak of the enroll process itself: VmHWM of its own memory, read while it runs. (ru_maxrss of the
    # child counts the test runner's memory too: the child shares it between fork and exec.)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()
    hwm, deadline = 0.0, time.monotonic() + 120
    while time.monotonic() < deadline:
        hwm = max(hwm, _vm_hwm_mb(proc.pid))
        try:
            proc.wait(timeout=0.02)  # sampled every 20 ms until it exits
            break
        except subprocess.TimeoutExpired:
            continue
    reader.join(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()
    assert proc.wait(timeout=30) == 1
    assert json.loads(out[0])["rejected_total"] == 2_100
    assert 0 < hwm < 150, f"peak RSS {hwm:.0f} MB"


def _vm_hwm_mb(pid: int) -> float:
    """The process's peak RSS so far (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


@pytest.fixture
def folder(project: Project) -> Path:
    inbox = project.root / "inbox"
    inbox.mkdir()
    project.data["defaults"]["gap"] = "0s"
    project.add_mailboxes(1, owner="bob", prefix="b", smtp={"host": "127.0.0.1", "port": 9})  # nothing is sent
    project.add_cadence(users=["bob"])
    project.data["automations"] = [
        {"name": "drop", "cadence": "c1", "owner": "bob", "watch": str(inbox), "settle": "1s", "max_file_size": "1MB"}
    ]
    project.write()
    return inbox


@pytest.mark.anyio
async def test_links_fifos_and_huge_files_in_a_watched_folder_are_refused_unread(
    project: Project, folder: Path
) -> None:
    secret = project.root / "secret-password"
    secret.write_text("email\nHunter2-Secret@leak.example\n")
    (folder / "leak.csv").symlink_to(secret)
    os.link(secret, folder / "hard.csv")
    os.mkfifo(folder / "pipe.csv")
    (folder / "huge.csv").write_text("email\n" + "x@prospects.example\n" * 60_000)
    database = project.root / "cadenced.db"
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            failed = folder / "failed"
            await until(lambda: len(list(failed.glob("*.error.txt"))) == 4, within=20)
    errors = {p.name.split("-", 1)[1]: p.read_text() for p in (folder / "failed").glob("*.error.txt")}
    assert "a symbolic link" in errors["leak.csv.error.txt"]
    assert "a hard link" in errors["hard.csv.error.txt"]
    assert "not a regular file" in errors["pipe.csv.error.txt"]
    assert "over max_file_size" in errors["huge.csv.error.txt"]
    everything = json.dumps(logs) + "".join(errors.values())
    assert "Hunter2" not in everything
    assert secret.read_text().startswith("email\nHunter2")  # the target was neither read into anything nor moved
    assert (folder / "failed").is_dir() and not any((folder / "failed").glob("*.csv.error.txt.*"))
    assert query(database, "SELECT count(*) FROM enrollments") == [(0,)]


@pytest.mark.anyio
async def test_a_link_planted_where_the_report_goes_is_never_written_through(project: Project, folder: Path) -> None:
    database = project.root / "cadenced.db"
    project.run("status")  # the database exists
    processed = folder / "processed"
    processed.mkdir()
    now = time.time()
    for second in range(0, 40):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + second))
        (processed / f"{stamp}-x.csv.report.json").symlink_to(database)
    (folder / "x.csv").write_text("email\np1@prospects.example\n")
    async with running(project.config_path):
        await until(lambda: not (folder / "x.csv").exists(), within=20)
        await until(lambda: query(database, "SELECT count(*) FROM enrollments") == [(1,)])
    reports = [p for p in processed.glob("*x.csv.report.json") if not p.is_symlink()]
    assert len(reports) == 1 and json.loads(reports[0].read_text())["enrolled"] == 1
    assert query(database, "PRAGMA integrity_check") == [("ok",)]
    assert all(p.resolve() == database for p in processed.glob("*.report.json") if p.is_symlink())


@pytest.mark.anyio
async def test_a_folder_that_cannot_file_away_is_reported_once_and_not_reread(project: Project, folder: Path) -> None:
    (folder / "processed").write_text("a file where the folder should be")
    (folder / "x.csv").write_text("email\np1@prospects.example\n")
    with structlog.testing.capture_logs() as logs:
        async with running(project.config_path):
            await until(lambda: [e for e in logs if e["event"] == "automation.error"], within=20)
            await anyio.sleep(3)  # an observation window of three scans: the file must not be read again
    errors = [e for e in logs if e["event"] == "automation.error"]
    assert len(errors) == 1 and "is not a folder" in errors[0]["detail"]
    assert query(project.root / "cadenced.db", "SELECT count(*) FROM enrollments") == [(1,)]


_SWAP: list[tuple[Path, Path]] = []  # (watched folder, where an attacker points failed/): armed for one swap


def _swap_failed_for_a_link(event: str, args: tuple[object, ...]) -> None:
    """An attacker's move at the worst moment: failed/ was checked, the note is about to be created in it, and
    failed/ is swapped for a link to another folder (an audit hook runs just before the open it reports)."""
    if event != "open" or not _SWAP or not str(args[0]).endswith(".error.txt"):
        return
    folder, elsewhere = _SWAP.pop()
    (folder / "failed").rename(folder / "failed-real")
    (folder / "failed").symlink_to(elsewhere)


sys.addaudithook(_swap_failed_for_a_link)


def test_failed_swapped_for_a_link_after_its_check_moves_nothing_through_it(project: Project, folder: Path) -> None:
    """Folders are used by descriptor (dir_fd), not by name after the check: a link put in place of failed/ between
    the check and the move leads nowhere; the file and its note land in the folder that was checked."""
    from daemon import enroll
    from daemon.config import load_config
    from daemon.store import Store

    elsewhere = project.root / "root-only"
    elsewhere.mkdir(mode=0o700)
    (folder / "failed").mkdir()
    dropped = folder / "bad.csv"
    dropped.write_text("name\nno address column here\n")
    store = Store.open(project.root / "cadenced.db")
    try:
        _SWAP.append((folder, elsewhere))
        result = enroll.import_dropped(
            store, load_config(project.config_path), "c1", "bob", dropped, time.time(), 1 << 20
        )
    finally:
        _SWAP.clear()
        store.close()
    assert result.error and "email" in result.error
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name.split("-", 1)[1] for p in (folder / "failed-real").iterdir()) == [
        "bad.csv",
        "bad.csv.error.txt",
    ]


def test_a_wide_header_is_refused_on_its_line_at_once(project: Project) -> None:
    """100,000 columns (789 KB) held the daemon at 100% CPU for minutes: columns are capped (SPEC §2a: 200) and
    looked up in a set."""
    project.add_mailboxes(1)
    project.add_cadence()
    wide = ",".join(["email", *(f"c{i}" for i in range(100_000))])
    path = project.csv(["p0@prospects.example" + "," * 100_000], header=wide)
    result = project.enroll(path)
    assert result.code == 2
    assert f"{path}:1: 100001 columns in the header row; at most 200" in result.err
    assert enrolled(project) == 0
    at_the_cap = project.csv(
        ["p1@prospects.example" + ",x" * 199],
        name="cap.csv",
        header=",".join(["email", *(f"c{i}" for i in range(199))]),
    )
    assert project.enroll(at_the_cap).json()["enrolled"] == 1
