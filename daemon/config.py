"""TOML → frozen dataclasses; every check names its TOML path."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import stat
import tomllib
import zoneinfo
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

import email_validator

from daemon import compose, redact
from daemon.errors import ConfigError

DEFAULT_PATH = "/etc/cadenced/config.toml"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MASK = "********"

T = TypeVar("T")
_MISSING: Any = object()
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_HOURS = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")


class Secret:
    """A password or token: its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(********)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class OAuth2:
    """A mailbox's OAuth2 client (SPEC §7a): cadenced gets access tokens itself with the refresh-token grant."""

    client_id: str
    client_secret: Secret | None
    client_secret_source: str  # "client_secret_file:/path", "client_secret_env:VAR", … or ""
    refresh_token: Secret | None  # None until `cadenced mailbox authorize` has written one
    refresh_token_source: str
    token_url: str
    auth_url: str
    scopes: tuple[str, ...]

    @property
    def refresh_token_file(self) -> str:
        """Where a refresh token is written (by authorize, or when the provider rotates it); "" if not a file."""
        kind, _, where = self.refresh_token_source.partition(":")
        return where if kind == "refresh_token_file" else ""


@dataclass(frozen=True, slots=True)
class Auth:
    """How to log in: a password from a file, the environment, a credential, or inline; or OAuth2."""

    username: str
    secret: Secret | None
    source: str  # "password_file:/path", "password_env:VAR", "credential:NAME", "password", ""
    mechanism: str = "password"  # password | xoauth2 (token_command) | oauth2 (the mailbox's [oauth2])
    token_command: tuple[str, ...] = ()
    oauth2: OAuth2 | None = None


@dataclass(frozen=True, slots=True)
class Server:
    """An SMTP or IMAP endpoint of one mailbox."""

    host: str
    port: int
    security: str  # tls | starttls | none
    ca_file: str
    allow_plaintext: bool
    auth: Auth
    timeout: float
    poll: float = 60.0  # IMAP only


