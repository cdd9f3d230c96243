"""List automations: CSVs dropped in a watched folder are enrolled with the automation's owner as adder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from daemon.enroll import FolderState, ready_files
from tests.conftest import Project
from tests.daemon_helpers import running, until
from tests.servers import SmtpServer

pytestmark = [pytest.mark.both_stores, pytest.mark.slow]


def test_only_complete_csv_files_are_read(tmp_path: Path) -> None:
    state = FolderState()
    now = 1_800_000_000.0
    settle = 10.0
    done = tmp_path / "done.csv"
    done.write_text("email\na@x.example\n")
    os.utime(done, (now - 60, now - 60))
    growing = tmp_path / "growing.csv"
    growing.write_text("email\n")
    os.utime(growing, (now - 60, now - 60))
    upload = tmp_path / "upload.csv.part"
    upload.write_text("email\n")
    os.utime(upload, (now, now))
    assert ready_files(tmp_path, state, now, settle) == []  # first sight: nothing is known to be stable yet
    growing.write_text("email\nb@x.example\n")
    os.utime(growing, (now - 1, now - 1))
    assert ready_files(tmp_path, state, now + 1, settle) == [done]  # growing changed since the last look
    # An upload that stalls for 4 s is not taken; renamed from .part, it is taken at once.
    assert ready_files(tmp_path, state, now + 5, settle) == [done]
    upload.rename(tmp_path / "upload.csv")
    assert ready_files(tmp_path, state, now + 6, settle) == [done, tmp_path / "upload.csv"]
    assert ready_files(tmp_path, state, now + 1 + settle, settle) == [done, growing, tmp_path / "upload.csv"]


@pytest.mark.anyio
async def test_dropped_csv_is_enrolled_and_filed(project: Project) -> None:
    server = SmtpServer().start()
    try:
        inbox = project.root / "inbox"
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(2, smtp=server.smtp_config())
        (bob_box,) = project.add_mailboxes(1, owner="bob", smtp=server.smtp_config())
        project.add_cadence(users=["alice", "bob"], rotate_among="adder")
        project.data["automations"] = [
            {"name": "webinar", "cadence": "c1", "owner": "bob", "watch": str(inbox), "settle": "1s"}
        ]
        project.write()
        async with running(project.config_path):
            await until(lambda: inbox.is_dir())
            part = inbox / "leads.csv.part"
            part.write_text("email,first_name\nw1@prospects.example,W\nw2@prospects.example,X\nnot-an-address,Y\n")
            part.rename(inbox / "leads.csv")  # renamed into place, as an uploader should
            (inbox / "bad.csv").write_text("name,phone\nPat,123\n")
            processed, failed = inbox / "processed", inbox / "failed"
            await until(lambda: list(processed.glob("*.report.json")) and list(failed.glob("*.error.txt")), within=20)
            await anyio.to_thread.run_sync(server.recorder.wait_for, 2)
        report = json.loads(next(processed.glob("*.report.json")).read_text())
        assert report["enrolled"] == 2 and report["assignments"] == {bob_box: 2}  # rotated over the owner's mailboxes
        reason = "not a valid email address: An email address must have an @-sign."
        assert report["rejected"] == [{"line": 4, "email": "not-an-address", "reason": reason}]
        assert [p.name.endswith("-leads.csv") for p in processed.glob("*.csv")] == [True]
        assert "no email column" in next(failed.glob("*.error.txt")).read_text()
        assert not (inbox / "leads.csv").exists() and not (inbox / "bad.csv").exists()
        assert {d.sender for d in server.recorder.deliveries} == {bob_box}
    finally:
        server.stop()
