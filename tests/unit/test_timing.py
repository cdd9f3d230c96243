"""Windows, gaps and limits as pure functions, around DST in Berlin and New York."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import timing
from daemon.model import Schedule, Warmup

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
    warmup = draw(
        st.none()
        | st.builds(Warmup, st.integers(1, 5), st.integers(0, 3), st.integers(1, 3), st.integers(5, 25)).filter(
            lambda w: w.ceiling >= w.start
        )
    )
    # Skipped dates around the instants drawn (DST days included), a run of several in a row among them.
    base = date(2026, 1, 1)
    offsets = draw(
        st.sets(st.sampled_from([86, 87, 88, 89, 297, 298, 299, 66, 67, 303, 304, 305, 160, 161]), max_size=6)
    )
    skip = frozenset((base + timedelta(days=o)).isoformat() for o in offsets)
    return Schedule(tz, frozenset(days), hours, draw(st.integers(1, 20)), (float(low), float(high)), warmup, skip)


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
    first: str | None = None
    t = start
    for _ in range(60):
        decision = timing.next_allowed(t, s, gap_until, counts, first_day=first)
        assert decision.at is not None
        at = decision.at
        assert timing.in_window(at, s)
        if last is not None:
            assert at - last >= s.gap[0] - 1e-6
        day = timing.local_day(at, s.timezone)
        assert day not in s.skip_dates
        first = first or day
        counts[day] = counts.get(day, 0) + 1
        assert counts[day] <= min(s.daily_limit, timing.allowance(s, day, first)[0])
        if s.warmup is not None:  # the ramp: day n of sending allows start + step * (n // every), up to the ceiling
            n = (date.fromisoformat(day) - date.fromisoformat(first)).days
            assert counts[day] <= min(s.warmup.ceiling, s.warmup.start + s.warmup.step * (n // s.warmup.every))
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
    first: str | None = None
    t = start
    hits = 0
    for step in steps:
        expected = timing.next_allowed(t, s, None, counts, first_day=first).at
        assert expected is not None
        hits += stretches.lo <= t < stretches.hi
        got = stretches.next_allowed(t, counts)
        assert got == (expected, timing.local_day(expected, s.timezone)), (wall(t, s.timezone), s)
        first = first or got[1]
        counts[got[1]] = counts.get(got[1], 0) + 1
        t = got[0] + step


@settings(max_examples=200, deadline=None)
@given(
    s=schedules(),
    start=instants,
    steps=st.lists(st.tuples(st.integers(0, 7200), st.integers(-600, 600), st.booleans()), min_size=1, max_size=80),
)
def test_a_sender_loops_clock_answers_as_next_allowed_does(
    s: Schedule, start: float, steps: list[tuple[int, int, bool]]
) -> None:
    """A sender loop keeps the open stretch it last sent in: every answer and every local day equal the full
    computations, with gaps and throttles before and after `t`, the first send day set on the way, DST included."""
    clock = timing.SenderClock(s)
    counts: dict[str, int] = {}
    first: str | None = None
    t = start
    for step, gap, throttled in steps:
        gap_until, throttled_until = t + gap, (t + 300 if throttled else None)
        expected = timing.next_allowed(t, s, gap_until, counts, throttled_until, first)
        assert clock.next_allowed(t, gap_until, counts, throttled_until, first) == expected, (wall(t, s.timezone), s)
        assert clock.local_day(t) == timing.local_day(t, s.timezone)
        if expected.at is None:
            return
        day = timing.local_day(expected.at, s.timezone)
        first = first or day
        counts[day] = counts.get(day, 0) + 1
        t = expected.at + step


def test_a_sender_loop_finds_its_stretch_once_a_window() -> None:
    s = sched(limit=500)  # 09:00-17:00 in Berlin
    clock = timing.SenderClock(s)
    counts: dict[str, int] = {}
    t = ts("2026-10-25 09:00", BERLIN)  # the autumn DST change is that night
    found = 0
    for _ in range(600):
        stretch = (clock._stretch.lo, clock._stretch.hi)
        decision = clock.next_allowed(t, None, counts, None, "2026-10-01")
        assert decision.at is not None
        found += (clock._stretch.lo, clock._stretch.hi) != stretch
        day = clock.local_day(decision.at)
        counts[day] = counts.get(day, 0) + 1
        t = decision.at + 60
    assert wall(t - 60, BERLIN) == "Mon 2026-10-26 10:59:00"  # 480 on Sunday, 120 on Monday
    assert found == 2
    # The stretch's allowance was counted from one first send day: another one is asked afresh.
    warm = Schedule(BERLIN, frozenset(range(7)), ((540, 1020),), 10, (0.0, 0.0), Warmup(2, 3, 2, 9), frozenset())
    clock, t = timing.SenderClock(warm), ts("2026-12-05 10:00", BERLIN)
    assert clock.next_allowed(t, None, {"2026-12-05": 2}, None, "2026-12-01") == timing.Decision(t, None)  # 8 a day
    assert clock.next_allowed(t + 60, None, {"2026-12-05": 2}, None, "2026-12-05").waiting_for == "warmup"  # 2 a day


@settings(max_examples=100, deadline=None)
@given(s=schedules(), start=instants)
def test_thirty_days_of_a_plan_are_what_a_run_sends(s: Schedule, start: float) -> None:
    """A mailbox with mail always due, for 30 days: `plan`'s day counts equal a run's (the daemon's
    next_allowed, the plan's average gap), and no day is over its allowance or on a skipped date."""
    gap = sum(s.gap) / 2
    end = start + 30 * 86400

    def days(answer: Callable[[float, dict[str, int], str | None], float | None]) -> dict[str, int]:
        counts: dict[str, int] = {}
        first: str | None = None
        t = start
        while (at := answer(t, counts, first)) is not None and at < end:
            day = timing.local_day(at, s.timezone)
            first = first or day
            counts[day] = counts.get(day, 0) + 1
            t = at + gap
        return counts

    stretches = timing.Stretches(s)
    run = days(lambda t, counts, first: timing.next_allowed(t, s, None, counts, first_day=first).at)
    plan = days(lambda t, counts, _: (stretches.next_allowed(t, counts) or (None, ""))[0])
    assert plan == run
    first_day = min(run, default=None)
    for day, n in run.items():
        assert day not in s.skip_dates and n <= timing.allowance(s, day, first_day)[0] <= s.daily_limit


def test_warmup_ramps_from_the_first_send_day_and_skip_dates_wait() -> None:
    s = Schedule(BERLIN, frozenset(range(7)), ((540, 1020),), 10, (0.0, 0.0), Warmup(2, 3, 2, 9), frozenset())
    assert [timing.allowance(s, f"2026-12-{d:02d}", "2026-12-01")[0] for d in range(1, 9)] == [2, 2, 5, 5, 8, 8, 9, 9]
    assert timing.allowance(s, "2026-12-05", "2026-12-01") == (8, "warmup")
    grown = Schedule(BERLIN, frozenset(range(7)), ((540, 1020),), 6, (0.0, 0.0), Warmup(2, 3, 2, 9), frozenset())
    assert timing.allowance(grown, "2026-12-05", "2026-12-01") == (6, "daily_limit")  # never above daily_limit
    t = ts("2026-12-01 10:00", BERLIN)
    d = timing.next_allowed(t, s, None, {"2026-12-01": 2}, first_day="2026-12-01")
    assert (wall(d.at or 0, BERLIN), d.waiting_for) == ("Wed 2026-12-02 09:00:00", "warmup")
    holidays = Schedule(
        BERLIN, frozenset(range(5)), ((540, 1020),), 10, (0.0, 0.0), None, frozenset({"2026-12-24", "2026-12-25"})
    )
    d = timing.next_allowed(ts("2026-12-23 18:00", BERLIN), holidays, None, {})
    assert (wall(d.at or 0, BERLIN), d.waiting_for) == ("Mon 2026-12-28 09:00:00", "skip_date")
    many = Schedule(
        "UTC",
        frozenset(range(7)),
        ((0, 1440),),
        10,
        (0.0, 0.0),
        None,
        frozenset((date(2026, 7, 1) + timedelta(days=i)).isoformat() for i in range(40)),
    )
    d = timing.next_allowed(ts("2026-07-01 00:00", "UTC"), many, None, {})
    assert wall(d.at or 0, "UTC") == "Mon 2026-08-10 00:00:00"  # six weeks off: found, not "never"


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


def test_public_holidays_of_a_calendar_are_skipped() -> None:
    us = Schedule(NEW_YORK, frozenset(range(5)), ((540, 1020),), 10, (0.0, 0.0), None, frozenset(), 0, ("US",))
    d = timing.next_allowed(ts("2026-12-24 18:00", NEW_YORK), us, None, {})  # Christmas is a Friday
    assert (wall(d.at or 0, NEW_YORK), d.waiting_for) == ("Mon 2026-12-28 09:00:00", "skip_date")
    assert timing.skipped(us, "2027-07-05")  # Independence Day observed, computed for the year asked
    bavaria = Schedule(BERLIN, frozenset(range(5)), ((540, 1020),), 10, (0.0, 0.0), None, frozenset(), 0, ("DE-BY",))
    assert timing.skipped(bavaria, "2026-01-06") and not timing.skipped(bavaria, "2026-01-07")  # Epiphany
