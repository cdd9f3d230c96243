"""What every part of the store shares: its connection (an Engine), its transactions, and the moves several
records make together (an enrollment ends, a step is scheduled, a count follows a change)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from daemon.store.engine import Engine, Queries
from daemon.store.records import COUNTED_STATES
from daemon.timing import utc_day

EndedBy = Literal["email", "id", "ids"]  # which enrollments _end ends: an address's, one, several


class Core:
    conn: Engine
    q: Queries
    path: Path | str

    transaction: Callable[[], AbstractContextManager[None]]  # one writer at a time; nests into an open one
    # May this daemon claim the mailbox's messages (PostgreSQL: its lease lasts)? Asked at once, the answer read
    # when called: in a pipeline it travels with the turn's first read.
    holding: Callable[[str], Callable[[], bool]]
    shared: bool
    counts_by_hand: bool

    def __init__(self, engine: Engine) -> None:
        self.conn = engine
        self.q = engine.q
        self.path = engine.where
        self.transaction = engine.transaction  # the engine's own: no call between a store method and it
        self.holding = engine.holding
        # PostgreSQL: several daemons share the database, each sending for the mailboxes it leases.
        self.shared = engine.shared
        self.counts_by_hand = engine.counts_by_hand  # no counting triggers on this connection (group commit)
        # counts_by_hand, in a group commit: the results of its sends and ends, summed over the batch and
        # written once at its end (hold_results); a call rolled back takes its own back (drop_results).
        self._held: dict[tuple[str, str, int, str, str, str], int] | None = None
        self._held_call: list[tuple[str, str, int, str, str, str]] = []

    # --- transactions ---------------------------------------------------------------------------

    def enrolling(self) -> Any:
        """An import's enrolling transaction (SQLite: its foreign keys not checked, see the engine)."""
        return self.conn.enrolling()

    def staging(self) -> Any:
        """Where an import stages its file (SQLite: one transaction of the temp database)."""
        return self.conn.staging()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def check_integrity(self) -> None:
        self.conn.check_integrity()

    def data_version(self) -> int:
        """Changes whenever another connection commits: how the daemon notices other commands."""
        return self.conn.data_version()

    def _list(self, values: Sequence[Any]) -> Any:
        return self.conn.list_param(values)

    # --- the moves several records make together --------------------------------------------------

    def _end(self, by: EndedBy, value: Any, state: str, now: float, detail: str) -> list[int]:
        """The one way enrollments end early (replied, stopped, the others of a bounced address): the active ones
        of an address, of an id or of a list of ids take `state`, and every message of theirs not yet sent is
        cancelled with `detail`."""
        q = self.q
        cancel, log, end = {
            "email": (q.cancel_messages_of_email, q.log_end_of_email, q.end_enrollments_of_email),
            "id": (q.cancel_messages_of_id, q.log_end_of_id, q.end_enrollments_of_id),
            "ids": (q.cancel_messages_of_ids, q.log_end_of_ids, q.end_enrollments_of_ids),
        }[by]
        if by == "ids":
            value = self._list(list(value))
        rows = self.conn.all(cancel, (detail, value))
        self.conn.run(log, (now, state, detail, value))  # `prospect show` says what ended it, and when
        self.conn.run(end, (state, now, value))
        return [r[0] for r in rows]

    def _bounced(self, email: str, enrollment: int, now: float, detail: str) -> list[int]:
        """The enrollment of a bounced message `bounced`; the address's other enrollments stopped."""
        self.conn.run(self.q.mark_bounced, (now, enrollment))
        return self._end("email", email, "stopped", now, detail)

    def suppress(self, email: str, reason: str, now: float) -> None:
        self.conn.run(self.q.suppress, (email, reason, now))

    def schedule_step(self, enrollment: int, step: int, mailbox: str, due: float) -> None:
        """The next step of an active enrollment (nothing when it has ended, or the step is there already)."""
        if self.conn.pipelines:  # counted in the statement: no answer to wait for (in a pipeline, none waited for)
            self.conn.write(self.q.schedule_step_counted, (step, mailbox, due, enrollment))
            self.conn.tell((mailbox,))  # (a step that was there already: a wake-up for nothing, rarely)
            return
        inserted = self.conn.run(self.q.schedule_step, (step, mailbox, due, enrollment))
        if inserted > 0:
            self._count_scheduled([(mailbox, inserted)])
            self.conn.tell((mailbox,))

    def finish_enrollment(self, enrollment: int, now: float, last: tuple[int, str, str] | None = None) -> None:
        """The enrollment ends `finished`. `last` (counts_by_hand: the group commit's send of the last step): the
        step, variant and mailbox of that send, which the result counts on."""
        if not self.counts_by_hand:  # the triggers count it: no answer is read (a pipeline does not wait)
            self.conn.write(self.q.finish_enrollment, (now, enrollment))
            return
        row = self.conn.one(self.q.finish_enrollment, (now, enrollment))
        if row is not None:
            self.conn.run(self.q.uncount_active, (row[0],))
            self.conn.run(self.q.count_finished, (row[0],))
            if last is not None:
                self.count_results(row[0], utc_day(now), *last, "finished")

    def count_results(self, cadence: str, day: str, step: int, variant: str, mailbox: str, kind: str) -> None:
        """What the result triggers do for one send or end, on the connection without them (counts_by_hand):
        the row and its two rollups, at once or (in a group commit) with the batch's others."""
        if self._held is not None:
            self._held_call.append((cadence, day, step, variant, mailbox, kind))
            return
        self._write_results({(cadence, day, step, variant, mailbox, kind): 1})

    def hold_results(self) -> None:
        """A group commit's batch begins: its results are summed until write_held_results."""
        self._held, self._held_call = {}, []

    def keep_results(self) -> None:
        """The call that counted them committed to its savepoint: its results join the batch's."""
        held = self._held
        if held is not None:
            for key in self._held_call:
                held[key] = held.get(key, 0) + 1
        self._held_call = []

    def drop_results(self) -> None:
        """The call that counted them was rolled back: so are its results."""
        self._held_call = []

    def write_held_results(self) -> None:
        """In the batch's transaction, before its commit: the summed results written (a statement per distinct
        row and rollup, not three per send and end), and holding ends."""
        held, self._held, self._held_call = self._held, None, []
        if held:
            self._write_results(held)

    def release_results(self) -> None:
        """The batch failed as a whole: nothing it held is written."""
        self._held, self._held_call = None, []

    def _write_results(self, counts: dict[tuple[str, str, int, str, str, str], int]) -> None:
        rows = [(*key, n) for key, n in counts.items()]
        for statement in (self.q.count_result_row, self.q.count_result_total, self.q.count_result_day):
            self.conn.executemany(statement, rows)

    def set_mailbox_state(self, mailbox: str, state: str, reason: str | None, now: float) -> None:
        self.conn.run(self.q.set_mailbox_state, (mailbox, state, reason, now))

    def _unsent_to_error(self, mailbox: str, reason: str, detail: str) -> list[int]:
        """The mailbox's scheduled and sending messages into the retry queue: one statement a state, each on
        its own index (scheduled ones are in the due index only)."""
        ids = [
            r[0]
            for statement in (self.q.scheduled_to_error, self.q.sending_to_error)
            for r in self.conn.all(statement, (reason, detail, mailbox))
        ]
        return sorted(ids)

    def pause(self, mailbox: str, reason: str, now: float) -> bool:
        """Paused with `reason` until `mailbox resume`; False when it already was."""
        with self.transaction():
            self.conn.run(self.q.health_row, (mailbox, now))
            rows = self.conn.all(self.q.pause, (reason, mailbox))
        return bool(rows)

    # --- counts kept as things change ---------------------------------------------------------------
    # On SQLite the counts of messages and enrollments by state follow each change by TEMP triggers every
    # connection installs, except the daemon's group commit's, whose claim and send count by hand (a trigger
    # cost SQLite 15 µs a row before its body ran: a sixth of the daemon's CPU per send, measured); PostgreSQL
    # keeps them by its PL/pgSQL triggers, except on the group commit's session, where claim_counted and
    # mark_sent_counted count in the statement. Inserts are counted here, in bulk, on both.

    def count_enrollments(self, cadence: str, added: dict[str, int]) -> None:
        """Keep the per-mailbox tally rotation balances on (SPEC §3: fewest so far)."""
        self.conn.executemany(self.q.count_enrollments, [(cadence, mailbox, n) for mailbox, n in added.items()])

    def enrolled_in(self, cadence: str) -> int:
        """How many enrollments the cadence has: the next one's number in it (`seq`, which picks its variants)."""
        return int(self.conn.one(self.q.enrolled_in, (cadence,))[0])

    def count_result(self, cadence: str, day: str, kind: str, per_mailbox: dict[str, int]) -> None:
        """What the triggers do not see, counted in `results` (step 0, no variant): an import's enrollments."""
        self.conn.executemany(self.q.count_result, [(cadence, day, m, kind, n) for m, n in per_mailbox.items() if n])

    def _count_enrolled(self, cadence: str, n: int) -> None:
        """New enrollments, all active (the one place that inserts counts them; changes count by trigger)."""
        self.conn.run(self.q.count_enrolled, (cadence, n))

    def _recount(self, mailbox: str, old: str, new: str) -> None:
        """What the counting trigger does for one message, on the connection without it (counts_by_hand)."""
        self.conn.run(self.q.uncount_message, (mailbox, old))
        if new in COUNTED_STATES:
            self.conn.run(self.q.count_message, (mailbox, new))

    def _count_scheduled(self, added: Iterable[tuple[str, int]]) -> None:
        """New scheduled messages (the one place that inserts counts them; updates count by trigger)."""
        self.conn.executemany(self.q.count_scheduled, list(added))

    def count_failure(self, mailbox: str, day: str, kind: str, at_smtp: bool, n: int = 1) -> None:
        """A bounce or a block of one of the mailbox's messages (`n` < 0 takes some back)."""
        statement = {"bounced": self.q.count_day_bounces, "blocked": self.q.count_day_blocks}[kind]
        self.conn.run(statement, (mailbox, day, n if at_smtp else 0, n))

    def _count_block(self, mailbox: str, now: float) -> None:
        """Blocks count against the mailbox's health (its reputation, not the address)."""
        self.conn.run(self.q.count_block, (mailbox, now))

    def reputation(self, mailbox: str, since_day: str) -> tuple[int, int, int]:
        """(attempts, bounces, blocks) of the mailbox's local days from `since_day` on."""
        row = self.conn.one(self.q.reputation, (mailbox, since_day))
        return int(row[0]), int(row[1]), int(row[2])
