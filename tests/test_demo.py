"""The README's first command: `cadenced demo` shows rotation, stickiness, threads and the limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "enrolled 6 prospects" in out
    assert out.count("2 prospects") == 3  # rotation: 6 prospects over 3 mailboxes
    assert "SENDER CHANGED" not in out and "BROKEN THREAD" not in out
    assert out.count("in thread") == 8  # steps 2 and 3 of the four prospects of the unlimited mailboxes
    assert "sent today 2/2, scheduled 2, waiting for daily_limit" in out
    assert out.count("deferred: daily_limit until") == 2
    assert "14 emails delivered to the loopback server; none twice." in out
