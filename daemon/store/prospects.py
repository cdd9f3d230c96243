"""A prospect and a cadence under the team's hand (SPEC §8a): look an address up, stop it, change its fields,
mark an outcome; pause and resume a cadence."""

from __future__ import annotations

import json
from typing import Any

from daemon.store.core import Core
from daemon.store.records import HELD_DUE


class Prospects(Core):
    # --- cadences ----------------------------------------------------------------------------------

    def pause_cadence(self, cadence: str, reason: str, now: float) -> bool:
        """Paused until resumed: its messages are held as they come due (Outbox._next_due). False: it was."""
        with self.transaction():
            return self.conn.one(self.q.pause_cadence, (cadence, now, reason)) is not None

    def resume_cadence(self, cadence: str) -> int | None:
        """Its held messages get their own due times back (those past go at once, in their order, within each
        mailbox's window and limits); None when it was not paused, else how many were held."""
        with self.transaction():
            if self.conn.one(self.q.unpause_cadence, (cadence,)) is None:
                return None
            released = 0
            mailboxes = [str(r[0]) for r in self.conn.all(self.q.mailboxes_with_scheduled)]
            for mailbox in mailboxes:
                released += len(self.conn.all(self.q.release_held, (mailbox, HELD_DUE, cadence)))
            self.conn.tell(mailboxes)
        return released

    def wrote_to_domain(self, cadence: str, domain: str, mailbox: str) -> bool:
        """Whether `mailbox` writes to someone at `domain` in `cadence` (a reply from there is about it)."""
        return self.conn.one(self.q.wrote_to_domain, (cadence, mailbox, "@" + domain)) is not None

    def stop_domain(self, cadence: str, domain: str, now: float, detail: str) -> tuple[list[str], list[int]]:
        """stop_on_reply = "company": every active enrollment of `cadence` at `domain` ends `replied`; returns
        (their addresses, the messages cancelled). One pass over the cadence's enrollments, once per reply."""
        rows = self.conn.all(self.q.active_at_domain, (cadence, "@" + domain))
        if not rows:
            return [], []
        with self.transaction():
            cancelled = self._end("ids", [int(r[0]) for r in rows], "replied", now, detail)
        return [str(r[1]) for r in rows], cancelled

    def cadence_pauses(self) -> dict[str, tuple[float, str]]:
        """cadence → (paused at, reason)."""
        return {str(r[0]): (float(r[1]), str(r[2])) for r in self.conn.all(self.q.cadence_pauses)}

    # --- prospects ---------------------------------------------------------------------------------

    def prospect(self, email: str) -> dict[str, Any] | None:
        """Every enrollment of the address with its messages and events, and its suppression; None: unknown."""
        q = self.q
        enrollments = []
        for row in self.conn.all(q.enrollments_of_email, (email,)):
            messages = [
                dict(
                    zip(
                        (
                            "id",
                            "step",
                            "mailbox",
                            "state",
                            "reason",
                            "due_at",
                            "sent_at",
                            "message_id",
                            "subject",
                            "detail",
                            "attempts",
                            "variant",
                        ),
                        m,
                        strict=True,
                    )
                )
                for m in self.conn.all(q.messages_of_enrollment, (row[0],))
            ]
            events = [
                {"at": e[0], "kind": e[1], "detail": e[2]} for e in self.conn.all(q.events_of_enrollment, (row[0],))
            ]
            enrollments.append(
                {
                    "id": row[0],
                    "cadence": row[1],
                    "mailbox": row[2],
                    "owner": row[3],
                    "adder": row[4],
                    "state": row[5],
                    "fields": json.loads(row[6]),
                    "created_at": row[7],
                    "ended_at": row[8],
                    "outcome": row[9],
                    "seq": row[10],
                    "messages": messages,
                    "events": events,
                }
            )
        found = self.conn.one(q.suppression_of, (email,))
        suppressed = None if found is None else {"reason": found[0], "at": found[1]}
        if not enrollments and suppressed is None:
            return None
        return {"email": email, "enrollments": enrollments, "suppressed": suppressed}

    def emails_from(self, prefix: str) -> list[str]:
        """Enrolled addresses that begin with `prefix` (at most 5,000, through the address index)."""
        return [str(r[0]) for r in self.conn.all(self.q.emails_from, (prefix, prefix + "\U0010ffff"))]

    def stop_enrollments(self, ids: list[int], reason: str, now: float) -> list[int]:
        """The enrollments end `stopped` (the address is not suppressed); their waiting messages are cancelled."""
        with self.transaction():
            return self._end("ids", ids, "stopped", now, reason)

    def mark_outcome(self, ids: list[int], outcome: str, now: float, detail: str, ended: list[int]) -> list[int]:
        """The outcome kept on each enrollment; an active one ends as a reply does (`replied`, its event says
        the outcome), one that had ended (`ended`) gets the outcome and an event `marked`."""
        with self.transaction():
            for enrollment in ids:
                self.conn.run(self.q.set_outcome, (outcome, enrollment))
            for enrollment in ended:
                self.conn.run(self.q.log_event, (enrollment, now, "marked", detail))
            return self._end("ids", ids, "replied", now, detail)

    def set_fields(self, changes: list[tuple[int, dict[str, str]]], now: float, detail: str) -> None:
        """Each enrollment's fields as given (whole): messages not yet sent render with them."""
        with self.transaction():
            for enrollment, fields in changes:
                self.conn.run(self.q.set_fields, (json.dumps(fields, ensure_ascii=False), enrollment))
                self.conn.run(self.q.log_event, (enrollment, now, "fields", detail))
