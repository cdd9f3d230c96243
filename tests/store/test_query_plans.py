"""Every hot statement uses an index: scheduling and reading cost what is due or asked for, not what is enrolled."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import lifecycle
from daemon.config import PauseRule, load_config
from daemon.errors import StoreUnavailable
from daemon.store import Claimed, SentRecord, Store
from tests.conftest import Project

# A table scan of one of these grows with everything ever enrolled or sent.
BIG = re.compile(r"\bSCAN (messages|enrollments|m|e)\b")  # with or without an index: a scan is O(rows)


def plans(store: Store, call: Callable[[Store], Any]) -> list[tuple[str, list[str]]]:
    """Run `call`, capture every statement it executes, and EXPLAIN QUERY PLAN each one."""
    statements: list[str] = []
    store.conn.trace(statements.append)  # type: ignore[attr-defined]
    try:
        call(store)
    finally:
        store.conn.trace(None)  # type: ignore[attr-defined]
    out = []
    for sql in statements:
        head = sql.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
            continue
        try:
            rows = store.conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        except StoreUnavailable:
            continue  # a statement bound to a temporary object that is gone
        out.append((" ".join(sql.split()), [str(r[3]) for r in rows]))
    return out


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "plans.db")
    with s.transaction():
        s.insert_enrollments(
            "c", [(i + 1, "c", f"p{i}@x.example", "m@x.example", "u", "u", "{}", 0.0, i) for i in range(50)]
        )
        s.schedule_first_steps(1, None, 0.0, {"m@x.example": 50})
        s.conn.execute("UPDATE messages SET due_at = enrollment_id - 1")
    return s


CLAIMED = Claimed(1, 1, 1, "m@x.example", "c", "p0@x.example", {}, 0.0, 1, 0, "m@x.example", "<x@y>")

HOT: dict[str, Callable[[Store], Any]] = {
    "snapshot": lambda s: s.snapshot("m@x.example", "2026-11-28", 0.0),
    "claim": lambda s: s.claim("m@x.example", 1e12, lambda i, a: f"<{i}.{a}@x>"),
    "claim, follow-ups first": lambda s: s.claim("m@x.example", 1e12, lambda i, a: f"<{i}.{a}@y>", "follow_ups"),
    "claim, first emails first": lambda s: s.claim("m@x.example", 1e12, lambda i, a: f"<{i}.{a}@z>", "new"),
    "thread": lambda s: s.thread(1, 3),
    "record_sent": lambda s: s.record_sent(
        SentRecord(CLAIMED, 1.0, 250, "ok", "Hi", "2026-11-28", 2.0, (2, "m@x.example", 9.0))
    ),
    "earliest_due": lambda s: s.earliest_due("m@x.example"),
    "status counts": lambda s: (s.message_counts(), s.enrollment_counts(), s.health(), s.pins()),
    "recover_sending": lambda s: s.recover_sending(1.0),
    "disconnect": lambda s: s.disconnect("m@x.example", 1.0, "down", 2.0),
    "reconnect": lambda s: s.reconnect("m@x.example", 1.0),
    "catch_due_while_down": lambda s: s.catch_due_while_down("m@x.example", 1.0),
    "outbox --state error": lambda s: s.outbox(state="error", limit=100),
    "outbox --state scheduled, sent": lambda s: (
        s.outbox(state="scheduled", mailbox="m@x.example", limit=100),
        s.outbox(state="sent", limit=100),
    ),
    "error_ids": lambda s: (s.error_ids(None, exclude_uncertain=True), s.error_ids("m@x.example")),
    "pending_ids": lambda s: s.pending_ids("m@x.example", exclude_uncertain=True),
    "uncertain_message_ids": lambda s: s.uncertain_message_ids("m@x.example"),
    "mark_deferred": lambda s: s.mark_deferred("m@x.example", 5.0, "deferred: window until later"),
    "replies and bounces": lambda s: (
        s.enrollments_of_message_ids(["<a@b>"]),
        s.enrollments_of_sender("p1@x.example", "m@x.example"),
    ),
    "plan": lambda s: (
        list(s.scheduled_in_order("m@x.example", 1e12, "follow_ups")),
        list(s.scheduled_in_order("m@x.example", 1e12, "new")),
        s.route_of(3),
    ),
    "bounces": lambda s: (
        s.dsn_failed(["<a@b>"], "p1@x.example", "blocked", "5.7.1", "m@x.example"),
        s.bounce_address("p2@x.example", 3, 1.0, "5.1.1"),
        s.record_failed(CLAIMED, 1.0, 550, "5.1.1", True),
        s.record_failed(CLAIMED, 1.0, 550, "5.7.1", False),
        s.end_enrollments([3, 4], "replied", 1.0, "replied"),
        s.settle_uncertain(5, True, 1.0, "found"),
        s.unblame("m@x.example", [1, 2], 1.0, "the sender's"),
    ),
    "enroll": lambda s: (
        s.start_import(),
        s.stage_import([(i, f"p{i % 60}@x.example", "u", "{}") for i in range(1, 80)]),
        s.drop_staged_duplicates(),
        s.drop_staged_suppressed(),
        s.drop_staged_enrolled("c"),
        s.next_enrollment_id(),
        s.staged_groups(True),
        s.staged_groups(False),
        s.enroll_staged("c", "u", 1.0, 51, {"": ("m@x.example", "n@x.example")}, False, 50),
        s.schedule_first_steps(51, None, 1.0, {"m@x.example": 5, "n@x.example": 5}),  # p50 … p59 are new
    ),
    "start-up": lambda s: s.orphan_removed_mailboxes({"other@x.example"}, 1.0),
    "reputation": lambda s: (
        s.count_failure("m@x.example", "2026-11-28", "bounced", True),
        s.pause_if("m@x.example", PauseRule(0.05, 0.05, 1, 7), "2026-11-22", 1.0),
        s.resume("m@x.example"),
        s.first_send_day("m@x.example"),
        s.next_due_domain("m@x.example", 10.0),
        s.domain_sent("m@x.example", "2026-11-28", "x.example"),
        s.defer_domain("m@x.example", "x.example", 10.0, 20.0, "deferred: domain_limit"),
        s.domain_counts_on("m@x.example", "2026-11-28"),
        s.email_of(3),
        s.never_contacted("m@x.example"),
        s.unsubscribe(1, 1.0, "unsubscribed"),
        s.suppress_addresses(["p2@x.example"], "operator", 1.0),
    ),
    "messages_by_id": lambda s: s.messages_by_id([1, 2]),
}


# sqlite_stat1 as ANALYZE wrote it for 10,000,000 enrollments and 20,000,000 messages (bench/scale.py): averages
# that hide the skew (a state is "5,000,000 rows" though only 50,000 are in error), which can tempt the planner.
LARGE_STATS = [
    ("enrollments", "sqlite_autoindex_enrollments_1", "10000000 1 1"),
    ("messages", "messages_state", "10250000 2050000 99503 99503"),  # every state but scheduled
    ("messages", "messages_by_message_id", "10000000 1"),
    ("messages", "messages_due", "9750001 99490 9"),
    ("messages", "sqlite_autoindex_messages_1", "20000000 2 1"),
]


@pytest.fixture(params=["no statistics", "statistics of a large database"])
def planned(request: pytest.FixtureRequest, store: Store) -> Store:
    if request.param == "no statistics":
        return store
    with store.transaction():
        store.conn.execute("ANALYZE sqlite_master")  # creates sqlite_stat1
        store.conn.execute("DELETE FROM sqlite_stat1")
        store.conn.executemany("INSERT INTO sqlite_stat1 VALUES (?, ?, ?)", LARGE_STATS)
    store.close()
    return Store.open(store.path)  # statistics are read when a connection opens


@pytest.mark.parametrize("name", list(HOT))
def test_hot_statements_use_an_index(planned: Store, name: str) -> None:
    found = plans(planned, HOT[name])
    assert found, f"{name}: no statement captured"
    for sql, plan in found:
        scans = [step for step in plan if BIG.search(step)]
        assert not scans, f"{name}: {sql}\n  plan: {plan}"


def test_a_first_release_database_migrates_and_keeps_its_counts(tmp_path: Path) -> None:
    """A database made by the first release (schema 1) opens with this one: counts backfilled, rules kept."""
    from daemon.store import SCHEMA_VERSION
    from daemon.store.sqlite import MIGRATIONS, statements

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for statement in statements(MIGRATIONS[1]):
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


def recount(store: Store) -> dict[tuple[str, str], int]:
    rows = store.conn.execute(
        "SELECT mailbox, state, count(*) FROM messages WHERE state IN ('scheduled', 'sending', 'error') "
        "GROUP BY mailbox, state"
    )
    return {(r[0], r[1]): r[2] for r in rows}


def recount_enrollments(store: Store) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for cadence, state, n in store.conn.execute("SELECT cadence, state, count(*) FROM enrollments GROUP BY 1, 2"):
        counts.setdefault(cadence, {})[state] = n
    return counts


def test_the_kept_message_counts_are_the_real_counts(store: Store) -> None:
    """`status` reads counts kept as messages and enrollments change: after every hot operation they equal a
    full count."""
    assert store.message_counts() == recount(store) == {("m@x.example", "scheduled"): 50}
    assert store.enrollment_counts() == recount_enrollments(store) == {"c": {"active": 50}}
    for name, call in HOT.items():
        with store.transaction():
            call(store)
        assert store.message_counts() == recount(store), name
        assert store.enrollment_counts() == recount_enrollments(store), name
    with store.transaction():
        store.conn.execute("DELETE FROM messages WHERE id % 3 = 0")
        store.conn.execute("UPDATE messages SET mailbox = 'other@x.example' WHERE id % 5 = 0")
    assert store.message_counts() == recount(store)


def test_the_group_commits_own_counts_are_the_real_counts(store: Store) -> None:
    """The daemon's group-commit connection has no counting triggers: its claim, send and finish count by
    hand, between changes made by connections that have them."""
    hand = Store.open(store.path, counts_by_hand=True)
    assert hand.conn.execute("SELECT count(*) FROM sqlite_temp_master WHERE type = 'trigger'").fetchone()[0] == 0
    for i in range(12):
        with hand.transaction():
            c = hand.claim("m@x.example", 1e12, lambda m, a: f"<{m}.{a}@x>")
            assert c is not None
            if i % 4 == 3:
                hand.record_sent(
                    SentRecord(c, 1.0, 250, "ok", "Hi", "2026-11-28", 2.0, None)
                )  # the last step: finished
            elif i % 4 != 2:
                hand.record_sent(SentRecord(c, 1.0, 250, "ok", "Hi", "2026-11-28", 2.0, (2, "other@x.example", 9.0)))
        if i % 4 == 2:  # left in `sending`: the other connection finds it uncertain, its trigger counts
            store.recover_sending(1.0)
        assert hand.message_counts() == recount(hand), i
        assert hand.enrollment_counts() == recount_enrollments(hand), i
    assert recount(hand)[("m@x.example", "error")] == 3
    assert recount_enrollments(hand)["c"]["finished"] == 3


def test_every_way_in_counts_what_it_adds(project: Project) -> None:
    """No trigger counts inserted enrollments or messages (it would cost an import a fifth more): the inserting
    operations do. Every way in, each checked against a full count: an import placed in turns by SQL, one placed
    row by row (weighted rotation), one from a step's own sender, a send that schedules the next step, and an
    uncertain send settled from Sent that schedules it."""
    mb1, mb2 = project.add_mailboxes(2)
    project.add_cadence("turns", steps=2)
    project.add_cadence("weighted", steps=2, rotation="weighted")
    fixed = project.add_cadence("fixed", steps=2, auto_rotate=False)
    fixed["steps"][0]["sender"] = mb2
    for name in ("turns", "weighted", "fixed"):
        assert project.enroll(project.people(5, name=f"{name}.csv"), cadence=name).code == 0
    config = load_config(project.write())
    store = Store.open(project.database)
    try:

        def counted() -> None:
            assert store.message_counts() == recount(store)
            assert store.enrollment_counts() == recount_enrollments(store)

        counted()
        assert sum(store.enrollment_counts()[c]["active"] for c in ("turns", "weighted", "fixed")) == 15
        now = time.time() + 60  # every step 1 is due; every step 2 a day after its step 1 is sent
        with store.transaction():
            claimed = store.claim(mb1, now, lambda message, attempt: f"<cadenced.{message}.{attempt}.ab@x>")
        assert claimed is not None and claimed.step == 1
        following = lifecycle.next_step(config, claimed.cadence, claimed.step, claimed.sticky, now)
        assert following is not None
        store.record_sent(SentRecord(claimed, now, 250, "ok", "Hi", "2026-12-05", now, following))
        counted()
        with store.transaction():
            again = store.claim(mb1, now, lambda message, attempt: f"<cadenced.{message}.{attempt}.cd@x>")
        assert again is not None and again.step == 1
        store.record_error(again.id, "uncertain", None, "lost after DATA", now)
        with store.transaction():
            route = store.settle_uncertain(again.id, True, now, "found in Sent")
            assert route is not None
            enrollment, step, cadence, sticky = route
            nxt = lifecycle.next_step(config, cadence, step, sticky, now)
            assert nxt is not None
            store.schedule_step(enrollment, *nxt)
        counted()
    finally:
        store.close()
