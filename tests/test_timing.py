"""Windows, gaps and limits as pure functions, around DST in Berlin and New York."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import timing
from daemon.config import Schedule

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def ts(text: str, tz: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def sched(
    tz: str = BERLIN, days: str = "0123456", hours: tuple[tuple[int, int], ...] = ((540, 1020),), limit: int = 50
) -> Schedule:
    return Schedule(tz, frozenset(int(d) for d in days), hours, limit, (0.0, 0.0))


def wall(t: float, tz: str) -> str:
    return timing.local(t, tz).strftime("%a %Y-%m-%d %H:%M:%S")


def test_weekday_window_skips_the_weekend() -> None:
    s = sched(days="01234")
    friday_evening = ts("2026-11-27 17:30", BERLIN)
    assert wall(timing.next_open(friday_evening, s), BERLIN) == "Mon 2026-11-30 09:00:00"
    inside = ts("2026-11-27 10:15", BERLIN)
    assert timing.next_open(inside, s) == inside


def test_end_is_exclusive_and_several_ranges() -> None:
    s = sched(hours=((510, 720), (780, 1050)))
    assert wall(timing.next_open(ts("2026-11-25 12:00", BERLIN), s), BERLIN) == "Wed 2026-11-25 13:00:00"
    assert wall(timing.next_open(ts("2026-11-25 17:30", BERLIN), s), BERLIN) == "Thu 2026-11-26 08:30:00"


def test_spring_forward_gap_opens_at_the_jump() -> None:
    # 2026-03-29 Berlin: 02:00 → 03:00. A window starting 02:30 opens at 03:00 local.
    s = sched(hours=((150, 300),))
    t = timing.next_open(ts("2026-03-29 01:00", BERLIN), s)
    assert wall(t, BERLIN) == "Sun 2026-03-29 03:00:00"
    # New York springs forward 2026-03-08 02:00 → 03:00.
    s = sched(tz=NEW_YORK, hours=((120, 180),))
    t = timing.next_open(ts("2026-03-08 00:30", NEW_YORK), s)
    assert wall(t, NEW_YORK) == "Mon 2026-03-09 02:00:00"  # the whole range was skipped that night


def test_autumn_fold_counts_the_repeated_hour_twice() -> None:
    # 2026-10-25 Berlin: 03:00 CEST → 02:00 CET. A window 02:00-02:30 exists twice that night.
    s = sched(hours=((120, 150),))
    first = timing.next_open(ts("2026-10-25 01:00", BERLIN), s)
    assert timing.local(first, BERLIN).utcoffset() == timedelta(hours=2)
    after_first = first + 30 * 60  # 02:30 CEST: outside, until the clock goes back to 02:00
    second = timing.next_open(after_first, s)
    assert second - first == 3600
    assert wall(second, BERLIN) == "Sun 2026-10-25 02:00:00"


def test_daily_limit_moves_to_the_next_window_day() -> None:
    s = sched(days="01234", limit=3)
    friday = ts("2026-11-27 15:00", BERLIN)
    decision = timing.next_allowed(friday, s, None, {"2026-11-27": 3})
    assert decision.waiting_for == "daily_limit"
    assert decision.at is not None and wall(decision.at, BERLIN) == "Mon 2026-11-30 09:00:00"
    assert timing.next_allowed(friday, s, None, {"2026-11-27": 2}) == timing.Decision(friday, None)


def test_gap_then_window() -> None:
    s = sched()
    t = ts("2026-11-25 16:58", BERLIN)
    d = timing.next_allowed(t, s, t + 300, {})
    assert d.waiting_for == "window"  # the gap ends after the window closed: the window is the reason
    assert d.at is not None and wall(d.at, BERLIN) == "Thu 2026-11-26 09:00:00"
    d = timing.next_allowed(t - 3600, s, t - 3600 + 300, {})
    assert d.waiting_for == "gap"
    d = timing.next_allowed(ts("2026-11-25 07:00", BERLIN), s, None, {})
    assert d.waiting_for == "window"
    assert timing.next_allowed(t, sched(limit=0), None, {}) == timing.Decision(None, "daily_limit")


# Instants spread over the DST change days of both zones, and ordinary ones.
_DST_DAYS = [
    ts("2026-03-29 00:00", BERLIN),
    ts("2026-10-25 00:00", BERLIN),
    ts("2026-03-08 00:00", NEW_YORK),
    ts("2026-11-01 00:00", NEW_YORK),
    ts("2026-06-10 00:00", BERLIN),
]
instants = st.one_of(
    st.sampled_from(_DST_DAYS).flatmap(lambda base: st.floats(base - 86400, base + 2 * 86400)),
    st.floats(ts("2026-01-01 00:00", "UTC"), ts("2027-12-31 00:00", "UTC")),
)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    tz = draw(st.sampled_from([BERLIN, NEW_YORK, "UTC", "Asia/Kolkata", "Australia/Lord_Howe"]))
    days = draw(st.sets(st.integers(0, 6), min_size=1))
    n = draw(st.integers(1, 3))
    points = sorted(draw(st.sets(st.integers(0, 1440), min_size=2 * n, max_size=2 * n)))
    hours = tuple((points[i], points[i + 1]) for i in range(0, len(points), 2))
    low = draw(st.integers(0, 600))
    high = low + draw(st.integers(0, 600))
    return Schedule(tz, frozenset(days), hours, draw(st.integers(1, 20)), (float(low), float(high)))


@settings(max_examples=300, deadline=None)
@given(s=schedules(), t=instants)
def test_next_open_is_inside_and_nothing_earlier_is(s: Schedule, t: float) -> None:
    opened = timing.next_open(t, s)
    assert opened >= t
    assert timing.in_window(opened, s)
    # No instant between t and the opening is inside (checked on a one-minute grid).
    probe = t
    while probe < opened - 1:
        assert not timing.in_window(probe, s), (wall(probe, s.timezone), wall(opened, s.timezone))
        probe += 60


@settings(max_examples=150, deadline=None)
@given(s=schedules(), start=instants, seed=st.integers(0, 2**32))
def test_planned_sends_keep_window_gap_and_limit(s: Schedule, start: float, seed: int) -> None:
    """A mailbox that always has mail: every send inside, never closer than the gap, never over."""
    import random

    rng = random.Random(seed)
    counts: dict[str, int] = {}
    gap_until: float | None = None
    last: float | None = None
    t = start
    for _ in range(60):
        decision = timing.next_allowed(t, s, gap_until, counts)
        assert decision.at is not None
        at = decision.at
        assert timing.in_window(at, s)
        if last is not None:
            assert at - last >= s.gap[0] - 1e-6
        day = timing.local_day(at, s.timezone)
        counts[day] = counts.get(day, 0) + 1
        assert counts[day] <= s.daily_limit
        gap = timing.draw_gap(s, rng)
        assert s.gap[0] <= gap <= s.gap[1]
        gap_until, last, t = at + gap, at, at


@pytest.mark.parametrize("tz", [BERLIN, NEW_YORK])
def test_local_day_and_midnight_across_dst(tz: str) -> None:
    for day in ("2026-03-29", "2026-10-25", "2026-03-08", "2026-11-01"):
        start = ts(f"{day} 12:00", tz)
        midnight = timing.next_local_midnight(start, tz)
        assert wall(midnight, tz).endswith("00:00:00")
        assert timing.local_day(midnight, tz) > day
        assert timing.local_day(midnight - 1, tz) == day


@settings(max_examples=200, deadline=None)
@given(s=schedules(), start=instants, steps=st.lists(st.integers(0, 7200), min_size=1, max_size=80))
def test_the_plans_stretches_answer_as_next_allowed_does(s: Schedule, start: float, steps: list[int]) -> None:
    """`plan` keeps the open stretch it found; every answer equals the full `next_allowed`, DST included."""
    stretches = timing.Stretches(s)
    counts: dict[str, int] = {}
    t = start
    hits = 0
    for step in steps:
        expected = timing.next_allowed(t, s, None, counts).at
        assert expected is not None
        hits += stretches.lo <= t < stretches.hi
        got = stretches.next_allowed(t, counts)
        assert got == (expected, timing.local_day(expected, s.timezone)), (wall(t, s.timezone), s)
        counts[got[1]] = counts.get(got[1], 0) + 1
        t = got[0] + step


def test_a_days_sends_cost_one_zone_look_up() -> None:
    s = sched(limit=500)  # 09:00-17:00 in Berlin
    stretches = timing.Stretches(s)
    counts: dict[str, int] = {}
    t = ts("2026-10-25 09:00", BERLIN)  # the autumn DST change is that night: the stretch ends at 17:00
    found = 0
    for _ in range(600):
        if not stretches.lo <= t < stretches.hi:
            found += 1
        at, day = stretches.next_allowed(t, counts) or (0.0, "")
        counts[day] = counts.get(day, 0) + 1
        t = at + 60
    assert wall(t - 60, BERLIN) == "Mon 2026-10-26 10:59:00"  # 480 on Sunday 09:00-16:59, 120 on Monday
    assert found == 2
