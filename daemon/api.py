"""[api]: the daemon's HTTP listener. Prometheus /metrics (no token); with a bearer token, playbook enrollments,
and the JSON of `status`, `outbox`, `outbox retry` and `outbox reassign` as the CLI prints them.

Starlette for the routes (an ASGI toolkit that runs on anyio) under Hypercorn (an ASGI server made to be
embedded: it serves inside the daemon's own task group and stops on the daemon's signal, installing no
signal handlers of its own). Every database call opens its own connection in a worker thread: a scrape,
a status or an enrollment never blocks the sender loops' event loop. TLS is a reverse proxy's job.

A request is hostile until parsed: its body is read up to a bound, its JSON checked field by field, and
every refusal is a 4xx whose JSON names the field. Nothing a refused request carried is enrolled.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config as ServerConfig
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon import dashboard, enroll, headers, logs, operate, prospects, readside, store
from daemon.config import LOOPBACK_HOSTS, is_loopback
from daemon.errors import NotFound, Refused, StoreError, StoreUnavailable, UsageError
from daemon.model import ApiSettings, Config, Playbook
from daemon.store import MESSAGE_STATES, OUTCOMES, Store

MAX_LIMIT = 10_000  # messages one GET /v1/outbox returns
MAX_PROSPECTS = 10_000  # prospects in one enrollment request
MAX_BODY = 16 * 1024 * 1024  # bytes of one request body (10,000 prospects of 1.6 KB each)
BODY_WITHIN = 120.0  # seconds a client has to send its whole body (a trickling one holds no slot for long)
BODIES_AT_ONCE = 8  # request bodies being received at once: what they can hold in memory is bounded
MAX_FIELDS = 200  # distinct fields in one enrollment request
MAX_NAME = 128  # characters of a field name
MAX_IDS = 10_000  # message ids in one retry or reassign
MAX_ID = 2**53  # a message id beyond this is no message (and would overflow SQLite's integer)
_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # an Idempotency-Key: printable ASCII, no spaces
_DIGITS = re.compile(r"[0-9]{1,6}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
CONCURRENT_ENROLLMENTS = 2  # requests enrolling at once (each holds its prospects in memory)


class BadRequest(Exception):
    """A 4xx for the client: what is wrong, where (a JSON path, a header, a query parameter)."""

    def __init__(self, status: int, field: str, detail: str, error: str = "bad_request") -> None:
        super().__init__(detail)
        self.status, self.field, self.detail, self.error = status, field, detail, error

    def response(self) -> JSONResponse:
        return error_response(self.status, self.error, self.detail, self.field)


def error_response(status: int, error: str, detail: str, field: str | None = None, **more: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse({**body, **more}, status_code=status)


def cadence_messages(config: Config, found: Iterable[tuple[str, int, str, str, int]]) -> CounterMetricFamily:
    """cadenced_cadence_messages_total{cadence,step,variant,outcome}: each configured cadence's messages by step,
    variant ("-": none) and what became of them (sent, blocked, and the ends and outcomes of the prospects whose
    last email it was). Only configured names make labels: a removed cadence or variant is left out."""
    family = CounterMetricFamily(
        "cadenced_cadence_messages",
        "Messages of each cadence by step and variant, and what became of them",
        labels=["cadence", "step", "variant", "outcome"],
    )
    steps = {c.name: c.steps for c in config.cadences}
    for cadence, step, variant, kind, n in found:
        known = steps.get(cadence, ())
        if not 0 < step <= len(known):
            continue
        names = {v.name for v in known[step - 1].variants}
        if (variant or "-") not in (names or {"-"}):
            continue
        family.add_metric([cadence, str(step), variant or "-", kind.removeprefix("outcome:")], n)
    return family


class DaemonMetrics(Collector):
    """Read at each scrape: the daemon's counts since start, and the database's state now."""

    def __init__(self, config: Callable[[], Config], dispatcher: Callable[[], Any]) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.last_commit = 0.0  # when this process last committed (store.commits hook)
        self.db: Store | None = None
        self.db_path: Path | str = ""

    def collect(self) -> Iterator[Any]:
        config = self.config()
        d = self.dispatcher()
        sent = CounterMetricFamily("cadenced_messages_sent", "Messages the servers accepted since the daemon started")
        sent.add_metric([], d.stats.sent if d else 0)
        yield sent
        events = CounterMetricFamily(
            "cadenced_events", "Log events since start, by event and reason", labels=["event", "reason"]
        )
        for (name, reason), n in sorted(logs.event_counts.items()):
            events.add_metric([name, reason], n)
        yield events
        watchers = list(d.watchers.values()) if d else []
        sessions = GaugeMetricFamily("cadenced_imap_sessions", "IMAP sessions logged in and watching INBOX")
        sessions.add_metric([], sum(1 for w in watchers if w.watching))
        yield sessions
        watched = GaugeMetricFamily("cadenced_imap_watched_mailboxes", "Mailboxes with [imap] being watched")
        watched.add_metric([], len(watchers))
        yield watched
        db = self._store(config)
        try:
            now = time.time()
            by_state = GaugeMetricFamily("cadenced_messages", "Messages waiting, by state", labels=["state"])
            totals = {state: 0 for state in ("scheduled", "sending", "error")}
            for (_mailbox, state), n in db.message_counts().items():
                totals[state] = totals.get(state, 0) + n
            for state, n in sorted(totals.items()):
                by_state.add_metric([state], n)
            yield by_state
            sent_today = GaugeMetricFamily("cadenced_mailbox_sent_today", "Sent today (local day)", labels=["mailbox"])
            limit = GaugeMetricFamily("cadenced_mailbox_allowance_today", "May send today", labels=["mailbox"])
            up = GaugeMetricFamily(
                "cadenced_mailbox_state", "1 for the mailbox's current state", labels=["mailbox", "state"]
            )
            for address, state, sent_on, allowance in readside.gauges(config, db, now):
                sent_today.add_metric([address], sent_on)
                limit.add_metric([address], allowance)
                up.add_metric([address, state], 1)
            yield sent_today
            yield limit
            yield up
            heartbeat = GaugeMetricFamily(
                "cadenced_last_commit_timestamp_seconds",
                "When the daemon last committed (a send, or its heartbeat every few seconds)",
            )
            kept = float(db.daemon_state().get("heartbeat_at") or 0)
            heartbeat.add_metric([], max(kept, self.last_commit))
            yield heartbeat
            yield cadence_messages(config, db.results_of_messages())
        except BaseException:
            self.close()  # a broken connection is not kept: the next scrape opens a new one
            raise

    def _store(self, config: Config) -> Store:
        """One connection, kept from scrape to scrape (reopened after an error or when the database moves)."""
        if self.db is not None and self.db_path != config.daemon.database:
            self.close()
        if self.db is None:
            self.db = Store.open(config.daemon.database, create=False)
            self.db_path = config.daemon.database
        return self.db

    def close(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()


# --- request bodies ---------------------------------------------------------------------------------------


async def read_json(request: Request, receiving: anyio.CapacityLimiter, limit: int = MAX_BODY) -> Any:
    """The body as JSON: application/json, at most `limit` bytes (read no further) within BODY_WITHIN seconds,
    no NaN or Infinity. At most BODIES_AT_ONCE are received at a time; the others wait their turn."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise BadRequest(415, "Content-Type", "must be application/json", "unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "body", f"larger than {limit} bytes", "too_large")
    body = bytearray()
    async with receiving:
        with anyio.move_on_after(BODY_WITHIN) as deadline:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BadRequest(413, "body", f"larger than {limit} bytes", "too_large")
    if deadline.cancelled_caught:
        raise BadRequest(408, "body", f"not received within {BODY_WITHIN:.0f} s", "timeout")
    try:
        return json.loads(bytes(body), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        detail = str(exc)[:200] if isinstance(exc, json.JSONDecodeError) else "not UTF-8 JSON, or nested too deep"
        raise BadRequest(400, "body", f"not valid JSON: {detail}", "malformed_json") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(422, where or "body", "must be a JSON object")
    for key in value:
        if key not in allowed:
            raise BadRequest(422, f"{where}.{key}" if where else key, "unknown field")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(422, key, "must be true or false")
    return value


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not value or len(value) > 320):
        raise BadRequest(422, key, "must be a mailbox address (a non-empty string)")
    return value


