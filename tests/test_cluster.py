"""Several daemons on one PostgreSQL database: leases share the mailboxes out, and kill -9 loses and doubles
nothing (SPEC §10). Real processes, real SMTP servers, a real (throwaway) PostgreSQL."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query
from tests.servers import SmtpServer

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes

LEASE = 6.0
DAILY_LIMIT = 40  # 300 prospects, 2 steps each, sticky: 50 messages a mailbox, 40 may go today
_OUTBOX_ID = re.compile(r"<cadenced\.(\d+)\.(\d+)\.")


def holders(url: str) -> dict[str, str]:
    return dict(query(url, "SELECT mailbox, holder FROM leases"))  # type: ignore[arg-type]


def test_three_daemons_share_the_mailboxes_and_a_kill_9_loses_and_doubles_nothing(
    project: Project, postgres_url: str, tmp_path: Path
) -> None:
    servers = [SmtpServer(), SmtpServer()]
    for server in servers:
        server.recorder.on_data = lambda rcpt: time.sleep(0.02)  # sends in flight when a kill lands
        server.start()
    daemons: dict[str, DaemonProcess] = {}
    try:
        project.database = project.data["daemon"]["database"] = postgres_url
        project.data["daemon"].update({"lease": f"{LEASE:g}s", "log_format": "json"})
        project.data["defaults"].update({"gap": "0s", "daily_limit": DAILY_LIMIT})
        boxes = project.add_mailboxes(6, smtp=servers[0].smtp_config())
        boxes += project.add_mailboxes(6, prefix="mc", smtp=servers[1].smtp_config())
        cadence = project.add_cadence(steps=2)
        cadence["steps"][1]["wait"] = "0s"
        assert project.enroll(project.people(300)).json()["enrolled"] == 300  # 600 messages: demand above the limits
        configs = {}
        for node in ("a", "b", "c"):
            project.data["daemon"]["node"] = node
            configs[node] = tmp_path / f"node-{node}.toml"
            configs[node].write_text(tomli_w.dumps(project.data))
        for node, path in configs.items():
            daemons[node] = DaemonProcess(path)

        def delivered() -> int:
            return sum(len(s.recorder.deliveries) for s in servers)

        # The three share the twelve mailboxes evenly once they have all seen each other.
        eventually(lambda: sorted(Counter(holders(postgres_url).values()).values()) == [4, 4, 4], 30, "4 each")

        takeovers: list[float] = []
        for kill, victim in enumerate(("a", "b", "c", "a", "b")):
            eventually(lambda k=kill: delivered() >= 80 * (k + 1), 60, f"progress before kill {kill + 1}")
            lost = sorted(m for m, holder in holders(postgres_url).items() if holder == victim)
            before = Counter(d.sender for s in servers for d in s.recorder.deliveries)
            daemons[victim].proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            daemons[victim].wait()

            def resumed(lost: list[str] = lost, before: dict[str, int] = before, gone: str = victim) -> bool:
                """Each of the dead daemon's mailboxes is held by another and has sent again (or has nothing
                left to send)."""
                leases = holders(postgres_url)
                if any(leases.get(m) in (None, gone) for m in lost):
                    return False
                waiting = dict(
                    query(postgres_url, "SELECT mailbox, count(*) FROM messages WHERE state = 'scheduled' GROUP BY 1")
                )
                done = dict(  # the day's limit counts sends and uncertain ones
                    query(
                        postgres_url,
                        "SELECT mailbox, count(*) FROM messages WHERE state = 'sent' OR reason = 'uncertain' "
                        "GROUP BY 1",
                    )
                )
                sent_now = Counter(d.sender for s in servers for d in s.recorder.deliveries)
                return all(sent_now[m] > before[m] or not waiting.get(m) or done.get(m, 0) >= DAILY_LIMIT for m in lost)

            eventually(resumed, 3 * LEASE, f"the others to take {victim}'s mailboxes over")
            takeovers.append(time.monotonic() - killed_at)
            daemons[victim] = DaemonProcess(configs[victim])  # it comes back, and gets its share again

        def settled() -> bool:
            rows = query(postgres_url, "SELECT mailbox, state, reason FROM messages WHERE state != 'scheduled'")
            done = Counter(r[0] for r in rows if r[1] == "sent" or r[2] == "uncertain")
            return "sending" not in {r[1] for r in rows} and all(done[m] == DAILY_LIMIT for m in boxes)

        eventually(settled, 120, "every mailbox to reach its day's limit (sent, or uncertain)")
        # The last one back gets its share again: the others let go of what they took over.
        eventually(lambda: sorted(Counter(holders(postgres_url).values()).values()) == [4, 4, 4], 30, "4 each again")
        status = project.run("status", "--json").json()
        assert {d["node"] for d in status["daemons"] if d["live"]} == {"a", "b", "c"}
        assert status["daemon"]["running"] is True
        assert all(m["holder"] in ("a", "b", "c") for m in status["mailboxes"])
    finally:
        for d in daemons.values():
            if d.proc.poll() is None:
                d.signal(signal.SIGTERM)
        for d in daemons.values():
            if d.proc.poll() is None:
                assert d.wait() == 0, "\n".join(d.lines[-20:])
        for server in servers:
            server.stop()

    deliveries = [d for s in servers for d in s.recorder.deliveries]
    ids = Counter(int(_OUTBOX_ID.search(d["Message-ID"]).group(1)) for d in deliveries)  # type: ignore[union-attr]
    assert max(ids.values()) == 1, "a message went twice"
    rows = query(
        postgres_url,
        "SELECT m.id, m.state, m.reason, e.email, m.step FROM messages m JOIN enrollments e ON e.id = m.enrollment_id",
    )
    step_of = {r[0]: (r[3], r[4]) for r in rows}
    assert max(Counter(step_of[i] for i in ids).values()) == 1  # each (prospect, step) at most once
    by_step = {(r[3], r[4]): r for r in rows}
    for i in range(300):  # every thread is whole: a follow-up exists once its first step is sent
        first = by_step[(f"p{i}@prospects.example", 1)]
        assert (first[1] == "sent") == ((f"p{i}@prospects.example", 2) in by_step)
    sent = {r[0] for r in rows if r[1] == "sent"}
    uncertain = {r[0] for r in rows if r[1] == "error" and r[2] == "uncertain"}
    waiting = {r[0] for r in rows if r[1] == "scheduled"}  # past today's limits: tomorrow's
    assert sent | uncertain | waiting == {r[0] for r in rows}, Counter((r[1], r[2]) for r in rows)  # none lost
    assert len(sent | uncertain) == 12 * DAILY_LIMIT
    assert sent <= set(ids) and set(ids) <= sent | uncertain  # what went out is sent, or says it may have
    assert len(uncertain) <= 5 * 4  # at most what a killed daemon had in flight: one per mailbox it held
    per_mailbox = Counter(d.sender for d in deliveries)
    assert max(per_mailbox.values()) <= DAILY_LIMIT  # the day's limit held across every takeover
    assert query(postgres_url, "SELECT max(sent) FROM daily_counts")[0][0] <= DAILY_LIMIT
    assert max(takeovers) <= LEASE + 3, takeovers  # within the lease (and a round), never later
