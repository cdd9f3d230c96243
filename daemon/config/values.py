"""Values a configuration is written in: durations (45s, 1d12h), sizes, gaps, hours of a window."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


_HOURS = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")


def parse_duration(text: str) -> float:
    """`45s`, `30m`, `4h`, `3d`, `1d12h` → seconds. Raises ValueError."""
    m = _DURATION.fullmatch(text.strip())
    if not text.strip() or m is None or not any(m.groups()):
        raise ValueError(f"not a duration (use 45s, 30m, 4h, 3d or sums such as 1d12h), got {text!r}")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return float(d * 86400 + h * 3600 + mi * 60 + s)


def format_duration(seconds: float) -> str:
    """Seconds → the shortest duration text that parses back to them."""
    rest = int(seconds)
    if rest == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


_SIZE = re.compile(r"(\d+)\s*(B|KB|MB|GB)?", re.IGNORECASE)


_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"must be a size such as 50MB, 200KB or 1GB, got {text!r}")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


def parse_gap(text: str) -> tuple[float, float]:
    """`2m-5m` or `30s` → (min, max) seconds."""
    low, sep, high = text.partition("-")
    a = parse_duration(low)
    b = parse_duration(high) if sep else a
    if b < a:
        raise ValueError(f"range must go from low to high, got {text!r}")
    return (a, b)


def parse_hours(text: str) -> tuple[int, int]:
    """`09:00-17:00` → (540, 1020) minutes; `00:00-24:00` is all day."""
    m = _HOURS.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"must look like 09:00-17:00, got {text!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(f"not a time of day in {text!r}")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end <= start:
        raise ValueError(f"end must be after start (a range may not cross midnight), got {text!r}")
    return (start, end)


def merge_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)