@dataclass(frozen=True, slots=True)
class Warmup:
    """A new mailbox's ramp (SPEC §11): `start` a day on its first send day, `step` more every `every` days."""

    start: int
    step: int
    every: int  # days
    ceiling: int

    def allowance(self, days_since_first: int) -> int:
        return min(self.ceiling, self.start + self.step * (max(days_since_first, 0) // self.every))


@dataclass(frozen=True, slots=True)
class PauseRule:
    """`pause_on` (SPEC §11): past either rate over its last `window_days` of sends, a mailbox pauses itself."""

    bounce_rate: float
    block_rate: float
    min_sends: int
    window_days: int

    def reason(self, sent: int, bounces: int, blocks: int) -> str | None:
        """Why the mailbox should stop now, with the numbers; None while it is under both rates (pure)."""
        if sent < self.min_sends or sent <= 0:
            return None
        for what, n, rate in (("bounce", bounces, self.bounce_rate), ("block", blocks, self.block_rate)):
            if n / sent > rate:
                return (
                    f"{what} rate {n / sent:.1%} ({n} of {sent} sends in {self.window_days}d) "
                    f"over pause_on.{what}_rate {rate:.1%}"
                )
        return None


DEFAULT_PAUSE = PauseRule(0.05, 0.05, 50, 7)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a mailbox may send: local days and hours, the daily limit, the gap, warm-up and skipped dates."""

    timezone: str
    days: frozenset[int]  # 0 = Monday
    hours: tuple[tuple[int, int], ...]  # minutes after local midnight, [start, end)
    daily_limit: int
    gap: tuple[float, float]  # seconds, min and max
    warmup: Warmup | None = None
    skip_dates: frozenset[str] = frozenset()  # ISO local dates with no sends
    domain_daily_limit: int = 0  # sends per recipient domain per local day (0: no such limit)
    holidays: tuple[str, ...] = ()  # public holiday calendars with no sends: "US", "DE-BY" (country-subdivision)


@dataclass(frozen=True, slots=True)
class Mailbox:
    address: str
    name: str
    owner: str
    schedule: Schedule
    smtp: Server
    imap: Server | None
    paused: bool
    helo_name: str = ""  # the EHLO name; "" is the host's FQDN
    sent_copies: str = "none"  # none | provider (files submitted mail in Sent itself) | append (we save a copy)
    provider: str = ""  # google | microsoft | generic: the preset its servers were filled in from
    oauth2: OAuth2 | None = None
    unsubscribe_url: compose.Template | None = None  # an https one-click link ({{ token }}, {{ email }}, {{ mailbox }})
    pause_on: PauseRule | None = DEFAULT_PAUSE  # None: never pauses itself
    reassign_after: float = 0.0  # seconds disconnected before its never-contacted enrollments move (0: never)


@dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclass(frozen=True, slots=True)
class Step:
    number: int  # 1-based
    wait: float  # seconds
    subject: compose.Template | None
    body: compose.Template
    body_file: str
    sender: str


@dataclass(frozen=True, slots=True)
class Cadence:
    name: str
    users: tuple[str, ...]
    mailboxes: tuple[str, ...]
    pool: tuple[str, ...]  # mailbox addresses in file order
    auto_rotate: bool
    rotate_among: str  # adder | owner | cadence
    sender: str
    stop_on_reply: bool
    fields: tuple[str, ...]
    steps: tuple[Step, ...]
    rotation: str = "round_robin"  # round_robin | weighted (by daily capacity)
    rotate_among_set: bool = True  # False: the file leaves it to the default (a database may pin the old one)

    def required_fields(self) -> frozenset[str]:
        names: set[str] = set()
        for step in self.steps:
            names |= step.body.required
            if step.subject is not None:
                names |= step.subject.required
        return frozenset(names - set(compose.SENDER_FIELDS))


@dataclass(frozen=True, slots=True)
class Automation:
    name: str
    cadence: str
    owner: str
    watch: Path
    max_file_size: int = 50 * 1024 * 1024  # bytes; a larger file goes to failed/ unread
    settle: float = 10.0  # seconds a *.csv must stay unchanged (a *.csv.part renamed to *.csv goes at once)


@dataclass(frozen=True, slots=True)
class Playbook:
    """[[playbooks]]: prospects POSTed by another system (a CRM rule, a form) enrolled as the owner adds them."""

    name: str
    cadence: str
    owner: str
    fields: tuple[tuple[str, str], ...] = ()  # (field, the incoming JSON key that fills it)

    def field_for(self) -> dict[str, str]:
        """Incoming key → field name (lower case, as a CSV header is read)."""
        return {key: name for name, key in self.fields}


PLAYBOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # it is a URL path segment


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    database: Path | str  # an SQLite file, or a PostgreSQL URL (postgresql://…)
    log_format: str
    log_level: str
    max_connections: int
    shutdown_grace: float
    retry_delays: tuple[float, ...]
    idle_close: float
    probe_backoff: tuple[float, float]
    busy_timeout: float = 30.0  # how long a commit waits for another process's write lock before sends pause
    settle_after: float = 900.0  # an uncertain send not in Sent after this long (sent_copies = provider) goes again
    node: str = ""  # this daemon's name among several on one PostgreSQL database (default: the host name)
    lease: float = 60.0  # PostgreSQL: how long a mailbox's lease lasts unless renewed


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """[api]: the daemon's HTTP listener (metrics, status, outbox), off without the table."""

    host: str  # "" with a unix socket
    port: int
    socket: str  # a unix socket path, or ""
    token: Secret | None
    token_source: str
    metrics_token: Secret | None = None  # /metrics asks for it when set
    metrics_token_source: str = ""
    tls_cert: str = ""  # served over HTTPS with both (a listener other machines can reach needs them)
    tls_key: str = ""
    allow_plain_http: bool = False  # plain HTTP off loopback: the operator says a proxy on this host does TLS
    hosts: tuple[str, ...] = ()  # Host names accepted besides the loopback ones (a reverse proxy's own)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    daemon: DaemonSettings
    defaults: Schedule
    users: tuple[User, ...]
    mailboxes: tuple[Mailbox, ...]
    cadences: tuple[Cadence, ...]
    automations: tuple[Automation, ...]
    warnings: tuple[str, ...] = field(default=(), compare=False)
    api: ApiSettings | None = None
    playbooks: tuple[Playbook, ...] = ()
    _mailboxes: dict[str, Mailbox] = field(default_factory=dict, compare=False, repr=False)
    _cadences: dict[str, Cadence] = field(default_factory=dict, compare=False, repr=False)
    _users: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Look-ups by name cost the same with 10 mailboxes or 50,000.
        object.__setattr__(self, "_mailboxes", {m.address: m for m in self.mailboxes})
        object.__setattr__(self, "_cadences", {c.name: c for c in self.cadences})
        object.__setattr__(self, "_users", frozenset(u.name for u in self.users))

    def mailbox(self, address: str) -> Mailbox:
        return self._mailboxes[address]

    def cadence(self, name: str) -> Cadence:
        return self._cadences[name]

    def user_names(self) -> frozenset[str]:
        return self._users

    def playbook(self, name: str) -> Playbook:
        for p in self.playbooks:
            if p.name == name:
                return p
        raise KeyError(name)


# --- values -----------------------------------------------------------------


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


SENT_COPIES = ("none", "provider", "append")


@dataclass(frozen=True, slots=True)
class Preset:
    """What `provider = "…"` fills in; any key the file sets wins."""

    smtp: tuple[str, int, str]  # host, port, security
    imap: tuple[str, int, str] | None
    token_url: str
    auth_url: str
    scopes: tuple[str, ...]
    sent_copies: str


PROVIDERS = {
    # Google: SMTP and IMAP accept XOAUTH2 with the one scope that covers mail; Gmail files what is sent in Sent.
    "google": Preset(
        ("smtp.gmail.com", 587, "starttls"),
        ("imap.gmail.com", 993, "tls"),
        "https://oauth2.googleapis.com/token",
        "https://accounts.google.com/o/oauth2/v2/auth",
        ("https://mail.google.com/",),
        "provider",
    ),
    # Microsoft 365 (work and school accounts): SMTP AUTH client submission, which Exchange Online files in
    # Sent Items; offline_access is what brings a refresh token.
    "microsoft": Preset(
        ("smtp.office365.com", 587, "starttls"),
        ("outlook.office365.com", 993, "tls"),
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize",
        (
            "https://outlook.office.com/SMTP.Send",
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access",
        ),
        "provider",
    ),
    # A self-hosted server: the usual ports and security; hosts and auth are the file's to give.
    "generic": Preset(("", 587, "starttls"), None, "", "", (), "none"),
}
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}")
_ADDRESS_LITERAL = re.compile(r"\[(?:\d{1,3}\.){3}\d{1,3}\]|\[IPv6:[0-9A-Fa-f:.]+\]")


def _helo_name(t: _Table, default: str) -> str:
    value = t.string("helo_name", default)
    if not isinstance(value, str):
        return default
    if value and not (_HOSTNAME.fullmatch(value) or _ADDRESS_LITERAL.fullmatch(value)):
        t.problems.add(t.at("helo_name"), f"must be a fully qualified host name or an address literal, got {value!r}")
        return default
    return value


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The everyday address: a dot-atom local part and a plain host name with a letters-only TLD. Every address
# plainly_valid accepts email-validator accepts too (tests/test_config.py holds a property test of that);
# anything else goes to email-validator itself.
_LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+[A-Za-z]{{2,63}}")
_SPECIAL_USE = frozenset(email_validator.SPECIAL_USE_DOMAIN_NAMES)
_SPECIAL_SUFFIXES = tuple(f".{name}" for name in _SPECIAL_USE)
_DOMAIN_VERDICTS: dict[str, bool] = {}  # a list has few domains for its rows: each is judged once (bounded)
_DOMAINS_KEPT = 65536


def plainly_valid(text: str) -> bool:
    """The everyday address, recognised in under a microsecond (False: ask address_problem, which may accept it)."""
    local, at, domain = text.rpartition("@")
    if not at or len(text) > 254 or len(local) > 64:
        return False
    verdict = _DOMAIN_VERDICTS.get(domain)
    if verdict is None:
        verdict = _plain_domain(domain)
        if len(_DOMAIN_VERDICTS) >= _DOMAINS_KEPT:
            _DOMAIN_VERDICTS.clear()
        _DOMAIN_VERDICTS[domain] = verdict
    return verdict and _LOCAL.fullmatch(local) is not None


def _plain_domain(domain: str) -> bool:
    if len(domain) > 253 or _DOMAIN.fullmatch(domain) is None:
        return False
    domain = domain.lower()
    if "--" in domain and any(label[2:4] == "--" for label in domain.split(".")):
        return False  # IDNA rules (Punycode): email-validator's to judge
    return domain not in _SPECIAL_USE and not domain.endswith(_SPECIAL_SUFFIXES)


def address_problem(text: str) -> str | None:
    """Why `text` is not an address we can send to (syntax only, no DNS), or None.

    email-validator checks RFC 5321/5322 syntax; ASCII only, since sending to an
    internationalised address needs SMTPUTF8, which cadenced does not speak. The
    everyday address is recognised first by a stricter pattern (50 µs → 1 µs a row).
    """
    if plainly_valid(text):
        return None
    try:
        email_validator.validate_email(text, check_deliverability=False, allow_smtputf8=False)
    except email_validator.EmailNotValidError as exc:
        return str(exc)
    return None


def valid_address(text: str) -> bool:
    return address_problem(text) is None


# --- reading tables ----------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


class _Table:
    """One TOML table being read: typed getters that record problems, then unknown keys."""

    def __init__(self, data: dict[str, Any], path: str, problems: _Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, kind: type | tuple[type, ...], kind_name: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.problems.add(self.at(key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.add(self.at(key), f"must be {kind_name}, got {_type_name(value)}")
            return default if default is not _MISSING else None
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, str, "a string", default)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, bool, "true or false", default)

    def integer(self, key: str, default: Any, low: int, high: int) -> Any:
        value = self._get(key, int, "an integer", default)
        if isinstance(value, int) and not low <= value <= high:
            self.problems.add(self.at(key), f"must be {low}-{high}, got {value}")
            return default
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> Any:
        value = self.string(key, default)
        if isinstance(value, str) and value not in choices:
            self.problems.add(self.at(key), f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, list, "a list of strings", default)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    self.problems.add(f"{self.at(key)}[{i}]", f"must be a string, got {_type_name(item)}")
                    return default
        return value

    def parsed(self, key: str, default: Any, parse: Callable[[str], T]) -> T | Any:
        text = self.string(key, _MISSING if default is _MISSING else None)
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError as exc:
            self.problems.add(self.at(key), str(exc))
            return default

    def table(self, key: str, required: bool = False) -> _Table | None:
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.problems.add(self.at(key), "is required")
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            self.problems.add(self.at(key), f"must be a table, got {_type_name(value)}")
            return None
        return _Table(value, self.at(key), self.problems)

    def tables(self, key: str, label: Callable[[int, dict[str, Any]], str] | None = None) -> Iterator[_Table]:
        self.seen.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problems.add(self.at(key), f"must be an array of tables ([[{key}]]), got {_type_name(value)}")
            return
        for i, item in enumerate(value):
            suffix = label(i, item) if label else f"[{i}]"
            yield _Table(item, self.at(key) + suffix, self.problems)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problems.add(self.at(key), "unknown key")


def _type_name(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _cadence_label(i: int, item: dict[str, Any]) -> str:
    name = item.get("name")
    return f'."{name}"' if isinstance(name, str) and name else f"[{i}]"


# --- the schema ---------------------------------------------------------------


_FALLBACK_SCHEDULE = Schedule("UTC", frozenset(range(5)), ((540, 1020),), 50, (120.0, 300.0))


def _schedule(t: _Table, base: Schedule) -> Schedule:
    tz = t.string("timezone", base.timezone)
    if isinstance(tz, str) and t.has("timezone"):
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            t.problems.add(t.at("timezone"), f"unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)")
            tz = base.timezone
    days_list = t.strings("days", None)
    days = base.days
    if days_list is not None:
        picked: set[int] = set()
        for i, d in enumerate(days_list):
            if d.lower() not in DAYS:
                t.problems.add(f"{t.at('days')}[{i}]", f"must be one of {', '.join(DAYS)}, got {d!r}")
            else:
                picked.add(DAYS.index(d.lower()))
        if not days_list:
            t.problems.add(t.at("days"), "must name at least one day")
        days = frozenset(picked) or base.days
    hours_list = t.strings("hours", None)
    hours = base.hours
    if hours_list is not None:
        ranges = []
        for i, h in enumerate(hours_list):
            try:
                ranges.append(parse_hours(h))
            except ValueError as exc:
                t.problems.add(f"{t.at('hours')}[{i}]", str(exc))
        if not hours_list:
            t.problems.add(t.at("hours"), "must name at least one range")
        hours = merge_ranges(ranges) or base.hours
    limit = t.integer("daily_limit", base.daily_limit, 0, 100_000)
    gap = t.parsed("gap", base.gap, parse_gap)
    warmup = _warmup(t, base.warmup)
    skip_dates = base.skip_dates
    skip_list = t.strings("skip_dates", None)
    if skip_list is not None:
        picked_dates = set()
        for i, text in enumerate(skip_list):
            try:
                if len(text) != 10:  # YYYY-MM-DD only (fromisoformat also reads 20261224)
                    raise ValueError(text)
                picked_dates.add(date.fromisoformat(text).isoformat())
            except ValueError:
                t.problems.add(f"{t.at('skip_dates')}[{i}]", f"must be a date such as 2026-12-24, got {text!r}")
        skip_dates = frozenset(picked_dates)
    domain_limit = t.integer("domain_daily_limit", base.domain_daily_limit, 0, 100_000)
    calendars = base.holidays
    given = t.strings("holidays", None)
    if given is not None:
        for i, code in enumerate(given):
            problem = holiday_calendar_problem(code)
            if problem:
                t.problems.add(f"{t.at('holidays')}[{i}]", problem)
        calendars = tuple(dict.fromkeys(given))
    return Schedule(tz, days, hours, limit, gap, warmup, skip_dates, domain_limit, calendars)


def holiday_calendar_problem(code: str) -> str:
    """Why `code` ("US", "DE-BY") names no calendar of the holidays package, or ""."""
    import holidays  # 50 ms: imported by the configs that name a calendar, not by every command

    country, _, subdivision = code.partition("-")
    try:
        holidays.country_holidays(country, subdiv=subdivision or None, years=2026)
    except NotImplementedError as exc:
        return f'no holiday calendar {code!r} ({exc}); a country code such as "US" or "DE-BY"'
    return ""


UNSUBSCRIBE_LINK = re.compile(r"https://[!-;=?-~]+")  # printable ASCII without spaces or angle brackets


def _unsubscribe_url(t: _Table, base: compose.Template | None) -> compose.Template | None:
    """The one-click unsubscribe link's template, checked by rendering it for a sample prospect."""
    text = t.string("unsubscribe_url", None)
    if text is None:
        return base
    if not text:
        return None
    template = _template(t, "unsubscribe_url", text)
    if template is None:
        return None
    try:
        sample = template.render(
            {"token": "12-abcdefghijklmnopqrstuvwxyz", "email": "pat@example.com", "mailbox": "sam@example.com"}
        )
    except compose.TemplateProblem as exc:
        t.problems.add(t.at("unsubscribe_url"), f"template error: {exc} (it knows token, email and mailbox)")
        return None
    if not UNSUBSCRIBE_LINK.fullmatch(sample):
        t.problems.add(t.at("unsubscribe_url"), f"must make an https:// link without spaces, made {sample[:80]!r}")
        return None
    return template


def _pause_on(t: _Table, base: PauseRule | None) -> PauseRule | None:
    """`pause_on = { bounce_rate, block_rate, min_sends, window }`, or `pause_on = false`."""
    if not t.has("pause_on"):
        return base
    if t.data["pause_on"] is False:
        t.seen.add("pause_on")
        return None
    r = t.table("pause_on")
    if r is None:
        return base
    defaults = base or DEFAULT_PAUSE
    rates = []
    for key, default in (("bounce_rate", defaults.bounce_rate), ("block_rate", defaults.block_rate)):
        value = r._get(key, (int, float), "a number", default)
        if isinstance(value, int | float) and not 0 < value < 1:
            r.problems.add(r.at(key), f"must be between 0 and 1 (0.05 is 5%), got {value}")
            value = default
        rates.append(float(value))
    min_sends = r.integer("min_sends", defaults.min_sends, 1, 1_000_000)
    window = r.parsed("window", defaults.window_days * 86400.0, parse_duration)
    r.finish()
    if window % 86400 or window < 86400:
        r.problems.add(r.at("window"), f"must be whole days (1d, 7d, …), got {format_duration(window)}")
        window = defaults.window_days * 86400.0
    return PauseRule(rates[0], rates[1], min_sends, int(window // 86400))


def _warmup(t: _Table, base: Warmup | None) -> Warmup | None:
    """`warmup = { start, step, every, ceiling }`, or `warmup = false` to turn a default off."""
    if not t.has("warmup"):
        return base
    value = t.data["warmup"]
    if value is False:
        t.seen.add("warmup")
        return None
    w = t.table("warmup")
    if w is None:
        return base
    start = w.integer("start", 5, 1, 100_000)
    step = w.integer("step", 2, 0, 100_000)
    every = w.parsed("every", 86400.0, parse_duration)
    ceiling = w.integer("ceiling", 40, 1, 100_000)
    w.finish()
    if every % 86400 or every < 86400:
        w.problems.add(w.at("every"), f"must be whole days (1d, 2d, …), got {format_duration(every)}")
        every = 86400.0
    if ceiling < start:
        w.problems.add(w.at("ceiling"), f"must be at least start ({start}), got {ceiling}")
    return Warmup(start, step, int(every // 86400), ceiling)


def _named_secret(t: _Table, name: str, base_dir: Path, missing_ok: bool = False) -> tuple[Secret | None, str]:
    """`<name>_file`, `<name>_env` or `<name>_credential`: the secret and where it came from.

    `missing_ok`: a file that does not exist yet is no error (a refresh token before `mailbox authorize`).
    """
    picked = _one_source(t, (f"{name}_file", f"{name}_env", f"{name}_credential"))
    if picked is None:
        return None, ""
    key, value = picked
    kind = key.rpartition("_")[2]
    return _read_secret(t, key, kind, value, base_dir, missing_ok)


def _one_source(t: _Table, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """The one key of `keys` the table gives, with its value; giving two is a problem."""
    sources = [k for k in keys if t.has(k)]
    if len(sources) > 1:
        t.problems.add(t.path, f"give only one of {', '.join(sources)}")
    if not sources:
        return None
    for other in sources[1:]:
        t.seen.add(other)
    value = t.string(sources[0])
    return (sources[0], value) if isinstance(value, str) else None


def _read_secret(
    t: _Table, key: str, kind: str, value: str, base_dir: Path, missing_ok: bool = False
) -> tuple[Secret | None, str]:
    """A secret from a file, an environment variable or a systemd credential, and its source."""
    if kind == "file":
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if missing_ok and not path.exists():
            return None, f"{key}:{path}"
        return _secret_file(t, key, path, f"{key}:{path}", str(path))
    if kind == "env":
        if value not in os.environ:
            t.problems.add(t.at(key), f"environment variable {value} is not set")
            return None, ""
        return Secret(os.environ[value]), f"{key}:{value}"
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        t.problems.add(t.at(key), "CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        return None, ""
    return _secret_file(t, key, Path(creds) / value, f"{key}:{value}", f"credential {value}")


def _oauth2(t: _Table, preset: Preset | None, base_dir: Path) -> OAuth2 | None:
    client_id = t.string("client_id")
    secret, secret_source = _named_secret(t, "client_secret", base_dir)
    token, token_source = _named_secret(t, "refresh_token", base_dir, missing_ok=True)
    token_url = t.string("token_url", preset.token_url if preset else "")
    auth_url = t.string("auth_url", preset.auth_url if preset else "")
    scopes = t.strings("scopes", list(preset.scopes) if preset else [])
    t.finish()
    for key, url in (("token_url", token_url), ("auth_url", auth_url)):
        if not isinstance(url, str) or (key == "auth_url" and not url):
            continue  # auth_url (and scopes) only `mailbox authorize` needs: a refresh token made elsewhere does not
        problem = _endpoint_problem(url)
        if problem:
            t.problems.add(t.at(key), problem)
    if not token_source:
        t.problems.add(t.path, "needs refresh_token_file, refresh_token_env or refresh_token_credential")
    if not isinstance(client_id, str) or not isinstance(token_url, str) or not isinstance(auth_url, str):
        return None
    return OAuth2(client_id, secret, secret_source, token, token_source, token_url, auth_url, tuple(scopes or ()))


def _endpoint_problem(url: str) -> str:
    """Why an OAuth endpoint cannot be used: HTTPS, or plain HTTP to this machine (a test or local proxy)."""
    if not url:
        return "is required (no provider preset gives it)"
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit(":", 1)[0] if not rest.startswith("[") else rest.split("]", 1)[0] + "]"
    if scheme == "https" and host:
        return ""
    if scheme == "http" and host in _LOOPBACK_HOSTS:
        return ""
    if scheme == "http":
        return f"must be https:// (plain http only to this machine), got {url!r}"
    return f"must be an https:// URL, got {url!r}"


def _secret(t: _Table, base_dir: Path, problems: _Problems, config_path: Path) -> tuple[Secret | None, str]:
    picked = _one_source(t, ("password_file", "password_env", "credential", "password"))
    if picked is None:
        return None, ""
    key, value = picked
    if key != "password":
        return _read_secret(
            t, key, {"password_file": "file", "password_env": "env"}.get(key, "credential"), value, base_dir
        )
    try:
        mode = config_path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IROTH | stat.S_IRGRP):
        problems.warnings.append(
            f"{t.at('password')}: inline password in {config_path}, which others can read; "
            "use password_file, password_env or credential"
        )
    return Secret(value), "password"


MAX_SECRET = 64 * 1024  # characters of a secret file (a refresh token is under 2 KB; a key file under 16 KB)


def _secret_file(t: _Table, key: str, path: Path, source: str, label: str) -> tuple[Secret | None, str]:
    try:
        with path.open(encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read(MAX_SECRET + 1)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        t.problems.add(t.at(key), f"cannot read {label}: {reason}")
        return None, ""
    if len(text) > MAX_SECRET:
        t.problems.add(t.at(key), f"{label} is larger than a secret can be ({MAX_SECRET} characters)")
        return None, ""
    if mode & (stat.S_IRGRP | stat.S_IROTH) and not label.startswith("credential"):
        t.problems.warnings.append(
            f"{t.at(key)}: {path} can be read by its group or by others (mode {stat.S_IMODE(mode):04o}); "
            "chmod 600 it (or 640 with a group of the service's own)"
        )
    return Secret(text.rstrip("\r\n")), source


def _server(
    t: _Table,
    kind: str,
    base_dir: Path,
    problems: _Problems,
    config_path: Path,
    preset: tuple[str, int, str] | None = None,
    oauth2: OAuth2 | None = None,
    address: str = "",
) -> Server:
    """One [smtp] or [imap] table; a provider's preset fills in what it leaves out, OAuth2 the login."""
    host = t.string("host", preset[0] if preset else "")
    default_port = {"smtp": 587, "imap": 993}[kind]
    port = t.integer("port", preset[1] if preset else default_port, 1, 65535)
    security = t.choice(
        "security", preset[2] if preset else ("starttls" if kind == "smtp" else "tls"), ("tls", "starttls", "none")
    )
    ca_file = t.string("ca_file", "")
    if ca_file:
        ca_path = Path(ca_file) if Path(ca_file).is_absolute() else base_dir / ca_file
        if not ca_path.is_file():
            t.problems.add(t.at("ca_file"), f"no such file {ca_path}")
        ca_file = str(ca_path)
    allow_plaintext = t.boolean("allow_plaintext", False)
    mechanism = t.choice("auth", "oauth2" if oauth2 is not None else "password", ("password", "xoauth2", "oauth2"))
    username = t.string("username", address if mechanism == "oauth2" or preset else "")
    token_command = t.strings("token_command", [])
    secret, source = _secret(t, base_dir, problems, config_path)
    timeout = t.parsed("timeout", 60.0, parse_duration)
    poll = t.parsed("poll", 60.0, parse_duration) if kind == "imap" else 60.0
    if kind == "imap" and security == "starttls":
        t.problems.add(t.at("security"), 'STARTTLS is not offered for IMAP: use "tls" (port 993)')
    if not host:
        t.problems.add(t.at("host"), "is required")
    if mechanism == "xoauth2" and not token_command:
        t.problems.add(t.at("token_command"), 'is required with auth = "xoauth2"')
    if mechanism != "xoauth2" and token_command:
        t.problems.add(t.at("token_command"), 'only goes with auth = "xoauth2"')
    if mechanism == "oauth2" and oauth2 is None:
        t.problems.add(t.at("auth"), '"oauth2" needs a [mailboxes.oauth2] table (client_id, refresh_token_file, …)')
    if mechanism == "oauth2" and secret is not None:
        t.problems.add(t.at("auth"), '"oauth2" logs in with a token: remove the password')
    if security == "none" and (secret is not None or token_command or mechanism == "oauth2") and not allow_plaintext:
        t.problems.add(
            t.at("security"),
            '"none" would send the password in clear text; set allow_plaintext = true to allow it',
        )
    if (secret is not None or token_command) and not username:
        t.problems.add(t.at("username"), "is required when a password or token is given")
    t.finish()
    auth = Auth(username, secret, source, mechanism, tuple(token_command), oauth2 if mechanism == "oauth2" else None)
    return Server(host, port, security, ca_file, allow_plaintext, auth, timeout, poll)


def _template(t: _Table, key: str, source: str | None) -> compose.Template | None:
    if source is None:
        return None
    try:
        return compose.compile_template(source)
    except compose.TemplateProblem as exc:
        t.problems.add(t.at(key), f"template error: {exc}")
        return None


def _step(t: _Table, number: int, base_dir: Path) -> Step | None:
    wait = t.parsed("wait", 0.0, parse_duration)
    subject_text = t.string("subject", None)
    body_text = t.string("body", None)
    body_file = t.string("body_file", "")
    sender = t.string("sender", "")
    t.finish()
    if subject_text is not None and ("\r" in subject_text or "\n" in subject_text):
        t.problems.add(t.at("subject"), "must be one line")
        subject_text = None
    if body_text is not None and body_file:
        t.problems.add(t.path, "give body or body_file, not both")
    elif body_text is None and body_file:
        path = Path(body_file) if Path(body_file).is_absolute() else base_dir / body_file
        try:
            body_text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            t.problems.add(t.at("body_file"), f"cannot read {path}: {reason}")
            return None
        body_file = str(path)
    elif body_text is None:
        t.problems.add(t.path, "needs body or body_file")
        return None
    if number == 1 and not subject_text:
        t.problems.add(t.at("subject"), "is required on the first step (later steps without one reply in its thread)")
    subject = _template(t, "subject", subject_text) if subject_text else None
    body = _template(t, "body_file" if body_file else "body", body_text)
    if body is None:
        return None
    return Step(number, wait, subject, body, body_file, sender)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and build the whole configuration, or raise ConfigError with every problem."""
    config_path = Path(path)
    try:
        raw_bytes = config_path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(config_path)) from None
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        raise ConfigError([f"line {line}: not UTF-8"], str(config_path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], str(config_path)) from None
    return build_config(data, config_path)


def build_config(data: dict[str, Any], config_path: Path) -> Config:
    problems = _Problems()
    base_dir = config_path.parent
    root = _Table(data, "", problems)

    d = root.table("daemon") or _Table({}, "daemon", problems)
    database = _database(d, base_dir)
    daemon = DaemonSettings(
        database=database,
        log_format=d.choice("log_format", "auto", ("auto", "json", "console")),
        log_level=d.choice("log_level", "info", ("debug", "info", "warning", "error")),
        max_connections=d.integer("max_connections", 100, 1, 100_000),
        shutdown_grace=d.parsed("shutdown_grace", 30.0, parse_duration),
        retry_delays=tuple(_retry_delays(d)),
        idle_close=d.parsed("idle_close", 60.0, parse_duration),
        probe_backoff=d.parsed("probe_backoff", (30.0, 1800.0), parse_gap),
        busy_timeout=d.parsed("busy_timeout", 30.0, parse_duration),
        settle_after=d.parsed("settle_after", 900.0, parse_duration),
        node=_node(d),
        lease=_lease(d),
    )
    d.finish()

    dt = root.table("defaults") or _Table({}, "defaults", problems)
    defaults = _schedule(dt, _FALLBACK_SCHEDULE)
    default_helo = _helo_name(dt, "")
    default_copies = dt.choice("sent_copies", "none", SENT_COPIES)
    default_provider = dt.choice("provider", "", ("", *PROVIDERS))
    default_unsubscribe = _unsubscribe_url(dt, None)
    default_pause = _pause_on(dt, DEFAULT_PAUSE)
    default_reassign = dt.parsed("reassign_after", 0.0, parse_duration)
    dt.finish()

    users: list[User] = []
    user_seen: set[str] = set()
    for t in root.tables("users"):
        name = t.string("name")
        t.finish()
        if isinstance(name, str):
            if not name:
                t.problems.add(t.at("name"), "must not be empty")
            elif name in user_seen:
                t.problems.add(t.at("name"), f"duplicate user {name!r}")
            else:
                users.append(User(name))
                user_seen.add(name)
    user_names = {u.name for u in users}

    address_seen: set[str] = set()
    mailboxes: list[Mailbox] = []
    for t in root.tables("mailboxes"):
        address = t.string("address")
        if isinstance(address, str):
            problem = address_problem(address)
            if problem is not None:
                t.problems.add(t.at("address"), f"not an email address: {address!r} ({problem})")
            elif address.lower() in address_seen:
                t.problems.add(t.at("address"), f"duplicate mailbox {address!r}")
            address_seen.add(address.lower())
        name = t.string("name", "")
        if isinstance(name, str) and ("\r" in name or "\n" in name):
            t.problems.add(t.at("name"), "must be one line")
        owner = t.string("owner")
        if isinstance(owner, str) and owner not in user_names:
            t.problems.add(t.at("owner"), f"unknown user {owner!r}")
        schedule = _schedule(t, defaults)
        paused = t.boolean("paused", False)
        helo_name = _helo_name(t, default_helo)
        unsubscribe_url = _unsubscribe_url(t, default_unsubscribe)
        pause_on = _pause_on(t, default_pause)
        reassign_after = t.parsed("reassign_after", default_reassign, parse_duration)
        provider = t.choice("provider", default_provider, ("", *PROVIDERS))
        preset = PROVIDERS.get(provider)
        sent_copies = t.choice("sent_copies", preset.sent_copies if preset else default_copies, SENT_COPIES)
        oauth_t = t.table("oauth2")
        oauth2 = _oauth2(oauth_t, preset, base_dir) if oauth_t else None
        me = address if isinstance(address, str) else ""
        smtp_t = t.table("smtp", required=preset is None)
        if smtp_t is None and preset is not None:
            smtp_t = _Table({}, t.at("smtp"), problems)
        smtp = (
            _server(smtp_t, "smtp", base_dir, problems, config_path, preset.smtp if preset else None, oauth2, me)
            if smtp_t
            else None
        )
        imap_t = t.table("imap")
        if imap_t is None and preset is not None and preset.imap is not None:
            imap_t = _Table({}, t.at("imap"), problems)  # Google and Microsoft always have IMAP: replies are read
        imap = (
            _server(imap_t, "imap", base_dir, problems, config_path, preset.imap if preset else None, oauth2, me)
            if imap_t
            else None
        )
        t.finish()
        if isinstance(address, str) and isinstance(owner, str) and smtp is not None:
            mailbox = Mailbox(
                address,
                name or "",
                owner,
                schedule,
                smtp,
                imap,
                bool(paused),
                helo_name,
                sent_copies,
                provider,
                oauth2,
                unsubscribe_url,
                pause_on,
                reassign_after,
            )
            if sent_copies in ("provider", "append") and imap is None:
                t.problems.add(t.at("sent_copies"), f'"{sent_copies}" needs [imap] to reach the Sent folder')
            mailboxes.append(mailbox)

    cadences: list[Cadence] = []
    for t in root.tables("cadences", _cadence_label):
        cadence = _cadence(t, mailboxes, user_names, base_dir)
        if cadence is not None:
            if any(c.name == cadence.name for c in cadences):
                t.problems.add(t.at("name"), f"duplicate cadence {cadence.name!r}")
            else:
                cadences.append(cadence)

    automations: list[Automation] = []
    for t in root.tables("automations"):
        name = t.string("name")
        cad = t.string("cadence")
        owner = t.string("owner")
        watch = t.string("watch")
        max_size = t.parsed("max_file_size", 50 * 1024 * 1024, parse_size)
        settle = t.parsed("settle", 10.0, parse_duration)
        t.finish()
        if isinstance(cad, str) and not any(c.name == cad for c in cadences):
            t.problems.add(t.at("cadence"), f"unknown cadence {cad!r}")
        if isinstance(owner, str) and owner not in user_names:
            t.problems.add(t.at("owner"), f"unknown user {owner!r}")
        if isinstance(name, str) and any(a.name == name for a in automations):
            t.problems.add(t.at("name"), f"duplicate automation {name!r}")
        if all(isinstance(v, str) for v in (name, cad, owner, watch)):
            wpath = Path(watch) if Path(watch).is_absolute() else base_dir / watch
            automations.append(Automation(name, cad, owner, wpath, max_size, settle))
    playbooks: list[Playbook] = []
    for t in root.tables("playbooks", _cadence_label):
        playbook = _playbook(t, {c.name for c in cadences}, user_names)
        if playbook is not None:
            if any(p.name == playbook.name for p in playbooks):
                t.problems.add(t.at("name"), f"duplicate playbook {playbook.name!r}")
            else:
                playbooks.append(playbook)
    api_t = root.table("api")
    api = _api(api_t, base_dir) if api_t else None
    if playbooks and api is None and not problems.items:
        problems.warnings.append("playbooks: defined, but without [api] nothing can reach them")
    root.finish()

    if problems.items:
        raise ConfigError(problems.items, str(config_path))
    for m in mailboxes:  # from now on no text this process prints can show them
        for server in (m.smtp, m.imap):
            if server is not None and server.auth.secret is not None:
                redact.register(server.auth.username, server.auth.secret.reveal())
        if m.oauth2 is not None:
            for secret in (m.oauth2.client_secret, m.oauth2.refresh_token):
                if secret is not None:
                    redact.register(m.address, secret.reveal())
    return Config(
        path=config_path,
        daemon=daemon,
        defaults=defaults,
        users=tuple(users),
        mailboxes=tuple(mailboxes),
        cadences=tuple(cadences),
        automations=tuple(automations),
        warnings=tuple(problems.warnings),
        api=api,
        playbooks=tuple(playbooks),
    )


def _playbook(t: _Table, cadences: set[str], user_names: set[str]) -> Playbook | None:
    name = t.string("name")
    cadence = t.string("cadence")
    owner = t.string("owner")
    mapping = t.table("fields")
    fields: list[tuple[str, str]] = []
    if mapping is not None:
        for field_name, key in mapping.data.items():
            mapping.seen.add(field_name)
            where = mapping.at(field_name)
            if not isinstance(key, str) or not key:
                t.problems.add(where, f"must be the incoming JSON key (a string), got {_type_name(key)}")
            elif field_name != field_name.lower() or _BAD_FIELD.search(field_name):
                t.problems.add(where, "a field name is lower case, without spaces or control characters")
            else:
                fields.append((field_name, key))
        keys = [k for _, k in fields]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            t.problems.add(mapping.path, f"the key {key!r} fills more than one field")
    t.finish()
    if isinstance(name, str) and not PLAYBOOK_NAME.fullmatch(name):
        t.problems.add(t.at("name"), f"letters, digits, '.', '_' and '-' (at most 64; it is in the URL), got {name!r}")
        return None
    if isinstance(cadence, str) and cadence not in cadences:
        t.problems.add(t.at("cadence"), f"unknown cadence {cadence!r}")
    if isinstance(owner, str) and owner not in user_names:
        t.problems.add(t.at("owner"), f"unknown user {owner!r} (the playbook adds prospects as this user)")
    if not all(isinstance(v, str) for v in (name, cadence, owner)):
        return None
    return Playbook(name, cadence, owner, tuple(fields))


_BAD_FIELD = re.compile(r"[\s\x00-\x1f\x7f]")


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _node(d: _Table) -> str:
    node = d.string("node", "")
    if not node:  # the host name, made to fit
        return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-._")[:63] or "node"
    if not isinstance(node, str) or not _NODE.fullmatch(node):
        d.problems.add(d.at("node"), f"letters, digits, '.', '_' and '-', at most 63, got {node!r}")
        return "node"
    return node


def _lease(d: _Table) -> float:
    lease = d.parsed("lease", 60.0, parse_duration)
    if isinstance(lease, float) and not 3.0 <= lease <= 3600.0:
        d.problems.add(d.at("lease"), f"must be 3s to 1h, got {format_duration(lease)}")
        return 60.0
    return float(lease)


def _database(d: _Table, base_dir: Path) -> Path | str:
    """`database`: an SQLite file (relative to the config's folder), or `postgresql://…`; or `database_url_env` /
    `database_url_credential`, where the URL (and its password) is kept out of the file."""
    sources = [k for k in ("database", "database_url_env", "database_url_credential") if d.has(k)]
    if len(sources) > 1:
        d.problems.add(d.at(sources[1]), f"give only one of {', '.join(sources)}")
        d.seen.update(sources)
    env = d.string("database_url_env", None)
    credential = d.string("database_url_credential", None)
    if isinstance(env, str):
        url = os.environ.get(env, "")
        if not url.startswith(POSTGRES_SCHEMES):
            d.problems.add(d.at("database_url_env"), f"${env} must hold a postgresql:// URL (it is unset or not one)")
            return "postgresql://unset"
        text: str = url
    elif isinstance(credential, str):
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            d.problems.add(d.at("database_url_credential"), "CREDENTIALS_DIRECTORY is not set (LoadCredential=)")
            return "postgresql://unset"
        secret, _ = _secret_file(
            d, "database_url_credential", Path(folder) / credential, "", f"credential {credential}"
        )
        text = secret.reveal().strip() if secret is not None else ""
        if not text.startswith(POSTGRES_SCHEMES):
            if secret is not None:
                d.problems.add(d.at("database_url_credential"), "the credential must hold a postgresql:// URL")
            return "postgresql://unset"
    else:
        text = d.string("database", "/var/lib/cadenced/cadenced.db")
        if not isinstance(text, str):
            return Path("/var/lib/cadenced/cadenced.db")
    if text.startswith(POSTGRES_SCHEMES):
        try:
            passwords = database_passwords(text)
        except ValueError as exc:
            d.problems.add(d.at(sources[0] if sources else "database"), f"not a PostgreSQL URL: {exc}")
            return text
        for password in passwords:
            redact.register("database", password)
        if passwords and sources == ["database"]:
            d.problems.warnings.append(
                f"{d.at('database')}: a password in the config file; use database_url_env, "
                "database_url_credential, or a ~/.pgpass / PGPASSFILE of the service's own"
            )
        return text
    return Path(text) if Path(text).is_absolute() else base_dir / text


_PASSWORD_PARAMS = frozenset({"password", "sslpassword"})


def database_passwords(url: str) -> set[str]:
    """Every password a PostgreSQL URL carries (in its user part, or as `?password=` in libpq's form), as written
    and as decoded: what must never be shown. psycopg's conninfo parser says what libpq will use."""
    from psycopg.conninfo import conninfo_to_dict

    parts = urlsplit(url)
    found = {parts.password or ""}
    try:
        found |= {str(v) for k, v in conninfo_to_dict(url).items() if k in _PASSWORD_PARAMS and v is not None}
    except Exception as exc:  # psycopg.ProgrammingError: libpq cannot parse it
        raise ValueError(str(exc).strip()) from None
    for piece in parts.query.split("&"):
        key, _, value = piece.partition("=")
        if unquote(key).lower() in _PASSWORD_PARAMS:
            found |= {value, unquote(value), unquote_plus(value)}
    found |= {unquote(f) for f in found}
    return {f for f in found if f}


MIN_TOKEN = 32  # characters of an [api] token: a guessable one is no lock
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _api(t: _Table, base_dir: Path) -> ApiSettings | None:
    """`listen = "127.0.0.1:8025"` (loopback; another address needs TLS or allow_plain_http) or "unix:/path"."""
    listen = t.string("listen", "127.0.0.1:8025")
    token, source = _named_secret(t, "token", base_dir)
    metrics_token, metrics_source = _named_secret(t, "metrics_token", base_dir)
    tls_cert = t.string("tls_cert", "")
    tls_key = t.string("tls_key", "")
    allow_plain_http = t.boolean("allow_plain_http", False)
    hosts = t.strings("hosts", [])
    t.finish()
    if not source:
        t.problems.add(t.path, "needs token_file, token_env or token_credential (every request but /metrics shows it)")
    for secret, where in ((token, source), (metrics_token, metrics_source)):
        if secret is None:
            continue
        redact.register("api", secret.reveal())
        if len(secret.reveal().strip()) < MIN_TOKEN:
            key = t.at(where.partition(":")[0])
            t.problems.add(
                key,
                f"the token must be at least {MIN_TOKEN} characters, got {len(secret.reveal().strip())} "
                "(make one: head -c 32 /dev/urandom | base64)",
            )
    tls: list[str] = []
    for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if isinstance(value, str) and value:
            file = Path(value) if Path(value).is_absolute() else base_dir / value
            if not file.is_file():
                t.problems.add(t.at(key), f"no such file {file}")
            tls.append(str(file))
    if len(tls) == 1:
        t.problems.add(t.path, "give both tls_cert and tls_key, or neither")
    cert, key_file = (tls[0], tls[1]) if len(tls) == 2 else ("", "")
    names = tuple(h.lower() for h in hosts or [])
    for i, name in enumerate(names):
        if not re.fullmatch(r"[a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\]", name):
            t.problems.add(f"{t.at('hosts')}[{i}]", f"not a host name: {name!r}")
    plain = bool(allow_plain_http)
    if not isinstance(listen, str):
        return None
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path.startswith("/"):
            t.problems.add(t.at("listen"), f"a unix socket needs an absolute path, got {listen!r}")
        return ApiSettings("", 0, path, token, source, metrics_token, metrics_source, cert, key_file, plain, names)
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        t.problems.add(t.at("listen"), f'must be "HOST:PORT" or "unix:/PATH", got {listen!r}')
        return None
    if not is_loopback(host):
        if not cert and not plain:
            t.problems.add(
                t.at("listen"),
                f"{listen} can be reached from other machines: give tls_cert and tls_key, or say "
                "allow_plain_http = true (only behind a TLS proxy: tokens and every prospect cross the network)",
            )
        elif not cert:
            t.problems.warnings.append(
                f"{t.at('listen')}: {listen} serves plain HTTP to other machines (allow_plain_http = true): "
                "tokens and prospects cross the network in clear unless a TLS proxy is in front"
            )
    return ApiSettings(
        host, int(port_text), "", token, source, metrics_token, metrics_source, cert, key_file, plain, names
    )


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_delays(d: _Table) -> list[float]:
    texts = d.strings("retry_delays", ["5m", "30m", "2h"])
    delays = []
    for i, text in enumerate(texts or []):
        try:
            delays.append(parse_duration(text))
        except ValueError as exc:
            d.problems.add(f"{d.at('retry_delays')}[{i}]", str(exc))
    return delays


def _cadence(t: _Table, mailboxes: list[Mailbox], user_names: set[str], base_dir: Path) -> Cadence | None:
    name = t.string("name")
    users = t.strings("users", [])
    direct = t.strings("mailboxes", [])
    auto_rotate = t.boolean("auto_rotate", True)
    rotate_among_set = t.has("rotate_among")
    rotate_among = t.choice("rotate_among", "adder", ("adder", "owner", "cadence"))
    rotation = t.choice("rotation", "round_robin", ("round_robin", "weighted"))
    sender = t.string("sender", "")
    stop_on_reply = t.boolean("stop_on_reply", True)
    fields = t.strings("fields", [])
    known = {m.address for m in mailboxes}
    for i, u in enumerate(users or []):
        if u not in user_names:
            t.problems.add(f"{t.at('users')}[{i}]", f"unknown user {u!r}")
    for i, a in enumerate(direct or []):
        if a not in known:
            t.problems.add(f"{t.at('mailboxes')}[{i}]", f"unknown mailbox {a!r}")
    for i, f in enumerate(fields or []):
        if not f.isidentifier():
            t.problems.add(f"{t.at('fields')}[{i}]", f"not a template variable name: {f!r}")
    wanted = set(direct or [])
    members = set(users or [])
    pool = tuple(m.address for m in mailboxes if m.address in wanted or m.owner in members)
    if (users or direct) and not pool:
        t.problems.add(t.path, "the pool is empty: its users own no mailbox and it names none")
    elif not users and not direct:
        t.problems.add(t.path, "needs users or mailboxes to send from")
    if sender and sender not in pool:
        t.problems.add(t.at("sender"), f"{sender!r} is not a mailbox of this cadence's pool")
    if sender and auto_rotate:
        t.problems.add(t.at("sender"), "a fixed sender needs auto_rotate = false")
    steps: list[Step] = []
    step_tables = list(t.tables("steps"))
    if not step_tables:
        t.problems.add(t.at("steps"), "a cadence needs at least one step")
    for number, st in enumerate(step_tables, start=1):
        step = _step(st, number, base_dir)
        if step is None:
            continue
        if step.sender:
            if auto_rotate:
                st.problems.add(
                    st.at("sender"),
                    '"Assign to Sender" is disabled under auto-rotate: set auto_rotate = false to use it',
                )
            elif step.sender not in pool:
                st.problems.add(st.at("sender"), f"{step.sender!r} is not a mailbox of this cadence's pool")
        steps.append(step)
    t.finish()
    if not isinstance(name, str):
        return None
    if not name:
        t.problems.add(t.at("name"), "must not be empty")
        return None
    for step, st in zip(steps, step_tables, strict=False):
        _check_render(st, step, tuple(fields or []))
    return Cadence(
        name=name,
        users=tuple(users or []),
        mailboxes=tuple(direct or []),
        pool=pool,
        auto_rotate=bool(auto_rotate),
        rotate_among=rotate_among,
        sender=sender or "",
        stop_on_reply=bool(stop_on_reply),
        rotation=rotation,
        rotate_among_set=rotate_among_set,
        fields=tuple(fields or []),
        steps=tuple(steps),
    )


def _check_render(t: _Table, step: Step, fields: tuple[str, ...]) -> None:
    sample = compose.sample_variables(fields)
    for key, template in (("subject", step.subject), ("body_file" if step.body_file else "body", step.body)):
        if template is None:
            continue
        try:
            template.render(sample)
        except compose.TemplateProblem as exc:
            hint = ""
            if "undefined" in str(exc):
                hint = (
                    " (prospect fields are email, first_name, last_name, company and the names in"
                    " fields = [...]; use default(...) for a fallback)"
                )
            t.problems.add(t.at(key), f"{exc}{hint}")


def config_digest(path: Path) -> str:
    """What `enroll`, `status` and `outbox` compare with the running daemon's config ("reload to apply")."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def config_path_from(arg: str | None) -> Path:
    """--config beats CADENCED_CONFIG beats the default path."""
    return Path(arg or os.environ.get("CADENCED_CONFIG") or DEFAULT_PATH)


# --- printing -------------------------------------------------------------------


def _schedule_dict(s: Schedule) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "skip_dates": sorted(s.skip_dates),
        "holidays": list(s.holidays),
        "domain_daily_limit": s.domain_daily_limit,
    }
    if s.warmup is not None:
        w = s.warmup
        extra["warmup"] = {"start": w.start, "step": w.step, "every": f"{w.every}d", "ceiling": w.ceiling}
    return {
        "timezone": s.timezone,
        "days": [DAYS[d] for d in sorted(s.days)],
        "hours": [f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}" for a, b in s.hours],
        "daily_limit": s.daily_limit,
        "gap": format_duration(s.gap[0])
        if s.gap[0] == s.gap[1]
        else f"{format_duration(s.gap[0])}-{format_duration(s.gap[1])}",
    } | extra


def _server_dict(s: Server, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": s.host,
        "port": s.port,
        "security": s.security,
        "ca_file": s.ca_file,
        "allow_plaintext": s.allow_plaintext,
        "timeout": format_duration(s.timeout),
        "username": s.auth.username,
    }
    if s.auth.mechanism == "xoauth2":
        out["auth"] = "xoauth2"
        out["token_command"] = list(s.auth.token_command)
    elif s.auth.mechanism == "oauth2":
        out["auth"] = "oauth2"
    kind_of_source = s.auth.source.partition(":")[0]
    if kind_of_source == "password":
        out["password"] = MASK
    elif kind_of_source:
        out[kind_of_source] = s.auth.source.partition(":")[2]
    if kind == "imap":
        out["poll"] = format_duration(s.poll)
    return out


def _oauth2_dict(o: OAuth2) -> dict[str, Any]:
    out: dict[str, Any] = {"client_id": o.client_id}
    for source in (o.client_secret_source, o.refresh_token_source):
        if source:
            key, _, where = source.partition(":")
            out[key] = where
    return {**out, "token_url": o.token_url, "auth_url": o.auth_url, "scopes": list(o.scopes)}


def _api_dict(a: ApiSettings) -> dict[str, Any]:
    kind, _, where = a.token_source.partition(":")
    listen = f"unix:{a.socket}" if a.socket else f"{a.host}:{a.port}"
    out: dict[str, Any] = {"listen": listen, **({kind: where} if kind else {})}
    metrics_kind, _, metrics_where = a.metrics_token_source.partition(":")
    if metrics_kind:
        out[metrics_kind] = metrics_where
    if a.tls_cert:
        out |= {"tls_cert": a.tls_cert, "tls_key": a.tls_key}
    if a.allow_plain_http:
        out["allow_plain_http"] = True
    if a.hosts:
        out["hosts"] = list(a.hosts)
    return out


def shown_database(database: Path | str) -> str:
    """The database as logs, errors and `check` may print it: every password (user part or query) masked."""
    if isinstance(database, Path):
        return str(database)
    try:
        parts = urlsplit(database)
        password = parts.password
    except ValueError:
        return "postgresql://(a URL that cannot be parsed)"
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:********@{host}"
    query = "&".join(
        f"{key}=********" if unquote(key).lower() in _PASSWORD_PARAMS else f"{key}{sep}{value}"
        for key, sep, value in (piece.partition("=") for piece in parts.query.split("&") if piece)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def effective_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as plain TOML data, secrets masked."""
    d = config.daemon
    return {
        "daemon": {
            "database": shown_database(d.database),
            "log_format": d.log_format,
            "log_level": d.log_level,
            "max_connections": d.max_connections,
            "shutdown_grace": format_duration(d.shutdown_grace),
            "retry_delays": [format_duration(x) for x in d.retry_delays],
            "idle_close": format_duration(d.idle_close),
            "probe_backoff": f"{format_duration(d.probe_backoff[0])}-{format_duration(d.probe_backoff[1])}",
            "busy_timeout": format_duration(d.busy_timeout),
            "settle_after": format_duration(d.settle_after),
            "node": d.node,
            "lease": format_duration(d.lease),
        },
        "defaults": _schedule_dict(config.defaults),
        "users": [{"name": u.name} for u in config.users],
        "mailboxes": [
            {
                "address": m.address,
                "name": m.name,
                "owner": m.owner,
                "paused": m.paused,
                **({"helo_name": m.helo_name} if m.helo_name else {}),
                "sent_copies": m.sent_copies,
                **({"provider": m.provider} if m.provider else {}),
                **({"unsubscribe_url": m.unsubscribe_url.source} if m.unsubscribe_url else {}),
                "reassign_after": format_duration(m.reassign_after),
                "pause_on": {
                    "bounce_rate": m.pause_on.bounce_rate,
                    "block_rate": m.pause_on.block_rate,
                    "min_sends": m.pause_on.min_sends,
                    "window": f"{m.pause_on.window_days}d",
                }
                if m.pause_on
                else False,
                **_schedule_dict(m.schedule),
                **({"oauth2": _oauth2_dict(m.oauth2)} if m.oauth2 else {}),
                "smtp": _server_dict(m.smtp, "smtp"),
                **({"imap": _server_dict(m.imap, "imap")} if m.imap else {}),
            }
            for m in config.mailboxes
        ],
        "cadences": [
            {
                "name": c.name,
                "users": list(c.users),
                "mailboxes": list(c.mailboxes),
                "auto_rotate": c.auto_rotate,
                "rotate_among": c.rotate_among,
                "rotation": c.rotation,
                "sender": c.sender,
                "stop_on_reply": c.stop_on_reply,
                "fields": list(c.fields),
                "steps": [
                    {
                        "wait": format_duration(s.wait),
                        **({"subject": s.subject.source} if s.subject else {}),
                        **({"body_file": s.body_file} if s.body_file else {"body": s.body.source}),
                        "sender": s.sender,
                    }
                    for s in c.steps
                ],
            }
            for c in config.cadences
        ],
        **({"api": _api_dict(config.api)} if config.api else {}),
        "automations": [
            {
                "name": a.name,
                "cadence": a.cadence,
                "owner": a.owner,
                "watch": str(a.watch),
                "max_file_size": f"{a.max_file_size}B",
                "settle": format_duration(a.settle),
            }
            for a in config.automations
        ],
        "playbooks": [
            {"name": p.name, "cadence": p.cadence, "owner": p.owner, **({"fields": dict(p.fields)} if p.fields else {})}
            for p in config.playbooks
        ],
    }
