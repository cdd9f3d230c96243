"""What the store counts as it goes: messages and enrollments by state, sends by day and by domain."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from daemon.store.core import Core

Oldest = tuple[float, tuple[int, int]]  # (due time, (0, id)): lifecycle.goes_first's terms


class Counts(Core):
    def message_counts(self) -> dict[tuple[str, str], int]:
        """(mailbox, state) → messages scheduled, sending or in error, as kept by every change (not counted here)."""
        rows = self.conn.execute(self.q.message_counts)
        return {(r[0], r[1]): r[2] for r in rows}

    def sent_on(self, mailbox: str, day: str) -> int:
        row = self.conn.one(self.q.sent_on, (mailbox, day))
        return int(row[0]) if row else 0

    def sent_today(self, mailbox: str, day: str, day_start: float) -> int:
        """Today's count as the daily limit sees it: the day's sends and the uncertain ones since it began."""
        return self.sent_on(mailbox, day) + int(self.conn.one(self.q.uncertain_since, (mailbox, day_start))[0])

    def enrollment_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for cadence, state, n in self.conn.execute(self.q.enrollment_counts):
            out.setdefault(cadence, {})[state] = n
        return out

    def lacking_field(self, cadence: str, field: str) -> tuple[int, str | None]:
        """(active enrollments of `cadence` whose `field` is missing or empty, one of their addresses)."""
        row = self.conn.one(self.q.lacking_field, (cadence, field))
        return (int(row[0]), row[1]) if row else (0, None)

    def earliest_due(self, mailbox: str) -> float | None:
        row = self.conn.one(self.q.earliest_due, (mailbox,))
        return None if row[0] is None else float(row[0])

    def sent_on_days(self, wanted: Sequence[tuple[str, str]]) -> dict[str, int]:
        """Sends of each (mailbox, local day) in one statement per 5,000 (a scrape of 10,000 mailboxes)."""
        out: dict[str, int] = {}
        for i in range(0, len(wanted), 5000):
            rows = self.conn.execute(
                self.q.sent_on_days,
                (json.dumps(wanted[i : i + 5000]),),
            )
            out.update((r[0], int(r[1])) for r in rows)
        return out

    def first_send_days(self, mailboxes: Sequence[str]) -> dict[str, str]:
        """first_send_day of many mailboxes, each by the index."""
        out: dict[str, str] = {}
        for i in range(0, len(mailboxes), 5000):
            rows = self.conn.execute(
                self.q.first_send_days,
                (json.dumps(list(mailboxes[i : i + 5000])),),
            )
            out.update((r[0], r[1]) for r in rows if r[1] is not None)
        return out

    def first_send_day(self, mailbox: str) -> str | None:
        """The local day of the mailbox's first send ever (warm-up counts from it)."""
        row = self.conn.one(self.q.first_send_day, (mailbox,))
        return str(row[0]) if row[0] is not None else None

    def domain_counts_on(self, mailbox: str, day: str) -> list[tuple[str, str, int]]:
        """(day, domain, sent) of the mailbox's local `day` (what plan starts from)."""
        rows = self.conn.execute(self.q.domain_counts_on, (mailbox, day))
        return [(r[0], r[1], r[2]) for r in rows]

    def domain_sent(self, mailbox: str, day: str, domain: str) -> int:
        row = self.conn.one(self.q.domain_sent, (mailbox, day, domain))
        return int(row[0]) if row else 0

    def first_emails_waiting(self, mailbox: str, until: float) -> int:
        """First emails (step 1) of `mailbox` scheduled before `until`: the backlog `enroll` tells the end of."""
        return int(self.conn.one(self.q.first_emails_waiting, (mailbox, until))[0])

    def new_per_day_state(self, mailbox: str, day: str) -> tuple[int, float | None]:
        """(first emails sent on the mailbox's local `day`, due time of its oldest scheduled follow-up)."""
        row = self.conn.one(self.q.new_per_day_state, (mailbox, day))
        return int(row[0] or 0), (None if row[1] is None else float(row[1]))

    def oldest_of_kinds(self, mailbox: str) -> tuple[Oldest | None, Oldest | None]:
        """((due, (0, id)) of the oldest scheduled follow-up, of the oldest first email), None where none waits."""
        found = {int(k): (float(d), (0, int(i))) for k, d, i in self.conn.all(self.q.oldest_of_kinds, (mailbox,))}
        return found.get(2), found.get(1)

    def first_emails_on(self, mailbox: str, day: str) -> int:
        """First emails (step 1) the mailbox sent on its local `day` (status, plan)."""
        row = self.conn.one(self.q.first_emails_on, (mailbox, day))
        return int(row[0]) if row else 0

    def results(self, by: str, cadence: str | None, since: str) -> list[tuple[Any, ...]]:
        """`cadenced report`'s sums: (cadence, the `by` key's columns…, kind, of step 1, n); by "" (per cadence),
        "step", "variant" (step and variant), "mailbox" or "day"; from the UTC day `since` on."""
        q = self.q
        if by == "day" or since:
            query = {
                "": q.results_total_since,
                "step": q.results_by_step_since,
                "variant": q.results_by_variant_since,
                "mailbox": q.results_by_mailbox_since,
                "day": q.results_by_day,
            }[by]
            return [tuple(r) for r in self.conn.execute(query, (cadence, int(cadence is None), since))]
        query = {"": q.results_total, "step": q.results_by_step, "variant": q.results_by_variant}.get(
            by, q.results_by_mailbox
        )
        return [tuple(r) for r in self.conn.execute(query, (cadence, int(cadence is None)))]

    def results_of_messages(self) -> list[tuple[str, int, str, str, int]]:
        """(cadence, step, variant, kind, n) of every message counted in the results (for /metrics)."""
        return [(r[0], int(r[1]), r[2], r[3], int(r[4])) for r in self.conn.execute(self.q.results_of_messages)]
