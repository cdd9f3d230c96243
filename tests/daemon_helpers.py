"""Run the real daemon in the test's event loop and wait on conditions, bounded."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
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
from daemon.store.sqlite import install_counting


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


def query(db: Path | str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """SQL on the test's database, a file or a PostgreSQL URL: the test's look at the tables, written in what
    the two engines share, with `?` placeholders."""
    if isinstance(db, str):
        import psycopg

        from daemon.store.postgres import _IntLoader

        with psycopg.connect(db, autocommit=True) as conn:
            conn.adapters.register_loader("numeric", _IntLoader)
            cursor = conn.execute(sql.replace("%", "%%").replace("?", "%s"), args)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []
    with sqlite3.connect(db, timeout=30) as conn:
        install_counting(conn)  # as every cadenced connection does: a state changed here is counted
        return conn.execute(sql, args).fetchall()


def states(db: Path | str) -> dict[str, int]:
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


class DaemonProcess:
    """`cadenced run` as a real process: its JSON log lines, collected as they come."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:

        cmd = [sys.executable, "-m", "daemon", "--config", str(config_path), "run"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        self.proc.stdout.close()

    def events(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(line) for line in self.lines]

    def wait_event(self, name: str, within: float = 20.0, after: int = 0, **fields: Any) -> dict[str, Any]:
        """The first event `name` (with these fields) logged after the first `after` lines."""

        def find() -> dict[str, Any] | None:
            for line in self.lines[after:]:
                event = json.loads(line)
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    return event  # type: ignore[no-any-return]
            return None

        with self._cond:
            found: dict[str, Any] | None = None
            self._cond.wait_for(lambda: (found := find()) is not None or self.proc.poll() is not None, within)
            found = find()
        if found is None:
            raise AssertionError(f"no {name} {fields} within {within}s; log:\n" + "\n".join(self.lines[-30:]))
        return found

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, within: float = 30.0) -> int:
        code = self.proc.wait(timeout=within)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def eventually(condition: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    """`until` for tests outside an event loop (real processes from a test's thread): poll `condition`, bounded."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)