def _ids(body: dict[str, Any]) -> list[int] | None:
    value = body.get("ids")
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_IDS:
        raise BadRequest(422, "ids", f"must be a list of 1 to {MAX_IDS} message ids")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= MAX_ID:
            raise BadRequest(422, f"ids[{i}]", "must be a message id (a positive whole number)")
    return list(dict.fromkeys(value))


def key_reader(playbook: Playbook) -> Callable[[str], str | None]:
    """A prospect's key → the field it fills (None: left out). With `fields`, the mapped keys, `email` and `owner`
    as they are; else every key, named as a CSV column is (SPEC §2a: `First Name` → first_name, `Work Email` →
    email) or by the playbook's `map`."""
    mapped = playbook.field_for()
    given = {headers.squash(k): f for k, f in playbook.mapping}

    def name_of(key: str) -> str | None:
        if mapped:
            name = mapped.get(key) or (key if key in ("email", "owner") else None)
            return None if name is None else name.strip().lower()
        if (found := given.get(headers.squash(key))) is not None:
            return found or None
        return headers.field_name(key) or key.strip().lower()

    return name_of


def prospect_rows(doc: Any, playbook: Playbook) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """`{"prospects": [{…}, …]}` → a header and rows, as a CSV would give them; BadRequest names the field.

    Values are strings, numbers, true/false or null (an empty field). Without `fields` in the playbook every
    key is a field; with it, the mapped keys fill their fields, `email` and `owner` are read as they are,
    and the rest of a payload (a CRM's whole record) is left alone.
    """
    body = _object(doc, "", {"prospects"})
    if "prospects" not in body:
        raise BadRequest(422, "prospects", "is required: a list of prospects")
    prospects = body["prospects"]
    if not isinstance(prospects, list):
        raise BadRequest(422, "prospects", "must be a list of prospects")
    if len(prospects) > MAX_PROSPECTS:
        raise BadRequest(413, "prospects", f"{len(prospects)} prospects; one request takes at most {MAX_PROSPECTS}")
    mapped = playbook.field_for()
    header: dict[str, None] = {"email": None}
    name_of = key_reader(playbook)
    parsed: list[dict[str, str]] = []
    for i, prospect in enumerate(prospects):
        where = f"prospects[{i}]"
        if not isinstance(prospect, dict):
            raise BadRequest(422, where, "must be a JSON object of fields")
        fields: dict[str, str] = {}
        for key, value in prospect.items():
            name = name_of(key)
            if name is None:
                continue
            at = f"{where}.{key}"
            if not name or len(name) > MAX_NAME or _CONTROL.search(name):
                raise BadRequest(422, at, f"not a field name (1 to {MAX_NAME} characters, no control characters)")
            if name in fields:
                raise BadRequest(422, at, f"field {name!r} given twice")
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float | str):
                text = value if isinstance(value, str) else str(value)
            else:
                raise BadRequest(422, at, "must be a string, a number, true, false or null")
            if len(text) > enroll.MAX_FIELD:
                raise BadRequest(422, at, f"longer than {enroll.MAX_FIELD} characters")
            fields[name] = text
            header.setdefault(name, None)
            if len(header) > MAX_FIELDS:
                raise BadRequest(422, at, f"more than {MAX_FIELDS} different fields in one request")
        if not fields.get("email", "").strip():
            email_key = next((k for k, n in mapped.items() if n == "email"), "email")
            raise BadRequest(422, f"{where}.{email_key}", "is required: the prospect's email address")
        parsed.append(fields)
    names = list(header)
    return names, [(i, [fields.get(n, "") for n in names]) for i, fields in enumerate(parsed)]


