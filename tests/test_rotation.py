"""Rotation balance as a property: any batches, any pool sizes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import rotation


@settings(max_examples=200, deadline=None)
@given(
    pool_size=st.integers(1, 12),
    batches=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    unavailable=st.sets(st.integers(0, 11)),
)
def test_counts_differ_by_at_most_one(pool_size: int, batches: list[int], unavailable: set[int]) -> None:
    pool = [f"m{i}@x.example" for i in range(pool_size)]
    members = [rotation.PoolMember(a, "alice", i not in unavailable) for i, a in enumerate(pool)]
    usable = [m.address for m in members if m.available] or pool
    counts: dict[str, int] = {}
    rules = rotation.Rules(True, "cadence", "", "")
    for size in batches:  # a new Rotator per batch, as each import batch starts from the database
        rotator = rotation.Rotator(rules, members, counts)
        for _ in range(size):
            chosen = rotator.place("alice", "alice")
            counts[chosen] = counts.get(chosen, 0) + 1
        assert rotation.spread(counts, usable) <= 1
    assert set(counts) <= set(usable)


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
    rotator = rotation.Rotator(rotation.Rules(True, "owner", "", ""), members, {})
    counts: dict[str, int] = {}
    for owner in owners:
        chosen = rotator.place(owner, "alice")
        assert next(m.owner for m in members if m.address == chosen) == owner
        counts[chosen] = counts.get(chosen, 0) + 1
    for owner in ("alice", "bob", "carol"):
        mine = [m.address for m in members if m.owner == owner]
        if any(o == owner for o in owners):
            assert rotation.spread(counts, mine) <= 1
