"""TOML → the frozen dataclasses of daemon.model; every check names its TOML path."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import ipaddress
import os
import re
import tomllib
import zoneinfo
from datetime import date
from pathlib import Path
from typing import Any

import email_validator

from daemon import compose, headers, lifecycle, redact
from daemon.config.database import _database, _lease, _node
from daemon.config.presets import PROVIDERS, SENT_COPIES, Preset
from daemon.config.secrets import _named_secret, _secret
from daemon.config.tables import _Problems, _Table, _type_name
from daemon.config.values import format_duration, merge_ranges, parse_duration, parse_gap, parse_hours, parse_size
from daemon.errors import ConfigError
from daemon.model import (
    DAYS,
    DEFAULT_PAUSE,
    PLAYBOOK_NAME,
    PRIORITIES,
    UNSUBSCRIBE_LINK,
    ApiSettings,
    Auth,
    Automation,
    Cadence,
    Config,
    DaemonSettings,
    Mailbox,
    OAuth2,
    PauseRule,
    Playbook,
    Schedule,
    Server,
    Step,
    User,
    Variant,
    Warmup,
)

DEFAULT_PATH = "/etc/cadenced/config.toml"


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


def _cadence_label(i: int, item: dict[str, Any]) -> str:
    name = item.get("name")
    return f'."{name}"' if isinstance(name, str) and name else f"[{i}]"


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
    prioritize = t.choice("prioritize", base.prioritize, PRIORITIES)
    new_per_day = t.integer("new_per_day", base.new_per_day, 0, 100_000)
    return Schedule(tz, days, hours, limit, gap, warmup, skip_dates, domain_limit, calendars, prioritize, new_per_day)


def holiday_calendar_problem(code: str) -> str:
    """Why `code` ("US", "DE-BY") names no calendar of the holidays package, or ""."""
    import holidays  # 50 ms: imported by the configs that name a calendar, not by every command

    country, _, subdivision = code.partition("-")
    try:
        holidays.country_holidays(country, subdiv=subdivision or None, years=2026)
    except NotImplementedError as exc:
        return f'no holiday calendar {code!r} ({exc}); a country code such as "US" or "DE-BY"'
    return ""


def _signature(t: _Table, base: compose.Template | None) -> compose.Template | None:
    """`signature`: a template of the mailbox's sender_name and sender_address, checked by rendering it."""
    text = t.string("signature", None)
    if text is None:
        return base
    template = _template(t, "signature", text) if text else None
    if template is None:
        return None
    try:
        template.render(compose.sender_variables("Sam Sender", "sam@sender.example"))
    except compose.TemplateProblem as exc:
        t.problems.add(t.at("signature"), f"template error: {exc} (it knows sender_name and sender_address)")
        return None
    return template


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


def _step(t: _Table, number: int, base_dir: Path, body_format: str = "text") -> Step | None:
    wait = t.parsed("wait", 0.0, parse_duration)
    body_format = t.choice("format", body_format, ("text", "markdown"))
    subject_text = _subject_text(t)
    body_text, body_file = _body_text(t, base_dir)
    sender = t.string("sender", "")
    thread = t.choice("thread", "reply", ("reply", "new"))
    variant_tables = list(t.tables("variants"))
    t.finish()
    new_thread = thread == "new" and number > 1
    markdown = body_format == "markdown"
    if variant_tables:
        shared = Step(number, wait, None, compose.compile_template(""), "", sender, new_thread, markdown)
        return _step_with_variants(t, variant_tables, shared, base_dir, subject_text, body_text, body_file, thread)
    if thread == "new" and not subject_text:
        t.problems.add(t.at("thread"), '"new" needs the step\'s own subject (a new thread is not a reply)')
    if body_text is None:
        if body_file is None:
            t.problems.add(t.path, "needs body or body_file")
        return None
    if number == 1 and not subject_text:
        t.problems.add(t.at("subject"), "is required on the first step (later steps without one reply in its thread)")
    subject = _template(t, "subject", subject_text) if subject_text else None
    body = _template(t, "body_file" if body_file else "body", body_text)
    if body is None:
        return None
    return Step(number, wait, subject, body, body_file or "", sender, new_thread, markdown)