def _rejected(report: enroll.Report, keys: Callable[[int], dict[str, str]]) -> list[dict[str, Any]]:
    out = []
    for r in report.rejected:
        field = f"prospects[{r.line}]"
        if r.field:
            field += f".{keys(r.line).get(r.field, r.field)}"
        out.append({"index": r.line, "field": field, "email": r.email, "reason": r.reason})
    return out


def enrollment_answer(report: enroll.Report, keys: Callable[[int], dict[str, str]]) -> dict[str, Any]:
    """`enroll --json`'s report; a rejected prospect is named by its index and field in the request."""
    return {
        "enrolled": report.enrolled,
        "skipped": report.skipped,
        "rejected": _rejected(report, keys),
        "rejected_total": report.rejected_total,
        "assignments": dict(report.assignments),
    }


class _Replay(Exception):
    def __init__(self, kept: tuple[str, str, str]) -> None:
        super().__init__("kept answer")
        self.kept = kept


# --- the app ----------------------------------------------------------------------------------------------


def build_app(
    settings: ApiSettings,
    config: Callable[[], Config],
    dispatcher: Callable[[], Any],
    wake: Callable[[], None] = lambda: None,
) -> Starlette:
    registry = CollectorRegistry(auto_describe=False)
    collector = DaemonMetrics(config, dispatcher)
    registry.register(collector)
    commits = Histogram(
        "cadenced_store_commit_seconds",
        "Time of the daemon's transactions, BEGIN to COMMIT (waiting for the lock, work, fsync)",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=registry,
    )

    def committed(seconds: float) -> None:
        commits.observe(seconds)
        collector.last_commit = time.time()

    stop_observing = store.commits.add(committed)
    expected = _secret_bytes(settings.token)
    metrics_expected = _secret_bytes(settings.metrics_token)
    snapshot = MetricsSnapshot(registry, collector)
    enrolling = anyio.CapacityLimiter(CONCURRENT_ENROLLMENTS)
    receiving = anyio.CapacityLimiter(BODIES_AT_ONCE)
    log = logs.get()

    def authorized(request: Request, wanted: bytes | None = None) -> bool:
        return bearer_matches(request.headers.get("authorization", ""), wanted or expected)

    def refused() -> JSONResponse:
        return JSONResponse(
            {"error": "unauthorized", "detail": "Authorization: Bearer <the token of [api]> is required"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def open_store() -> Store:
        return Store.open(config().daemon.database, busy_timeout=config().daemon.busy_timeout)

    async def in_thread(fn: Callable[[], Response], limiter: anyio.CapacityLimiter | None = None) -> Response:
        """Run a database call in a worker thread; a database that cannot answer now is a 503, not a 500."""
        try:
            return await anyio.to_thread.run_sync(fn, limiter=limiter)
        except (StoreError, StoreUnavailable) as exc:
            log.error("api.error", detail=str(exc)[:300])
            return JSONResponse(
                {"error": "unavailable", "detail": "the database cannot answer now; try again"},
                status_code=503,
                headers={"Retry-After": "5"},
            )

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return _closing_if_unread(request, refused())
            try:
                response: Response = await handler(request)
            except BadRequest as exc:
                return _closing_if_unread(request, exc.response())
            return response

        return endpoint

    async def metrics(request: Request) -> Response:
        if metrics_expected is not None and not authorized(request, metrics_expected):
            return _closing_if_unread(request, refused())
        try:
            body = await snapshot.latest()
        except (StoreError, StoreUnavailable) as exc:
            log.error("api.error", detail=str(exc)[:300])
            return Response("the database cannot answer now\n", status_code=503, headers={"Retry-After": "5"})
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_document(config()))  # behind the token: it names the playbooks

    async def status(_: Request) -> Response:
        def read() -> Response:
            db = Store.open(config().daemon.database, create=False)
            try:
                return JSONResponse(readside.status(config(), db, time.time()))
            finally:
                db.close()

        return await in_thread(read)

    async def outbox(request: Request) -> Response:
        query = request.query_params
        unknown = sorted(set(query) - {"state", "mailbox", "cadence", "limit"})
        if unknown:
            raise BadRequest(400, unknown[0], "unknown parameter")
        state = query.get("state")
        if state is not None and state not in MESSAGE_STATES:
            raise BadRequest(400, "state", f"one of {', '.join(MESSAGE_STATES)}")
        limit_text = query.get("limit", "1000")
        if not _DIGITS.fullmatch(limit_text) or not 0 < int(limit_text) <= MAX_LIMIT:
            raise BadRequest(400, "limit", f"a whole number from 1 to {MAX_LIMIT}")

        def read() -> Response:
            db = Store.open(config().daemon.database, create=False)
            try:
                rows = db.outbox(
                    state=state, mailbox=query.get("mailbox"), cadence=query.get("cadence"), limit=int(limit_text)
                )
                return JSONResponse({"messages": readside.outbox_messages(rows, db.cadence_pauses())})
            finally:
                db.close()

        return await in_thread(read)

    def operator_action(action: Callable[[Store, Config], dict[str, Any]]) -> Callable[[], Response]:
        def work() -> Response:
            db = open_store()
            try:
                answer = action(db, config())
            except NotFound as exc:
                return error_response(404, "not_found", str(exc))
            except Refused as exc:
                return error_response(409, "refused", str(exc))
            except UsageError as exc:
                return error_response(422, "bad_request", str(exc), "to")
            finally:
                db.close()
            return JSONResponse(answer)

        return work

    def _email(request: Request) -> str:
        email = str(request.path_params["email"])
        if not 0 < len(email) <= 320:
            raise BadRequest(422, "email", "1 to 320 characters")
        return email

    def _word(body: dict[str, Any], key: str, most: int = 500) -> str | None:
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > most):
            raise BadRequest(422, key, f"must be a string of at most {most} characters")
        return value

    async def prospect_show(request: Request) -> Response:
        email = _email(request)

        def action(db: Store, _cfg: Config) -> dict[str, Any]:
            return prospects.show(prospects.find(db, email), db.cadence_pauses())

        return await in_thread(operator_action(action))

    async def prospect_stop(request: Request) -> Response:
        email = _email(request)
        body = _object(await read_json(request, receiving, 64 * 1024), "", {"cadence", "reason"})
        cadence, reason = _word(body, "cadence", 200), _word(body, "reason") or ""

        def action(db: Store, _cfg: Config) -> dict[str, Any]:
            done = prospects.stop(db, email, cadence, reason, time.time())
            log.info("api.prospect_stopped", prospect=done["email"], cadences=done["stopped"])
            return done

        return await in_thread(operator_action(action))

    async def prospect_mark(request: Request) -> Response:
        email = _email(request)
        body = _object(await read_json(request, receiving, 64 * 1024), "", {"cadence", "outcome"})
        cadence, outcome = _word(body, "cadence", 200), body.get("outcome")
        if outcome not in OUTCOMES:
            raise BadRequest(422, "outcome", f"one of {', '.join(OUTCOMES)}")

        def action(db: Store, _cfg: Config) -> dict[str, Any]:
            done = prospects.mark(db, email, cadence, str(outcome), time.time())
            log.info("api.prospect_marked", prospect=done["email"], outcome=outcome)
            return done

        return await in_thread(operator_action(action))

    async def prospect_patch(request: Request) -> Response:
        email = _email(request)
        body = _object(await read_json(request, receiving, 1024 * 1024), "", {"cadence", "fields"})
        cadence, given = _word(body, "cadence", 200), body.get("fields")
        if not isinstance(given, dict) or not given or len(given) > MAX_FIELDS:
            raise BadRequest(422, "fields", f"an object of 1 to {MAX_FIELDS} fields, each a string")
        for key, value in given.items():
            if not isinstance(value, str) or len(value) > enroll.MAX_FIELD:
                raise BadRequest(422, f"fields.{key}", f"a string of at most {enroll.MAX_FIELD} characters")
        try:
            changes = prospects.parse_assignments([f"{k}={v}" for k, v in given.items()])
        except UsageError as exc:
            raise BadRequest(422, "fields", str(exc)) from None

        def action(db: Store, cfg: Config) -> dict[str, Any]:
            done = prospects.set_fields(db, cfg, email, cadence, changes, time.time())
            log.info("api.prospect_changed", prospect=done["email"], fields=done["fields"])
            return done

        answer = await in_thread(operator_action(action))
        wake()
        return answer

    async def cadence_pause(request: Request) -> Response:
        name = str(request.path_params["name"])
        body = _object(await read_json(request, receiving, 64 * 1024), "", {"reason"})
        reason = _word(body, "reason") or "no reason given"

        def action(db: Store, cfg: Config) -> dict[str, Any]:
            done = prospects.pause_cadence(db, cfg, name, f"paused through the API: {reason}", time.time())
            log.info("api.cadence_paused", cadence=name)
            return {"cadence": name, "paused": True, "was_paused": not done}

        return await in_thread(operator_action(action))

    async def cadence_resume(request: Request) -> Response:
        name = str(request.path_params["name"])

        def action(db: Store, cfg: Config) -> dict[str, Any]:
            released = prospects.resume_cadence(db, cfg, name)
            log.info("api.cadence_resumed", cadence=name, released=released)
            return {"cadence": name, "paused": False, "released": released}

        answer = await in_thread(operator_action(action))
        wake()
        return answer

    async def retry(request: Request) -> Response:
        body = _object(
            await read_json(request, receiving, 1024 * 1024), "", {"ids", "mailbox", "all", "include_uncertain"}
        )
        ids, mailbox, every = _ids(body), _text(body, "mailbox"), _flag(body, "all")
        include = _flag(body, "include_uncertain")
        if sum((ids is not None, mailbox is not None, every)) != 1:
            raise BadRequest(422, "ids", 'name the messages: one of "ids", "mailbox" or "all": true')

        def action(db: Store, cfg: Config) -> dict[str, Any]:
            outcome = operate.retry(db, cfg, ids, mailbox, every, include_uncertain=include)
            log.info("api.retried", messages=len(outcome.messages))
            return {"retried": outcome.messages}

        answer = await in_thread(operator_action(action))
        wake()
        return answer

    async def reassign(request: Request) -> Response:
        body = _object(await read_json(request, receiving, 1024 * 1024), "", {"ids", "from", "to", "include_uncertain"})
        ids, source, to = _ids(body), _text(body, "from"), _text(body, "to")
        include = _flag(body, "include_uncertain")
        if to is None:
            raise BadRequest(422, "to", "is required: the mailbox that sends them from now on")
        if (ids is None) == (source is None):
            raise BadRequest(422, "ids", 'name the messages: one of "ids" or "from"')

        def action(db: Store, cfg: Config) -> dict[str, Any]:
            outcome = operate.reassign(db, cfg, ids, source, to, include_uncertain=include)
            log.info("api.reassigned", messages=len(outcome.messages), enrollments=outcome.enrollments, to=to)
            return {
                "reassigned": outcome.messages,
                "enrollments": outcome.enrollments,
                "to": to,
                "goes_at": outcome.goes_at,
                "waiting_for": outcome.waiting_for,
            }

        answer = await in_thread(operator_action(action))
        wake()
        return answer

    async def enroll_prospects(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            playbook = config().playbook(name)
        except KeyError:
            raise BadRequest(404, "name", f"no playbook {name!r} in the config", "not_found") from None
        key = request.headers.get("idempotency-key")
        if key is not None and not _KEY.fullmatch(key):
            raise BadRequest(422, "Idempotency-Key", "1 to 255 printable ASCII characters, no spaces")
        doc = await read_json(request, receiving)
        header, rows = prospect_rows(doc, playbook)
        digest = hashlib.sha256(
            json.dumps([name, doc], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
        prospects = doc["prospects"]
        mapped = {v: k for k, v in playbook.fields}
        name_of = key_reader(playbook)

        def keys(index: int) -> dict[str, str]:
            """Field → the key the request gave it under (to name a rejected field as the client sent it)."""
            given = prospects[index] if 0 <= index < len(prospects) else {}
            return {n: next((k for k in given if name_of(k) == n), mapped.get(n, n)) for n in header}

        def replay(kept: tuple[str, str, str]) -> Response:
            if (kept[0], kept[1]) != (name, digest):
                return error_response(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for another request; nothing was changed",
                    "Idempotency-Key",
                )
            answer = told(json.loads(kept[2]))  # the facts as first given, the forecast as of now
            return JSONResponse(answer, headers={"Idempotent-Replayed": "true"})

        def told(answer: dict[str, Any]) -> dict[str, Any]:
            """The answer with the day each mailbox given prospects sends its last first email (`enroll`'s
            forecast), read after the commit: a year's plan is not made while holding the write lock."""
            if not answer["enrolled"]:
                return {**answer, "first_emails_by": {}}
            db = open_store()
            try:
                by = readside.first_emails_by(config(), db, time.time(), answer["assignments"])
            finally:
                db.close()
            return {**answer, "first_emails_by": by}

        def work() -> Response:
            now = time.time()
            db = open_store()
            try:
                if key is not None and (kept := db.api_answer(key)) is not None:
                    return replay(kept)
                cfg = config()
                importer = enroll.Importer(db, cfg, playbook.cadence, playbook.owner)
                importer.row_name = "prospects[{}]".format
                importer.columns_name = "the prospects' fields"

                def within(report: enroll.Report) -> None:
                    if key is None:
                        return
                    if (kept := db.api_answer(key)) is not None:  # a twin request committed while we staged
                        raise _Replay(kept)
                    answer = json.dumps(enrollment_answer(report, keys), ensure_ascii=False)
                    db.keep_api_answer(key, name, digest, answer, now)

                report = importer.enroll_rows(f"playbook {name!r}", header, rows, now, strict=True, within=within)
            except _Replay as twin:
                return replay(twin.kept)
            except enroll.Rejected as exc:
                rejected = _rejected(exc.report, keys)
                conflict = any(r.kind == "placement" for r in exc.report.rejected)
                first = rejected[0] if rejected else {"field": "prospects", "reason": ""}
                return error_response(
                    409 if conflict else 422,
                    "no_mailbox" if conflict else "invalid_prospects",
                    f"{first['field']}: {first['reason']}; nothing was enrolled",
                    str(first["field"]),
                    rejected=rejected,
                    rejected_total=exc.report.rejected_total,
                )
            except Refused as exc:
                return error_response(409, "refused", str(exc))
            except UsageError as exc:
                return error_response(422, "invalid_prospects", str(exc), "prospects")
            finally:
                db.close()
            log.info(
                "api.enrolled",
                playbook=name,
                cadence=playbook.cadence,
                enrolled=report.enrolled,
                skipped=report.skipped,
                rejected=report.rejected_total,
                assignments=report.assignments,
                idempotency_key=key,
            )
            return JSONResponse(told(enrollment_answer(report, keys)))

        answer = await in_thread(work, enrolling)
        if answer.status_code == 200:
            wake()
        return answer

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/openapi.json", guarded(openapi), methods=["GET"]),
        Route("/v1/status", guarded(status), methods=["GET"]),
        Route("/v1/outbox", guarded(outbox), methods=["GET"]),
        Route("/v1/outbox/retry", guarded(retry), methods=["POST"]),
        Route("/v1/outbox/reassign", guarded(reassign), methods=["POST"]),
        Route("/v1/playbooks/{name}/enrollments", guarded(enroll_prospects), methods=["POST"]),
        Route("/v1/prospects/{email}", guarded(prospect_show), methods=["GET"]),
        Route("/v1/prospects/{email}", guarded(prospect_patch), methods=["PATCH"]),
        Route("/v1/prospects/{email}/stop", guarded(prospect_stop), methods=["POST"]),
        Route("/v1/prospects/{email}/mark", guarded(prospect_mark), methods=["POST"]),
        Route("/v1/cadences/{name}/pause", guarded(cadence_pause), methods=["POST"]),
        Route("/v1/cadences/{name}/resume", guarded(cadence_resume), methods=["POST"]),
        *dashboard.routes(settings, config, wake),  # the pages at / (SPEC §12)
    ]
    app = Starlette(routes=routes)
    app.state.metrics = snapshot
    app.state.stop_observing = stop_observing
    return app


def _secret_bytes(secret: Any) -> bytes | None:
    """The token to compare with, or None: an empty or blank token is no token (it would match an empty one)."""
    if secret is None:
        return None
    value = secret.reveal().strip()
    return value.encode() if value else None


def _closing_if_unread(request: Request, response: Response) -> Response:
    """A refusal sent before a request's body was read says that the connection ends with it: the server drops
    a connection whose request it did not read to the end, and a client that reused it would lose its next
    request ("server disconnected without sending a response"). The body of a refused request is not read: it
    may be a large import from someone without the token."""
    if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
        response.headers["connection"] = "close"
    return response


def bearer_matches(header: str, expected: bytes | None) -> bool:
    """`Authorization: Bearer <token>` against the configured token, in constant time; nothing matches no token,
    and an empty presented token matches nothing."""
    scheme, _, token = header.partition(" ")
    given = token.strip().encode()
    return expected is not None and bool(given) and scheme.lower() == "bearer" and hmac.compare_digest(given, expected)


METRICS_TTL = 2.0  # seconds a /metrics snapshot is served again (a scrape storm costs one read of the database)


class MetricsSnapshot:
    """The exposition text, made at most once per METRICS_TTL by one scrape at a time over one kept connection;
    the scrapes that come meanwhile get the same text."""

    def __init__(self, registry: CollectorRegistry, collector: DaemonMetrics) -> None:
        self.registry = registry
        self.collector = collector
        self.lock = anyio.Lock()
        self.made_at = -METRICS_TTL
        self.body = b""
        self.made = 0  # snapshots made (tests count them)

    async def latest(self) -> bytes:
        async with self.lock:
            if time.monotonic() - self.made_at >= METRICS_TTL:
                self.body = await anyio.to_thread.run_sync(generate_latest, self.registry)
                self.made_at = time.monotonic()
                self.made += 1
            return self.body

    def close(self) -> None:
        self.collector.close()


# --- the OpenAPI document ---------------------------------------------------------------------------------


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(config: Config) -> dict[str, Any]:
    """OpenAPI 3.1 of the listener; the playbooks of the config it runs are the `name`s it lists."""
    from daemon import __version__

    unauthorized = _error("no or wrong bearer token")
    ids = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "minItems": 1}
    ids["maxItems"] = MAX_IDS
    address = {"type": "string", "minLength": 1, "maxLength": 320}
    value = {"type": ["string", "number", "boolean", "null"]}
    common = {
        "401": unauthorized,
        "415": _error("the body is not application/json"),
        "400": _error("the body is not JSON"),
        "413": _error("the body is too large"),
        "422": _error("a field is wrong: `field` names it"),
        "503": _error("the database cannot answer now"),
    }
    refused = _error("refused by the outbox's rules (the CLI's refusal): nothing was changed")
    report = {
        "type": "object",
        "required": ["enrolled", "skipped", "rejected", "rejected_total", "assignments", "first_emails_by"],
        "properties": {
            "enrolled": {"type": "integer"},
            "skipped": {"type": "integer", "description": "already enrolled in this cadence"},
            "rejected": {"type": "array", "items": {"type": "object"}},
            "rejected_total": {"type": "integer"},
            "assignments": {"type": "object", "additionalProperties": {"type": "integer"}},
            "first_emails_by": {
                "type": "object",
                "additionalProperties": {"type": ["string", "null"]},
                "description": "per mailbox given prospects, the local day its last scheduled first email goes "
                "under today's limits (null: past a year, or the mailbox is paused or down); made when "
                "answered, a replay's included",
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cadenced",
            "version": __version__,
            "description": "The daemon's HTTP API: enroll from other systems, read and work the outbox.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string"},
                        "detail": {"type": "string"},
                        "field": {"type": "string"},
                    },
                }
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/status": {
                "get": {
                    "summary": "`cadenced status --json`",
                    "responses": {
                        "200": _ok("mailboxes and cadences", {"type": "object", "required": ["mailboxes", "cadences"]}),
                        "401": unauthorized,
                        "503": common["503"],
                    },
                }
            },
            "/v1/outbox": {
                "get": {
                    "summary": "`cadenced outbox --json`",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string", "enum": list(MESSAGE_STATES)}},
                        {"name": "mailbox", "in": "query", "schema": {"type": "string"}},
                        {"name": "cadence", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 1000},
                        },
                    ],
                    "responses": {
                        "200": _ok(
                            "messages",
                            {
                                "type": "object",
                                "required": ["messages"],
                                "properties": {"messages": {"type": "array", "items": {"type": "object"}}},
                            },
                        ),
                        "400": _error("a query parameter is wrong: `field` names it"),
                        "401": unauthorized,
                        "503": common["503"],
                    },
                }
            },
            "/v1/outbox/retry": {
                "post": {
                    "summary": "`cadenced outbox retry`: error → scheduled",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "ids": ids,
                                "mailbox": address,
                                "all": {"type": "boolean"},
                                "include_uncertain": {"type": "boolean"},
                            },
                            "oneOf": [
                                {"required": ["ids"]},
                                {"required": ["mailbox"]},
                                {"required": ["all"], "properties": {"all": {"const": True}}},
                            ],
                        }
                    ),
                    "responses": {
                        "200": _ok(
                            "retried",
                            {
                                "type": "object",
                                "required": ["retried"],
                                "properties": {"retried": {"type": "array", "items": {"type": "integer"}}},
                            },
                        ),
                        "409": refused,
                        **common,
                    },
                }
            },
            "/v1/outbox/reassign": {
                "post": {
                    "summary": "`cadenced outbox reassign`: a new sticky sender",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["to"],
                            "properties": {
                                "ids": ids,
                                "from": address,
                                "to": address,
                                "include_uncertain": {"type": "boolean"},
                            },
                            "oneOf": [{"required": ["ids"]}, {"required": ["from"]}],
                        }
                    ),
                    "responses": {
                        "200": _ok(
                            "reassigned",
                            {
                                "type": "object",
                                "required": ["reassigned", "enrollments", "to", "goes_at", "waiting_for"],
                            },
                        ),
                        "409": refused,
                        **common,
                    },
                }
            },
            "/v1/playbooks/{name}/enrollments": {
                "post": {
                    "summary": "Enroll prospects as the playbook's owner adds them (`enroll --json`'s report)",
                    "description": (
                        "All or nothing: a prospect bad in itself refuses the request (422, nothing enrolled). "
                        "Already enrolled, suppressed and repeated addresses are reported, the rest enrolled. "
                        "A request retried with the same Idempotency-Key gets the first answer again."
                    ),
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": [p.name for p in config.playbooks] or ["-"]},
                        },
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                        },
                    ],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["prospects"],
                            "properties": {
                                "prospects": {
                                    "type": "array",
                                    "maxItems": MAX_PROSPECTS,
                                    "items": {
                                        "type": "object",
                                        "required": ["email"],
                                        "properties": {"email": {"type": "string", "format": "email"}},
                                        "additionalProperties": value,
                                    },
                                }
                            },
                        }
                    ),
                    "responses": {
                        "200": _ok("the enrollment report", report),
                        "404": _error("no such playbook"),
                        "409": _error("no mailbox of the owner can take new prospects, or the cadence is pinned"),
                        **common,
                    },
                }
            },
            **_prospect_paths(common, refused, unauthorized),
        },
    }


