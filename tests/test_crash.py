"""kill -9 at random moments: no step of any prospect is ever delivered twice, nothing is lost."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.daemon_helpers import eventually, query, states
from tests.servers import SmtpServer

pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

KILLS = 20
MESSAGES = 200  # 100 prospects x 2 steps, all due at once
_OUTBOX_ID = re.compile(r"<cadenced\.(\d+)\.(\d+)\.")


def start(project: Project, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "daemon", "--config", str(project.config_path), "run"]
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def test_sigkill_at_random_moments_never_sends_a_step_twice(project: Project) -> None:
    server = SmtpServer()
    # A slow server (each DATA takes 60 ms) keeps transactions in flight when the kills land.
    server.recorder.on_data = lambda rcpt: time.sleep(0.06)
    server.start()
    rng = random.Random(20261127)
    db = project.database
    log = project.root / "daemon.log"
    try:
        project.data["defaults"]["gap"] = "0s"
        project.data["daemon"]["log_format"] = "json"
        project.add_mailboxes(4, smtp=server.smtp_config())
        cadence = project.add_cadence(steps=2)
        cadence["steps"][1]["wait"] = "0s"
        assert project.enroll(project.people(MESSAGES // 2)).json()["enrolled"] == MESSAGES // 2

        kills_while_due = 0
        uncertain_after_kill = 0
        while kills_while_due < KILLS:
            before = states(db)
            if before.get("scheduled", 0) == 0:
                break
            proc = start(project, log)
            time.sleep(rng.uniform(0.3, 0.8))  # a random moment: this is the experiment, not a wait
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills_while_due += 1
            uncertain_after_kill += states(db).get("sending", 0)
        assert kills_while_due >= KILLS, f"only {kills_while_due} kills before everything was sent"

        # A last clean run sends what is left, then stops on SIGTERM.
        proc = start(project, log)
        try:
            # Drained: nothing scheduled and nothing in flight (a send in flight schedules its follow-up).
            eventually(
                lambda: states(db).get("scheduled", 0) == states(db).get("sending", 0) == 0, 60, "the outbox to drain"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0

        deliveries = server.recorder.deliveries
        ids = Counter(int(_OUTBOX_ID.match(d["Message-ID"]).group(1)) for d in deliveries)  # type: ignore[union-attr]
        rows = query(
            db,
            "SELECT m.id, e.email, m.step, m.state, m.reason, m.message_id FROM messages m "
            "JOIN enrollments e ON e.id = m.enrollment_id",
        )
        by_step = Counter((email, step) for (mid, email, step, *_rest) in rows for _ in range(ids.get(mid, 0)))
        assert not [k for k, n in by_step.items() if n > 1], "a step delivered twice"
        outcome: Counter[str] = Counter()
        for mid, _email, _step, state, reason, message_id in rows:
            seen = ids.get(mid, 0)
            if state == "sent":
                assert seen == 1, (mid, seen)
                assert any(d["Message-ID"] == message_id for d in deliveries)
                outcome["sent"] += 1
            else:
                assert (state, reason) == ("error", "uncertain"), (mid, state, reason)
                assert seen <= 1
                outcome["uncertain, delivered" if seen else "uncertain, not delivered"] += 1
        assert sum(outcome.values()) == len(rows)
        # The counts `status` reads, kept by the sending connection itself and by the others' triggers, are exact.
        kept = query(db, "SELECT mailbox, state, n FROM message_counts WHERE n != 0 ORDER BY 1, 2")
        real = query(
            db,
            "SELECT mailbox, state, count(*) FROM messages WHERE state IN ('scheduled', 'sending', 'error') "
            "GROUP BY 1, 2 ORDER BY 1, 2",
        )
        assert kept == real
        kept = query(  # kept per node on PostgreSQL (the daemon's rows and the commands'): summed
            db, "SELECT cadence, state, sum(n) FROM enrollment_counts GROUP BY 1, 2 HAVING sum(n) != 0 ORDER BY 1, 2"
        )
        assert kept == query(db, "SELECT cadence, state, count(*) FROM enrollments GROUP BY 1, 2 ORDER BY 1, 2")
        assert len(deliveries) == sum(ids.values()) == outcome["sent"] + outcome["uncertain, delivered"]
        print(
            f"\ncrash test: {kills_while_due} SIGKILLs while messages were due; "
            f"{len(rows)} messages, {dict(outcome)}; {len(deliveries)} deliveries at the server, none twice; "
            f"{uncertain_after_kill} messages caught in 'sending' by a kill"
        )
    finally:
        server.stop()
