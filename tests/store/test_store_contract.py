"""The store's contract, on both engines, through its operations only (no SQL on its tables): what each
operation changes, and the counts it keeps, are the same on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import StoreBusy
from daemon.store import Claimed, SentRecord, Store

A, B = "a@send.example", "b@send.example"
DAY = "2026-12-07"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    where: Path | str = tmp_path / "contract.db"
    if request.param == "postgresql":
        where = request.getfixturevalue("postgres_url")
    s = Store.open(where)
    yield s
    s.close()


def enroll(store: Store, cadence: str, emails: list[str], mailbox: str = A, due: float = 100.0) -> list[int]:
    first = store.next_enrollment_id()
    rows = [(first + i, cadence, e, mailbox, "alice", "alice", "{}", 0.0, first + i) for i, e in enumerate(emails)]
    with store.transaction():
        store.insert_enrollments(cadence, rows)
        store.count_enrollments(cadence, {mailbox: len(rows)})
        store.schedule_first_steps(first, None, due, {mailbox: len(rows)})
    return [r[0] for r in rows]


def counts_agree(store: Store) -> None:
    """The kept counts are what the outbox and the enrollments hold."""
    listed = Counter((m["mailbox"], m["state"]) for m in store.outbox())
    pending = {k: n for k, n in listed.items() if k[1] in ("scheduled", "sending", "error")}
    assert store.message_counts() == pending


def claim(store: Store, mailbox: str = A, now: float = 1000.0) -> Claimed:
    c = store.claim(mailbox, now, lambda i, a: f"<{i}.{a}@send.example>")
    assert c is not None
    return c


def sent(c: Claimed, next_step: tuple[int, str, float] | None) -> SentRecord:
    return SentRecord(c, 1000.0, 250, "ok", f"step {c.step}", DAY, 1060.0, next_step)


def test_the_group_commits_session_counts_what_the_triggers_count(store: Store) -> None:
    """The daemon's group commit counts without the counting triggers (SQLite by hand, PostgreSQL in the claim's
    and the record's statements): the same sends, one cadence and mailbox through it and another through a
    session with the triggers, leave the same counts and results."""
    where = store.conn.url if store.shared else store.path  # type: ignore[attr-defined]
    group = Store.open(where, wait=False, counts_by_hand=True)
    try:
        if store.shared:  # its triggers stand aside: the statements count
            assert group.conn.one("SELECT current_setting('cadenced.counting', true)")[0] == "statement"
        for s, cadence, mailbox in ((group, "c1", A), (store, "c2", B)):
            enroll(store, cadence, ["p1@x.example", "p2@y.example"], mailbox=mailbox)
            for _ in range(2):
                c = claim(s, mailbox)
                with s.transaction():
                    s.record_sent(sent(c, (2, mailbox, 1500.0)))
            c = claim(s, mailbox, 2000.0)
            with s.transaction():
                s.record_sent(sent(c, None))  # its last step: the enrollment finished
            with s.transaction():
                s.record_sent(sent(c, None))  # recorded again (a commit whose answer was lost): counted once
    finally:
        group.close()
    counts_agree(store)
    counts = store.message_counts()
    assert {(m, s): n for (m, s), n in counts.items() if m == A} == {
        (A, s): n for (m, s), n in counts.items() if m == B
    }
    assert store.enrollment_counts() == {"c1": {"active": 1, "finished": 1}, "c2": {"active": 1, "finished": 1}}
    for by, since in (("variant", ""), ("mailbox", ""), ("day", ""), ("step", "1970-01-01")):
        rows = {(r[0], *(A if v == B else v for v in r[1:])) for r in store.results(by, None, since)}
        assert {r[1:] for r in rows if r[0] == "c1"} == {r[1:] for r in rows if r[0] == "c2"}, by
        assert any(r[0] == "c1" and "finished" in r for r in rows), by


@pytest.mark.parametrize("prioritize", ["due", "follow_ups", "new", "follow_ups_only", None])
def test_a_turns_reads_asked_together_are_the_reads_asked_one_by_one(store: Store, prioritize: str | None) -> None:
    """A fenced PostgreSQL session in a pipeline asks a turn's lease, snapshot and next row in one statement;
    they read what the three statements read on their own (SQLite, and an unfenced session: those three)."""
    enroll(store, "c1", ["p1@x.example", "p2@y.example"], due=50.0)
    c = claim(store)
    with store.transaction():
        store.record_sent(sent(c, (2, A, 500.0)))
    if store.shared:
        store.lease_round("node-a", [A], 60.0, [], True)
        store.fence("node-a", 60.0)
    for mailbox, held in ((A, True), (B, not store.shared)):
        with store.conn.pipelined(), store.transaction():
            holds, snap, following = store.ask_turn_reads(mailbox, DAY, 0.0, 1000.0, prioritize)
            alone = store.holding(mailbox), store.ask_snapshot(mailbox, DAY, 0.0)
            row = store.ask_next_due(mailbox, 1000.0, prioritize)() if prioritize is not None else None
            assert (holds(), snap()) == (alone[0](), alone[1]())
            assert holds() is held
            if prioritize is None:
                assert following is None
            else:
                assert following is not None
                got = following()
                assert (got is None and row is None) or tuple(got) == tuple(row), (got, row)
                assert (got is not None) is (mailbox == A)  # A has a first email and a follow-up due; B nothing


def test_a_claim_takes_the_oldest_due_and_a_send_schedules_the_next_step(store: Store) -> None:
    enroll(store, "c1", ["p1@x.example"], due=100.0)
    enroll(store, "c1", ["p2@y.example"], due=50.0)
    assert store.claim(A, 10.0, lambda i, a: "<never>") is None  # nothing due yet
    c = claim(store)
    assert (c.email, c.step, c.attempts, c.fields) == ("p2@y.example", 1, 1, {"email": "p2@y.example"})
    counts_agree(store)
    with store.transaction():
        store.record_sent(sent(c, (2, B, 5000.0)))
    assert store.sent_on(A, DAY) == 1
    assert store.thread(c.enrollment_id, 2) == [(1, c.message_id, "step 1")]
    follow_up = [m for m in store.outbox(state="scheduled") if m["prospect"] == "p2@y.example"]
    assert [(m["step"], m["mailbox"], m["due_at"]) for m in follow_up] == [(2, B, 5000.0)]
    counts_agree(store)
    last = claim(store, B, 6000.0)
    with store.transaction():
        store.record_sent(sent(last, None))
    assert store.enrollment_counts()["c1"] == {"active": 1, "finished": 1}
    snap = store.snapshot(A, DAY, 0.0)
    assert (snap.sent_today, snap.gap_until, snap.state) == (1, 1060.0, "connected")


def test_a_bounce_suppresses_and_stops_the_address_everywhere_and_unblame_undoes_it(store: Store) -> None:
    enroll(store, "c1", ["dead@x.example", "p@y.example"])
    enroll(store, "c2", ["dead@x.example"], mailbox=B)
    c = claim(store)
    assert c.email == "dead@x.example"
    cancelled = store.record_failed(c, 1000.0, 550, "5.1.1 no such user", suppress=True, day=DAY)
    assert len(cancelled) == 1  # c2's step 1, from B
    assert [s["email"] for s in store.suppressions()] == ["dead@x.example"]
    assert store.enrollment_counts() == {"c1": {"active": 1, "bounced": 1}, "c2": {"stopped": 1}}
    assert store.reputation(A, DAY) == (1, 1, 0)
    counts_agree(store)
    refused = store.unblame(A, [c.id], 1001.0, "the sender's refusal", day=DAY)
    assert refused == [c.id]
    assert store.suppressions() == []
    assert store.enrollment_counts() == {"c1": {"active": 2}, "c2": {"active": 1}}
    assert store.messages_by_id([c.id])[c.id]["reason"] == "refused"
    assert store.reputation(A, DAY) == (0, 0, 0)
    counts_agree(store)


def test_a_disconnected_mailbox_keeps_its_messages_in_the_retry_queue(store: Store) -> None:
    enroll(store, "c1", ["p1@x.example", "p2@x.example"])
    c = claim(store)
    assert sorted(store.disconnect(A, 1000.0, "535 auth failed", 1060.0)) == sorted([c.id, c.id + 1])
    assert {m["reason"] for m in store.outbox(state="error")} == {"disconnected"}
    assert store.mailbox_states()[A][0] == "disconnected"
    counts_agree(store)
    # The one in flight may have gone: it is not retried by a reconnect, only by the operator.
    back = store.reconnect(A, 1100.0)
    assert len(back) == 2 and store.mailbox_states()[A][0] == "connected"
    assert store.error_ids(A) == [] and len(store.pending_ids(A)) == 2
    counts_agree(store)


def test_pause_resume_reassign_and_ending_enrollments(store: Store) -> None:
    ids = enroll(store, "c1", ["p1@x.example", "p2@x.example", "p3@x.example"])
    assert store.pause(A, "operator: checking", 10.0) and not store.pause(A, "again", 11.0)
    assert store.mailbox_states()[A] == ("connected", "operator: checking")
    assert store.resume(A) == "operator: checking" and store.resume(A) is None
    with store.transaction():
        moved = store.reassign([ids[0]], B)
    assert len(moved) == 1 and store.rotation_counts("c1") == {A: 2, B: 1}
    assert store.route_of(ids[0]) == ("c1", B)
    with store.transaction():
        ended = store.end_enrollments(ids[1:], "replied", 20.0, "replied")
    assert len(ended) == 2
    assert store.enrollment_counts()["c1"] == {"active": 1, "replied": 2}
    assert store.unsubscribe_address("p1@x.example", 30.0, "unsubscribed") == [moved[0]]
    assert store.enrollment_counts()["c1"] == {"stopped": 1, "replied": 2}
    counts_agree(store)


def test_an_import_is_checked_as_a_set_and_enrolled_in_turns(store: Store) -> None:
    store.suppress("gone@x.example", "operator", 0.0)
    enroll(store, "c1", ["old@x.example"])
    store.start_import()
    with store.staging():
        store.stage_import(
            [
                (2, "p1@x.example", "alice", "{}"),
                (3, "p2@x.example", "bob", "{}"),
                (4, "p1@x.example", "alice", "{}"),
                (5, "gone@x.example", "alice", "{}"),
                (6, "old@x.example", "bob", "{}"),
                (7, "p3@x.example", "bob", "{}"),
            ]
        )
    assert store.drop_staged_duplicates() == [(4, "p1@x.example", 2)]
    assert store.drop_staged_suppressed() == [(5, "gone@x.example", "operator")]
    assert store.drop_staged_enrolled("c1") == 1
    assert sorted(store.staged_groups(True)) == [("alice", 1), ("bob", 2)]
    first = store.next_enrollment_id()
    with store.enrolling():
        store.enroll_staged("c1", "alice", 5.0, first, {"": (A, B)}, by_owner=False, seq=0)
    routes = [store.route_of(first + i) for i in range(3)]
    assert routes == [("c1", A), ("c1", B), ("c1", A)]  # file order, the cycle in turn
    assert store.enrollment_counts()["c1"] == {"active": 4}


def test_a_writer_that_does_not_wait_is_told_the_database_is_busy(store: Store) -> None:
    """SQLite has one writer at a time; PostgreSQL locks rows: a writer of another row goes on, one of the same
    row is told the database is busy (at once, or after its lock_timeout), and goes once the lock is let go."""
    other = Store.open(store.conn.url if store.shared else store.path, wait=False)  # type: ignore[attr-defined]
    try:
        with store.transaction():
            store.pause(A, "operator", 0.5)
            with pytest.raises(StoreBusy):
                other.pause(A, "operator", 1.0)
            if store.shared:
                assert other.pause(B, "operator", 1.0)  # no global lock: another mailbox's row is free
        assert other.resume(A) == "operator"  # once the lock is let go
    finally:
        other.close()


def test_an_uncertain_send_found_delivered_counts_in_the_day_it_went(store: Store) -> None:
    """Uncertain, a send counts in its day's limit; settled from Sent, as one the server answered does."""
    enroll(store, "c1", ["p1@x.example", "p2@x.example"])
    c = claim(store)
    assert store.cut_uncertain(c.id, 1000.0, "cut at shutdown")
    assert store.sent_on(A, DAY) == 0
    # Uncertain, it may have been delivered: it counts in the day that began before it, not in a later one.
    assert (store.sent_today(A, DAY, 900.0), store.snapshot(A, DAY, 900.0).sent_today) == (1, 1)
    assert store.sent_today(A, DAY, 1000.5) == 0
    with store.transaction():
        route = store.settle_uncertain(c.id, True, 1000.0, "found in Sent", DAY)
    assert route == (c.enrollment_id, 1, "c1", A)
    assert store.sent_on(A, DAY) == 1
    assert store.sent_today(A, DAY, 900.0) == 1  # counted once: sent now, no longer uncertain
    assert store.messages_by_id([c.id])[c.id]["state"] == "sent"
    with store.transaction():
        assert store.settle_uncertain(c.id, True, 1000.0, "again", DAY) is None  # settled once
    assert store.sent_on(A, DAY) == 1
    counts_agree(store)


