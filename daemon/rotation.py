"""Pure: which mailbox an enrollment gets (SPEC §3)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Mailbox states that may take new enrollments while another may not.
AVAILABLE = "connected"


@dataclass(frozen=True, slots=True)
class PoolMember:
    address: str
    owner: str
    available: bool  # connected and not paused


class Placement(Exception):
    """The prospect cannot be placed; the message is the reason shown to the user."""


class Balancer:
    """Least-enrolled-first over any subset of a pool, ties by file order.

    Counts are shared by all subsets; each subset keeps a heap with lazy
    correction, so one placement costs O(log n) whatever the pool size.
    """

    def __init__(self, pool: Sequence[str], counts: Mapping[str, int]) -> None:
        self.order = {address: i for i, address in enumerate(pool)}
        self.counts = {address: int(counts.get(address, 0)) for address in pool}
        self._heaps: dict[tuple[str, ...], list[tuple[int, int, str]]] = {}

    def pick(self, candidates: tuple[str, ...]) -> str:
        heap = self._heaps.get(candidates)
        if heap is None:
            heap = [(self.counts[a], self.order[a], a) for a in candidates]
            heapq.heapify(heap)
            self._heaps[candidates] = heap
        while True:
            count, order, address = heap[0]
            current = self.counts[address]
            if count == current:
                break
            heapq.heapreplace(heap, (current, order, address))
        self.counts[address] = current + 1
        heapq.heapreplace(heap, (current + 1, order, address))
        return address


@dataclass(frozen=True, slots=True)
class Rules:
    """The sender rules of one cadence, as config gives them."""

    auto_rotate: bool
    rotate_among: str  # cadence | owner | adder
    sender: str  # cadence sender, for auto_rotate = false
    first_step_sender: str


class Rotator:
    """Places a stream of enrollments of one cadence."""

    def __init__(self, rules: Rules, pool: Sequence[PoolMember], counts: Mapping[str, int]) -> None:
        self.rules = rules
        self.pool = tuple(pool)
        self.balancer = Balancer([m.address for m in self.pool], counts)
        self._groups: dict[str | None, tuple[str, ...]] = {}

    def _candidates(self, owner_filter: str | None) -> tuple[str, ...]:
        group = self._groups.get(owner_filter)
        if group is None:
            members = [m for m in self.pool if owner_filter is None or m.owner == owner_filter]
            usable = [m.address for m in members if m.available]
            # Unavailable mailboxes take enrollments only when nothing else could.
            group = tuple(usable or [m.address for m in members])
            self._groups[owner_filter] = group
        return group

    def place(self, owner: str, adder: str) -> str:
        """The sticky sender of a new enrollment, or raise Placement with the reason."""
        rules = self.rules
        if not rules.auto_rotate:
            chosen = rules.first_step_sender or rules.sender
            if chosen:
                self.balancer.counts[chosen] = self.balancer.counts.get(chosen, 0) + 1
                return chosen
            mine = self._candidates(adder)
            if not mine:
                raise Placement(f"user {adder!r} has no mailbox in this cadence's pool")
            first = next(m.address for m in self.pool if m.owner == adder)
            self.balancer.counts[first] += 1
            return first
        if rules.rotate_among == "cadence":
            key: str | None = None
        elif rules.rotate_among == "owner":
            key = owner
        else:
            key = adder
        candidates = self._candidates(key)
        if not candidates:
            who = "owner" if rules.rotate_among == "owner" else "adder"
            raise Placement(f"{who} {key!r} has no mailbox in this cadence's pool")
        return self.balancer.pick(candidates)


def spread(counts: Mapping[str, int], members: Iterable[str]) -> int:
    """Largest minus smallest count among `members` (0 when balanced)."""
    values = [counts.get(m, 0) for m in members]
    return max(values) - min(values) if values else 0
