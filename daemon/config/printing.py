"""`cadenced check --print`: the effective configuration as plain TOML data, every secret masked."""

from __future__ import annotations

from typing import Any

from daemon.config.values import format_duration
from daemon.model import (
    DAYS,
    MASK,
    ApiSettings,
    Config,
    OAuth2,
    Schedule,
    Server,
)
from daemon.store.urls import shown_database


def _schedule_dict(s: Schedule) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "skip_dates": sorted(s.skip_dates),
        "holidays": list(s.holidays),
        "domain_daily_limit": s.domain_daily_limit,
        "prioritize": s.prioritize,
        "new_per_day": s.new_per_day,
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
    viewer_kind, _, viewer_where = a.read_only_token_source.partition(":")
    if viewer_kind:
        out[viewer_kind] = viewer_where
    if a.tls_cert:
        out |= {"tls_cert": a.tls_cert, "tls_key": a.tls_key}
    if a.allow_plain_http:
        out["allow_plain_http"] = True
    if a.hosts:
        out["hosts"] = list(a.hosts)
    return out


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
                **({"signature": m.signature.source} if m.signature else {}),
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
                "new_per_day": c.new_per_day,
                "sender": c.sender,
                "stop_on_reply": "company" if c.stop_company else c.stop_on_reply,
                "fields": list(c.fields),
                "steps": [
                    {
                        "wait": format_duration(s.wait),
                        **({"subject": s.subject.source} if s.subject else {}),
                        **({"body_file": s.body_file} if s.body_file else {"body": s.body.source}),
                        "sender": s.sender,
                        **({"thread": "new"} if s.new_thread else {}),
                        **({"format": "markdown"} if s.markdown else {}),
                        **(
                            {
                                "variants": [
                                    {
                                        "name": v.name,
                                        "weight": v.weight,
                                        **({"subject": v.step.subject.source} if v.step.subject else {}),
                                        **(
                                            {"body_file": v.step.body_file}
                                            if v.step.body_file
                                            else {"body": v.step.body.source}
                                        ),
                                    }
                                    for v in s.variants
                                ]
                            }
                            if s.variants
                            else {}
                        ),
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
                **({"map": dict(a.mapping)} if a.mapping else {}),
                **({"delimiter": a.delimiter} if a.delimiter else {}),
                **({"encoding": a.encoding} if a.encoding else {}),
            }
            for a in config.automations
        ],
        "playbooks": [
            {
                "name": p.name,
                "cadence": p.cadence,
                "owner": p.owner,
                **({"fields": dict(p.fields)} if p.fields else {}),
                **({"map": dict(p.mapping)} if p.mapping else {}),
            }
            for p in config.playbooks
        ],
    }