def test_a_claim_takes_follow_ups_first_first_emails_first_or_the_oldest(store: Store) -> None:
    enroll(store, "c1", ["p1@x.example", "p2@y.example"], due=100.0)
    c = store.claim(A, 50.0, lambda i, a: "<never>")
    assert c is None
    first = claim(store, A, 100.0)
    with store.transaction():
        store.record_sent(sent(first, (2, A, 500.0)))  # p1's follow-up, due after p2's first email
    assert store.next_due_domain(A, 1000.0, "follow_ups") == "x.example"
    assert store.next_due_domain(A, 1000.0, "new") == "y.example"
    assert store.next_due_domain(A, 1000.0, "due") == "y.example"
    assert store.next_due_domain(A, 400.0, "follow_ups") == "y.example"  # no follow-up due yet
    follow_up = store.claim(A, 1000.0, lambda i, a: f"<{i}.{a}@send.example>", "follow_ups")
    assert follow_up is not None and (follow_up.email, follow_up.step) == ("p1@x.example", 2)


def test_what_a_plan_leaves_is_counted_by_cadence_from_where_it_stopped(store: Store) -> None:
    """`left_in_order`: the scheduled messages of one kind due before the horizon, from a (due, id) on."""
    ids = enroll(store, "c1", ["p1@x.example", "p2@x.example"], due=100.0)
    enroll(store, "c2", ["p3@x.example"], due=100.0)
    enroll(store, "c2", ["p4@x.example"], due=900.0)  # past the horizon below
    rows = list(store.scheduled_in_order(A, 500.0, "new"))
    assert [r[2] for r in rows][:2] == ids
    second = rows[1]  # the plan sent the first: the rest, from the second on, are left
    assert sorted(store.left_in_order(A, second[0], second[3], 500.0, "new")) == [("c1", 1), ("c2", 1)]
    assert store.left_in_order(A, second[0], second[3], 500.0, "follow_ups") == []
    assert sorted(store.left_in_order(A, 0.0, 0, 1000.0, "new")) == [("c1", 2), ("c2", 2)]


def test_a_cadences_first_emails_are_counted_per_mailbox_and_day_and_the_rest_wait(store: Store) -> None:
    """[[cadences]] new_per_day: a first email counts for its cadence; the cadence's other due first emails
    on the mailbox move to `until`, in their order; another cadence's and the follow-ups stay due."""
    enroll(store, "c1", ["p1@x.example", "p2@x.example", "p3@x.example"])
    enroll(store, "c2", ["q1@x.example"])
    c = claim(store)
    with store.transaction():
        store.record_sent(SentRecord(c, 1000.0, 250, "ok", "s", DAY, 1000.0, None, count_cadence=True))
    assert (store.cadence_first_emails(A, "c1", DAY), store.cadence_first_emails(A, "c2", DAY)) == (1, 0)
    moved = store.defer_cadence_new(A, "c1", 1000.0, 5000.0, "deferred: new_per_day of cadence 'c1'")
    assert len(moved) == 2
    assert claim(store, A, 1000.0).email == "q1@x.example"  # the other cadence goes on
    assert store.claim(A, 1000.0, lambda i, a: "<none>") is None
    later = [claim(store, A, 6000.0).email for _ in range(2)]
    assert later == ["p2@x.example", "p3@x.example"]  # in their order
    counts_agree(store)
