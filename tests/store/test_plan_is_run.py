"""`cadenced plan` forecasts what a run sends: day by day and mailbox by mailbox, over random cadences with
per-step senders (auto_rotate off), removed cadences, paused and refused mailboxes, follow-ups first, first
emails first or due order, daily, per-domain and first-email (new_per_day) limits, windows in several
time zones.

The run is the sender loop's own turn (dispatch.take_turn: record, look, claim, in one transaction) and its own
record of an accepted send (dispatch.sent_record), on the real store, taken on a virtual clock: each mailbox
takes its turn whenever the previous turn said it may send next, and a send is accepted as it is claimed.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from daemon import lifecycle, readside
from daemon.config import build_config
from daemon.dispatch import sent_record, take_turn
from daemon.model import Config
from daemon.store import SentRecord, Store

START = 1_796_000_000.0  # Monday 30 November 2026, 00:53 UTC
DAYS = 4
BOXES = ("mb1@send.example", "mb2@send.example", "mb3@send.example")
ZONES = ("UTC", "Europe/Paris", "America/New_York")

# Found by hypothesis: once c2's one first email of the day is sent, the next turn (take_turn) moves every due
# first email of c2 to the next sending day, behind c1's due with them; the plan moved one only when it came next.
BOX = {
    "owner": "alice",
    "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
    "timezone": "UTC",
    "hours": ["08:00-18:00"],
    "days": ["mon", "tue", "wed", "thu", "fri"],
    "gap": "1m",
    "domain_daily_limit": 0,
    "prioritize": "follow_ups",
    "new_per_day": 0,
    "paused": False,
}
FULL_CADENCE_MOVES_ON = {
    "boxes": [
        {**BOX, "address": BOXES[0], "name": "Mb0", "daily_limit": 2},
        {**BOX, "address": BOXES[1], "name": "Mb1", "daily_limit": 0},
        {**BOX, "address": BOXES[2], "name": "Mb2", "daily_limit": 0},
    ],
    "cadences": [
        {
            "name": "c1",
            "users": ["alice"],
            "auto_rotate": False,
            "steps": [{"wait": "0s", "body": "hi", "subject": "hello"}, {"wait": "1h", "body": "hi"}],
            "new_per_day": 0,
        },
        {
            "name": "c2",
            "users": ["alice"],
            "auto_rotate": False,
            "steps": [{"wait": "0s", "body": "hi", "subject": "hello"}],
            "new_per_day": 1,
        },
    ],
    "enrollments": [
        ("c1", "mb1@send.example", 0.0),
        ("c2", "mb1@send.example", 0.0),
        ("c1", "mb1@send.example", 0.0),
        ("c1", "mb1@send.example", 0.0),
        ("c2", "mb1@send.example", -1.0),
    ],
    "refused": None,
}


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    boxes = []
    for i, address in enumerate(BOXES):
        boxes.append(
            {
                "address": address,
                "name": f"Mb{i}",
                "owner": "alice",
                "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
                "timezone": draw(st.sampled_from(ZONES)),
                "hours": [draw(st.sampled_from(["08:00-18:00", "00:00-24:00", "09:00-12:00"]))],
                "days": draw(st.sampled_from([["mon", "tue", "wed", "thu", "fri"], ["mon", "wed", "fri", "sat"]])),
                "daily_limit": draw(st.integers(0, 6)),
                "gap": draw(st.sampled_from(["1m", "20m", "2h"])),
                "domain_daily_limit": draw(st.sampled_from([0, 0, 1, 2])),
                "prioritize": draw(st.sampled_from(["follow_ups", "new", "due"])),
                "new_per_day": draw(st.sampled_from([0, 0, 1, 2])),
                "paused": draw(st.booleans()) if i == 2 else False,
            }
        )
    cadences = []
    for name in ("c1", "c2"):
        rotating = draw(st.booleans())  # a step's own sender ("Assign to Sender") needs auto_rotate off
        steps = []
        for n in range(draw(st.integers(1, 3))):
            step: dict[str, Any] = {"wait": "0s" if n == 0 else draw(st.sampled_from(["1h", "1d", "2d"])), "body": "hi"}
            if n == 0:
                step["subject"] = "hello"
            sender = None if rotating else draw(st.sampled_from([None, *BOXES]))
            if sender is not None:
                step["sender"] = sender
            steps.append(step)
        cadence = {"name": name, "users": ["alice"], "auto_rotate": rotating, "steps": steps}
        cadence["new_per_day"] = draw(st.sampled_from([0, 0, 1, 2]))  # a share of each mailbox's first emails
        cadences.append(cadence)
    enrollments = draw(
        st.lists(
            st.tuples(st.sampled_from(["c1", "c2", "gone"]), st.sampled_from(BOXES), st.floats(-86400, 2 * 86400)),
            min_size=1,
            max_size=14,
        )
    )
    refused = draw(st.sampled_from([None, *BOXES]))
    return {"boxes": boxes, "cadences": cadences, "enrollments": enrollments, "refused": refused}


def _config(scenario: dict[str, Any], folder: Path) -> Config:
    data = {
        "daemon": {"database": str(folder / "plan.db")},
        "users": [{"name": "alice"}],
        "mailboxes": scenario["boxes"],
        "cadences": scenario["cadences"],
    }
    return build_config(data, folder / "cadenced.toml")


def _enroll(store: Store, scenario: dict[str, Any]) -> None:
    """Step 1 of each enrollment, from its sticky mailbox or its step's own sender, as enroll schedules it;
    a cadence `gone` was in the config when its prospects were enrolled and is no longer."""
    with store.transaction():
        for i, (cadence, mailbox, offset) in enumerate(scenario["enrollments"], start=1):
            store.insert_enrollments(
                cadence, [(i, cadence, f"p{i}@x{i % 3}.example", mailbox, "alice", "alice", "{}", 0.0, i)]
            )
            first = next((c for c in scenario["cadences"] if c["name"] == cadence), None)
            sender = first["steps"][0].get("sender") if first else None
            store.schedule_first_steps(i, sender, START + offset, {sender or mailbox: 1})
        if scenario["refused"]:
            store.disconnect(scenario["refused"], START - 60, "554 5.7.1 sender refused", None, state="refused")


def run(config: Config, store: Store, start: float, horizon: float) -> Counter[tuple[str, str, str]]:
    """What the sender loops send from `start` to `horizon`, by (local day, mailbox, new or follow_ups)."""
    clocks = {m.address: lifecycle.timing.SenderClock(m.schedule) for m in config.mailboxes}
    caps = {c.name: c.new_per_day for c in config.cadences if c.new_per_day}
    pending: dict[str, SentRecord] = {}
    sent: Counter[tuple[str, str, str]] = Counter()
    rng = random.Random(7)
    ids = itertools.count()
    t = start
    for _ in range(20_000):
        wake: list[float] = []
        for m in config.mailboxes:
            clock = clocks[m.address]
            day = clock.local_day(t)
            committed = pending.pop(m.address, None)
            turn = take_turn(store, m, clock, day, t, committed, lambda i, a: f"<{next(ids)}@x>", cadence_caps=caps)
            if committed is not None and committed.next_step is not None and committed.next_step[1] != m.address:
                wake.append(t)  # the dispatcher wakes the mailbox whose queue the send changed
            c = turn.claimed
            if c is not None:
                _, step = lifecycle.step_of(config, c.cadence, c.step)
                if step is None:  # not sent: as the sender loop's compose finds it
                    with store.transaction():
                        store.record_error(c.id, "config_changed", None, "its cadence is no longer in the config")
                else:
                    sent[(day, m.address, "follow_ups" if c.step > 1 else "new")] += 1
                    pending[m.address] = sent_record(config, m, c, t, day, 250, "ok", "hello", rng)
                wake.append(t)
            elif turn.decision is not None and turn.decision.at is not None:
                wake.append(turn.decision.at)
        upcoming = [w for w in wake if w < horizon]
        if not upcoming and not pending:
            return sent
        t = max(t, min(upcoming, default=t))
    raise AssertionError("the run did not settle")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
@example(FULL_CADENCE_MOVES_ON)
def test_plan_forecasts_what_the_sender_loops_send(scenario: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = _config(scenario, Path(folder))
        store = Store.open(config.daemon.database)
        try:
            _enroll(store, scenario)
            forecast = readside.plan(config, store, START, DAYS)
            planned = {
                (r["date"], r["mailbox"], kind): r[kind]
                for r in forecast["days"]
                for kind in ("new", "follow_ups")
                if r[kind]
            }
            assert all(r["sends"] == r["new"] + r["follow_ups"] for r in forecast["days"])
            sent = run(config, store, START, START + DAYS * 86400)
            event(f"sends: {min(sum(sent.values()), 10)}{'+' if sum(sent.values()) >= 10 else ''}")
            assert planned == dict(sent)
        finally:
            store.close()
