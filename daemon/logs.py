"""structlog set-up: one event per line, JSON or console, library logs through the same renderer."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from daemon import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_METHOD_LEVELS = {**_LEVELS, "warn": logging.WARNING, "exception": logging.ERROR, "critical": logging.CRITICAL}
# syslog priorities journald reads from a "<N>" prefix
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}
_NOISY = ("aiosmtplib", "apscheduler", "aioimaplib", "mail.log", "asyncio")
_SECRET_KEYS = frozenset({"password", "passwd", "token", "secret", "authorization", "auth_string"})


# Events counted for /metrics, by (event, reason): the label values come from the code, bounded; others "other".
COUNTED = frozenset(
    {
        "message.sent",
        "message.failed",
        "message.error",
        "message.deferred",
        "message.cancelled",
        "message.retried",
        "message.copied",
        "reply.detected",
        "bounce.detected",
        "unsubscribe.detected",
        "mailbox.disconnected",
        "mailbox.reconnected",
        "mailbox.auto_paused",
        "enrollment.reassigned",
        "imap.watching",
        "imap.error",
        "store.error",
        "api.enrolled",
    }
)
_REASONS = frozenset(
    {
        "",
        "bounced",
        "blocked",
        "expired",
        "uncertain",
        "disconnected",
        "refused",
        "throttled",
        "daily_limit",
        "warmup",
        "skip_date",
        "window",
        "domain_limit",
        "paused",
        "template",
        "config_changed",
        "cadence_removed",
        "replied",
        "unsubscribed",
        "reconnected",
        "quota",
        "deferred",
        "transient",
    }
)
event_counts: dict[tuple[str, str], int] = {}


def _count(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    name = event.get("event")
    if name in COUNTED:
        reason = str(event.get("reason", ""))
        key = (str(name), reason if reason in _REASONS else "other")
        event_counts[key] = event_counts.get(key, 0) + 1
    return event


def _below(threshold: int) -> Processor:
    """Drops what is under the configured level (after it was counted)."""

    def drop(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
        if _METHOD_LEVELS.get(method, logging.CRITICAL) < threshold:
            raise structlog.DropEvent
        return event

    return drop


def _redact(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """A field named like a secret never reaches the output; no value shows a configured secret."""
    masking = redact.active()
    for key, value in event.items():  # values replaced in place: the keys stay as they are
        if key.lower() in _SECRET_KEYS:
            event[key] = "********"
        elif masking and isinstance(value, str):
            event[key] = redact.redact(value)
    return event


class _Stamper:
    """`timestamp`, UTC, ISO 8601 to the microsecond (structlog's TimeStamper formats the whole date each line)."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        now = time.time()
        second, text = self._second
        if int(now) != second:
            second = int(now)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)  # one tuple: a line logged from another thread reads a whole pair
        event["timestamp"] = f"{text}.{min(int((now - second) * 1e6), 999_999):06d}Z"
        return event


class _Redacting:
    """Last line of defence, on the rendered line (tracebacks, library messages included)."""

    def __init__(self, renderer: Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        rendered = self.renderer(logger, name, event)
        return redact.redact(rendered.decode() if isinstance(rendered, bytes) else str(rendered))


class _JournalPrefix:
    """Under journald, `<N>` before each line sets the entry's priority."""

    def __init__(self, renderer: Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        level = str(event.get("level", "info"))
        rendered = self.renderer(logger, name, event)
        text = rendered.decode() if isinstance(rendered, bytes) else str(rendered)
        return f"<{_PRIORITY.get(level, 6)}>{text}"


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "json":
        return True
    if log_format == "console":
        return False
    return not stream.isatty()


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and route stdlib logging (aiosmtplib, APScheduler, aioimaplib) through it."""
    out = stream if stream is not None else sys.stdout
    as_json = wants_json(log_format, out)
    threshold = _LEVELS.get(level, logging.INFO)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _Stamper(),
        _redact,
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        tracebacks: Processor = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        tracebacks = structlog.processors.StackInfoRenderer()
    renderer = _Redacting(renderer)
    if os.environ.get("JOURNAL_STREAM"):
        renderer = _JournalPrefix(renderer)
    structlog.configure(
        # Counted first, then filtered by level: /metrics counts a send under log_level = "warning" too.
        processors=[_count, _below(threshold), *shared, tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(min(threshold, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, tracebacks],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def get(**bound: Any) -> Any:
    return structlog.get_logger("cadenced", **bound)
