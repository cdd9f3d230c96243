"""List automations: CSVs dropped in a watched folder are enrolled with the automation's owner as adder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from daemon.enroll import SETTLE_SECONDS, FolderState, ready_files
from tests.conftest import Project
from tests.daemon_helpers import running, until
from tests.servers import SmtpServer


def test_only_settled_csv_files_are_read(tmp_path: Path) -> None:
    state = FolderState()
    now = 1_800_000_000.0
    done = tmp_path / "done.csv"
    done.write_text("email\na@x.example\n")
    os.utime(done, (now - 60, now - 60))
    growing = tmp_path / "growing.csv"
    growing.write_text("email\n")
    os.utime(growing, (now - 60, now - 60))
    (tmp_path / "upload.csv.part").write_text("email\n")
    assert ready_files(tmp_path, state, now) == []  # first sight: nothing is known to be stable yet
    growing.write_text("email\nb@x.example\n")
    os.utime(growing, (now - 1, now - 1))
    assert ready_files(tmp_path, state, now + 1) == [done]  # growing changed since the last look
    assert ready_files(tmp_path, state, now + 1 + SETTLE_SECONDS) == [done, growing]


@pytest.mark.anyio
async def test_dropped_csv_is_enrolled_and_filed(project: Project) -> None:
    server = SmtpServer().start()
    try:
        inbox = project.root / "inbox"
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(2, smtp=server.smtp_config())
        (bob_box,) = project.add_mailboxes(1, owner="bob", smtp=server.smtp_config())
        project.add_cadence(users=["alice", "bob"], rotate_among="adder")
        project.data["automations"] = [{"name": "webinar", "cadence": "c1", "owner": "bob", "watch": str(inbox)}]
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
        assert report["rejected"] == [{"line": 4, "email": "not-an-address", "reason": "not a valid email address"}]
        assert [p.name.endswith("-leads.csv") for p in processed.glob("*.csv")] == [True]
        assert "no 'email' column" in next(failed.glob("*.error.txt")).read_text()
        assert not (inbox / "leads.csv").exists() and not (inbox / "bad.csv").exists()
        assert {d.sender for d in server.recorder.deliveries} == {bob_box}
    finally:
        server.stop()
