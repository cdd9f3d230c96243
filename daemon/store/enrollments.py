"""Prospects and their enrollments: who is enrolled, suppressed or unsubscribed, the rotation's tallies, and
the daemon's own small state (heartbeat, keys, answers kept for an Idempotency-Key)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from daemon.store.core import Core
from daemon.store.records import IDEMPOTENCY_KEPT, Pin


class Enrollments(Core):
    def daemon_state(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.conn.execute(self.q.daemon_state)}

    def set_daemon_state(self, values: dict[str, str | None]) -> None:
        with self.transaction():
            self.conn.executemany(
                self.q.set_daemon_state,
                list(values.items()),
            )

    def pins(self) -> dict[str, Pin]:
        rows = self.conn.all(self.q.pins)
        return {r[0]: Pin(r[0], bool(r[1]), r[2], r[3]) for r in rows}

    def pin(self, cadence: str, auto_rotate: bool, rotate_among: str, now: float) -> None:
        self.conn.run(
            self.q.pin,
            (cadence, int(auto_rotate), rotate_among, now),
        )

    def unsubscribe_key(self) -> bytes:
        """The key of every unsubscribe token (made once; the same across restarts and reloads)."""
        with self.transaction():
            self.conn.run(
                self.q.make_unsubscribe_key,
                (secrets.token_hex(32),),
            )
            row = self.conn.one(self.q.unsubscribe_key)
        return bytes.fromhex(row[0])

    def web_key(self) -> bytes:
        """The key the dashboard signs its cookies and CSRF tokens with (made once; kept across restarts)."""
        with self.transaction():
            self.conn.run(self.q.make_web_key, (secrets.token_hex(32),))
            row = self.conn.one(self.q.web_key)
        return bytes.fromhex(row[0])

    def open_web_session(self, digest: str, role: str, now: float, expires: float) -> None:
        """A sign-in kept (by its id's digest), the expired ones forgotten."""
        with self.transaction():
            self.conn.run(self.q.forget_web_sessions, (now,))
            self.conn.run(self.q.open_web_session, (digest, role, now, expires))

    def web_session(self, digest: str, now: float) -> str | None:
        """The role of a live sign-in, None when there is none (expired, signed out, never)."""
        row = self.conn.one(self.q.web_session, (digest, now))
        return str(row[0]) if row else None

    def end_web_session(self, digest: str) -> None:
        with self.transaction():
            self.conn.run(self.q.end_web_session, (digest,))

    def kept_unsubscribe_key(self) -> bytes | None:
        """The unsubscribe key if one was made (a read command makes none)."""
        row = self.conn.one(self.q.unsubscribe_key)
        return bytes.fromhex(row[0]) if row else None

    def api_answer(self, key: str) -> tuple[str, str, str] | None:
        """(playbook, digest of the request, answer as JSON) given to an Idempotency-Key, if still kept."""
        row = self.conn.one(self.q.api_answer, (key,))
        return (row[0], row[1], row[2]) if row else None

    def keep_api_answer(self, key: str, playbook: str, digest: str, answer: str, now: float) -> None:
        """In the transaction of what the request did; keys older than IDEMPOTENCY_KEPT are forgotten."""
        with self.transaction():
            self.conn.run(self.q.forget_api_answers, (now - IDEMPOTENCY_KEPT,))
            self.conn.run(self.q.keep_api_answer, (key, playbook, digest, answer, now))

    def unsubscribe(self, enrollment: int, now: float, detail: str) -> tuple[str, list[int]] | None:
        """The prospect of `enrollment` asked to hear no more: suppressed, every cadence of theirs stopped."""
        row = self.conn.one(self.q.email_of, (enrollment,))
        if row is None:
            return None
        return row[0], self.unsubscribe_address(row[0], now, detail)

    def unsubscribe_address(self, email: str, now: float, detail: str) -> list[int]:
        """Suppressed as unsubscribed; its active enrollments stopped and their pending messages cancelled."""
        self.suppress(email, "unsubscribed", now)
        return self._end("email", email, "stopped", now, detail)

    def suppress_addresses(self, emails: Sequence[str], reason: str, now: float) -> dict[str, list[int]]:
        """The operator's `cadenced suppress`: each address suppressed, its pending messages cancelled."""
        with self.transaction():
            out = {}
            for email in emails:
                self.suppress(email, reason, now)
                out[email] = self._end("email", email, "stopped", now, f"address suppressed: {reason}")
            return out

    def unsuppress(self, emails: Sequence[str]) -> list[str]:
        """Suppressions lifted (new imports may enroll the address again; nothing ended is restarted)."""
        with self.transaction():
            return [r[0] for email in emails for r in self.conn.execute(self.q.unsuppress, (email,))]

    def suppressions(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = self.q.suppressions + (f" LIMIT {int(limit)}" if limit is not None else "")
        rows = self.conn.execute(sql)
        return [{"email": r[0], "reason": r[1], "created_at": r[2]} for r in rows]

    def rotation_counts(self, cadence: str) -> dict[str, int]:
        rows = self.conn.execute(self.q.rotation_counts, (cadence,))
        return dict(rows.fetchall())

    def rotation_state(self, cadence: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
        """Where the cadence's rotation stopped: per group the last mailbox used, and weighted credits."""
        cursors = dict(self.conn.execute(self.q.rotation_cursors, (cadence,)))
        credits = {(g, m): c for g, m, c in self.conn.execute(self.q.rotation_credits, (cadence,))}
        return cursors, credits

    def save_rotation(self, cadence: str, cursors: dict[str, str], credits: dict[tuple[str, str], float]) -> None:
        self.conn.executemany(
            self.q.save_rotation_cursor,
            [(cadence, g, last) for g, last in cursors.items()],
        )
        self.conn.executemany(
            self.q.save_rotation_credit,
            [(cadence, g, m, c) for (g, m), c in credits.items()],
        )

    def next_enrollment_id(self) -> int:
        return int(self.conn.one(self.q.next_enrollment_id)[0]) + 1

    def insert_enrollments(self, cadence: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """rows: (id, cadence, email, mailbox, owner, adder, fields_json, created_at), all of `cadence`."""
        self.conn.executemany(
            self.q.insert_enrollments,
            rows,
        )
        self._count_enrolled(cadence, len(rows))

    def schedule_first_steps(
        self, first_id: int, sender: str | None, due_at: float, per_mailbox: dict[str, int]
    ) -> None:
        """Step 1 of every enrollment from `first_id` on (`per_mailbox` of them), from `sender` or its own mailbox."""
        self.conn.run(
            self.q.schedule_first_steps,
            (sender, due_at, first_id),
        )
        self._count_scheduled([(sender, sum(per_mailbox.values()))] if sender else per_mailbox.items())

    def first_message_of(self, enrollment: int) -> tuple[str, dict[str, str], str] | None:
        """(address, fields, the mailbox that sends step 1) of an enrollment."""
        row = self.conn.one(self.q.first_message_of, (enrollment,))
        return None if row is None else (str(row[0]), dict(json.loads(row[1])), str(row[2]))

    def email_of(self, enrollment: int) -> str:
        row = self.conn.one(self.q.email_of, (enrollment,))
        return str(row[0]) if row else ""

    def enrollments_of_message_ids(self, message_ids: Sequence[str]) -> list[tuple[int, str, str, str]]:
        """(enrollment id, cadence, email, state) of the enrollments that sent these Message-IDs."""
        rows = self.conn.execute(
            self.q.enrollments_of_message_ids,
            (self._list(list(message_ids)),),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def enrollments_of_sender(self, email: str, mailbox: str) -> list[tuple[int, str, str, str]]:
        """Active enrollments of this address whose sticky sender is `mailbox`."""
        rows = self.conn.execute(
            self.q.enrollments_of_sender,
            (email, mailbox),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def end_enrollments(self, ids: Sequence[int], state: str, now: float, detail: str) -> list[int]:
        """Enrollments end (replied, stopped); their messages not yet sent are cancelled."""
        return self._end("ids", ids, state, now, detail)

    def bounce_address(self, email: str, enrollment: int, now: float, detail: str) -> list[int]:
        """A bounce read in a DSN: as at SMTP (record_failed), the enrollment of the bounced message `bounced`,
        the address suppressed, its other enrollments stopped and nothing more sent to it, in any cadence."""
        self.suppress(email, detail[:200], now)
        return self._bounced(email, enrollment, now, "address suppressed after a bounce")

    def route_of(self, enrollment: int) -> tuple[str, str] | None:
        """(cadence, sticky sender) of an enrollment."""
        row = self.conn.one(self.q.route_of, (enrollment,))
        return None if row is None else (str(row[0]), str(row[1]))