def _subject_text(t: _Table) -> str | None:
    subject = t.string("subject", None)
    if subject is not None and ("\r" in subject or "\n" in subject):
        t.problems.add(t.at("subject"), "must be one line")
        return None
    return subject if isinstance(subject, str) else None


def _body_text(t: _Table, base_dir: Path) -> tuple[str | None, str | None]:
    """(text, "" or the file it was read from); (None, None) when the table gives neither body nor body_file;
    (None, "") when what it gives cannot be used (the problem is noted)."""
    body = t.string("body", None)
    body_file = t.string("body_file", None)
    if isinstance(body, str) and isinstance(body_file, str):
        t.problems.add(t.path, "give body or body_file, not both")
        return None, ""
    if isinstance(body, str):
        return body, ""
    if not isinstance(body_file, str):
        return None, (None if "body" not in t.data and "body_file" not in t.data else "")
    path = Path(body_file) if Path(body_file).is_absolute() else base_dir / body_file
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        t.problems.add(t.at("body_file"), f"cannot read {path}: {reason}")
        return None, ""


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,39}")
MAX_VARIANTS = 26


def _step_with_variants(
    t: _Table,
    tables: list[_Table],
    shared: Step,
    base_dir: Path,
    subject_text: str | None,
    body_text: str | None,
    body_file: str | None,
    thread: str,
) -> Step | None:
    """A step with [[cadences.steps.variants]]: each variant its own subject and body, or the step's where it
    leaves one out (`shared`: the step's wait, sender, thread and format). The step itself reads as its first
    variant."""
    number = shared.number
    if len(tables) < 2 or len(tables) > MAX_VARIANTS:
        t.problems.add(t.at("variants"), f"give 2 to {MAX_VARIANTS} variants, got {len(tables)}")
    variants: list[Variant] = []
    for i, vt in enumerate(tables):
        name = vt.string("name", chr(ord("A") + i) if i < MAX_VARIANTS else str(i + 1))
        weight = vt.integer("weight", 1, 1, 1000)
        v_subject = _subject_text(vt)
        v_body, v_file = _body_text(vt, base_dir)
        vt.finish()
        if isinstance(name, str) and not VARIANT_NAME.fullmatch(name):
            vt.problems.add(
                vt.at("name"), f"{name!r}: letters, digits, space . _ - (40 at most, a letter or digit first)"
            )
        elif any(v.name == name for v in variants):
            vt.problems.add(vt.at("name"), f"duplicate variant {name!r}")
        subject_text_v = v_subject if v_subject is not None else subject_text
        where, text, file = (vt, v_body, v_file) if v_body is not None else (t, body_text, body_file)
        if text is None:
            if v_file is None and body_file is None:
                vt.problems.add(vt.path, "needs body or body_file (the step gives neither)")
            continue
        if thread == "new" and not subject_text_v:
            vt.problems.add(vt.at("subject"), "\"new\" thread needs a subject (the step's or the variant's own)")
        if number == 1 and not subject_text_v:
            vt.problems.add(vt.at("subject"), "is required on the first step (the step's or the variant's own)")
        owner = vt if v_subject is not None else t
        subject = _template(owner, "subject", subject_text_v) if subject_text_v else None
        body = _template(where, "body_file" if file else "body", text)
        if body is None or not isinstance(name, str):
            continue
        version = dataclasses.replace(shared, subject=subject, body=body, body_file=file or "")
        variants.append(Variant(name, weight if isinstance(weight, int) else 1, version))
    if len(variants) != len(tables) or not variants:
        return None
    first = variants[0].step
    return dataclasses.replace(first, variants=tuple(variants))


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
    default_signature = _signature(dt, None)
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
        signature = _signature(t, default_signature)
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
                signature,
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
        mapping = _column_map(t)
        delimiter = t.choice("delimiter", None, (",", ";", "\t"))
        encoding = t.parsed("encoding", None, _encoding)
        t.finish()
        if isinstance(cad, str) and not any(c.name == cad for c in cadences):
            t.problems.add(t.at("cadence"), f"unknown cadence {cad!r}")
        if isinstance(owner, str) and owner not in user_names:
            t.problems.add(t.at("owner"), f"unknown user {owner!r}")
        if isinstance(name, str) and any(a.name == name for a in automations):
            t.problems.add(t.at("name"), f"duplicate automation {name!r}")
        if all(isinstance(v, str) for v in (name, cad, owner, watch)):
            wpath = Path(watch) if Path(watch).is_absolute() else base_dir / watch
            automations.append(Automation(name, cad, owner, wpath, max_size, settle, mapping, delimiter, encoding))
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
    for c in cadences:  # a From name left empty reads as nothing in an email
        templates = [t for s in c.versions() for t in (s.subject, s.body) if t is not None]
        for m in (m for m in mailboxes if m.address in c.pool and not m.name):
            uses = any("sender_name" in t.names for t in templates)
            signs = (
                m.signature is not None
                and "sender_name" in m.signature.names
                and any("signature" in t.names for t in templates)
            )
            if uses or signs:
                problems.warnings.append(
                    f'mailboxes."{m.address}": no name, and cadence {c.name!r} writes {{{{ sender_name }}}}'
                    f"{' (through its signature)' if signs and not uses else ''}: it will read as nothing; set name"
                )
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
    column_map = _column_map(t)
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
    return Playbook(name, cadence, owner, tuple(fields), column_map)