def _prospect_paths(common: dict[str, Any], refused: dict[str, Any], unauthorized: dict[str, Any]) -> dict[str, Any]:
    """SPEC §8a over HTTP: a prospect looked up, stopped, changed, marked; a cadence paused and resumed."""
    email = {"name": "email", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 320}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    missing = _error("no such prospect or cadence: `detail` names the nearest")
    done = _ok("done", {"type": "object"})
    text = {"type": "string", "maxLength": 500}
    cadence = {"type": "string", "maxLength": 200}

    def body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
        schema = {"type": "object", "additionalProperties": False, "properties": properties, "required": required}
        return _json_body(schema)

    answers = {"200": done, "404": missing, "409": refused, **common}
    return {
        "/v1/prospects/{email}": {
            "get": {
                "summary": "`cadenced prospect show --json`: enrollments, messages, timeline",
                "parameters": [email],
                "responses": {
                    "200": done,
                    "404": missing,
                    "422": common["422"],
                    "401": unauthorized,
                    "503": common["503"],
                },
            },
            "patch": {
                "summary": "`cadenced prospect set`: the fields of its active enrollments",
                "parameters": [email],
                "requestBody": body(
                    {
                        "cadence": cadence,
                        "fields": {
                            "type": "object",
                            "minProperties": 1,
                            "maxProperties": MAX_FIELDS,
                            "additionalProperties": {"type": "string"},
                        },
                    },
                    ["fields"],
                ),
                "responses": answers,
            },
        },
        "/v1/prospects/{email}/stop": {
            "post": {
                "summary": "`cadenced prospect stop`: stopped, waiting messages cancelled, not suppressed",
                "parameters": [email],
                "requestBody": body({"cadence": cadence, "reason": text}, []),
                "responses": answers,
            }
        },
        "/v1/prospects/{email}/mark": {
            "post": {
                "summary": "`cadenced prospect mark`: an outcome; an active enrollment ends as replied",
                "parameters": [email],
                "requestBody": body({"cadence": cadence, "outcome": {"enum": list(OUTCOMES)}}, ["outcome"]),
                "responses": answers,
            }
        },
        "/v1/cadences/{name}/pause": {
            "post": {
                "summary": "`cadenced cadence pause`: its messages held until resumed",
                "parameters": [name],
                "requestBody": body({"reason": text}, []),
                "responses": answers,
            }
        },
        "/v1/cadences/{name}/resume": {
            "post": {
                "summary": "`cadenced cadence resume`: held messages due again at their own times",
                "parameters": [name],
                "responses": {"200": done, "404": missing, "409": refused, "401": unauthorized, "503": common["503"]},
            }
        },
    }


