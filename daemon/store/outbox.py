"""The outbox: messages claimed, sent, failed, retried, reassigned, and what the operator reads of them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from daemon.store.core import Core
from daemon.store.records import BLOCKED_BY, HELD_DUE, MESSAGE_STATES, SUPPRESSED_BY, Claimed, SentRecord, domain_of
from daemon.timing import utc_day

OUTBOX_KEYS = (  # the columns of the outbox queries, by name
    "id",
    "cadence",
    "prospect",
    "step",
    "mailbox",
    "state",
    "reason",
    "due_at",
    "sent_at",
    "message_id",
    "attempts",
    "smtp_code",
    "detail",
    "variant",
)


class Outbox(Core):
    def outbox(
        self,
        *,
        state: str | None = None,
        mailbox: str | None = None,
        cadence: str | None = None,
        prospect: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        sql, args = self._outbox_query(state, mailbox, cadence, prospect)
        sql += " ORDER BY m.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [dict(zip(OUTBOX_KEYS, r, strict=True)) for r in self.conn.execute(sql, args)]

    def outbox_page(
        self,
        state: str,
        *,
        mailbox: str | None = None,
        cadence: str | None = None,
        prospect: str | None = None,
        after: tuple[str, float, int] | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """A page of one state's messages in mailbox order (then due order for scheduled ones, id order for the
        rest), after the (mailbox, due_at, id) that ended the previous page: the order the state's index keeps,
        so a page costs its rows at any size of the outbox (the dashboard's)."""
        sql, args = self._outbox_query(state, mailbox, cadence, prospect)
        # The due time the order keeps (a held message shows the one it will get back): `key_due`, the cursor's.
        sql = sql.replace(" FROM messages m", ", m.due_at FROM messages m", 1)
        q = self.q
        columns = "m.mailbox, m.due_at, m.id" if state == "scheduled" else "m.mailbox, m.id"
        if after is not None:
            values = after if state == "scheduled" else (after[0], after[2])
            marks = ", ".join([q.param] * len(values))
            sql += (" AND " if " WHERE " in sql else " WHERE ") + f"({columns}) > ({marks})"
            args += list(values)
        sql += f" ORDER BY {columns} LIMIT {int(limit)}"
        return [dict(zip((*OUTBOX_KEYS, "key_due"), r, strict=True)) for r in self.conn.execute(sql, args)]

    def outbox_count(
        self,
        *,
        state: str | None = None,
        mailbox: str | None = None,
        cadence: str | None = None,
        prospect: str | None = None,
        beyond: int = 0,
        cap: int = 100_000,
    ) -> int:
        """How many more messages the selection has past its first `beyond`: counted up to `cap` (a count of
        millions would cost what the list saves)."""
        sql, args = self._outbox_query(state, mailbox, cadence, prospect)
        row = self.conn.one(f"SELECT count(*) FROM ({sql} LIMIT {int(beyond) + int(cap)}) AS selected", args)
        return max(int(row[0]) - beyond, 0) if row else 0

    def _outbox_query(
        self, state: str | None, mailbox: str | None, cadence: str | None, prospect: str | None
    ) -> tuple[str, list[Any]]:
        q = self.q
        where, args = [], []
        if state:
            if state not in MESSAGE_STATES:
                where.append("1 = 0")
            else:
                where.append(f"m.state = '{state}'")  # written out: a partial index is chosen by its value
        if mailbox:
            where.append(f"m.mailbox = {q.param}")
            args.append(mailbox)
        if cadence:
            where.append(f"e.cadence = {q.param}")
            args.append(cadence)
        if prospect:
            where.append(f"e.email = {q.param}")
            args.append(prospect)
        # By state, always through its index (SQLite, see queries/sqlite.sql); one prospect's, by the address.
        sql: str = {None: q.outbox, "": q.outbox, "scheduled": q.outbox_scheduled}.get(state, q.outbox_by_state)
        if prospect:
            sql = q.outbox
        if where:
            sql += " WHERE " + " AND ".join(where)
        return sql, args

    def recover_sending(self, now: float) -> list[int]:
        """Messages left in `sending` by a crash: maybe delivered, so never resent by themselves."""
        with self.transaction():
            rows = self.conn.all(
                self.q.recover_sending,
                (now,),
            )
        return [r[0] for r in rows]

    def next_due_domain(self, mailbox: str, now: float, prioritize: str = "due") -> str | None:
        """The recipient domain of the message `claim` would take now."""
        row = self._next_due(mailbox, now, prioritize)
        return domain_of(row[5]) if row else None

    def _next_due_statement(self, prioritize: str, prefix: str = "") -> str:
        names = {
            "follow_ups": "next_due_follow_ups_first",
            "new": "next_due_new_first",
            "follow_ups_only": "next_due_follow_up",  # new_per_day reached: no first email today
        }
        return getattr(self.q, prefix + names.get(prioritize, "next_due"))  # type: ignore[no-any-return]

    def ask_next_due(self, mailbox: str, now: float, prioritize: str) -> Callable[[], Any]:
        """The row `claim` would take now, asked ahead and read when called (PostgreSQL, in the group commit's
        pipeline: with the turn's snapshot, one round trip for both). The row is locked until the commit, taken
        or not; `claim(..., ahead=)` takes it when the turn decides to send."""
        rows = self.conn.execute(self._next_due_statement(prioritize), (mailbox, now))
        return rows.fetchone

    def _next_due(self, mailbox: str, now: float, prioritize: str, ahead: Callable[[], Any] | None = None) -> Any:
        """The row of the message a claim takes now, in the mailbox's order (model.PRIORITIES); `ahead`: that
        row, asked before (ask_next_due)."""
        q = self.q
        statement = self._next_due_statement(prioritize)
        while True:
            row = ahead() if ahead is not None else self.conn.one(statement, (mailbox, now))
            ahead = None
            if row is None or not row[11]:
                return row
            # Its cadence is paused: its due messages on this mailbox are held (their due time kept) and the
            # claim looks again. Costs the messages that come due while it is paused, once each.
            detail = f"deferred: cadence paused until `cadenced cadence resume {row[4]}`"
            self.conn.run(q.hold_cadence_due, (HELD_DUE, detail, mailbox, row[4], now))

    def cadence_first_emails(self, mailbox: str, cadence: str, day: str) -> int:
        """First emails of `cadence` the mailbox sent on its local `day` ([[cadences]] new_per_day)."""
        row = self.conn.one(self.q.cadence_first_emails, (mailbox, cadence, day))
        return int(row[0]) if row else 0

    def defer_cadence_new(self, mailbox: str, cadence: str, now: float, until: float, detail: str) -> list[int]:
        """The cadence's first emails for today are sent: its due first emails on `mailbox` wait until `until`,
        in their order (follow-ups and other cadences go on)."""
        with self.transaction():
            rows = self.conn.all(self.q.defer_cadence_new, (until, detail, mailbox, cadence, now))
        return [r[0] for r in rows]

    def defer_domain(self, mailbox: str, domain: str, now: float, until: float, detail: str) -> list[int]:
        """domain_daily_limit reached: the mailbox's due messages to `domain` wait until `until`, in their order
        (the others go on). Costs the mailbox's due messages, once per domain and day."""
        with self.transaction():
            rows = self.conn.all(
                self.q.defer_domain,
                (until, detail, mailbox, domain, now),
            )
        return [r[0] for r in rows]

    def claim(
        self,
        mailbox: str,
        now: float,
        message_id: Callable[[int, int], str],
        prioritize: str = "due",
        ahead: Callable[[], Any] | None = None,
    ) -> Claimed | None:
        """The next due message of `mailbox` (the oldest, or follow-ups or first emails first: `prioritize`),
        moved to `sending` and committed before any send. `ahead`: ask_next_due's answer for the same mailbox,
        time and order, in this transaction, with nothing deferred since."""
        with self.transaction():
            row = self._next_due(mailbox, now, prioritize, ahead)
            if row is None:
                return None
            attempts = row[8] + 1
            mid = message_id(row[0], attempts)
            # PostgreSQL: counted in the statement where the session's triggers stand aside (the group commit)
            self.conn.write(self.q.claim_counted if self.conn.pipelines else self.q.claim, (attempts, mid, row[0]))
            if self.counts_by_hand:
                self._recount(row[3], "scheduled", "sending")
        return Claimed(
            id=row[0],
            enrollment_id=row[1],
            step=row[2],
            mailbox=row[3],
            cadence=row[4],
            email=row[5],
            fields={"email": row[5], **json.loads(row[6])},  # the address is stored once, in its own column
            due_at=row[7],
            attempts=attempts,
            transient_failures=row[9],
            sticky=row[10],
            message_id=mid,
            seq=row[12],
            thread=tuple((int(t[0]), t[1], t[2]) for t in row[13] or ()) if len(row) > 13 else None,
        )

    def thread(self, enrollment_id: int, before_step: int) -> list[tuple[int, str, str]]:
        """(step, message_id, subject) of the enrollment's sent messages, in order."""
        rows = self.conn.execute(
            self.q.thread,
            (enrollment_id, before_step),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def record_sent(self, r: SentRecord) -> None:
        """Sent: the message, the day's count, the gap, the next step and the copy for Sent, in one commit."""
        c, now, code, text, subject, day = r.claimed, r.at, r.code, r.text, r.subject, r.day
        gap_until, next_step, copy, count_domain = r.gap_until, r.next_step, r.copy, r.count_domain
        with self.transaction():
            write = self.conn.write  # none of these answers is read: in a pipeline they go with the next read
            if copy is not None:
                write(self.q.keep_sent_copy, (c.id, c.mailbox, c.message_id, copy))
            was = None
            cadence = c.cadence if r.count_cadence and c.step == 1 else None
            if self.conn.pipelines:  # one statement (it or the triggers count the rest): no answer to wait for
                domain = domain_of(c.email) if count_domain else None
                first = int(c.step == 1)
                ends = c.enrollment_id if next_step is None else None  # its last step: ended in the statement
                counted = (now, code, text, subject, r.variant, c.id, c.mailbox, day, first, gap_until, domain, cadence)
                write(self.q.mark_sent_counted, (*counted, ends, c.cadence, c.step))
            else:
                if count_domain:
                    write(self.q.count_domain_send, (c.mailbox, day, domain_of(c.email)))
                if cadence is not None:
                    write(self.q.count_cadence_first, (c.mailbox, cadence, day))
                if self.counts_by_hand:
                    was = self.conn.one(self.q.state_of_message, (c.id,))
                write(self.q.mark_sent, (now, code, text, subject, r.variant, c.id))
                if was is not None and was[1] != "sent":
                    self._recount(was[0], was[1], "sent")
                    self.count_results(c.cadence, utc_day(now), c.step, r.variant or "", c.mailbox, "sent")
                write(self.q.count_first_send if c.step == 1 else self.q.count_send, (c.mailbox, day))
                write(self.q.note_send, (c.mailbox, now, now, gap_until))
            if next_step is not None:
                step, mailbox, due = next_step
                self.schedule_step(c.enrollment_id, step, mailbox, due)
            elif not self.conn.pipelines:  # PostgreSQL's statement above finished it
                self.finish_enrollment(c.enrollment_id, now, (c.step, r.variant or "", c.mailbox))

    def sent_copies_due(self, mailbox: str, limit: int) -> list[tuple[int, str, bytes]]:
        """(message, Message-ID, content) of sent messages not yet saved in the mailbox's Sent folder."""
        rows = self.conn.execute(
            self.q.sent_copies_due,
            (mailbox, limit),
        )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def copy_filed(self, message: int) -> None:
        with self.transaction():
            self.conn.run(self.q.copy_filed, (message,))

    def copy_failed(self, message: int, detail: str) -> None:
        with self.transaction():
            self.conn.run(self.q.copy_failed, (detail, message))

    def release_claim(self, message: int, attempts: int, detail: str) -> bool:
        """The attempt was abandoned before the end of DATA: scheduled again, for whoever holds its mailbox."""
        with self.transaction():
            released = self.conn.run(self.q.release_claim, (detail, message, attempts)) > 0
            if released:
                row = self.conn.one(self.q.state_of_message, (message,))
                self.conn.tell((row[0],))
        return released

    def reschedule(self, message: int, due_at: float, code: int | None, detail: str, transient: bool) -> None:
        """Back to `scheduled` (a 4xx to retry later, or a deferral): nothing was delivered."""
        with self.transaction():
            self.conn.run(
                self.q.reschedule,
                (due_at, code, detail, int(transient), message),
            )

    def record_error(self, message: int, reason: str, code: int | None, detail: str, now: float = 0.0) -> None:
        with self.transaction():
            self.conn.run(
                self.q.record_error,
                (reason, code, detail, reason, now, message),
            )

    def record_failed(
        self, c: Claimed, now: float, code: int | None, detail: str, suppress: bool, day: str = ""
    ) -> list[int]:
        """A permanent refusal of this message.

        suppress (the address does not exist): the enrollment bounced, the address suppressed and every
        pending message to it cancelled. Otherwise (blocked): this enrollment stops, the address is kept,
        and the block counts against the mailbox's health. Either counts on the mailbox's local `day`.
        """
        with self.transaction():
            if day:
                self.count_failure(c.mailbox, day, "bounced" if suppress else "blocked", at_smtp=True)
            self.conn.run(
                self.q.mark_failed,
                ("bounced" if suppress else "blocked", code, detail, c.id),
            )
            if not suppress:
                self._count_block(c.mailbox, now)
                return self._end("id", c.enrollment_id, "stopped", now, f"{BLOCKED_BY} {c.id}")
            self.conn.run(
                self.q.suppress_bounced,
                (c.email, f"bounced {code or ''} {detail}".strip()[:200], now, c.id),
            )
            return self._bounced(c.email, c.enrollment_id, now, f"{SUPPRESSED_BY} {c.id}")

    def cut_uncertain(self, message: int, now: float, detail: str) -> bool:
        """A transaction cut by a stop: `uncertain` if it was still in flight (True), unchanged otherwise."""
        with self.transaction():
            rows = self.conn.all(
                self.q.cut_uncertain,
                (now, detail, message),
            )
        return bool(rows)

    def unblame(self, mailbox: str, messages: Sequence[int], now: float, detail: str, day: str = "") -> list[int]:
        """Refusals that turned out to be the mailbox's (the same one for several recipients in a row):
        undo what they did to the prospects (and to the day's bounce counts), and put the messages in the error
        section as `refused`."""
        ids = self._list(list(messages))
        with self.transaction():
            if day:
                for kind, n in self.conn.all(
                    self.q.failed_kinds,
                    (ids,),
                ):
                    self.count_failure(mailbox, day, kind, at_smtp=True, n=-n)
            restored = self.conn.all(
                self.q.restore_cancelled,
                (ids, SUPPRESSED_BY, BLOCKED_BY),
            )
            self.conn.run(self.q.unsuppress_messages, (ids,))
            enrollments = {r[0] for r in restored}
            enrollments |= {r[0] for r in self.conn.execute(self.q.enrollments_of_messages, (ids,))}
            self.conn.run(
                self.q.reactivate_enrollments,
                (self._list(sorted(enrollments)),),
            )
            self.conn.run(
                self.q.unblock,
                (ids, mailbox),
            )
            rows = self.conn.all(
                self.q.mark_refused,
                (detail, ids),
            )
        return [r[0] for r in rows]

    def throttle(self, message: int, mailbox: str, until: float, code: int | None, detail: str) -> None:
        """The server asked the whole client to wait: the message keeps its place and its retries."""
        with self.transaction():
            self.conn.run(
                self.q.throttle_message,
                (code, detail, message),
            )
            self.conn.run(
                self.q.throttle_mailbox,
                (mailbox, until, until),
            )

    def catch_due_while_down(self, mailbox: str, now: float) -> list[int]:
        """Messages reaching their due time while the mailbox is down join its error section."""
        with self.transaction():
            rows = self.conn.all(
                self.q.catch_due_while_down,
                (mailbox, now),
            )
        return [r[0] for r in rows]

    def mark_deferred(self, mailbox: str, until: float, detail: str) -> list[int]:
        """Say on each due message why it waits; returns the ones newly told (logged once each)."""
        with self.transaction():
            rows = self.conn.all(
                self.q.mark_deferred,
                (detail, mailbox, until),
            )
        return [r[0] for r in rows]

    def messages_by_id(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        rows = self.conn.execute(
            self.q.messages_by_id,
            (self._list(list(ids)),),
        )
        keys = ("id", "state", "reason", "mailbox", "enrollment_id", "step", "cadence", "email")
        return {r[0]: dict(zip(keys, r, strict=True)) for r in rows}

    def error_ids(self, mailbox: str | None, *, exclude_uncertain: bool = False) -> list[int]:
        sql: str = self.q.error_ids
        if exclude_uncertain:
            sql += " AND coalesce(reason, '') != 'uncertain'"
        args: tuple[Any, ...] = ()
        if mailbox is not None:
            sql += f" AND mailbox = {self.q.param}"
            args = (mailbox,)
        return [r[0] for r in self.conn.execute(sql + " ORDER BY id", args)]

    def pending_ids(self, mailbox: str, *, exclude_uncertain: bool = False) -> list[int]:
        """Messages of `mailbox` not yet sent: scheduled, sending or in the error section."""
        statement = self.q.pending_ids_certain if exclude_uncertain else self.q.pending_ids
        rows = self.conn.execute(statement, (mailbox,))
        return [r[0] for r in rows]

    def retry(self, ids: Sequence[int]) -> int:
        """error → scheduled, on the operator's word (uncertain ones included)."""
        rows = self.conn.all(
            self.q.retry,
            (self._list(list(ids)),),
        )
        return len(rows)

    def reassign(self, enrollment_ids: Sequence[int], to: str) -> list[int]:
        """Move enrollments to `to`: their sticky sender and every message not yet sent."""
        ids = self._list(list(enrollment_ids))
        for cadence, mailbox, n in self.conn.all(
            self.q.enrollments_to_move,
            (ids, to),
        ):
            self.count_enrollments(cadence, {mailbox: -n, to: n})
        self.conn.run(
            self.q.move_enrollments,
            (to, ids),
        )
        rows = self.conn.all(
            self.q.move_messages,
            (to, ids),
        )
        self.conn.tell((to,))
        return [r[0] for r in rows]

    def never_contacted(self, mailbox: str) -> list[tuple[int, str, str, str]]:
        """(enrollment, cadence, owner, adder) of the mailbox's active enrollments whose first step has not
        gone (waiting in the retry queue or scheduled): nobody has heard from it yet. Uncertain ones are not
        among them (they may have been delivered)."""
        rows = self.conn.execute(
            self.q.never_contacted,
            (mailbox,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def dsn_failed(self, message_ids: Sequence[str], email: str, reason: str, detail: str, mailbox: str) -> None:
        """A DSN says a sent message failed after all: the message says so, and a block counts for the mailbox."""
        rows = self.conn.all(
            self.q.dsn_failed,
            (reason, detail, self._list(list(message_ids)), email),
        )
        if reason == "blocked" and rows:
            self._count_block(mailbox, time.time())

    def uncertain_message_ids(self, mailbox: str) -> list[tuple[int, str, float, bool]]:
        """(id, Message-ID, since, taken over) of the mailbox's uncertain messages; `taken over`: found in
        `sending` when another daemon took the mailbox over (its first daemon may yet deliver it)."""
        rows = self.conn.execute(
            self.q.uncertain_message_ids,
            (mailbox,),
        )
        return [(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def settle_uncertain(
        self, message: int, delivered: bool, sent_at: float, detail: str, day: str = ""
    ) -> tuple[int, int, str, str] | None:
        """Settle an `uncertain` message; returns (enrollment, step, cadence, sticky) when it changed.

        Delivered: `sent` at `sent_at` (when it was attempted), and counted in its mailbox's local `day` as
        record_sent counts a send: the daily limit holds what went. Not delivered: scheduled again."""
        row = self.conn.one(self.q.uncertain_route, (message,))
        if row is None:
            return None
        if delivered:
            self.conn.run(self.q.settle_delivered, (sent_at, detail, message))
            if day:
                self.conn.run(self.q.count_first_send if row[1] == 1 else self.q.count_send, (row[4], day))
        else:
            self.conn.run(self.q.settle_not_delivered, (detail, message))
        return (row[0], row[1], row[2], row[3])

    def scheduled_in_order(
        self, mailbox: str, until: float, kind: str = "all"
    ) -> Iterator[tuple[float, int, int, int]]:
        """(due_at, step, enrollment_id, id) of the scheduled messages due before `until`, read as they are taken:
        all of them, or the follow-ups (step >= 2) or the first emails only (`kind` "follow_ups", "new")."""
        statement = {
            "all": self.q.scheduled_in_order,
            "follow_ups": self.q.scheduled_follow_ups_in_order,
            "new": self.q.scheduled_new_in_order,
        }[kind]
        cursor = self.conn.execute(statement, (mailbox, until))
        while rows := cursor.fetchmany(256):
            yield from rows

    def left_in_order(self, mailbox: str, due: float, id_: int, until: float, kind: str) -> list[tuple[str, int]]:
        """(cadence, count) of the scheduled messages of `kind` ("follow_ups" or "new") due before `until`
        from (`due`, `id_`) on in the claim's order: what `plan` did not reach."""
        statement = self.q.left_follow_ups_in_order if kind == "follow_ups" else self.q.left_new_in_order
        return [(str(c), int(n)) for c, n in self.conn.all(statement, (mailbox, due, id_, until))]
