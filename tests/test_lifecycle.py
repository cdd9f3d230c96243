"""lifecycle: the rules written once (pure; no database, no clock)."""

from __future__ import annotations

import pytest

from daemon import lifecycle
from daemon.config import load_config
from tests.conftest import Project


def test_the_next_step_goes_from_its_own_sender_or_the_enrollments(project: Project) -> None:
    """Sticky: a step's own sender, else the enrollment's; never the mailbox that sent the step before."""
    mb1, mb2, mb3 = project.add_mailboxes(3)
    cadence = project.add_cadence(steps=3, auto_rotate=False)
    cadence["steps"][1] |= {"sender": mb2, "wait": "2d"}
    cadence["steps"][2]["wait"] = "1h"
    config = load_config(project.write())
    assert lifecycle.next_step(config, "c1", 1, mb1, 100.0) == (2, mb2, 100.0 + 2 * 86400)
    assert lifecycle.next_step(config, "c1", 2, mb3, 500.0) == lifecycle.Next(3, mb3, 500.0 + 3600)
    assert lifecycle.next_step(config, "c1", 3, mb1, 500.0) is None  # the last step
    assert lifecycle.next_step(config, "gone", 1, mb1, 500.0) is None  # no longer configured: it ends


@pytest.mark.parametrize(
    ("config_paused", "stored", "reason", "state"),
    [
        (False, None, None, "connected"),
        (False, "connected", None, "connected"),
        (True, "connected", None, "paused"),
        (False, "disconnected", "auto-paused: bounce rate", "paused"),
        (False, "disconnected", None, "disconnected"),
        (False, "refused", None, "refused"),
        (True, "refused", None, "paused"),
    ],
)
def test_a_mailboxs_state(config_paused: bool, stored: str | None, reason: str | None, state: str) -> None:
    assert lifecycle.mailbox_state(config_paused, stored, reason) == state
    assert lifecycle.takes_new_prospects(state, 50) is (state == "connected")
    assert not lifecycle.takes_new_prospects(state, 0)
