"""argparse commands; the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.streams.stapled
import tomli_w

from daemon import __version__, enroll, headers, operate, preview, prospects, readside, report
from daemon.config import (
    address_problem,
    config_digest,
    config_path_from,
    database_of,
    effective_dict,
    load_accepted,
    load_config,
    shown_database,
)
from daemon.errors import (
    CadencedError,
    ConfigError,
    Refused,
    SmtpFailure,
    StoreUnavailable,
    StoreUnreachable,
    UsageError,
)
from daemon.model import Config, Mailbox, OAuth2
from daemon.readside import iso
from daemon.store import MESSAGE_STATES, OUTCOMES, Store, copy_to_postgres

Handler = Callable[[argparse.Namespace], int]
UNIT_TIMEOUT_STOP = 45.0  # systemd/cadenced.service TimeoutStopSec
STOP_MARGIN = 15.0  # after the grace: closing connections (QUIT, 5 s), IMAP LOGOUT (5 s), the last commits


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _load(args: argparse.Namespace) -> Config:
    config = load_config(config_path_from(args.config))
    for warning in config.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    return config


def _open_store(config: Config, *, create: bool = True, warn: bool = True) -> Store:
    store = Store.open(config.daemon.database, create=create)
    try:
        warning = readside.stale_config(store, config, time.time()) if warn else None
    except StoreUnavailable:
        warning = None
    if warning:
        sys.stderr.write(f"warning: {warning}\n")
    return store


def _load_reading(args: argparse.Namespace) -> tuple[Config, bool]:
    """A read command's config (status, outbox, plan, prospect show, cadence list): the file's, or the one the
    running daemon accepted when the file is broken or differs from it, said first on stderr. (config, True)
    when it is the daemon's."""
    path = config_path_from(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        database = database_of(path)
        kept = _kept_config(database, path) if database is not None else None
        if kept is None:
            raise
        sys.stderr.write(f"note: {path} cannot be used ({exc.problems[0]}): reading the configuration {kept[1]}\n")
        return kept[0], True
    for warning in config.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    kept = _kept_config(config.daemon.database, path, differs_only=True)
    if kept is None:
        return config, False
    sys.stderr.write(
        f"note: {kept[1].removesuffix(' accepted')} runs an older version of {path}: reload to apply it "
        "(systemctl reload cadenced, or kill -HUP); until then this reads the configuration it runs\n"
    )
    return kept[0], True


def _kept_config(database: Path | str, path: Path, differs_only: bool = False) -> tuple[Config, str] | None:
    """The config the daemon kept in the database, and who accepted it when; None: none kept (or, with
    `differs_only`, no daemon runs or the file is what it runs)."""
    if isinstance(database, Path) and not database.exists():
        return None
    try:
        store = Store.open(database, create=False)
    except CadencedError:
        return None
    try:
        state = store.daemon_state()
        running = readside.daemon(store, time.time())
    except CadencedError:
        return None
    finally:
        store.close()
    text = state.get("config_text")
    if not text:
        return None
    if differs_only and (not running["running"] or state.get("config_digest") == config_digest(path)):
        return None
    who = f"the running daemon (pid {running['pid']})" if running["running"] else "the last daemon"
    try:
        return load_accepted(path, text), f"{who} accepted"
    except ConfigError:
        return None


T = TypeVar("T")

# --- commands ---------------------------------------------------------------------


def _existing_parent(path: Path) -> Path:
    """The nearest folder of `path` that exists (where the database, or its folder, would be created)."""
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _cannot_write(folder: Path) -> str:
    """Why nothing can be created in `folder` (tried for real: permission bits do not tell for root), or ""."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cadenced-check-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    problems: list[str] = []
    database = config.daemon.database
    found = False
    if isinstance(database, str):
        from daemon.store import postgres

        try:
            server, schema = postgres.inspect(database)
        except StoreUnreachable as exc:  # the config is what is checked: the daemon waits for its database
            sys.stderr.write(f"warning: {exc} (the daemon waits for it and starts when it answers)\n")
        else:
            state = (
                "no cadenced schema yet (made at the first enroll or start)" if schema is None else f"schema {schema}"
            )
            _out(f"database: PostgreSQL {server} at {shown_database(database)}, {state}")
            found = schema is not None
    else:
        folder = _existing_parent(database)
        why = _cannot_write(folder)
        if why:
            problems.append(f"daemon.database: cannot create {database}: {folder}: {why}")
        found = database.exists()
    if found:
        store = _open_store(config, create=False)
        try:
            store.check_integrity()
            pins = store.pins()
            problems = enroll.pin_problems(config, pins)
            for warning in enroll.pin_warnings(config, pins) + readside.stored_warnings(config, store):
                sys.stderr.write(f"warning: {warning}\n")
        finally:
            store.close()
    if config.daemon.shutdown_grace + STOP_MARGIN > UNIT_TIMEOUT_STOP:
        sys.stderr.write(
            f"warning: daemon.shutdown_grace {config.daemon.shutdown_grace:g}s leaves less than {STOP_MARGIN:g}s "
            f"before the unit's TimeoutStopSec={UNIT_TIMEOUT_STOP:g}s (systemd then kills the daemon): "
            f"raise TimeoutStopSec to at least {config.daemon.shutdown_grace + STOP_MARGIN:g}s\n"
        )
    fqdn = socket.getfqdn()
    loopback = ("127.0.0.1", "::1", "localhost")
    bare = [m.address for m in config.mailboxes if not m.helo_name and m.smtp.host not in loopback]
    if bare and "." not in fqdn:
        sys.stderr.write(
            f"warning: this host's name {fqdn!r} is not fully qualified and servers may refuse it at EHLO "
            f"(Postfix reject_non_fqdn_helo_hostname); set helo_name for {', '.join(bare[:5])}\n"
        )
    if problems:
        raise ConfigError(problems, str(config.path))
    if args.print:
        sys.stdout.write(tomli_w.dumps(effective_dict(config)))
    else:
        _out(
            f"{config.path}: ok ({len(config.users)} users, {len(config.mailboxes)} mailboxes, "
            f"{len(config.cadences)} cadences, {len(config.automations)} automations)"
        )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    config = _load(args)
    dialect = _dialect(args)
    store = _open_store(config)
    by: dict[str, str | None] = {}
    first: dict[str, Any] | None = None
    try:
        importer = enroll.Importer(store, config, args.cadence, args.adder, dialect)

        def forecast(report: enroll.Report) -> None:
            """A dry run's forecast and first email, made in its transaction (they read what it would enroll)."""
            nonlocal by, first
            if report.enrolled:
                by = readside.first_emails_by(config, store, time.time(), report.assignments)
                first = importer.first_email()

        dry = args.dry_run
        report = importer.run(Path(args.file), time.time(), within=forecast if dry else None, dry_run=dry)
        # When the last new prospect of each mailbox gets its first email (the backlog, told).
        if report.enrolled and not dry:
            by = readside.first_emails_by(config, store, time.time(), report.assignments)
    finally:
        store.close()
    code = 1 if report.failed else 0  # rows were given and none could be enrolled
    unused = importer.unused_columns()
    mapped = importer.header.as_list() if importer.header else []
    if args.json:
        extra = {"dry_run": True, "first_email": first} if dry else {}
        _json({**report.as_dict(), "first_emails_by": by, "columns": mapped, "unused_columns": unused, **extra})
        return code
    if dry:
        _out("dry run: nothing was written")
        _out(
            f"would enroll {report.enrolled}, skip {report.skipped} (already enrolled), reject {report.rejected_total}"
        )
    else:
        _out(
            f"enrolled {report.enrolled}, skipped {report.skipped} (already enrolled), rejected {report.rejected_total}"
        )
    for mailbox, n in sorted(report.assignments.items()):
        when = by.get(mailbox, "")
        told = f"first emails by {when}" if when else f"first emails: not within {readside.BACKLOG_DAYS} days"
        _out(f"  {mailbox}: {n} ({told})" if mailbox in by else f"  {mailbox}: {n}")
    for r in report.rejected:
        _out(f"  line {r.line}: {r.email or '-'}: {r.reason}")
    if report.rejected_total > len(report.rejected):
        _out(f"  … and {report.rejected_total - len(report.rejected)} more rejected rows")
    renamed = [
        f"{c['column']!r} → {c['field']}" if c["field"] else f"{c['column']!r} not read"
        for c in mapped
        if c["column"] and c["column"] != c["field"]
    ]
    if nameless := sum(1 for c in mapped if not c["column"]):
        renamed.append(f"{nameless} column(s) with no name (empty) not read")
    if renamed:
        _out("columns read as: " + ", ".join(renamed))
    if unused:
        _out(f"columns no template of cadence {args.cadence!r} uses (kept with the prospects): " + ", ".join(unused))
    if dry and first is not None:
        _out(f"first email (step 1), from mailbox {first['mailbox']}:")
        if "problem" in first:
            _out(f"  cannot be rendered: {first['problem']}")
        else:
            for name in ("From", "To", "Subject"):
                _out(f"  {name}: {first[name.lower()]}")
            _out()
            for text in first["body"].splitlines():
                _out(f"  {text}")
    return code


def _addresses(given: list[str]) -> list[str]:
    """Addresses from the command line, lower-cased as enrollments keep them; a bad one refuses them all."""
    bad = [(a, problem) for a in given if (problem := address_problem(a)) is not None]
    if bad:
        raise UsageError(f"not an email address: {bad[0][0]!r} ({bad[0][1]}); nothing was changed")
    return list(dict.fromkeys(a.lower() for a in given))


def cmd_mailbox_pause(args: argparse.Namespace) -> int:
    """Stop a mailbox without editing the config (kept in the database until `mailbox resume`)."""
    config = _load(args)
    mailbox = _mailbox(config, args.address)
    store = _open_store(config)
    try:
        done = store.pause(mailbox.address, f"paused by the operator: {args.reason}", time.time())
    finally:
        store.close()
    _out(f"{mailbox.address}: paused" if done else f"{mailbox.address}: was paused already")
    return 0


def cmd_mailbox_resume(args: argparse.Namespace) -> int:
    config = _load(args)
    mailbox = _mailbox(config, args.address)
    store = _open_store(config)
    try:
        was = store.resume(mailbox.address)
    finally:
        store.close()
    if was is None:
        raise Refused(
            f"{mailbox.address}: not paused by pause_on or `mailbox pause`"
            + (" (paused = true in the config: change it there and reload)" if mailbox.paused else "")
        )
    _out(f"{mailbox.address}: resumed (was {was}); its bounce and block rates count afresh")
    return 0


def cmd_prospect_show(args: argparse.Namespace) -> int:
    config, accepted = _load_reading(args)
    store = _open_store(config, create=False, warn=not accepted)
    try:
        shown = prospects.show(prospects.find(store, args.email), store.cadence_pauses())
    finally:
        store.close()
    if args.json:
        _json(shown)
        return 0
    if shown["suppressed"]:
        _out(f"{shown['email']}: suppressed since {shown['suppressed']['at']} ({shown['suppressed']['reason']})")
    else:
        _out(shown["email"])
    for e in shown["enrollments"]:
        state = e["state"] + (f" ({e['outcome']})" if e["outcome"] else "")
        paused = ", cadence paused" if e["cadence_paused"] else ""
        _out(
            f"  {e['cadence']}: {state}{paused}; mailbox {e['mailbox']}, owner {e['owner']}, added by {e['adder']} "
            f"at {e['created_at']}"
        )
        if e["fields"]:
            _out("    fields: " + ", ".join(f"{k}={' '.join(str(v).split())[:60]}" for k, v in e["fields"].items()))
        for m in e["messages"]:
            when = f"sent {m['sent_at']}" if m["sent_at"] else f"due {m['due_at']}" if m["due_at"] else ""
            state = f"{m['state']}/{m['reason']}" if m["reason"] else m["state"]
            why = f"  {' '.join(str(m['detail']).split())[:120]}" if m["detail"] and m["state"] != "sent" else ""
            mid = f"  {m['message_id']}" if m["state"] == "sent" and m["message_id"] else ""
            variant = f" variant {m['variant']}" if m.get("variant") else ""
            _out(f"    step {m['step']}{variant}  {state}  {m['mailbox']}  {when}{mid}{why}".rstrip())
    _out("timeline:")
    for t in shown["timeline"]:
        what = t["kind"] + (f" {t['cadence']}" if t.get("cadence") else "")
        if t["kind"] == "sent":
            what += f" step {t['step']} from {t['mailbox']}: {t['subject']!r}"
        elif t["kind"] == "enrolled":
            what += f" (mailbox {t['mailbox']})"
        if t.get("detail"):
            what += f": {' '.join(str(t['detail']).split())[:160]}"
        _out(f"  {t['at']}  {what}")
    return 0


Done = dict[str, Any]


def _prospect_action(
    args: argparse.Namespace, act: Callable[[Store, Config], Done], said: Callable[[Done], str]
) -> int:
    """`prospect stop|set|mark`: the action on the database; its answer as JSON, or in words."""
    config = _load(args)
    store = _open_store(config, create=False)
    try:
        done = act(store, config)
    finally:
        store.close()
    if args.json:
        _json(done)
    else:
        _out(said(done))
    return 0


def cmd_prospect_stop(args: argparse.Namespace) -> int:
    return _prospect_action(
        args,
        lambda store, _: prospects.stop(store, args.email, args.cadence, args.reason, time.time()),
        lambda d: (
            f"{d['email']}: stopped in {', '.join(d['stopped'])}; {len(d['cancelled'])} waiting message(s) "
            "cancelled (the address is not suppressed)"
        ),
    )


def cmd_prospect_set(args: argparse.Namespace) -> int:
    changes = prospects.parse_assignments(args.assignments)
    return _prospect_action(
        args,
        lambda store, config: prospects.set_fields(store, config, args.email, args.cadence, changes, time.time()),
        lambda d: (
            f"{d['email']}: {', '.join(d['fields'])} changed in {', '.join(d['changed'])}; "
            "messages not yet sent use them"
        ),
    )


def cmd_prospect_mark(args: argparse.Namespace) -> int:
    return _prospect_action(
        args,
        lambda store, _: prospects.mark(store, args.email, args.cadence, args.outcome, time.time()),
        lambda d: (
            f"{d['email']}: marked {d['outcome']}"
            + (f"; ended in {', '.join(d['ended'])}" if d["ended"] else "")
            + f"; {len(d['cancelled'])} waiting message(s) cancelled"
        ),
    )


def cmd_cadence_list(args: argparse.Namespace) -> int:
    config, accepted = _load_reading(args)
    store = _open_store(config, warn=not accepted)
    try:
        paused = store.cadence_pauses()
        counts = store.enrollment_counts()
    finally:
        store.close()
    rows: list[dict[str, Any]] = []
    for name in [c.name for c in config.cadences] + sorted(set(counts) - {c.name for c in config.cadences}):
        pause = paused.get(name)
        rows.append(
            {
                "name": name,
                "configured": any(c.name == name for c in config.cadences),
                "paused": pause is not None,
                "paused_at": iso(pause[0]) if pause else None,
                "paused_reason": pause[1] if pause else None,
                "enrollments": counts.get(name, {}),
            }
        )
    if args.json:
        _json({"cadences": rows})
        return 0
    for r in rows:
        state = (
            f"paused since {r['paused_at']} ({r['paused_reason']})"
            if r["paused"]
            else ("sending" if r["configured"] else "removed from the config")
        )
        counts_text = ", ".join(f"{k} {v}" for k, v in sorted(r["enrollments"].items())) or "no enrollments"
        _out(f"{r['name']}: {state}; {counts_text}")
    return 0


def cmd_cadence_pause(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_store(config)
    name = args.name
    try:
        done = prospects.pause_cadence(store, config, name, f"paused by the operator: {args.reason}", time.time())
    finally:
        store.close()
    if done:
        _out(f"{name}: paused; its messages wait (`cadenced cadence resume {name}`), enrollments are still taken")
    else:
        _out(f"{name}: was paused already")
    return 0


def cmd_cadence_resume(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_store(config)
    name = args.name
    try:
        released = prospects.resume_cadence(store, config, name)
    finally:
        store.close()
    _out(f"{name}: resumed; {released} held message(s) due again at their own times (those past go first)")
    return 0


def _with_store(args: argparse.Namespace, fn: Callable[[Store], T], *, create: bool = True) -> T:
    """`fn(store)` on the configured database, closed after."""
    store = _open_store(_load(args), create=create)
    try:
        return fn(store)
    finally:
        store.close()


def cmd_suppress(args: argparse.Namespace) -> int:
    """Never send to these addresses again; what they have pending is cancelled."""
    addresses = _addresses(args.addresses)
    cancelled = _with_store(args, lambda store: store.suppress_addresses(addresses, args.reason, time.time()))
    if args.json:
        _json({"suppressed": addresses, "cancelled": {a: ids for a, ids in cancelled.items()}})
    else:
        for address, ids in cancelled.items():
            _out(f"{address}: suppressed; {len(ids)} pending message(s) cancelled")
    return 0


def cmd_unsuppress(args: argparse.Namespace) -> int:
    addresses = _addresses(args.addresses)
    lifted = _with_store(args, lambda store: store.unsuppress(addresses))
    missing = [a for a in addresses if a not in lifted]
    if args.json:
        _json({"unsuppressed": lifted, "not_suppressed": missing})
    else:
        for address in lifted:
            _out(f"{address}: no longer suppressed (a new import may enroll it; nothing ended restarts)")
        for address in missing:
            _out(f"{address}: was not suppressed")
    return 0


def cmd_suppressions(args: argparse.Namespace) -> int:
    rows = _with_store(args, lambda store: store.suppressions(args.limit), create=False)
    if args.json:
        _json({"suppressions": [{**r, "created_at": iso(r["created_at"])} for r in rows]})
    else:
        for r in rows:
            _out(f"{r['email']:<40} {iso(r['created_at'])}  {r['reason']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config, accepted = _load_reading(args)
    store = _open_store(config, warn=not accepted)
    try:
        document = readside.status(config, store, time.time())
    finally:
        store.close()
    if args.json:
        _json(document)
        return 0
    _out("mailboxes:")
    for m in document["mailboxes"]:
        waiting = f"waiting for {m['waiting_for']}" if m["waiting_for"] else ""
        kind = {"follow_up": " (a follow-up)", "new": " (a first email)"}.get(m["next_message"] or "", "")
        nxt = f"next {m['next_send_at']}{kind}" if m["next_send_at"] else "nothing due"
        if m["new_per_day"]:
            nxt = f"new {m['new_today']}/{m['new_per_day']}  {nxt}"
        _out(
            f"  {m['address']:<32} {m['state']:<12} sent {m['sent_today']}/{m['daily_limit']}  "
            f"scheduled {m['scheduled']}  error {m['error']}  {nxt} {waiting}".rstrip()
        )
        if m.get("reason"):
            _out(f"  {'':<32} {m['state']}: {m['reason']}")
        if "holder" in m:
            lease = f"sent by {m['holder']} (lease to {m['lease_expires_at']})" if m["holder"] else "no daemon holds it"
            _out(f"  {'':<32} {lease}")
    for d in document.get("daemons", []):
        _out(
            f"daemon {d['node']}: pid {d['pid']} on {d['host']}, {'live' if d['live'] else 'gone'}, seen {d['seen_at']}"
        )
    store_state = document["daemon"]["store"]
    if store_state not in (None, "ok"):
        _out(f"daemon (pid {document['daemon']['pid']}): {store_state}")
    _out("cadences:")
    for c in document["cadences"]:
        counts = ", ".join(f"{k} {v}" for k, v in c["enrollments"].items()) or "no enrollments"
        paused = f" (paused since {c['paused_at']}: `cadenced cadence resume {c['name']}`)" if c["paused"] else ""
        _out(f"  {c['name']}: {counts}{paused}")
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    if args.action == "retry":
        return cmd_outbox_retry(args)
    if args.action == "reassign":
        return cmd_outbox_reassign(args)
    config, accepted = _load_reading(args)
    store = _open_store(config, warn=not accepted)
    limit = None if args.show_all else args.limit
    if limit is not None and limit < 1:
        raise UsageError("--limit: 1 or more (--all for every message)")
    try:
        prospects.check_filters(config, store, args.mailbox, args.cadence)
        prospect = prospects.find(store, args.prospect)["email"] if args.prospect else None
        where = {"state": args.state, "mailbox": args.mailbox, "cadence": args.cadence, "prospect": prospect}
        rows = store.outbox(**where, limit=None if limit is None else limit + 1)
        more = 0
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            more = store.outbox_count(**where, beyond=limit, cap=readside.COUNT_CAP)
        paused = store.cadence_pauses()
    finally:
        store.close()
    messages = readside.outbox_messages(rows, paused)
    if args.json:
        _json({"messages": messages, "more": more})
        return 0
    if not messages:
        _out("no messages")
        return 0
    table = [
        (
            str(m["id"]),
            f"{m['state']}/{m['reason']}" if m["reason"] else str(m["state"]),
            f"{m['cadence']} #{m['step']}",
            str(m["mailbox"]),
            str(m["prospect"]),
            f"sent {m['sent_at']}" if m["sent_at"] else f"due {m['due_at']}",
            " ".join(str(m["detail"] or "").split())[:160],
        )
        for m in messages
    ]
    head = ("ID", "STATE", "CADENCE", "MAILBOX", "PROSPECT", "WHEN", "WHY")
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head) - 1)]
    for r in [head, *table]:
        cells = [r[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(r[1:-1], widths[1:], strict=True)]
        _out("  ".join([*cells, r[-1]]).rstrip())
    if more:
        told = f"{more:,}" if more < readside.COUNT_CAP else f"over {readside.COUNT_CAP:,}"
        _out(f"{told} more (use --limit N or --all)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(config_path_from(args.config))
    from daemon import logs
    from daemon.service import Daemon

    logs.configure(config.daemon.log_format, config.daemon.log_level)
    for warning in config.warnings:  # one event per line in the daemon's log, not loose text on stderr
        logs.get().warning("config.warning", detail=warning)
    daemon = Daemon(config.path, config)
    anyio.run(daemon.run, backend="asyncio")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Offline: the daemon's lock on the SQLite file is taken for the copy, so none runs meanwhile."""
    from daemon.config import POSTGRES_SCHEMES
    from daemon.service import hold_lock

    config = _load(args)
    source = config.daemon.database
    url = os.environ.get(args.to[1:], "") if args.to.startswith("$") else args.to
    if not isinstance(source, Path):
        raise UsageError("daemon.database is already PostgreSQL: migrate copies an SQLite database into it")
    if not url.startswith(POSTGRES_SCHEMES):
        raise UsageError(f"--to: a postgresql:// URL (or $VARIABLE holding one), got {shown_database(args.to)!r}")
    release = hold_lock(source)
    try:
        store = Store.open(source, create=False)
        try:
            copied = copy_to_postgres(store, url)
        finally:
            store.close()
    finally:
        release()
    if args.json:
        _json({"to": shown_database(url), "tables": copied, "rows": sum(copied.values())})
        return 0
    _out(f"copied {sum(copied.values())} rows of {len(copied)} tables to {shown_database(url)}; every count verified")
    for table, n in copied.items():
        _out(f"  {table}: {n}")
    _out("now set [daemon] database (or database_url_env) to it, and start the daemons there")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    config, accepted = _load_reading(args)
    store = _open_store(config, warn=not accepted)
    try:
        document = readside.plan(config, store, time.time(), args.days)
    finally:
        store.close()
    if args.json:
        _json(document)
        return 0
    if not document["days"]:
        _out(f"nothing to send in the next {args.days} days")
    current = None
    for row in document["days"]:
        if row["date"] != current:
            current = row["date"]
            _out(f"{current}{'':<33} {'sends':>6} {'new':>6} {'follow-ups':>10}")
        _out(f"  {row['mailbox']:<40} {row['sends']:>6} {row['new']:>6} {row['follow_ups']:>10}")
    for row in document["past_horizon"]:  # a backlog that outlasts the forecast is named, not hidden
        waiting = " and ".join(
            f"{n} {what}" for n, what in ((row["new"], "first email(s)"), (row["follow_ups"], "follow-up(s)")) if n
        )
        _out(
            f"cadence {row['cadence']!r} on {row['mailbox']}: {waiting} due within {args.days} days"
            " go out after them (its backlog runs past this plan)"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    config, accepted = _load_reading(args)
    store = _open_store(config, warn=not accepted)
    try:
        cadence = prospects.known_cadence(config, store, args.cadence) if args.cadence else None
        document = report.report(config, store, args.by or "", cadence, args.since)
    finally:
        store.close()
    if args.json:
        _json(document)
        return 0
    for line in report.lines(document):
        _out(line)
    return 0


def _dialect(args: argparse.Namespace) -> enroll.Dialect:
    """How `enroll` and `preview --csv` read a file: --delimiter, --encoding, --map."""
    try:
        mapping = headers.parse_map(args.map)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    delimiter = enroll.delimiter_of(args.delimiter) if args.delimiter is not None else None
    return enroll.Dialect(delimiter, args.encoding, tuple(mapping.items()))


def cmd_preview(args: argparse.Namespace) -> int:
    config, accepted = _load_reading(args)
    database = config.daemon.database
    scratch = None
    if isinstance(database, Path) and not database.exists():
        # Nothing enrolled yet: an empty database in a scratch folder answers (the configured one is not made).
        scratch = tempfile.TemporaryDirectory(prefix="cadenced-preview-")
        store = Store.open(Path(scratch.name) / "empty.db")
    else:
        store = _open_store(config, create=False, warn=not accepted)
    try:
        if args.prospect is not None:
            if args.row is not None or args.mailbox is not None:
                raise UsageError("--row and --mailbox go with --csv (an enrolled prospect has its own mailbox)")
            document = preview.of_prospect(
                config, store, args.cadence, args.prospect, args.step, args.variant, time.time()
            )
        else:
            document = preview.of_csv(
                config,
                store,
                args.cadence,
                Path(args.csv),
                args.row or 1,
                _dialect(args),
                args.step,
                args.variant,
                args.mailbox,
                time.time(),
            )
    finally:
        store.close()
        if scratch is not None:
            scratch.cleanup()
    if args.json:
        _json(document)
    elif args.raw:
        sys.stdout.write(document["raw"])
    else:
        for line in preview.lines(document):
            _out(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon import demo

    return demo.main(keep=args.keep)


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_store(config, create=False)
    try:
        outcome = operate.retry(
            store, config, args.id, args.mailbox_of, args.all, include_uncertain=args.include_uncertain
        )
    finally:
        store.close()
    if args.json:
        _json({"retried": outcome.messages})
    else:
        _out(f"retried {len(outcome.messages)} message(s): {operate.id_list(outcome.messages)}")
    return 0


def cmd_outbox_reassign(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_store(config, create=False)
    try:
        outcome = operate.reassign(
            store, config, args.id, args.source, args.to, include_uncertain=args.include_uncertain
        )
    finally:
        store.close()
    if args.json:
        _json(
            {
                "reassigned": outcome.messages,
                "enrollments": outcome.enrollments,
                "to": args.to,
                "goes_at": outcome.goes_at,
                "waiting_for": outcome.waiting_for,
            }
        )
    else:
        _out(
            f"reassigned {outcome.enrollments} enrollment(s) to {args.to}; "
            f"{len(outcome.messages)} message(s) now leave from it: {operate.id_list(outcome.messages)}"
        )
        if outcome.goes_at is not None:
            _out(f"{args.to} waits for {outcome.waiting_for}: they go from {outcome.goes_at}")
    return 0


def _mailbox(config: Config, address: str) -> Mailbox:
    try:
        return config.mailbox(address)
    except KeyError:
        raise UsageError(f"unknown mailbox {address!r}") from None


def cmd_mailbox_test(args: argparse.Namespace) -> int:
    mailbox = _mailbox(_load(args), args.address)
    from daemon import imap, oauth, smtp

    tokens = oauth.Tokens()

    async def probe() -> None:
        try:
            await smtp.Connection(mailbox, tokens).probe()
            _out(f"{args.address}: SMTP {server.host}:{server.port} {server.security}: connected, EHLO and login ok")
            if mailbox.oauth2 is not None and (expiry := tokens.expiry(mailbox.address, mailbox.oauth2)):
                scopes = f"; scopes: {expiry[1]}" if expiry[1] else ""
                _out(f"{args.address}: OAuth2 access token valid until {iso(expiry[0])}{scopes}")
            if mailbox.imap is not None:
                await imap.check(mailbox, tokens, lambda line: _out(f"{args.address}: {line}"))
        finally:
            await tokens.aclose()

    server = mailbox.smtp
    try:
        anyio.run(probe, backend="asyncio")
    except SmtpFailure as failure:
        code = f" ({failure.code})" if failure.code else ""
        at = f" at {failure.stage.upper()}" if failure.stage else ""
        raise Refused(
            f"{args.address}: SMTP {server.host}:{server.port} {server.security}: {failure.text}{code}{at}"
        ) from None
    except imap.ImapFailure as failure:
        raise Refused(f"{args.address}: {failure}") from None
    return 0


def cmd_mailbox_authorize(args: argparse.Namespace) -> int:
    """The authorization-code flow with PKCE; the refresh token goes where the config reads it from."""
    mailbox = _mailbox(_load(args), args.address)
    settings = mailbox.oauth2
    if settings is None:
        raise UsageError(
            f"{args.address}: no [mailboxes.oauth2] table: give client_id and refresh_token_file "
            '(and provider = "google" or "microsoft", or token_url and auth_url)'
        )
    missing = [key for key, value in (("auth_url", settings.auth_url), ("scopes", settings.scopes)) if not value]
    if missing:
        index = next(i for i, m in enumerate(_load(args).mailboxes) if m.address == mailbox.address)
        raise UsageError(
            "; ".join(f"mailboxes[{index}].oauth2.{key}: is required by `mailbox authorize`" for key in missing)
            + ' (provider = "google" or "microsoft" gives both; the daemon itself needs neither)'
        )
    from daemon import oauth

    try:
        # Microsoft matches the registered redirect's host to the letter (`http://localhost`, any port); Google's
        # desktop clients take the loopback address.
        host = "localhost" if mailbox.provider == "microsoft" else "127.0.0.1"
        refresh = anyio.run(_authorize, mailbox.address, settings, args.port, host, args.timeout, backend="asyncio")
    except (oauth.AuthorizationFailed, oauth.TokenError) as exc:
        raise Refused(f"{args.address}: not authorized: {exc}") from None
    target = oauth.save_refresh_token(settings, refresh)
    if target is not None:
        _out(f"{args.address}: authorized; the refresh token is in {target} (mode 0600), which refresh_token_file")
        _out("names. Reload the daemon to use it: systemctl reload cadenced")
        return 0
    kind, _, name = settings.refresh_token_source.partition(":")
    _out(f"{args.address}: authorized. The refresh token, to store where {kind} = {name!r} reads it:")
    _out(refresh)
    if kind == "refresh_token_credential":
        _out(f"(for instance: systemd-creds encrypt --name={name} - /etc/credstore.encrypted/{name}, then reload)")
    return 0


AUTHORIZE_CONNECTIONS = 16  # connections the redirect listener serves at once; more are closed at once


async def _authorize(address: str, settings: OAuth2, port: int, host: str = "127.0.0.1", within: float = 600.0) -> str:
    """Print the URL; wait for the browser's redirect on a loopback listener, or for it pasted on stdin.

    Bounded: the whole wait (`within`), each connection (10 s for its request), and the connections served at
    once (AUTHORIZE_CONNECTIONS: idle connections cannot exhaust the process's descriptors)."""
    import secrets

    from daemon import oauth

    verifier, challenge = oauth.pkce_pair()
    state = secrets.token_urlsafe(16)
    found: list[str] = []
    failure: list[oauth.AuthorizationFailed] = []
    done = anyio.Event()

    def accept(target: str) -> bool:
        try:
            found.append(oauth.code_from_redirect(target, state))
        except oauth.AuthorizationFailed as exc:
            if "state differs" in str(exc) or "no authorization code" in str(exc):
                return False  # not ours (a favicon, a stray request): keep waiting
            found.append("")
            failure.append(exc)
        done.set()
        return True

    serving = [0]

    async def serve(stream: anyio.abc.SocketStream) -> None:
        if serving[0] >= AUTHORIZE_CONNECTIONS:
            await stream.aclose()  # a flood of idle connections: the browser's own comes in when one ends
            return
        serving[0] += 1
        try:
            await _serve_redirect(stream)
        finally:
            serving[0] -= 1

    async def _serve_redirect(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            with anyio.move_on_after(10):
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    try:
                        request += await stream.receive(4096)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            parts = request.split(b"\r\n", 1)[0].split()
            target = parts[1].decode("ascii", "replace") if len(parts) == 3 and parts[0] == b"GET" else ""
            ours = bool(target) and accept(target)
            text = "cadenced: authorization received; this tab can be closed." if ours else "not found"
            body = text.encode()
            head = f"HTTP/1.1 {'200 OK' if ours else '404 Not Found'}\r\nContent-Type: text/plain\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(head.encode() + body)

    async def pasted() -> None:
        """Lines on stdin, read as they come (a thread blocked in readline would hold the exit up)."""
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return  # no stdin at all: the listener alone
        pending = b""
        while True:
            with contextlib.suppress(OSError, ValueError):  # a regular file cannot be waited on; it never blocks
                await anyio.wait_readable(fd)
            chunk = os.read(fd, 4096)
            if not chunk:
                return  # the terminal or pipe closed: the listener alone
            pending = (pending + chunk)[-65536:]
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                text = line.decode("utf-8", "replace").strip()
                if text and not accept(text):
                    sys.stderr.write("cadenced: that is not the address the browser was sent to; paste it whole\n")

    if host == "localhost":  # whichever of 127.0.0.1 and ::1 the browser picks for it, on one port
        listeners, bound = await _both_loopbacks(port)
        listener: anyio.abc.Listener[anyio.abc.SocketStream] = anyio.streams.stapled.MultiListener(listeners)
    else:
        single = await anyio.create_tcp_listener(local_host=host, local_port=port)
        bound = single.extra(anyio.abc.SocketAttribute.local_port)
        listener = single
    redirect = f"http://{host}:{bound}/"
    url = oauth.authorization_url(settings, address, redirect, state, challenge)
    _out(f"Open this address in a browser and sign in as {address}:\n\n{url}\n")
    _out(f"The browser is sent back to {redirect}: on this machine that completes the authorization by itself.")
    _out("From another machine the page will not load: copy the address it shows and paste it here.")
    sys.stdout.flush()
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        tg.start_soon(pasted)
        with anyio.move_on_after(within):
            await done.wait()
        tg.cancel_scope.cancel()
    await listener.aclose()
    if not done.is_set():
        raise oauth.AuthorizationFailed(f"no redirect came within {within:g} s (--timeout)")
    if failure:
        raise failure[0]
    return await oauth.exchange_code(settings, found[0], verifier, redirect)


async def _both_loopbacks(port: int) -> tuple[list[anyio.abc.Listener[anyio.abc.SocketStream]], int]:
    """Listeners on 127.0.0.1 and ::1 at one port, or on 127.0.0.1 alone where this host has no IPv6. A port taken
    on ::1 by another program is never left to it (the browser could take the code there): another port, or, for
    a --port given, an error."""
    for _ in range(5):
        first = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        bound = first.extra(anyio.abc.SocketAttribute.local_port)
        try:
            second = await anyio.create_tcp_listener(local_host="::1", local_port=bound)
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                return [first], bound  # no IPv6 loopback here: a browser cannot reach ::1 either
            await first.aclose()
            if port:
                raise Refused(f"[::1]:{port} is in use by another program; choose another --port") from None
            continue
        return [first, second], bound
    raise Refused("no port was free on both 127.0.0.1 and ::1; give one with --port")


# --- parser ---------------------------------------------------------------------------


def _seconds(text: str) -> float:
    from daemon.config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be 1s to 1d, got {text!r}")
    return value


def _date(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 366:
        raise argparse.ArgumentTypeError(f"must be 1-366, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="configuration file (default: $CADENCED_CONFIG or /etc/cadenced/config.toml)",
    )
    parser = argparse.ArgumentParser(
        prog="cadenced", description="Sending daemon for sales outreach cadences.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"cadenced {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", parents=[common], help="validate the configuration")
    p.add_argument("--print", action="store_true", help="print the effective configuration as TOML")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("enroll", parents=[common], help="enroll prospects from a CSV file")
    p.add_argument("--cadence", required=True)
    p.add_argument("--as", dest="adder", required=True, metavar="USER", help="the user who adds them")
    p.add_argument("--json", action="store_true")
    _reading_options(p)
    p.add_argument("--dry-run", action="store_true", help="check everything and print the first email; write nothing")
    p.add_argument("file", metavar="FILE.csv")
    p.set_defaults(handler=cmd_enroll)

    p = sub.add_parser("status", parents=[common], help="mailboxes and cadences at a glance")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("outbox", parents=[common], help="list the outbox; retry or reassign messages")
    p.add_argument("--state", choices=MESSAGE_STATES)
    p.add_argument("--mailbox")
    p.add_argument("--cadence")
    p.add_argument("--prospect", metavar="EMAIL", help="the messages of one address")
    p.add_argument("--limit", type=int, default=50, help="at most this many messages (default 50)")
    p.add_argument("--all", dest="show_all", action="store_true", help="every message, however many")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_outbox, action=None)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    r = actions.add_parser("retry", parents=[common], help="move error messages back to scheduled")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", metavar="N")
    which.add_argument("--mailbox", dest="mailbox_of", metavar="M")
    which.add_argument("--all", action="store_true")
    r.add_argument("--include-uncertain", action="store_true", help="allow uncertain messages named by --id")
    r.add_argument("--json", action="store_true")
    r = actions.add_parser("reassign", parents=[common], help="change the sender, sticky from then on")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", metavar="N")
    which.add_argument("--from", dest="source", metavar="M")
    r.add_argument("--to", required=True, metavar="M2")
    r.add_argument("--include-uncertain", action="store_true", help="allow uncertain messages named by --id")
    r.add_argument("--json", action="store_true")

    p = sub.add_parser("suppress", parents=[common], help="never send to these addresses again")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--reason", default="operator", help="kept with the suppression (default: operator)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_suppress)
    p = sub.add_parser("unsuppress", parents=[common], help="lift suppressions (nothing ended restarts)")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_unsuppress)
    p = sub.add_parser("suppressions", parents=[common], help="list suppressed addresses and why")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_suppressions)

    p = sub.add_parser("mailbox", parents=[common], help="mailbox tools")
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    t = tools.add_parser("test", parents=[common], help="try the SMTP (and IMAP) login of a mailbox and report")
    t.add_argument("address")
    t.set_defaults(handler=cmd_mailbox_test)
    t = tools.add_parser("pause", parents=[common], help="stop a mailbox until `mailbox resume` (not the config)")
    t.add_argument("address")
    t.add_argument("--reason", default="no reason given")
    t.set_defaults(handler=cmd_mailbox_pause)
    t = tools.add_parser("resume", parents=[common], help="resume a mailbox paused by pause_on or `mailbox pause`")
    t.add_argument("address")
    t.set_defaults(handler=cmd_mailbox_resume)
    t = tools.add_parser("authorize", parents=[common], help="sign an OAuth2 mailbox in; store its refresh token")
    t.add_argument("address")
    t.add_argument("--port", type=int, default=0, help="the loopback redirect's port (default: any free one)")
    t.add_argument(
        "--timeout", type=_seconds, default=600.0, help="give up without a redirect after this long (default 10m)"
    )
    t.set_defaults(handler=cmd_mailbox_authorize)

    p = sub.add_parser("prospect", parents=[common], help="one prospect: show, stop, set fields, mark an outcome")
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    t = tools.add_parser("show", parents=[common], help="every enrollment, message and event of an address")
    t.add_argument("email")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=cmd_prospect_show)
    t = tools.add_parser("stop", parents=[common], help="end its enrollment(s); waiting messages cancelled")
    t.add_argument("email")
    t.add_argument("--cadence", help="only in this cadence (default: every one)")
    t.add_argument("--reason", default="", help="kept with the enrollment")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=cmd_prospect_stop)
    t = tools.add_parser("set", parents=[common], help="change its fields (FIELD= removes one)")
    t.add_argument("email")
    t.add_argument("assignments", nargs="+", metavar="FIELD=VALUE")
    t.add_argument("--cadence", help="only in this cadence (default: every active one)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=cmd_prospect_set)
    t = tools.add_parser("mark", parents=[common], help="an outcome: ends the enrollment as a reply does")
    t.add_argument("email")
    t.add_argument("--outcome", required=True, choices=OUTCOMES)
    t.add_argument("--cadence", help="only in this cadence (default: every one)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=cmd_prospect_mark)

    p = sub.add_parser("cadence", parents=[common], help="cadences: list, pause, resume")
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    t = tools.add_parser("list", parents=[common], help="each cadence: sending or paused, its enrollments")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=cmd_cadence_list)
    t = tools.add_parser("pause", parents=[common], help="hold every message of a cadence until resumed")
    t.add_argument("name")
    t.add_argument("--reason", default="no reason given")
    t.set_defaults(handler=cmd_cadence_pause)
    t = tools.add_parser("resume", parents=[common], help="send a paused cadence's messages again")
    t.add_argument("name")
    t.set_defaults(handler=cmd_cadence_resume)

    p = sub.add_parser("run", parents=[common], help="the daemon (foreground; systemd Type=notify)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("plan", parents=[common], help="forecast sends per mailbox per day, sending nothing")
    p.add_argument("--days", type=_days, default=7, help="1 to 366")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("report", parents=[common], help="what each cadence's emails did: sends, replies, bounces")
    p.add_argument("--cadence", metavar="NAME")
    p.add_argument("--by", choices=report.BY, help="a row per step, variant (of each step), mailbox or UTC day")
    p.add_argument("--since", type=_date, metavar="DATE", help="from this UTC day on (YYYY-MM-DD)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "preview", parents=[common], help="a step's email for one prospect as it would leave; nothing sent"
    )
    p.add_argument("--cadence", required=True, metavar="NAME")
    p.add_argument("--step", type=int, metavar="N", help="default: the prospect's step that waits to go, else 1")
    p.add_argument("--variant", metavar="NAME", help="this variant of the step (default: the prospect's)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--prospect", metavar="EMAIL", help="an enrolled address")
    who.add_argument("--csv", metavar="FILE", help="a CSV file, read as enroll reads it")
    p.add_argument("--row", type=int, metavar="N", help="the file's row (1: the first under the header; default 1)")
    p.add_argument("--mailbox", metavar="ADDRESS", help="with --csv: the mailbox to send from (rotation chooses)")
    _reading_options(p)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument("--raw", action="store_true", help="the message's bytes as they would go to the server")
    p.set_defaults(handler=cmd_preview)

    p = sub.add_parser("migrate", parents=[common], help="copy the SQLite database into an empty PostgreSQL one")
    p.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://…, or $VARIABLE holding it (a password stays off the command line)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("demo", help="a self-contained run against a local SMTP server on loopback")
    p.add_argument("--keep", action="store_true", help="keep the demo's folder (config, database) afterwards")
    p.set_defaults(handler=cmd_demo)
    return parser


def _reading_options(p: argparse.ArgumentParser) -> None:
    """How a CSV file is read (enroll, preview --csv)."""
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=FIELD",
        help="read a column as a field (repeatable; COLUMN= leaves it out)",
    )
    p.add_argument("--delimiter", help="',' ';' or tab (default: found from the header row)")
    p.add_argument("--encoding", help="the file's encoding (default: UTF-8, or UTF-16 by its byte-order mark)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        head = f"{exc.source}: " if exc.source else ""
        if len(exc.problems) == 1:
            sys.stderr.write(f"cadenced: {head}{exc.problems[0]}\n")
        else:
            sys.stderr.write(f"cadenced: {head}{len(exc.problems)} problems\n")
            for problem in exc.problems:
                sys.stderr.write(f"  {problem}\n")
        return exc.exit_code
    except CadencedError as exc:
        sys.stderr.write(f"cadenced: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cadenced status | head -3`: the reader left; say nothing more (and let the exit flush nowhere).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
