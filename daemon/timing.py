"""Pure: delivery windows, gaps, daily limits, "next allowed instant".

Instants are POSIX seconds (float, UTC). A mailbox's window is the set of
instants whose wall-clock time in its zone falls on one of its days and inside
one of its hour ranges; DST gaps and folds follow from that definition: a range
starting inside a spring-forward gap opens at the jump, and the repeated hour
of an autumn fold counts twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from daemon.model import Schedule

HORIZON_DAYS = 9  # any weekly window opens within a week; two more days cover DST edges


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local(t: float, tz: str) -> datetime:
    return datetime.fromtimestamp(t, zone(tz))


def local_day(t: float, tz: str) -> str:
    """The mailbox's calendar day of instant `t`, the key of its daily counter."""
    return local(t, tz).date().isoformat()


def _minute_of_day(dt: datetime) -> float:
    return dt.hour * 60 + dt.minute + dt.second / 60 + dt.microsecond / 60e6


def in_window(t: float, s: Schedule) -> bool:
    dt = local(t, s.timezone)
    if dt.weekday() not in s.days:
        return False
    minute = _minute_of_day(dt)
    return any(start <= minute < end for start, end in s.hours)


def _wall_to_instant(day: date, minute: int, tz: str) -> float:
    """The first instant whose local wall time on `day` is at or after `minute`."""
    zi = zone(tz)
    # Aware datetime + timedelta is wall-clock arithmetic; zoneinfo then picks the offset.
    wall = datetime(day.year, day.month, day.day, tzinfo=zi) + timedelta(minutes=minute)
    early = wall.replace(fold=0).timestamp()
    if local(early, tz).replace(tzinfo=None) == wall.replace(tzinfo=None):
        return early
    # The wall time does not exist (spring-forward gap): the answer is the jump itself.
    late = wall.replace(fold=1).timestamp()
    lo, hi = min(early, late), max(early, late)
    target = wall.replace(tzinfo=None)
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        if local(mid, tz).replace(tzinfo=None) >= target:
            hi = mid
        else:
            lo = mid
    return float(round(hi))


def _transitions(day: date, tz: str) -> list[float]:
    """Instants on local `day` where the zone's UTC offset changes."""
    zi = zone(tz)
    start = datetime(day.year, day.month, day.day, tzinfo=zi).timestamp()
    end = start + 86400 + 3 * 3600
    if local(start, tz).utcoffset() == local(end, tz).utcoffset():
        return []
    lo, hi = start, end
    off = local(lo, tz).utcoffset()
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        if local(mid, tz).utcoffset() == off:
            lo = mid
        else:
            hi = mid
    return [float(round(hi))]


def next_open(t: float, s: Schedule) -> float:
    """The earliest instant at or after `t` inside the window."""
    if in_window(t, s):
        return t
    first = local(t, s.timezone).date() - timedelta(days=1)
    best: float | None = None
    for i in range(HORIZON_DAYS):
        day = first + timedelta(days=i)
        if best is not None and datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() > best + 2 * 86400:
            break
        candidates = [_wall_to_instant(day, start, s.timezone) for start, _ in s.hours if day.weekday() in s.days]
        candidates += _transitions(day, s.timezone)
        for c in candidates:
            if c >= t and (best is None or c < best) and in_window(c, s):
                best = c
    if best is None:
        raise ValueError("the window never opens")  # only a window made entirely of DST gaps
    return best


def first_day_of(now: float, days: int, tz: str) -> str:
    """The first local day of a window of `days` local days that ends today (pause_on's window)."""
    return local_day(now - (max(days, 1) - 1) * 86400, tz)


def local_day_start(t: float, tz: str) -> float:
    """The first instant of `t`'s local day."""
    return _wall_to_instant(local(t, tz).date(), 0, tz)


def next_local_midnight(t: float, tz: str) -> float:
    """The first instant of the local day after `t`'s."""
    day = local(t, tz).date() + timedelta(days=1)
    return _wall_to_instant(day, 0, tz)


def next_sending_day(t: float, s: Schedule, first_day: str | None) -> float:
    """When the mailbox's next local day after `t`'s first lets it send (domain_daily_limit moves a full
    domain's due messages there); its midnight when it never sends."""
    midnight = next_local_midnight(t, s.timezone)
    return next_allowed(midnight, s, None, {}, None, first_day).at or midnight


@dataclass(frozen=True, slots=True)
class Decision:
    """When a mailbox may send next, and what holds it back (SPEC §9 `waiting_for`)."""

    at: float | None  # None: never (a daily limit of 0)
    waiting_for: str | None  # None | window | gap | throttled | daily_limit | warmup | skip_date


@lru_cache(maxsize=256)
def _holiday_dates(code: str, year: int) -> frozenset[str]:
    import holidays  # 50 ms: imported by the schedules that name a calendar, not by every command

    country, _, subdivision = code.partition("-")
    return frozenset(d.isoformat() for d in holidays.country_holidays(country, subdiv=subdivision or None, years=year))


def skipped(s: Schedule, day: str) -> bool:
    """No sends on this local day: one of its skip_dates, or a public holiday of one of its calendars."""
    return day in s.skip_dates or any(day in _holiday_dates(code, int(day[:4])) for code in s.holidays)


def allowance(s: Schedule, day: str, first_day: str | None) -> tuple[int, str]:
    """The most the mailbox may send on local `day`, and the rule that sets it: `daily_limit`, or `warmup`
    counted from its first send day (`first_day`; None: it has sent nothing yet, so `day` would be the first)."""
    if s.warmup is None:
        return s.daily_limit, "daily_limit"
    since = 0 if first_day is None else (date.fromisoformat(day) - date.fromisoformat(first_day)).days
    ramp = s.warmup.allowance(since)
    return (ramp, "warmup") if ramp < s.daily_limit else (s.daily_limit, "daily_limit")


