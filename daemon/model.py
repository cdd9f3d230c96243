"""The domain model: the frozen dataclasses a loaded configuration is made of, which every part of the
daemon reads. Loading and checking them (TOML, secrets, presets) is daemon.config's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from daemon import compose

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MASK = "********"
PRIORITIES = ("follow_ups", "new", "due")  # which of a mailbox's due messages goes first (SPEC §4)
UNSUBSCRIBE_LINK = re.compile(r"https://[!-;=?-~]+")  # printable ASCII without spaces or angle brackets


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
    prioritize: str = "follow_ups"  # among due messages: follow_ups (step >= 2) first, new (step 1) first, or due
    new_per_day: int = 0  # first emails (step 1) per local day at most, across cadences (0: no such cap)


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
    signature: compose.Template | None = None  # {{ signature }}: rendered with the mailbox's sender_name/address
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
    new_thread: bool = False  # thread = "new": its own subject, no In-Reply-To; the steps after it reply to it
    markdown: bool = False  # format = "markdown": sent as text and HTML (multipart/alternative)
    variants: tuple[Variant, ...] = ()  # [[cadences.steps.variants]]: none, or two and more versions of the step

    def versions(self) -> tuple[Step, ...]:
        """The step as each prospect may get it: itself, or each of its variants (a Step with the variant's
        subject and body)."""
        return tuple(v.step for v in self.variants) if self.variants else (self,)


@dataclass(frozen=True, slots=True)
class Variant:
    """One version of a step (an A/B test): its name (`name`, or A, B, … in file order), its share (`weight`) and the
    step as it is sent in it (the variant's subject and body, or the step's where the variant leaves them out)."""

    name: str
    weight: int
    step: Step


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
    new_per_day: int = 0  # first emails of this cadence per mailbox per local day at most (0: no such cap)
    stop_company: bool = False  # stop_on_reply = "company": a reply from the prospect's domain stops all of it
    rotate_among_set: bool = True  # False: the file leaves it to the default (a database may pin the old one)

    def required_fields(self) -> frozenset[str]:
        names: set[str] = set()
        for step in self.versions():
            names |= step.body.required
            if step.subject is not None:
                names |= step.subject.required
        return frozenset(names - set(compose.SENDER_FIELDS))

    def versions(self) -> tuple[Step, ...]:
        """Every step as it may be sent: each variant of a step with variants."""
        return tuple(v for s in self.steps for v in s.versions())

    def used_fields(self) -> frozenset[str]:
        """Every prospect field a template of the cadence reads, with `default` or without."""
        names: set[str] = set()
        for step in self.versions():
            names |= step.body.names | (step.subject.names if step.subject is not None else frozenset())
        return frozenset(names - set(compose.SENDER_FIELDS) - {"unsubscribe_url"})

    def subject_fields(self) -> frozenset[str]:
        """The prospect fields a subject reads: they reach a header, so no line break may be in them."""
        names: set[str] = set()
        for step in self.versions():
            if step.subject is not None:
                names |= step.subject.names
        return frozenset(names)


@dataclass(frozen=True, slots=True)
class Automation:
    name: str
    cadence: str
    owner: str
    watch: Path
    max_file_size: int = 50 * 1024 * 1024  # bytes; a larger file goes to failed/ unread
    settle: float = 10.0  # seconds a *.csv must stay unchanged (a *.csv.part renamed to *.csv goes at once)
    mapping: tuple[tuple[str, str], ...] = ()  # `map`: column → field ('' leaves it out), as enroll's --map
    delimiter: str | None = None  # None: found from each file's header row
    encoding: str | None = None  # None: UTF-8, or UTF-16 by a byte-order mark


@dataclass(frozen=True, slots=True)
class Playbook:
    """[[playbooks]]: prospects POSTed by another system (a CRM rule, a form) enrolled as the owner adds them."""

    name: str
    cadence: str
    owner: str
    fields: tuple[tuple[str, str], ...] = ()  # (field, the incoming JSON key that fills it)
    mapping: tuple[tuple[str, str], ...] = ()  # `map`: incoming key → field ('' leaves it out), as --map

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
    read_only_token: Secret | None = None  # the dashboard's viewers: they see every page and act on nothing
    read_only_token_source: str = ""


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