def _column_map(t: _Table) -> tuple[tuple[str, str], ...]:
    """`map = { "Column Name" = "field" }` (SPEC §2a): a column or key read as a field; "" leaves it out."""
    table = t.table("map")
    if table is None:
        return ()
    out: dict[str, str] = {}
    for column, field in table.data.items():
        table.seen.add(column)
        if not isinstance(field, str):
            t.problems.add(table.at(repr(column)), f"must be a field name (a string), got {_type_name(field)}")
        else:
            out[column] = field
    try:
        return tuple(headers.check_map(out, table.path).items())
    except ValueError as exc:
        t.problems.add(table.path, str(exc).removeprefix(f"{table.path} "))
        return ()


def _encoding(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"{name!r} is not an encoding Python knows (cp1252, latin-1, utf-16…)") from None
    return name


_BAD_FIELD = re.compile(r"[\s\x00-\x1f\x7f]")


MIN_TOKEN = 32  # characters of an [api] token: a guessable one is no lock


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _api(t: _Table, base_dir: Path) -> ApiSettings | None:
    """`listen = "127.0.0.1:8025"` (loopback; another address needs TLS or allow_plain_http) or "unix:/path"."""
    listen = t.string("listen", "127.0.0.1:8025")
    token, source = _named_secret(t, "token", base_dir)
    metrics_token, metrics_source = _named_secret(t, "metrics_token", base_dir)
    viewer_token, viewer_source = _named_secret(t, "read_only_token", base_dir)
    tls_cert = t.string("tls_cert", "")
    tls_key = t.string("tls_key", "")
    allow_plain_http = t.boolean("allow_plain_http", False)
    hosts = t.strings("hosts", [])
    t.finish()
    if not source:
        t.problems.add(t.path, "needs token_file, token_env or token_credential (every request but /metrics shows it)")
    if token is not None and viewer_token is not None and token.reveal().strip() == viewer_token.reveal().strip():
        t.problems.add(t.at(viewer_source.partition(":")[0]), "must differ from the token (a viewer could act)")
    for secret, where in ((token, source), (metrics_token, metrics_source), (viewer_token, viewer_source)):
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
    viewer = (viewer_token, viewer_source)
    if not isinstance(listen, str):
        return None
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path.startswith("/"):
            t.problems.add(t.at("listen"), f"a unix socket needs an absolute path, got {listen!r}")
        return ApiSettings(
            "", 0, path, token, source, metrics_token, metrics_source, cert, key_file, plain, names, *viewer
        )
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
        host, int(port_text), "", token, source, metrics_token, metrics_source, cert, key_file, plain, names, *viewer
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
    stop_on_reply: Any = t.data.get("stop_on_reply", True)
    t.seen.add("stop_on_reply")
    if stop_on_reply != "company" and not isinstance(stop_on_reply, bool):
        t.problems.add(t.at("stop_on_reply"), f'must be true, false or "company", got {stop_on_reply!r}'[:200])
        stop_on_reply = True
    fields = t.strings("fields", [])
    new_per_day = t.integer("new_per_day", 0, 0, 100_000)
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
    body_format = t.choice("format", "text", ("text", "markdown"))
    steps: list[Step] = []
    step_tables = list(t.tables("steps"))
    if not step_tables:
        t.problems.add(t.at("steps"), "a cadence needs at least one step")
    for number, st in enumerate(step_tables, start=1):
        step = _step(st, number, base_dir, body_format)
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
        stop_company=stop_on_reply == "company",
        rotation=rotation,
        new_per_day=new_per_day if isinstance(new_per_day, int) else 0,
        rotate_among_set=rotate_among_set,
        fields=tuple(fields or []),
        steps=tuple(steps),
    )


