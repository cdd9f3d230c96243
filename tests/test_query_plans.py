"""Every hot statement uses an index: scheduling and reading cost what is due or asked for, not what is enrolled."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.store import Claimed, Store

# A table scan of one of these grows with everything ever enrolled or sent.
BIG = re.compile(r"\bSCAN (messages|enrollments|m|e)\b")  # with or without an index: a scan is O(rows)


def plans(store: Store, call: Callable[[Store], Any]) -> list[tuple[str, list[str]]]:
    """Run `call`, capture every statement it executes, and EXPLAIN QUERY PLAN each one."""
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    try:
        call(store)
    finally:
        store.conn.set_trace_callback(None)
    out = []
    for sql in statements:
        head = sql.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
            continue
        try:
            rows = store.conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        except sqlite3.Error:
            continue  # a statement bound to a temporary object that is gone
        out.append((" ".join(sql.split()), [str(r[3]) for r in rows]))
    return out


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "plans.db")
    with s.transaction():
        s.insert_enrollments(
            [("c", f"p{i}@x.example", "m@x.example", "u", "u", "{}", 0.0) for i in range(50)],
            [("m@x.example", float(i)) for i in range(50)],
        )
    return s


CLAIMED = Claimed(1, 1, 1, "m@x.example", "c", "p0@x.example", {}, 0.0, 1, 0, "m@x.example", "<x@y>")

HOT: dict[str, Callable[[Store], Any]] = {
    "snapshot": lambda s: s.snapshot("m@x.example", "2026-11-28"),
    "claim": lambda s: s.claim("m@x.example", 1e12, lambda i, a: f"<{i}.{a}@x>"),
    "thread": lambda s: s.thread(1, 3),
    "record_sent": lambda s: s.record_sent(CLAIMED, 1.0, 250, "ok", "Hi", "2026-11-28", 2.0, (2, "m@x.example", 9.0)),
    "earliest_due": lambda s: s.earliest_due("m@x.example"),
    "status counts": lambda s: (s.message_counts(), s.enrollment_counts(), s.health(), s.pins()),
    "recover_sending": lambda s: s.recover_sending(1.0),
    "disconnect": lambda s: s.disconnect("m@x.example", 1.0, "down", 2.0),
    "reconnect": lambda s: s.reconnect("m@x.example", 1.0),
    "catch_due_while_down": lambda s: s.catch_due_while_down("m@x.example", 1.0),
    "outbox --state error": lambda s: s.outbox(state="error", limit=100),
    "error_ids": lambda s: (s.error_ids(None, exclude_uncertain=True), s.error_ids("m@x.example")),
    "pending_ids": lambda s: s.pending_ids("m@x.example", exclude_uncertain=True),
    "uncertain_message_ids": lambda s: s.uncertain_message_ids("m@x.example"),
    "mark_deferred": lambda s: s.mark_deferred("m@x.example", 5.0, "deferred: window until later"),
    "replies and bounces": lambda s: (
        s.enrollments_of_message_ids(["<a@b>"]),
        s.enrollments_of_sender("p1@x.example", "m@x.example"),
    ),
    "plan": lambda s: s.scheduled_for_plan("m@x.example", 1e12, 100),
    "bounces": lambda s: (
        s.dsn_failed(["<a@b>"], "p1@x.example", "blocked", "5.7.1", "m@x.example"),
        s.bounce_address("p2@x.example", 1.0, "5.1.1"),
        s.record_failed(CLAIMED, 1.0, 550, "5.1.1", True),
        s.record_failed(CLAIMED, 1.0, 550, "5.7.1", False),
        s.end_enrollments([3, 4], "replied", 1.0, "replied"),
        s.settle_uncertain(5, True, 1.0, "found"),
        s.unblame("m@x.example", [1, 2], 1.0, "the sender's"),
    ),
    "enroll look-ups": lambda s: (s.suppressed(["p1@x.example"]), s.enrolled("c", ["p1@x.example"])),
    "start-up": lambda s: s.orphan_removed_mailboxes({"other@x.example"}, 1.0),
    "messages_by_id": lambda s: s.messages_by_id([1, 2]),
}


@pytest.mark.parametrize("name", list(HOT))
def test_hot_statements_use_an_index(store: Store, name: str) -> None:
    found = plans(store, HOT[name])
    assert found, f"{name}: no statement captured"
    for sql, plan in found:
        scans = [step for step in plan if BIG.search(step)]
        assert not scans, f"{name}: {sql}\n  plan: {plan}"


def test_a_first_release_database_migrates_and_keeps_its_counts(tmp_path: Path) -> None:
    """A database made by the first release (schema 1) opens with this one: counts backfilled, rules kept."""
    from daemon.store import _MIGRATIONS, SCHEMA_VERSION, _statements

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for statement in _statements(_MIGRATIONS[1]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.executemany(
            "INSERT INTO enrollments (cadence, email, mailbox, owner, adder, fields, state, created_at) "
            "VALUES ('c', ?, 'm@x.example', 'u', 'u', '{}', ?, 0)",
            [(f"p{i}@x.example", "active" if i % 3 else "replied") for i in range(30)],
        )
        conn.execute("INSERT INTO cadence_pins VALUES ('c', 1, 'cadence', 0)")
    store = Store.open(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.enrollment_counts() == {"c": {"active": 20, "replied": 10}}
    with store.transaction():
        store.conn.execute("UPDATE enrollments SET state = 'replied' WHERE email = 'p1@x.example'")
    assert store.enrollment_counts() == {"c": {"active": 19, "replied": 11}}
    assert store.pins()["c"].rotate_among == "cadence"
