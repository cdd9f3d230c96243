"""The dashboard (SPEC §12): pages on the [api] listener at `/` for the reps and managers who own the mailboxes and
cadences: Mailboxes, Outbox (Scheduled, Sent, Error with its actions), Plan, Results, Prospect.

Rendered on the server by Jinja2 (autoescaped), with one stylesheet and a few lines of script (confirmations)
served by the daemon itself: no CDN, no build step, it works on a server without internet. Every read and action
is the CLI's and the API's own (readside, operate, prospects, report): the dashboard adds pages, not rules.

Sign-in: the API token once (or `read_only_token` for a viewer who cannot act); the session is a random id kept
in the database by its SHA-256, sent as an `HttpOnly`, `SameSite=Strict` cookie (`Secure` unless the listener is
on loopback) and signed with a key the database keeps. Every form carries a CSRF token made from the session;
an action without it is refused (403), as is a viewer's. Without a session a page redirects to sign-in and an
action is refused (401). Sign-out ends the session in the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import secrets
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from daemon import logs, operate, prospects, readside, report, timing
from daemon.config import is_loopback
from daemon.dashboard import charts
from daemon.errors import NotFound, Refused, StoreError, StoreUnavailable, UsageError
from daemon.model import ApiSettings, Config
from daemon.store import OUTCOMES, Store

T = TypeVar("T")
HERE = Path(__file__).parent
SESSION_COOKIE = "cadenced_session"
SIGNIN_COOKIE = "cadenced_signin"  # the sign-in form's own CSRF value (double submit: no session exists yet)
SESSION_TTL = 12 * 3600.0  # seconds a sign-in lasts
PAGE = 50  # rows of the outbox per page
MAILBOX_PAGE = 100
MAX_FORM = 256 * 1024  # bytes of a form (a page of ids and a few fields)
UNREAD_BODY = frozenset({408, 413, 415})  # refusals sent before the request's body was read to its end
MAX_IDS = 10_000
PLAN_DAYS = 14
PLAN_FRESH = 60.0  # seconds a forecast is shown before it is made again (in the background)
STATIC = {"style.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
SECTIONS = {"scheduled": "Scheduled", "sent": "Sent", "error": "Error"}
REASONS = {  # the Error section's reasons, in words
    "disconnected": "disconnected: the mailbox could not connect or log in; it goes when the mailbox is back",
    "refused": "refused: the server refused the mailbox itself; it waits for you",
    "retries_exhausted": "retries exhausted: the server deferred it every time it was tried",
    "uncertain": "uncertain: the connection broke after the message was handed over: it may have arrived",
    "template": "template: the email could not be written for this prospect",
    "mailbox_removed": "removed: its mailbox is no longer in the configuration",
    "cadence_removed": "removed: its cadence is no longer in the configuration",
    "config_changed": "removed: its step is no longer in the cadence",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # a field a page does not have (a timeline entry without detail) is shown empty
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.globals["reason_words"] = lambda code: REASONS.get(code or "", code or "")
_ENV.globals["percent"] = lambda rate: "" if rate is None else f"{rate * 100:.1f}%"  # None: nobody contacted


@dataclass(frozen=True, slots=True)
class Session:
    role: str  # "operator" (the API token) or "viewer" (read_only_token)
    csrf: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


class Problem(Exception):
    """A request the dashboard refuses: its status and a sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _secret(value: Any) -> bytes | None:
    text = value.reveal().strip() if value is not None else ""
    return text.encode() if text else None