def _check_render(t: _Table, step: Step, fields: tuple[str, ...]) -> None:
    versions = [(f"variants[{i}].", v.step) for i, v in enumerate(step.variants)] or [("", step)]
    for prefix, version in versions:
        _check_version(t, version, fields, prefix)


def _check_version(t: _Table, step: Step, fields: tuple[str, ...], prefix: str) -> None:
    for _, part, exc in lifecycle.unfilled([step], compose.sample_variables(fields)):
        key = prefix + ("body_file" if part == "body" and step.body_file else part)
        hint = ""
        if "undefined" in str(exc):
            hint = (
                " (prospect fields are email, first_name, last_name, company and the names in"
                " fields = [...]; use default(...) for a fallback)"
            )
        t.problems.add(t.at(key), f"{exc}{hint}")


def accepted_state(path: Path) -> dict[str, str | None]:
    """What the daemon keeps of the config it runs (at start and at each reload): its digest, for the commands'
    "reload to apply", and its text, which read commands use when the file on disk is broken or differs."""
    try:
        raw = path.read_bytes()
    except OSError:
        return {"config_digest": "", "config_text": None}
    return {"config_digest": hashlib.sha256(raw).hexdigest(), "config_text": raw.decode("utf-8", "replace")}


def load_accepted(path: Path, text: str) -> Config:
    """A config the daemon accepted, from the text it kept (file paths in it are read from `path`'s folder)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"the kept configuration: invalid TOML: {exc}"], str(path)) from None
    return build_config(data, path)


_DAEMON_TABLE = re.compile(r"^\[daemon\][ \t]*(?:#[^\n]*)?\n(.*?)(?=^[ \t]*\[|\Z)", re.MULTILINE | re.DOTALL)


def database_of(path: Path) -> Path | str | None:
    """The database a config file names, read from its [daemon] table alone: the rest of the file may be broken
    (a read command then reads the config the daemon kept there). None: that table cannot be read either."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found = _DAEMON_TABLE.search(text)
    try:
        data = tomllib.loads(found.group(1)) if found else {}
    except tomllib.TOMLDecodeError:
        return None
    problems = _Problems()
    database = _database(_Table(data, "daemon", problems), path.parent)
    return None if problems.items else database


def config_digest(path: Path) -> str:
    """What `enroll`, `status` and `outbox` compare with the running daemon's config ("reload to apply")."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def config_path_from(arg: str | None) -> Path:
    """--config beats CADENCED_CONFIG beats the default path."""
    return Path(arg or os.environ.get("CADENCED_CONFIG") or DEFAULT_PATH)