def next_allowed(
    now: float,
    s: Schedule,
    gap_until: float | None,
    sent_on: Mapping[str, int] | Callable[[str], int],
    throttled_until: float | None = None,
    first_day: str | None = None,
) -> Decision:
    """The first instant at or after `now` the mailbox may send, under window, gap, throttle, skipped dates,
    warm-up and daily limit. `first_day`: the local day of its first send ever (warm-up counts from it)."""
    if s.daily_limit <= 0:
        return Decision(None, "daily_limit")
    count = sent_on if callable(sent_on) else (lambda day: sent_on.get(day, 0))
    t = now
    reason: str | None = None
    if gap_until is not None and gap_until > t:
        t, reason = gap_until, "gap"
    if throttled_until is not None and throttled_until > t:
        t, reason = throttled_until, "throttled"
    for _ in range(HORIZON_DAYS * 2 + len(s.skip_dates) + 30 * len(s.holidays)):
        opened = next_open(t, s)
        if opened > t and reason in (None, "gap", "throttled"):
            reason = "window"  # the window closed meanwhile: that is what holds it back now
        t = opened
        day = local_day(t, s.timezone)
        if skipped(s, day):
            t, reason = next_local_midnight(t, s.timezone), "skip_date"
            continue
        limit, rule = allowance(s, day, first_day)
        if count(day) < limit:
            return Decision(t, reason)
        t = next_local_midnight(t, s.timezone)
        reason = rule
    return Decision(None, "daily_limit")


def day_count(sent: int, limit: int, quota_day: str | None, day: str) -> int:
    """Sends that count against `day`: a provider's quota refusal that day fills it."""
    return max(sent, limit) if quota_day == day else sent


def draw_gap(s: Schedule, rng: random.Random) -> float:
    low, high = s.gap
    return low if high <= low else rng.uniform(low, high)


class Stretches:
    """`next_allowed` for many sends of one mailbox in a row (the plan), with the open stretch it last found.

    A stretch is a span inside one hour range of one local day with one UTC
    offset: while `t` falls in it and the day's count is under the limit, the
    answer is `t` itself, so the zone arithmetic is paid once a stretch, not
    once a send. Outside it, the full `next_allowed` answers (a property test
    holds the two equal).
    """

    def __init__(self, s: Schedule, first_day: str | None = None) -> None:
        self.s = s
        self.first_day = first_day  # of the mailbox's first send ever: the plan's first send makes it so
        self.lo = self.hi = 0.0
        self.day = ""
        self.limit = 0

    def next_allowed(self, t: float, sent_on: Mapping[str, int]) -> tuple[float, str] | None:
        """(when, its local day), or None when the mailbox never sends (a daily limit of 0)."""
        if self.lo <= t < self.hi and sent_on.get(self.day, 0) < self.limit:
            return t, self.day
        at = next_allowed(t, self.s, None, sent_on, first_day=self.first_day).at
        if at is None:
            return None
        self._find(at)
        self.first_day = self.first_day or self.day
        self.limit = allowance(self.s, self.day, self.first_day)[0]
        return at, self.day

    def _find(self, t: float) -> None:
        tz = self.s.timezone
        dt = local(t, tz)
        minute = _minute_of_day(dt)
        end = next((e for start, e in self.s.hours if start <= minute < e), None)
        self.lo, self.hi, self.day = t, t, dt.date().isoformat()
        if end is None:  # opened at a DST transition rather than at a range's start: no stretch to keep
            return
        hi = min(_wall_to_instant(dt.date(), end, tz), next_local_midnight(t, tz))
        for change in _transitions(dt.date(), tz):
            if change > t:
                hi = min(hi, change)
        self.hi = hi


class SenderClock:
    """A sender loop's `next_allowed` and `local_day`, answered from the open stretch it last found.

    While `t` falls in that stretch (one hour range of one local day, one UTC
    offset), past any gap or throttle and under the day's allowance, the full
    `next_allowed` would answer `t` itself (a property test holds the two
    equal): a mailbox sending all day pays the zone arithmetic once a stretch.
    """

    def __init__(self, s: Schedule) -> None:
        self.s = s
        self._stretch = Stretches(s)
        self._first_day: str | None = None  # the warm-up's first day the stretch's allowance was counted from
        self._day_start: tuple[str, float] = ("", 0.0)  # (local day, its first instant): once a day

    def local_day(self, t: float) -> str:
        stretch = self._stretch
        return stretch.day if stretch.lo <= t < stretch.hi else local_day(t, self.s.timezone)

    def day_start(self, t: float) -> float:
        """The first instant of `t`'s local day (local_day_start), worked out once a day."""
        day = self.local_day(t)
        if self._day_start[0] != day:
            self._day_start = (day, local_day_start(t, self.s.timezone))
        return self._day_start[1]

    def next_allowed(
        self,
        t: float,
        gap_until: float | None,
        sent_on: Mapping[str, int],
        throttled_until: float | None,
        first_day: str | None,
    ) -> Decision:
        stretch = self._stretch
        if (
            stretch.lo <= t < stretch.hi
            and first_day == self._first_day
            and (gap_until is None or gap_until <= t)
            and (throttled_until is None or throttled_until <= t)
            and sent_on.get(stretch.day, 0) < stretch.limit
        ):
            return Decision(t, None)
        decision = next_allowed(t, self.s, gap_until, sent_on, throttled_until, first_day)
        if decision.at == t:
            stretch._find(t)
            stretch.limit = allowance(self.s, stretch.day, first_day)[0]
            self._first_day = first_day
        return decision


def utc_day(at: float) -> str:
    """The UTC date of `at`: the day results count in (`cadenced report`), the same everywhere and in SQL."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))
