"""Run the real daemon in the test's event loop and wait on conditions, bounded."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio

from daemon.config import load_config
from daemon.service import Daemon


@asynccontextmanager
async def running(config_path: Path, clock: Callable[[], float] = time.time) -> AsyncIterator[Daemon]:
    daemon = Daemon(config_path, load_config(config_path), handle_signals=False, clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


async def until(condition: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail after `within` seconds."""
    with anyio.move_on_after(within):
        while True:
            value = condition()
            if value:
                return value
            await anyio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def states(db: Path) -> dict[str, int]:
    return dict(query(db, "SELECT state, count(*) FROM messages GROUP BY state"))  # type: ignore[arg-type]


def shifted_clock(target: float) -> Callable[[], float]:
    """A clock that runs at normal speed from `target`."""
    offset = target - time.time()
    return lambda: time.time() + offset


def next_weekday_at(weekday: int, hour: int, tz: str, after: float | None = None) -> float:
    """The next local `weekday` (0 = Monday) at `hour`:00, at least a day after `after` (default now)."""
    zone = ZoneInfo(tz)
    day = datetime.fromtimestamp(after if after is not None else time.time(), zone).date() + timedelta(days=1)
    while day.weekday() != weekday:
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, hour, tzinfo=zone).timestamp()
