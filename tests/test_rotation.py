"""Rotation as the seed says: each import split equally, round-robin from a stored cursor, never flooding."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import rotation
from tests.conftest import Project
from tests.daemon_helpers import query

pytestmark = pytest.mark.both_stores

POOL = [f"m{i}@x.example" for i in range(6)]


State = tuple[dict[str, str], dict[tuple[str, str], float]]


def run_import(rules: rotation.Rules, members: list[rotation.PoolMember], state: State, n: int) -> Counter[str]:
    """One import of n prospects, its rotator built from the stored state and the state saved after."""
    rotator = rotation.Rotator(rules, members, dict(state[0]), dict(state[1]))
    got = Counter(rotator.place("alice", "alice") for _ in range(n))
    state[0].update(rotator.cursors)
    state[1].update(rotator.credits)
    return got


@settings(max_examples=300, deadline=None)
@given(
    imports=st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 6), st.sets(st.integers(0, 5))), min_size=1, max_size=10
    )
)
def test_every_import_splits_evenly_and_no_newcomer_is_flooded(imports: list[tuple[int, int, set[int]]]) -> None:
    """Any sequence of imports while mailboxes join, pause or disconnect: each split differs by at most one."""
    rules = rotation.Rules(True, "cadence", "", "")
    state: State = ({}, {})
    for n, size, down in imports:
        members = [rotation.PoolMember(a, "alice", i not in down) for i, a in enumerate(POOL[:size])]
        eligible = [m.address for m in members if m.eligible] or [m.address for m in members]
        got = run_import(rules, members, state, n)
        assert set(got) <= set(eligible)
        counts = [got.get(a, 0) for a in eligible]
        assert max(counts) - min(counts) <= 1  # the per-import split; a newcomer gets no more than its share


def test_round_robin_continues_from_the_cursor() -> None:
    rules = rotation.Rules(True, "cadence", "", "")
    members = [rotation.PoolMember(a, "alice", True) for a in POOL[:3]]
    state: State = ({}, {})
    assert run_import(rules, members, state, 10) == {POOL[0]: 4, POOL[1]: 3, POOL[2]: 3}
    # The next import starts after the last one used (m0 got the 10th): m1, m2, m0, m1.
    assert run_import(rules, members, state, 4) == {POOL[1]: 2, POOL[2]: 1, POOL[0]: 1}


def test_weighted_rotation_follows_daily_capacity() -> None:
    rules = rotation.Rules(True, "cadence", "", "", rotation.WEIGHTED)
    members = [rotation.PoolMember(POOL[0], "alice", True, 40.0), rotation.PoolMember(POOL[1], "alice", True, 10.0)]
    state: State = ({}, {})
    assert run_import(rules, members, state, 50) == {POOL[0]: 40, POOL[1]: 10}
    # A newcomer with the same capacity as the first starts from nothing: it is not flooded to catch up.
    members.append(rotation.PoolMember(POOL[2], "alice", True, 40.0))
    got = run_import(rules, members, state, 18)
    assert got[POOL[2]] <= 9 and got[POOL[1]] >= 1


@settings(max_examples=100, deadline=None)
@given(owners=st.lists(st.sampled_from(["alice", "bob", "carol"]), min_size=1, max_size=60))
def test_owner_rotation_balances_within_each_owner(owners: list[str]) -> None:
    members = [
        rotation.PoolMember("a1@x.example", "alice", True),
        rotation.PoolMember("b1@x.example", "bob", True),
        rotation.PoolMember("a2@x.example", "alice", True),
        rotation.PoolMember("c1@x.example", "carol", True),
        rotation.PoolMember("b2@x.example", "bob", True),
        rotation.PoolMember("b3@x.example", "bob", True),
    ]
    rotator = rotation.Rotator(rotation.Rules(True, "owner", "", ""), members)
    counts: Counter[str] = Counter()
    for owner in owners:
        chosen = rotator.place(owner, "alice")
        assert next(m.owner for m in members if m.address == chosen) == owner
        counts[chosen] += 1
    for owner in ("alice", "bob", "carol"):
        mine = [m.address for m in members if m.owner == owner]
        if owner in owners:
            assert rotation.spread(counts, mine) <= 1


def test_imports_through_the_cli_rotate_as_the_seed_says(project: Project) -> None:
    """11/10 over two mailboxes, then a third joins: 12 new prospects split 4/4/4, not 1/11."""
    a1, a2 = project.add_mailboxes(2)
    (b1,) = project.add_mailboxes(1, owner="bob")
    project.add_cadence(users=["alice", "bob"], rotate_among="cadence", mailboxes=[])
    project.data["mailboxes"].pop()  # bob's mailbox joins later
    project.data["cadences"][0]["users"] = ["alice"]
    assert project.enroll(project.people(21)).json()["assignments"] == {a1: 11, a2: 10}
    project.data["mailboxes"].append({**project.data["mailboxes"][0], "address": b1, "owner": "bob"})
    project.data["cadences"][0]["users"] = ["alice", "bob"]
    got = project.enroll(project.people(12, start=100, name="more.csv")).json()["assignments"]
    assert got == {a1: 4, a2: 4, b1: 4}
    # A mailbox with daily_limit = 0 takes no new enrollments.
    project.data["mailboxes"][2]["daily_limit"] = 0
    got = project.enroll(project.people(4, start=200, name="again.csv")).json()["assignments"]
    assert got == {a1: 2, a2: 2}


def test_the_default_is_the_adders_mailboxes(project: Project) -> None:
    """A team cadence: bob's automation (or import) sends from bob's mailboxes, alice's from alice's."""
    (a1,) = project.add_mailboxes(1)
    (b1,) = project.add_mailboxes(1, owner="bob")
    project.add_cadence(users=["alice", "bob"])
    assert project.enroll(project.people(4), adder="bob").json()["assignments"] == {b1: 4}
    assert project.enroll(project.people(2, start=10, name="a.csv")).json()["assignments"] == {a1: 2}


def test_a_cadence_pinned_under_the_old_default_keeps_it(project: Project) -> None:
    (a1,) = project.add_mailboxes(1)
    (b1,) = project.add_mailboxes(1, owner="bob")
    project.add_cadence(users=["alice", "bob"])
    project.write()
    project.run("status")  # creates the database
    db = project.database
    query(db, "INSERT INTO cadence_pins VALUES ('c1', 1, 'cadence', 0)")
    query(
        db,
        "INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at) "
        "VALUES (1, 'c1', 'old@x.example', ?, 'alice', 'alice', '{}', 0)",
        a1,
    )
    query(db, "INSERT INTO enrollment_counts VALUES ('c1', 'active', 1)")  # kept by whatever inserts one
    check = project.run("check")
    assert check.code == 0, check.err
    assert 'cadences."c1".rotate_among: not set; kept at "cadence"' in check.err
    got = project.enroll(project.people(4)).json()["assignments"]
    assert got == {a1: 2, b1: 2}  # the whole pool, as before


@settings(max_examples=300, deadline=None)
@given(
    among=st.sampled_from(["cadence", "owner", "adder"]),
    auto=st.booleans(),
    size=st.integers(1, 6),
    down=st.sets(st.integers(0, 5)),
    cursor=st.sampled_from(["", *POOL, "gone@x.example"]),
    runs=st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.integers(0, 20)), min_size=1, max_size=4),
)
def test_a_run_placed_at_once_is_what_one_at_a_time_places(
    among: str, auto: bool, size: int, down: set[int], cursor: str, runs: list[tuple[str, int]]
) -> None:
    """An import places a run of rows in SQL from `cycle`: the same mailboxes and cursors as `place`."""
    members = [rotation.PoolMember(a, "alice" if i % 2 else "bob", i not in down) for i, a in enumerate(POOL[:size])]
    rules = rotation.Rules(auto, among, POOL[0] if not auto and size % 2 else "", "")
    cursors = {f"{among}:{o}": cursor for o in ("alice", "bob", "*")} if cursor else {}
    one, run = rotation.Rotator(rules, members, dict(cursors)), rotation.Rotator(rules, members, dict(cursors))
    for owner, n in runs:
        try:
            expected = [one.place(owner, "alice") for _ in range(n)]
        except rotation.Placement as exc:
            try:
                run.cycle(owner, "alice", n)
            except rotation.Placement as again:
                assert str(again) == str(exc)
                continue
            raise AssertionError("cycle placed what place refused") from None
        turns = run.cycle(owner, "alice", n)
        assert turns is not None
        assert [turns[i % len(turns)] for i in range(n)] == expected
        assert run.cursors == one.cursors


def test_weighted_rotation_is_placed_one_at_a_time() -> None:
    members = [rotation.PoolMember(POOL[0], "alice", True, 40.0), rotation.PoolMember(POOL[1], "alice", True, 10.0)]
    assert (
        rotation.Rotator(rotation.Rules(True, "cadence", "", "", rotation.WEIGHTED), members).cycle("a", "a", 5) is None
    )
