"""[api]: the daemon's HTTP listener. Prometheus /metrics (no token), and with a bearer token the JSON of
`status` and `outbox` as the CLI prints them.

Starlette for the routes (an ASGI toolkit that runs on anyio) under Hypercorn (an ASGI server made to be
embedded: it serves inside the daemon's own task group and stops on the daemon's signal, installing no
signal handlers of its own). Every read opens its own connection in a worker thread: a scrape or a status
never waits on, or holds up, the sender loops' event loop. TLS is a reverse proxy's job.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config as ServerConfig
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon import logs, readside
from daemon.config import ApiSettings, Config
from daemon.store import MESSAGE_STATES, Store

MAX_LIMIT = 10_000  # messages one GET /v1/outbox returns


class DaemonMetrics(Collector):
    """Read at each scrape: the daemon's counts since start, and the database's state now."""

    def __init__(self, config: Callable[[], Config], stats: Callable[[], Any]) -> None:
        self.config = config
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        config = self.config()
        stats = self.stats()
        sent = CounterMetricFamily("cadenced_messages_sent", "Messages the servers accepted since the daemon started")
        sent.add_metric([], stats.sent if stats else 0)
        yield sent
        events = CounterMetricFamily(
            "cadenced_events", "Log events since start, by event and reason", labels=["event", "reason"]
        )
        for (name, reason), n in sorted(logs.event_counts.items()):
            events.add_metric([name, reason], n)
        yield events
        store = Store.open(config.daemon.database, create=False)
        try:
            now = time.time()
            document = readside.status(config, store, now)
            by_state = GaugeMetricFamily("cadenced_messages", "Messages waiting, by state", labels=["state"])
            totals = {state: 0 for state in ("scheduled", "sending", "error")}
            for (_mailbox, state), n in store.message_counts().items():
                totals[state] = totals.get(state, 0) + n
            for state, n in sorted(totals.items()):
                by_state.add_metric([state], n)
            yield by_state
            sent_today = GaugeMetricFamily("cadenced_mailbox_sent_today", "Sent today (local day)", labels=["mailbox"])
            limit = GaugeMetricFamily("cadenced_mailbox_allowance_today", "May send today", labels=["mailbox"])
            up = GaugeMetricFamily(
                "cadenced_mailbox_state", "1 for the mailbox's current state", labels=["mailbox", "state"]
            )
            for m in document["mailboxes"]:
                sent_today.add_metric([m["address"]], m["sent_today"])
                limit.add_metric([m["address"]], m["allowance_today"])
                up.add_metric([m["address"], m["state"]], 1)
            yield sent_today
            yield limit
            yield up
            heartbeat = GaugeMetricFamily(
                "cadenced_last_commit_timestamp_seconds", "When the daemon last committed its heartbeat"
            )
            kept = store.daemon_state()
            heartbeat.add_metric([], float(kept.get("heartbeat_at") or 0))
            yield heartbeat
        finally:
            store.close()


def build_app(settings: ApiSettings, config: Callable[[], Config], stats: Callable[[], Any]) -> Starlette:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonMetrics(config, stats))
    expected = settings.token.reveal().encode() if settings.token is not None else None

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return expected is not None and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected)

    def refused() -> JSONResponse:
        return JSONResponse(
            {"error": "unauthorized", "detail": "Authorization: Bearer <the token of [api]> is required"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def metrics(_: Request) -> Response:
        body = await anyio.to_thread.run_sync(generate_latest, registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def status(request: Request) -> Response:
        if not authorized(request):
            return refused()

        def read() -> dict[str, Any]:
            store = Store.open(config().daemon.database, create=False)
            try:
                return readside.status(config(), store, time.time())
            finally:
                store.close()

        return JSONResponse(await anyio.to_thread.run_sync(read))

    async def outbox(request: Request) -> Response:
        if not authorized(request):
            return refused()
        query = request.query_params
        unknown = sorted(set(query) - {"state", "mailbox", "cadence", "limit"})
        if unknown:
            return JSONResponse({"error": "bad_request", "field": unknown[0], "detail": "unknown parameter"}, 400)
        state = query.get("state")
        if state is not None and state not in MESSAGE_STATES:
            detail = f"one of {', '.join(MESSAGE_STATES)}"
            return JSONResponse({"error": "bad_request", "field": "state", "detail": detail}, 400)
        limit_text = query.get("limit", "1000")
        if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_LIMIT:
            detail = f"a whole number from 1 to {MAX_LIMIT}"
            return JSONResponse({"error": "bad_request", "field": "limit", "detail": detail}, 400)

        def read() -> list[dict[str, Any]]:
            store = Store.open(config().daemon.database, create=False)
            try:
                rows = store.outbox(
                    state=state, mailbox=query.get("mailbox"), cadence=query.get("cadence"), limit=int(limit_text)
                )
                return readside.outbox_messages(rows)
            finally:
                store.close()

        return JSONResponse({"messages": await anyio.to_thread.run_sync(read)})

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/outbox", outbox, methods=["GET"]),
    ]
    return Starlette(routes=routes)


async def run(
    settings: ApiSettings,
    config: Callable[[], Config],
    stats: Callable[[], Any],
    stop: anyio.Event,
    done: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop` is set (the daemon stopping), then set `done`: the server closes by its own shutdown
    (Hypercorn does not take being cancelled mid-serve well), the daemon waits for that, bounded."""
    server = ServerConfig()
    server.bind = [f"unix:{settings.socket}"] if settings.socket else [f"{settings.host}:{settings.port}"]
    server.accesslog = None
    server.errorlog = None
    server.graceful_timeout = 2.0
    app = build_app(settings, config, stats)
    task_status.started()
    try:
        await serve(app, server, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        done.set()