def check_listen(settings: ApiSettings) -> None:
    """[api] listen can be bound now: Refused (exit 1, systemd starts the daemon again) names the address and the
    reason (another program listens there), where Hypercorn's OSError ended the daemon with a traceback.
    Checked before anything starts; the port is bound again by the server a moment later."""
    if settings.socket:
        return  # a unix socket: Hypercorn's own error names the path
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    probe = ServerConfig()
    probe.bind = [f"{host}:{settings.port}"]
    try:
        sockets = probe.create_sockets()
    except OSError as exc:
        raise Refused(
            f"[api] listen {host}:{settings.port}: cannot listen there ({exc.strerror or exc}); is another program "
            "(or another cadenced) listening on that port?"
        ) from None
    for sock in sockets.insecure_sockets:
        sock.close()


async def run(
    settings: ApiSettings,
    config: Callable[[], Config],
    dispatcher: Callable[[], Any],
    wake: Callable[[], None],
    stop: anyio.Event,
    done: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop` is set (the daemon stopping), then set `done`: the server closes by its own shutdown
    (Hypercorn does not take being cancelled mid-serve well), the daemon waits for that, bounded."""
    server = ServerConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.bind = [f"unix:{settings.socket}"] if settings.socket else [f"{host}:{settings.port}"]
    server.accesslog = None
    server.errorlog = None
    server.graceful_timeout = 2.0
    server.read_timeout = 60  # a connection silent this long mid-request is closed
    server.umask = 0o117  # a unix socket is 0660: the service's user and group, nobody else
    if settings.tls_cert:
        server.certfile, server.keyfile = settings.tls_cert, settings.tls_key
    app = build_app(settings, config, dispatcher, wake)
    # A unix socket cannot be reached by a browser (no rebinding); a listener off loopback has TLS.
    guarded_app = HostCheck(app, settings) if not settings.socket and is_loopback(settings.host) else app
    task_status.started()
    try:
        await serve(guarded_app, server, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        app.state.stop_observing()
        app.state.metrics.close()
        done.set()


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HostCheck:
    """On a loopback listener, only requests that name this machine (or a configured `hosts` name) in Host: a
    web page on another origin that resolves its own name to 127.0.0.1 (DNS rebinding) gets a 421."""

    def __init__(self, app: Any, settings: ApiSettings) -> None:
        self.app = app
        listening = f"[{settings.host}]" if ":" in settings.host else settings.host  # 127.0.0.7 names it too
        self.allowed = LOOPBACK_HOSTS | {"[::1]", listening.lower()} | set(settings.hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and host_of(_header(scope, b"host")) not in self.allowed:
            body = b'{"error":"misdirected","detail":"the Host header does not name this server"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 421, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def host_of(header: str) -> str:
    """The host of a Host header, lower case, without its port (`[::1]:8025` → `[::1]`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.partition("]")[0] + "]"
    return header.rpartition(":")[0] if header.count(":") == 1 else header
