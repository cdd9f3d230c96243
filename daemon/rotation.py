"""Pure: which mailbox an enrollment gets (SPEC §3).

Each import is split equally over the eligible mailboxes of the group (the
adder's, the owner's, or the whole pool), in round-robin order that continues
from where the previous import of that cadence and group stopped: the cursor
is stored. `rotation = "weighted"` splits in proportion to each mailbox's daily
capacity instead (smooth weighted round-robin, credits stored). A mailbox that
joins later takes its turn from then on and is never flooded to catch up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

ROUND_ROBIN, WEIGHTED = "round_robin", "weighted"


@dataclass(frozen=True, slots=True)
class PoolMember:
    address: str
    owner: str
    eligible: bool  # not paused, not disconnected or refused, daily_limit above 0
    weight: float = 1.0  # daily capacity, for weighted rotation


class Placement(Exception):
    """The prospect cannot be placed; the message is the reason shown to the user."""


@dataclass(frozen=True, slots=True)
class Rules:
    """The sender rules of one cadence, as config (and the database's pins) give them."""

    auto_rotate: bool
    rotate_among: str  # adder | owner | cadence
    sender: str  # cadence sender, for auto_rotate = false
    first_step_sender: str
    rotation: str = ROUND_ROBIN


@dataclass(slots=True)
class Rotator:
    """Places a stream of enrollments of one cadence; `cursors` and `credits` are what to store after."""

    rules: Rules
    pool: Sequence[PoolMember]
    cursors: dict[str, str] = field(default_factory=dict)  # group → last mailbox used
    credits: dict[tuple[str, str], float] = field(default_factory=dict)  # (group, mailbox) → credit
    _order: dict[str, int] = field(default_factory=dict)
    _groups: dict[str, tuple[PoolMember, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._order = {m.address: i for i, m in enumerate(self.pool)}

    def _candidates(self, group: str, owner_filter: str | None) -> tuple[PoolMember, ...]:
        found = self._groups.get(group)
        if found is None:
            members = [m for m in self.pool if owner_filter is None or m.owner == owner_filter]
            # Ineligible mailboxes take enrollments only when no mailbox of the group could.
            found = tuple(m for m in members if m.eligible) or tuple(members)
            self._groups[group] = found
        return found

    def place(self, owner: str, adder: str) -> str:
        """The sticky sender of a new enrollment, or raise Placement with the reason."""
        rules = self.rules
        if not rules.auto_rotate:
            chosen = rules.first_step_sender or rules.sender
            if chosen:
                return chosen
            mine = [m for m in self.pool if m.owner == adder]
            if not mine:
                raise Placement(f"user {adder!r} has no mailbox in this cadence's pool")
            return mine[0].address
        group, candidates = self._group(owner, adder)
        if rules.rotation == WEIGHTED:
            return self._weighted(group, candidates)
        return self._round_robin(group, candidates)

    def cycle(self, owner: str, adder: str, n: int) -> tuple[str, ...] | None:
        """The next `n` placements of one group at once, as the cycle they follow: placement i takes
        `cycle[i % len(cycle)]`, and the cursor ends where `n` calls of `place` would leave it.

        None for weighted rotation (its credits are placed one at a time); raises Placement as `place` does.
        """
        rules = self.rules
        if rules.auto_rotate and rules.rotation == WEIGHTED:
            return None
        if n <= 0:
            return ()
        if not rules.auto_rotate:
            return (self.place(owner, adder),)
        group, candidates = self._group(owner, adder)
        turns = tuple(self._round_robin(group, candidates) for _ in range(min(n, len(candidates))))
        self.cursors[group] = turns[(n - 1) % len(turns)]
        return turns

    def _group(self, owner: str, adder: str) -> tuple[str, tuple[PoolMember, ...]]:
        rules = self.rules
        if rules.rotate_among == "cadence":
            who, key = "", None
        elif rules.rotate_among == "owner":
            who, key = "owner", owner
        else:
            who, key = "adder", adder
        group = f"{rules.rotate_among}:{key or '*'}"
        candidates = self._candidates(group, key)
        if not candidates:
            raise Placement(f"{who} {key!r} has no mailbox in this cadence's pool")
        return group, candidates

    def _round_robin(self, group: str, candidates: tuple[PoolMember, ...]) -> str:
        last = self._order.get(self.cursors.get(group, ""), -1)
        # The first candidate after the last one used, in pool order (wrapping): a newcomer waits for its turn.
        chosen = next((m for m in candidates if self._order[m.address] > last), candidates[0])
        self.cursors[group] = chosen.address
        return chosen.address

    def _weighted(self, group: str, candidates: tuple[PoolMember, ...]) -> str:
        total = sum(max(m.weight, 0.0) for m in candidates)
        if total <= 0:
            return self._round_robin(group, candidates)
        best: PoolMember | None = None
        for m in candidates:
            key = (group, m.address)
            self.credits[key] = self.credits.get(key, 0.0) + max(m.weight, 0.0)
            if best is None or self.credits[key] > self.credits[(group, best.address)]:
                best = m
        assert best is not None
        self.credits[(group, best.address)] -= total
        self.cursors[group] = best.address
        return best.address


def spread(counts: Mapping[str, int], members: Iterable[str]) -> int:
    """Largest minus smallest count among `members` (0 when balanced)."""
    values = [counts.get(m, 0) for m in members]
    return max(values) - min(values) if values else 0
