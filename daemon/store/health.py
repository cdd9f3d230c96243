"""Each mailbox's health: its state, pause, probes, limits noted, and where its IMAP reading stopped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.model import PauseRule
from daemon.store.core import Core
from daemon.store.records import Snapshot


def snapshot_of(r: Any) -> Snapshot:
    """A `snapshot` row (the 12 columns it reads)."""
    return Snapshot(r[0], r[1] or 0, r[2], r[3], r[4], r[5], r[6], r[7] or 0, r[8], r[9], r[10], r[11])


class Health(Core):
    def mailbox_states(self) -> dict[str, tuple[str, str | None]]:
        """(stored state, paused_reason) by mailbox: lifecycle.mailbox_state says what that makes it."""
        rows = self.conn.execute(self.q.mailbox_states)
        return {r[0]: (r[1], r[2]) for r in rows.fetchall()}

    def health(self) -> dict[str, dict[str, Any]]:
        cur = self.conn.execute(self.q.health)
        names = [d[0] for d in cur.description]
        return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def snapshot(self, mailbox: str, day: str, day_start: float) -> Snapshot:
        """The mailbox as a turn sees it; `sent_today` counts the sends of its local `day` (which began at
        `day_start`) and the uncertain ones since (they may have been delivered)."""
        return self.ask_snapshot(mailbox, day, day_start)()

    def ask_snapshot(self, mailbox: str, day: str, day_start: float) -> Callable[[], Snapshot]:
        """`snapshot`, asked now and read when called: in a pipeline it travels with the batch's other reads."""
        rows = self.conn.execute(self.q.snapshot, (mailbox, day, day_start))
        return lambda: snapshot_of(rows.fetchone())

    def pause_if(self, mailbox: str, rule: PauseRule, since_day: str, now: float) -> tuple[str, tuple[int, ...]] | None:
        """Past a rate of `rule` over the window: paused (kept here, not in the config). (reason, numbers) when
        it is newly paused; None when it stays as it was."""
        with self.transaction():
            numbers = self.reputation(mailbox, since_day)
            reason = rule.reason(*numbers)
            if reason is None or not self.pause(mailbox, f"auto-paused: {reason}", now):
                return None
        return reason, numbers

    def resume(self, mailbox: str) -> str | None:
        """Unpaused; its bounce and block counts start afresh (else the next bounce pauses it again). Returns
        the reason it was paused for, None when it was not."""
        with self.transaction():
            row = self.conn.one(self.q.paused_reason, (mailbox,))
            if row is None:
                return None
            self.conn.run(self.q.resume, (mailbox,))
            self.conn.run(self.q.forget_failures, (mailbox,))
            # What waited only for the pause no longer says so (the loop says anew what it waits for, if anything).
            self.conn.run(
                self.q.forget_pause_details,
                (mailbox,),
            )
        return str(row[0])

    def disconnect(
        self, mailbox: str, now: float, detail: str, next_probe_at: float | None, state: str = "disconnected"
    ) -> list[int]:
        """The mailbox's problem: it goes to the retry queue with all its scheduled messages.

        `disconnected` is probed with backoff; `refused` (the server refuses this sender) waits for the
        operator: a reload that changes its settings, a restart, or `outbox retry`.
        """
        with self.transaction():
            self.conn.run(
                self.q.disconnect,
                (mailbox, detail, now, next_probe_at, state),
            )
            ids = self._unsent_to_error(mailbox, state, detail)
        return ids

    def reconnect(self, mailbox: str, now: float) -> list[int]:
        """A probe succeeded: connected again, its `disconnected` errors back to `scheduled`."""
        with self.transaction():
            self.set_mailbox_state(mailbox, "connected", None, now)
            self.conn.run(self.q.reset_probe, (mailbox,))
            rows = self.conn.all(
                self.q.back_from_retry_queue,
                (mailbox,),
            )
        return [r[0] for r in rows]

    def set_probe(self, mailbox: str, next_probe_at: float, detail: str) -> None:
        with self.transaction():
            self.conn.run(
                self.q.set_probe,
                (next_probe_at, detail, mailbox),
            )

    def note_limit(self, mailbox: str, day: str, quota: bool, now: float) -> bool:
        """Record that `day` is full for `mailbox`; True the first time (to log it once)."""
        with self.transaction():
            self.conn.run(
                self.q.health_row,
                (mailbox, now),
            )
            if quota:
                self.conn.run(self.q.note_quota_day, (day, mailbox))
            changed = self.conn.all(
                self.q.note_limit_logged,
                (day, mailbox),
            )
        return bool(changed)

    def orphan_removed_mailboxes(self, configured: set[str], now: float) -> list[tuple[str, int]]:
        """Pending messages of mailboxes no longer in the config go to error/mailbox_removed."""
        known = {r[0] for r in self.conn.execute(self.q.rotated_mailboxes)}
        known |= {r[0] for r in self.conn.execute(self.q.mailboxes_with_health)}
        out: list[tuple[str, int]] = []
        for mailbox in sorted(known - configured):
            with self.transaction():
                ids = self._unsent_to_error(
                    mailbox, "mailbox_removed", "its mailbox left the config: use outbox reassign to move it"
                )
            out += [(mailbox, i) for i in ids]
        return out

    def orphan_removed_cadences(self, configured: set[str]) -> list[tuple[str, int]]:
        """Scheduled messages of cadences no longer in the config go to error/cadence_removed (a cadence brought
        back by a reload lets `outbox retry` send them)."""
        out: list[tuple[str, int]] = []
        active = {str(r[0]) for r in self.conn.execute(self.q.enrollment_counts) if r[1] == "active" and r[2]}
        for cadence in sorted(active - configured):
            detail = f"cadence {cadence!r} left the config: bring it back and `outbox retry`, or `prospect stop`"
            with self.transaction():
                rows = self.conn.all(self.q.cadence_to_error, (detail, cadence))
            out += [(cadence, int(r[0])) for r in rows]
        return out

    def probe_now(self, mailbox: str, now: float) -> None:
        """A changed password (reload, restart): try the disconnected mailbox at once."""
        self.conn.run(
            self.q.probe_now,
            (now, mailbox),
        )

    def imap_position(self, mailbox: str) -> tuple[int, int] | None:
        row = self.conn.one(self.q.imap_position, (mailbox,))
        return None if row is None else (int(row[0]), int(row[1]))

    def set_imap_position(self, mailbox: str, uidvalidity: int, last_uid: int) -> None:
        self.conn.run(
            self.q.set_imap_position,
            (mailbox, uidvalidity, last_uid),
        )