def _local_path(value: str, fallback: str) -> str:
    """A path of this site to go back to (never another site's: no `//host`, no scheme)."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value and len(value) <= 2000:
        return value
    return fallback


def routes(
    settings: ApiSettings,
    config: Callable[[], Config],
    wake: Callable[[], None],
) -> list[Route]:
    """The dashboard's routes, for the [api] application."""
    operator = _secret(settings.token)
    viewer = _secret(settings.read_only_token)
    secure = bool(settings.socket or settings.tls_cert or not is_loopback(settings.host))
    log = logs.get()
    key_box: list[bytes] = []

    def open_store() -> Store:
        return Store.open(config().daemon.database, busy_timeout=config().daemon.busy_timeout)

    async def db(work: Callable[[Store], T]) -> T:
        def run() -> T:
            store = open_store()
            try:
                return work(store)
            finally:
                store.close()

        try:
            return await anyio.to_thread.run_sync(run)
        except (StoreError, StoreUnavailable) as exc:
            log.error("dashboard.error", detail=str(exc)[:300])
            raise Problem(503, "The database cannot answer now; try again in a moment.") from None

    def key(store: Store) -> bytes:
        if not key_box:
            key_box.append(store.web_key())
        return key_box[0]

    def sign(k: bytes, what: str) -> str:
        return hmac.new(k, what.encode(), hashlib.sha256).hexdigest()

    async def session_of(request: Request) -> Session | None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        sid, _, mac = cookie.partition(".")
        if not sid or len(cookie) > 200:
            return None

        def look(store: Store) -> Session | None:
            k = key(store)
            if not hmac.compare_digest(mac, sign(k, "session:" + sid)):
                return None
            role = store.web_session(hashlib.sha256(sid.encode()).hexdigest(), time.time())
            return Session(role, sign(k, "csrf:" + sid)) if role in ("operator", "viewer") else None

        return await db(look)

    def page(name: str, request: Request, session: Session | None, status: int = 200, **values: Any) -> Response:
        html = _ENV.get_template(name).render(
            session=session,
            path=request.url.path,
            note=_note(request, session),
            **values,
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def problem_page(request: Request, session: Session | None, status: int, detail: str) -> Response:
        return page("problem.html", request, session, status, detail=detail)

    async def read_form(request: Request) -> dict[str, list[str]]:
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise Problem(415, "A form of this page is expected.")
        body = bytearray()
        with anyio.move_on_after(30) as deadline:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM:
                    raise Problem(413, "That form is too large.")
        if deadline.cancelled_caught:
            raise Problem(408, "The form did not arrive in time.")
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), max_num_fields=MAX_IDS + 20, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            raise Problem(400, "That form could not be read.") from None
        form: dict[str, list[str]] = {}
        for k, v in pairs:
            form.setdefault(k, []).append(v)
        return form

    def one(form: dict[str, list[str]], name: str, most: int = 500) -> str:
        value = (form.get(name) or [""])[0].strip()
        if len(value) > most:
            raise Problem(422, f"{name}: at most {most} characters")
        return value

    async def answered(request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
        """A page's or an action's response, every refusal a page that says why: a Problem, what the shared
        actions refuse (404 not found, 409 refused, 422 unusable), and anything else logged and a 500."""
        try:
            return await work()
        except Problem as exc:
            response = problem_page(request, None, exc.status, exc.detail)
            if exc.status in UNREAD_BODY:  # the rest of the body is not read: say the connection ends here
                response.headers["connection"] = "close"
            return response
        except (NotFound, Refused, UsageError) as exc:
            status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Refused) else 422
            return problem_page(request, None, status, str(exc))
        except Exception as exc:
            log.error("dashboard.failed", path=request.url.path, error=type(exc).__name__, detail=str(exc)[:300])
            return problem_page(request, None, 500, "Something went wrong on our side; the daemon's log says what.")

    def viewing(handler: Callable[[Request, Session], Awaitable[Response]]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            async def work() -> Response:
                session = await session_of(request)
                if session is None:
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse("/signin?next=" + urllib.parse.quote(target, safe=""), 303)
                return await handler(request, session)

            return await answered(request, work)

        return endpoint

    def acting(
        handler: Callable[[Request, Session, dict[str, list[str]]], Awaitable[Response]],
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            async def work() -> Response:
                session = await session_of(request)
                if session is None:
                    # read (bounded) what was sent, so that the connection can carry the client's next request
                    with contextlib.suppress(Problem):
                        await read_form(request)
                    return problem_page(request, None, 401, "Sign in first: this action needs a session.")
                form = await read_form(request)
                if not hmac.compare_digest(one(form, "csrf", 200), session.csrf):
                    return problem_page(request, session, 403, "This form is stale or not ours (CSRF): reload.")
                if not session.may_act:
                    return problem_page(request, session, 403, "Signed in with the read-only token: view only.")
                return await handler(request, session, form)

            return await answered(request, work)

        return endpoint

    def back(form: dict[str, list[str]], session: Session, fallback: str, note: str) -> Response:
        """To the page the action came from, with what it did: the note signed for this session, so that a
        link made elsewhere cannot put words of its own on our pages."""
        target = _local_path(one(form, "back", 2000), fallback)
        joiner = "&" if "?" in target else "?"
        note = note[:300]
        told = urllib.parse.urlencode({"note": note, "ns": _note_mac(session, note)})
        return RedirectResponse(f"{target}{joiner}{told}", 303)

    # --- sign-in ------------------------------------------------------------------------------------

    async def signin_form(request: Request) -> Response:
        value = secrets.token_urlsafe(24)
        nxt = _local_path(request.query_params.get("next", ""), "/mailboxes")
        response = page("signin.html", request, None, form_csrf=value, next=nxt, failed=False)
        _cookie(response, SIGNIN_COOKIE, value, 600, secure)
        return response

    async def signin(request: Request) -> Response:
        try:
            form = await read_form(request)
        except Problem as exc:
            return problem_page(request, None, exc.status, exc.detail)
        given = request.cookies.get(SIGNIN_COOKIE, "")
        if not given or not hmac.compare_digest(one(form, "csrf", 200), given):
            return problem_page(request, None, 403, "This sign-in form is stale (CSRF): open the sign-in page again.")
        token = one(form, "token", 4096).encode()
        role = (
            "operator"
            if operator is not None and token and hmac.compare_digest(token, operator)
            else "viewer"
            if viewer is not None and token and hmac.compare_digest(token, viewer)
            else None
        )
        nxt = _local_path(one(form, "next", 2000), "/mailboxes")
        if role is None:
            log.warning("dashboard.signin_refused", client=request.client.host if request.client else None)
            value = secrets.token_urlsafe(24)
            response = page("signin.html", request, None, 401, form_csrf=value, next=nxt, failed=True)
            _cookie(response, SIGNIN_COOKIE, value, 600, secure)
            return response
        sid = secrets.token_urlsafe(32)
        now = time.time()

        def open_session(store: Store) -> str:
            store.open_web_session(hashlib.sha256(sid.encode()).hexdigest(), str(role), now, now + SESSION_TTL)
            return sign(key(store), "session:" + sid)

        mac = await db(open_session)
        log.info("dashboard.signed_in", role=role)
        response = RedirectResponse(nxt, 303)
        _cookie(response, SESSION_COOKIE, f"{sid}.{mac}", int(SESSION_TTL), secure)
        response.delete_cookie(SIGNIN_COOKIE, path="/")
        return response

    async def signout(request: Request) -> Response:
        try:
            session = await session_of(request)
            form = await read_form(request)
        except Problem as exc:
            return problem_page(request, None, exc.status, exc.detail)
        if session is not None and hmac.compare_digest(one(form, "csrf", 200), session.csrf):
            sid = request.cookies.get(SESSION_COOKIE, "").partition(".")[0]
            await db(lambda store: store.end_web_session(hashlib.sha256(sid.encode()).hexdigest()))
        response = RedirectResponse("/signin", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- pages --------------------------------------------------------------------------------------

    async def home(request: Request, session: Session) -> Response:
        return RedirectResponse("/mailboxes", 303)

    async def mailboxes(request: Request, session: Session) -> Response:
        cfg = config()
        wanted = request.query_params.get("q", "").strip().lower()[:200]
        shown = [m.address for m in cfg.mailboxes if wanted in m.address]
        page_no = _number(request.query_params.get("page", "1"), 1, 10**6)
        chosen = shown[(page_no - 1) * MAILBOX_PAGE : page_no * MAILBOX_PAGE]
        status = await db(lambda store: readside.status(cfg, store, time.time(), only=set(chosen)))
        rules = {m.address: m.pause_on for m in cfg.mailboxes}
        return page(
            "mailboxes.html",
            request,
            session,
            rows=status["mailboxes"],
            rules=rules,
            daemon=status.get("daemon"),
            q=wanted,
            page=page_no,
            more=len(shown) > page_no * MAILBOX_PAGE,
            total=len(shown),
        )

    async def mailbox_action(request: Request, session: Session, form: dict[str, list[str]]) -> Response:
        cfg = config()
        address, what = one(form, "address", 320), request.path_params["action"]
        if what not in ("pause", "resume"):
            raise Problem(404, "No such action.")
        try:
            mailbox = cfg.mailbox(address)
        except KeyError:
            raise Problem(404, f"No mailbox {address} in the configuration.") from None
        if what == "pause":
            reason = one(form, "reason") or "no reason given"
            done = await db(lambda s: s.pause(mailbox.address, f"paused from the dashboard: {reason}", time.time()))
            note = f"{address}: paused" if done else f"{address}: was paused already"
        else:
            was = await db(lambda s: s.resume(mailbox.address))
            if was is None:
                raise Refused(f"{address}: not paused by pause_on or a pause of the dashboard or CLI")
            note = f"{address}: resumed"
            wake()
        log.info("dashboard.mailbox_" + ("paused" if what == "pause" else "resumed"), mailbox=address)
        return back(form, session, "/mailboxes", note)

    async def outbox(request: Request, session: Session) -> Response:
        cfg = config()
        q = request.query_params
        state = q.get("state", "error")
        if state not in SECTIONS:
            raise Problem(400, f"state: one of {', '.join(SECTIONS)}")
        filters = {k: (q.get(k) or "").strip()[:320] or None for k in ("mailbox", "cadence", "prospect")}
        after = _cursor(q)

        def read(store: Store) -> tuple[list[dict[str, Any]], dict[str, int]]:
            mailbox, cadence, prospect = filters["mailbox"], filters["cadence"], filters["prospect"]
            rows = store.outbox_page(
                state, mailbox=mailbox, cadence=cadence, prospect=prospect, after=after, limit=PAGE + 1
            )
            counts = {
                s: store.outbox_count(state=s, mailbox=mailbox, cadence=cadence, prospect=prospect, cap=10_000)
                for s in SECTIONS
            }
            return rows, counts

        rows, counts = await db(read)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        for r in rows:
            r["due"], r["sent"] = readside.iso(r["due_at"]), readside.iso(r["sent_at"])
        base = {k: v for k, v in filters.items() if v}
        return page(
            "outbox.html",
            request,
            session,
            state=state,
            sections=SECTIONS,
            counts=counts,
            rows=rows,
            filters=filters,
            next_url=("/outbox?" + urllib.parse.urlencode({**base, "state": state, **_cursor_of(rows[-1])}))
            if more
            else None,
            first_url=("/outbox?" + urllib.parse.urlencode({**base, "state": state})) if after else None,
            targets=sorted(m.address for m in cfg.mailboxes),
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            uncertain=any(r["reason"] == "uncertain" for r in rows),
        )

    def ids_of(form: dict[str, list[str]]) -> list[int]:
        ids = []
        for value in form.get("id", [])[:MAX_IDS]:
            if not value.isdigit() or len(value) > 16:
                raise Problem(422, f"id: {value[:20]!r} is not a message id")
            ids.append(int(value))
        if not ids:
            raise Problem(422, "Choose at least one message.")
        return sorted(set(ids))

    async def retry(request: Request, session: Session, form: dict[str, list[str]]) -> Response:
        ids, include = ids_of(form), one(form, "include_uncertain") == "1"
        cfg = config()
        outcome = await db(lambda s: operate.retry(s, cfg, ids, None, False, include_uncertain=include))
        log.info("dashboard.retried", messages=len(outcome.messages))
        wake()
        return back(form, session, "/outbox", f"{len(outcome.messages)} message(s) will be sent again")

    async def reassign(request: Request, session: Session, form: dict[str, list[str]]) -> Response:
        ids, to, include = ids_of(form), one(form, "to", 320), one(form, "include_uncertain") == "1"
        cfg = config()
        try:
            target = cfg.mailbox(to)
        except KeyError:
            raise Problem(422, "Choose the mailbox that sends them from now on.") from None
        if one(form, "confirm") != "1":  # first the target's "sends at", then the change
            when = await db(lambda s: operate.when_it_sends(s, target, time.time()))
            return page(
                "reassign.html",
                request,
                session,
                ids=ids,
                to=to,
                when=when,
                include=include,
                back=_local_path(one(form, "back", 2000), "/outbox"),
            )
        outcome = await db(lambda s: operate.reassign(s, cfg, ids, None, to, include_uncertain=include))
        log.info("dashboard.reassigned", messages=len(outcome.messages), enrollments=outcome.enrollments, to=to)
        wake()
        told = f" (it sends at {outcome.goes_at})" if outcome.goes_at else ""
        return back(form, session, "/outbox", f"{len(outcome.messages)} message(s) now go from {to}{told}")

    # The plan forecasts every send of the next 14 days (700,000 at 1,000 mailboxes of 50 a day: seconds of
    # work). The dashboard keeps the last forecast and makes it again in the background when it is older than
    # PLAN_FRESH, so a view answers at once with a forecast at most that old (it says when it was made).
    forecasts: dict[str, Any] = {}

    def remake(cfg: Config) -> None:
        try:
            store = open_store()
            try:
                forecasts["kept"] = _forecast(cfg, store, time.time())
            finally:
                store.close()
        except (StoreError, StoreUnavailable) as exc:
            log.error("dashboard.error", detail=str(exc)[:300])
        finally:
            forecasts["busy"] = False

    async def plan(request: Request, session: Session) -> Response:
        cfg = config()
        chosen = (request.query_params.get("mailbox") or "").strip()[:320] or None
        kept: Forecast | None = forecasts.get("kept")
        if kept is None or kept.config is not cfg:  # none yet, or the config was reloaded: made now
            kept = await db(lambda store: _forecast(cfg, store, time.time()))
            forecasts["kept"] = kept
        elif time.time() - kept.at > PLAN_FRESH and not forecasts.get("busy"):
            forecasts["busy"] = True  # shown as it is; made again in the background for the next view
            threading.Thread(target=remake, args=(cfg,), name="plan", daemon=True).start()
        now, document, firsts, live = kept.at, kept.document, kept.firsts, kept.live
        # The limit drawn is what the mailboxes that can send may send (a paused or broken one sends nothing).
        boxes = [m for m in cfg.mailboxes if chosen in (None, m.address) and m.address in live]
        days = [timing.local_day(now + d * 86400, "UTC") for d in range(PLAN_DAYS)]
        dates = sorted({r["date"] for r in document["days"]} | set(days))[:PLAN_DAYS]
        bars = []
        for date in dates:
            rows = [r for r in document["days"] if r["date"] == date and chosen in (None, r["mailbox"])]
            limit = sum(
                0 if timing.skipped(m.schedule, date) else timing.allowance(m.schedule, date, firsts.get(m.address))[0]
                for m in boxes
            )
            bars.append(charts.PlanDay(date, sum(r["new"] for r in rows), sum(r["follow_ups"] for r in rows), limit))
        per_mailbox: dict[str, list[int]] = {}
        for r in document["days"]:
            per_mailbox.setdefault(r["mailbox"], [0, 0])
            per_mailbox[r["mailbox"]][0] += r["new"]
            per_mailbox[r["mailbox"]][1] += r["follow_ups"]
        return page(
            "plan.html",
            request,
            session,
            chart=charts.plan_chart(bars),
            bars=bars,
            chosen=chosen,
            per_mailbox=sorted(per_mailbox.items()),
            past=document["past_horizon"],
            made_at=readside.iso(now),
            mailboxes=[m.address for m in cfg.mailboxes],
        )

    async def results(request: Request, session: Session) -> Response:
        cfg = config()
        q = request.query_params
        by = q.get("by", "step")
        if by not in report.BY:
            raise Problem(400, f"by: one of {', '.join(report.BY)}")
        cadence = (q.get("cadence") or "").strip()[:200] or None
        since = (q.get("since") or "").strip()[:10] or None
        if since is not None and not _is_date(since):
            raise Problem(400, "since: a date written YYYY-MM-DD")

        def read(store: Store) -> tuple[dict[str, Any], dict[str, Any]]:
            name = prospects.known_cadence(cfg, store, cadence) if cadence else None
            return report.report(cfg, store, by, name, since), report.report(cfg, store, "day", name, since)

        try:
            document, per_day = await db(read)
        except NotFound as exc:
            raise Problem(404, str(exc)) from None
        days: dict[str, list[int]] = {}
        for c in per_day["cadences"]:
            for r in c["rows"]:
                day = days.setdefault(r["day"], [0, 0])
                day[0] += r["replied"]
                day[1] += r["bounced"]
        series = [(d, v[0], v[1]) for d, v in sorted(days.items())]
        return page(
            "results.html",
            request,
            session,
            document=document,
            by=by,
            cadence=cadence,
            since=since,
            chart=charts.results_chart(series),
            cadences=[c.name for c in cfg.cadences],
            kinds=report.COUNTS,
        )

    async def prospect(request: Request, session: Session) -> Response:
        address = (request.query_params.get("email") or "").strip()[:320]
        shown, missing = None, None
        if address:

            def read(store: Store) -> dict[str, Any]:
                return prospects.show(prospects.find(store, address), store.cadence_pauses())

            try:
                shown = await db(read)
            except NotFound as exc:
                missing = str(exc)
        return page("prospect.html", request, session, email=address, shown=shown, missing=missing, outcomes=OUTCOMES)

    async def prospect_action(request: Request, session: Session, form: dict[str, list[str]]) -> Response:
        address, what = one(form, "email", 320), request.path_params["action"]
        if what not in ("stop", "mark"):
            raise Problem(404, "No such action.")
        cadence = one(form, "cadence", 200) or None
        now = time.time()
        if what == "stop":
            reason = one(form, "reason") or "stopped from the dashboard"
            done = await db(lambda s: prospects.stop(s, address, cadence, reason, now))
            note = f"{done['email']}: stopped in {', '.join(done['stopped']) or 'nothing active'}"
        else:
            outcome = one(form, "outcome", 40)
            if outcome not in OUTCOMES:
                raise Problem(422, f"outcome: one of {', '.join(OUTCOMES)}")
            done = await db(lambda s: prospects.mark(s, address, cadence, outcome, now))
            note = f"{done['email']}: marked {outcome}"
        log.info("dashboard.prospect_" + ("stopped" if what == "stop" else "marked"), prospect=done["email"])
        return back(form, session, "/prospect?email=" + urllib.parse.quote(address), note)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        media = STATIC.get(name)
        if media is None:
            return Response("not found\n", status_code=404)
        body = (HERE / "static" / name).read_bytes()
        return Response(body, media_type=media, headers={"Cache-Control": "max-age=3600", **_SAFE})

    return [
        Route("/", viewing(home), methods=["GET"]),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/mailboxes", viewing(mailboxes), methods=["GET"]),
        Route("/mailboxes/{action:str}", acting(mailbox_action), methods=["POST"]),  # pause, resume
        Route("/outbox", viewing(outbox), methods=["GET"]),
        Route("/outbox/retry", acting(retry), methods=["POST"]),
        Route("/outbox/reassign", acting(reassign), methods=["POST"]),
        Route("/plan", viewing(plan), methods=["GET"]),
        Route("/results", viewing(results), methods=["GET"]),
        Route("/prospect", viewing(prospect), methods=["GET"]),
        Route("/prospect/{action:str}", acting(prospect_action), methods=["POST"]),
        Route("/static/{name:str}", static, methods=["GET"]),
    ]


_SAFE = {"X-Content-Type-Options": "nosniff"}


def _cookie(response: Response, name: str, value: str, max_age: int, secure: bool) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict", secure=secure)


@dataclass(frozen=True, slots=True)
class Forecast:
    """The plan as the dashboard keeps it: made at `at` for `config`, with what its chart needs besides."""

    at: float
    config: Config
    document: dict[str, Any]
    firsts: dict[str, str | None]  # the first send day of each mailbox warming up
    live: set[str]  # the mailboxes that can send (connected)


def _forecast(cfg: Config, store: Store, now: float) -> Forecast:
    firsts = {m.address: store.first_send_day(m.address) for m in cfg.mailboxes if m.schedule.warmup}
    health = store.health()
    live = {m.address for m in cfg.mailboxes if readside.mailbox_state(m.paused, health.get(m.address)) == "connected"}
    return Forecast(now, cfg, readside.plan(cfg, store, now, PLAN_DAYS), firsts, live)


def _note_mac(session: Session, note: str) -> str:
    return hmac.new(session.csrf.encode(), f"note:{note}".encode(), hashlib.sha256).hexdigest()[:32]


def _note(request: Request, session: Session | None) -> str:
    """What the last action did (`note`), when this session's action said it (`ns`); nothing otherwise."""
    note = request.query_params.get("note", "")[:300]
    if not note or session is None:
        return ""
    return note if hmac.compare_digest(request.query_params.get("ns", ""), _note_mac(session, note)) else ""


def _cursor(query: Any) -> tuple[str, float, int] | None:
    """Where an outbox page starts: after the (mailbox, due, id) that ended the one before (`am`, `ad`, `ai`)."""
    if "ai" not in query:
        return None
    mailbox, due = query.get("am", "")[:320], query.get("ad", "0")
    try:
        at = float(due)
    except ValueError:
        at = math.nan
    if not math.isfinite(at):
        raise Problem(400, "ad: not a time")
    return mailbox, at, _number(query.get("ai", ""), 0, 2**53)


def _cursor_of(row: dict[str, Any]) -> dict[str, str]:
    return {"am": row["mailbox"], "ad": repr(float(row["key_due"] or 0)), "ai": str(row["id"])}


def _number(text: str, least: int, most: int) -> int:
    if not text.isdigit() or len(text) > 16:
        raise Problem(400, f"{text[:20]!r} is not a whole number")
    value = int(text)
    if not least <= value <= most:
        raise Problem(400, f"{value} is out of range")
    return value


def _is_date(text: str) -> bool:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        return False
    return True


__all__ = ["routes"]
