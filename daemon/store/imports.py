"""An import: its file staged in a scratch table, checked there as a set, and enrolled in one statement."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from daemon.store.core import Core


class Imports(Core):
    def start_import(self) -> None:
        """A scratch table (SQLite's temp database: no lock on the real one) for the file being imported."""
        self.conn.run(self.q.drop_import_rows)
        self.conn.run(self.q.create_import_rows)

    def stage_import(self, rows: Sequence[tuple[int, str, str, str]]) -> None:
        """Stage (line, email, owner, fields) rows, in file order: each is numbered n = 1, 2, … as it comes."""
        self.conn.executemany(self.q.stage_import, rows)

    def drop_staged_duplicates(self) -> list[tuple[int, str, int]]:
        """(line, email, first line) of each repeated address, dropped from the staged rows (set-based, once)."""
        self.conn.run(self.q.index_staged_by_email)
        # The addresses seen twice, by one pass over the index (a window over every row took three times as long).
        duplicates = self.conn.all(self.q.staged_duplicates)
        self.conn.executemany(self.q.drop_staged_row, [(r[0],) for r in duplicates])
        return [(r[1], r[2], r[3]) for r in duplicates]

    def drop_staged_suppressed(self) -> list[tuple[int, str, str]]:
        """(line, email, reason) of staged addresses on the suppression list, dropped from the staged rows."""
        rows = self.conn.all(self.q.staged_suppressed)
        self.conn.executemany(self.q.drop_staged_row, [(r[0],) for r in rows])
        return [(r[1], r[2], r[3]) for r in rows]

    def drop_staged_enrolled(self, cadence: str) -> int:
        """Staged addresses the cadence already has, dropped; returns how many."""
        return self.conn.run(self.q.drop_staged_enrolled, (cadence,))

    def staged_groups(self, by_owner: bool) -> list[tuple[str, int]]:
        """(owner, rows) of the staged rows, or ('', rows) for them all."""
        if by_owner:
            return self.conn.all(self.q.staged_by_owner)
        return [("", int(self.conn.one(self.q.staged_count)[0]))]

    def drop_staged_group(self, owner: str | None) -> list[tuple[int, str]]:
        """(line, email) of the staged rows of `owner` (None: all), dropped."""
        if owner is None:
            rows = self.conn.all(self.q.staged_rows)
            self.conn.run(self.q.drop_staged_rows)
        else:
            rows = self.conn.all(self.q.staged_rows_of_owner, (owner,))
            self.conn.run(self.q.drop_staged_rows_of_owner, (owner,))
        return [(r[0], r[1]) for r in rows]

    def staged(self, size: int) -> Iterator[list[tuple[int, str, str, str]]]:
        """The staged rows in file order, `size` at a time."""
        cursor = self.conn.execute(self.q.staged)
        while rows := cursor.fetchmany(size):
            yield rows

    def enroll_staged(
        self,
        cadence: str,
        adder: str,
        now: float,
        first_id: int,
        cycles: dict[str, tuple[str, ...]],
        by_owner: bool,
        seq: int,
    ) -> None:
        """Every staged row enrolled, ids from `first_id` and numbers in the cadence from `seq` in file order, in one
        statement.

        `cycles`: per rotation group ('' for the whole file, else an owner when the group is the owner's)
        the mailboxes its rows take in turn, the i-th row of the group `cycle[i % len(cycle)]`.
        """
        self.conn.run(self.q.drop_import_turns)
        self.conn.run(self.q.drop_import_cycles)
        self.conn.run(self.q.create_import_cycles)
        self.conn.run(self.q.create_import_turns)
        self.conn.executemany(self.q.insert_import_cycles, [(g, len(c)) for g, c in cycles.items()])
        self.conn.executemany(
            self.q.insert_import_turns,
            [(g, i, m) for g, cycle in cycles.items() for i, m in enumerate(cycle)],
        )
        # Rows were numbered n = 1, 2, … as they were staged. While none was dropped since (the usual import:
        # no duplicate, none suppressed or enrolled already) n gives the id and the turn, with no sort and no
        # window: a third of the time of the statement below.
        count, last = self.conn.one(self.q.staged_span)
        if not by_owner and count == last and "" in cycles:
            # The turn's mailbox by rowid: half the cost per row of a look-up under (grp, turn).
            self.conn.run(self.q.drop_import_cycle)
            self.conn.run(self.q.create_import_cycle)
            self.conn.executemany(self.q.insert_import_cycle, list(enumerate(cycles[""])))
            enrolled = self.conn.run(
                self.q.enroll_staged_in_order, (first_id, cadence, adder, now, len(cycles[""]), seq)
            )
            self._count_enrolled(cadence, enrolled)
            return
        # Otherwise numbered again in file order: the whole file's numbers give the ids, the group's the turn.
        # Only (n, numbers) is numbered (a window over whole rows would copy every field); rows are read by n.
        statement = self.q.enroll_staged_by_owner if by_owner else self.q.enroll_staged_renumbered
        self._count_enrolled(cadence, self.conn.run(statement, (first_id, cadence, adder, now, seq)))
