"""Several daemons on one PostgreSQL when things go wrong (SPEC §10): a daemon stopped (SIGSTOP) past its lease,
a database connection that answers nothing (a TCP proxy that drops everything), an outside session holding
rows and the old global lock, the server restarted `-m immediate` and down at start-up. Nobody's trouble stops
the others, no daemon exits, nothing is delivered twice or lost, and no mailbox passes its daily limit (counted
at the SMTP servers). Real processes, real SMTP servers, a private PostgreSQL (it is stopped and started)."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import tomli_w

from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually, query
from tests.imap_server import Dovecot, needs_dovecot
from tests.postgres_server import EXTERNAL, Postgres, needs_postgres
from tests.servers import Pki, SmtpServer
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, needs_postgres]  # end to end: daemons, servers, a PostgreSQL of its own

LEASE = 6.0
DAILY_LIMIT = 60
_OUTBOX_ID = re.compile(r"<cadenced\.(\d+)\.(\d+)\.")


@pytest.fixture
def private_postgres() -> Iterator[Postgres]:
    """A server of this test's own: stopping it disturbs no other test."""
    if EXTERNAL:
        pytest.skip("CADENCED_TEST_POSTGRES names a shared server: these tests stop and start their own")
    server = Postgres()
    server.start()
    yield server
    server.stop()


def holders(url: str) -> dict[str, str]:
    return dict(query(url, "SELECT mailbox, holder FROM leases"))  # type: ignore[arg-type]


def node_config(project: Project, tmp_path: Path, node: str, database: str) -> Path:
    project.data["daemon"]["node"] = node
    project.data["daemon"]["database"] = database
    path = tmp_path / f"node-{node}.toml"
    path.write_text(tomli_w.dumps(project.data))
    return path


def all_running(daemons: dict[str, DaemonProcess]) -> None:
    for node, d in daemons.items():
        assert d.proc.poll() is None, f"{node} exited:\n" + "\n".join(d.lines[-20:])


def stop_all(daemons: dict[str, DaemonProcess]) -> dict[str, int]:
    """SIGTERM to each daemon still running (SIGCONT first: one may be stopped); their exit codes."""
    for d in daemons.values():
        if d.proc.poll() is None:
            d.signal(signal.SIGCONT)
            d.signal(signal.SIGTERM)
    return {n: d.wait(60) for n, d in daemons.items()}


def sent_once(deliveries: list[Any]) -> Counter[int]:
    """The outbox ids of the deliveries (from their Message-IDs), each asserted to have arrived once."""
    ids = Counter(int(_OUTBOX_ID.search(d["Message-ID"]).group(1)) for d in deliveries)  # type: ignore[union-attr]
    assert not ids or max(ids.values()) == 1, "a message went twice"
    return ids


def check_outcome(url: str, servers: list[SmtpServer], limit: int = DAILY_LIMIT) -> None:
    """No message delivered twice, none lost, what went out is recorded as sent or uncertain, and no mailbox
    passed its daily limit at the servers."""
    deliveries = [d for s in servers for d in s.recorder.deliveries]
    ids = sent_once(deliveries)
    rows = query(url, "SELECT id, state, reason FROM messages")
    state = {r[0]: (r[1], r[2]) for r in rows}
    assert {s for s, _ in state.values()} <= {"sent", "scheduled", "error"}, Counter(state.values())
    assert all(r == "uncertain" for s, r in state.values() if s == "error"), Counter(state.values())
    sent = {i for i, (s, _) in state.items() if s == "sent"}
    uncertain = {i for i, (s, r) in state.items() if r == "uncertain"}
    assert sent <= set(ids) and set(ids) <= sent | uncertain  # recorded as it happened, or said to be uncertain
    per_mailbox = Counter(d.sender for d in deliveries)
    assert max(per_mailbox.values()) <= limit, per_mailbox


def test_a_stopped_or_cut_off_daemon_never_stops_the_others(
    project: Project, private_postgres: Postgres, tmp_path: Path
) -> None:
    """Three daemons; b is stopped (SIGSTOP) for two leases ten times at random moments, c's connection is
    blackholed for three leases: the others send all along, nobody exits, nothing goes twice or past a limit.
    The shortest lease (3 s) keeps ten pauses within two minutes."""
    lease, limit = 3.0, 90
    url = private_postgres.database()
    servers = [SmtpServer(), SmtpServer()]
    for server in servers:
        server.recorder.on_data = lambda rcpt: time.sleep(0.03)  # transactions in flight when a stop lands
        server.start()
    parts = urlsplit(url)
    proxy = TcpProxy("127.0.0.1", private_postgres.port)
    behind_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    daemons: dict[str, DaemonProcess] = {}
    try:
        project.database = url
        project.data["daemon"].update({"lease": f"{lease:g}s", "log_format": "json", "busy_timeout": "5s"})
        project.data["defaults"].update({"gap": "1s", "daily_limit": limit})  # 9 a second at most
        boxes = project.add_mailboxes(5, smtp=servers[0].smtp_config())
        boxes += project.add_mailboxes(4, prefix="mc", smtp=servers[1].smtp_config())
        project.add_cadence()
        node_config(project, tmp_path, "setup", url)
        project.config_path = tmp_path / "node-setup.toml"
        # Demand above the limits: 1,000 first emails, 9 mailboxes at 90 may send 810 today.
        assert project.enroll(project.people(1000)).json()["enrolled"] == 1000
        configs = {n: node_config(project, tmp_path, n, behind_proxy if n == "c" else url) for n in "abc"}
        daemons = {n: DaemonProcess(path) for n, path in configs.items()}

        def delivered() -> int:
            return sum(len(s.recorder.deliveries) for s in servers)

        eventually(lambda: sorted(Counter(holders(url).values()).values()) == [3, 3, 3], 60, "3 each")
        rng = random.Random(7)
        for pause in range(10):
            time.sleep(rng.uniform(0.0, 1.0))
            before = delivered()
            daemons["b"].signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                eventually(lambda b=before: delivered() >= b + 10, 2 * lease, f"the others to send (pause {pause})")
                time.sleep(max(0.0, stopped + 2 * lease - time.monotonic()))  # the pause: two leases
            finally:
                daemons["b"].signal(signal.SIGCONT)
        proxy.blackhole()
        try:
            before = delivered()
            eventually(lambda: delivered() >= before + 10, 3 * lease, "the others to send past c's partition")
            time.sleep(3 * lease)
        finally:
            proxy.heal()

        def settled() -> bool:
            rows = query(url, "SELECT mailbox, state, reason FROM messages WHERE state != 'scheduled'")
            counts = Counter(r[0] for r in rows if r[1] == "sent" or r[2] == "uncertain")
            return all(r[1] != "sending" for r in rows) and all(counts[m] == limit for m in boxes)

        try:  # about a minute alone; bounded well above that for a loaded machine
            eventually(settled, 420, "every mailbox to reach its limit (sent or uncertain)")
        except AssertionError:
            rows = query(url, "SELECT mailbox, state, count(*) FROM messages GROUP BY 1, 2 ORDER BY 1, 2")
            print("messages:", rows, "\nleases:", holders(url))
            for node, d in daemons.items():
                print(f"--- {node}", *d.lines[-15:], sep="\n")
            raise
        all_running(daemons)
    finally:
        codes = stop_all(daemons)
        proxy.close()
        for server in servers:
            server.stop()
    assert codes == {"a": 0, "b": 0, "c": 0}
    check_outcome(url, servers, limit)


def test_an_outside_transaction_and_server_restarts_stop_no_daemon(
    project: Project, private_postgres: Postgres, tmp_path: Path
) -> None:
    """An outside session holds the old global lock and some messages' rows past every lock wait: sending goes
    on around them. The server restarted `-m immediate` three times: the daemon sends again within 10 s of
    each return. A daemon started while the server is down waits for it, then sends. Nobody exits."""
    url = private_postgres.database()
    server = SmtpServer()
    server.recorder.on_data = lambda rcpt: time.sleep(0.02)
    server.start()
    daemon: DaemonProcess | None = None
    late: DaemonProcess | None = None
    try:
        project.database = url
        project.data["daemon"].update({"lease": f"{LEASE:g}s", "log_format": "json", "busy_timeout": "3s"})
        project.data["defaults"].update({"gap": "1s", "daily_limit": 1000})  # 6 a second
        project.add_mailboxes(6, smtp=server.smtp_config())
        project.add_cadence()
        config = node_config(project, tmp_path, "a", url)
        project.config_path = config
        enrolled = project.enroll(project.people(300))
        assert enrolled.code == 0, enrolled.err

        with psycopg.connect(url, autocommit=False) as outside:  # an operator's psql, or a stuck migration
            outside.execute("SELECT pg_advisory_xact_lock(1667329125)")  # the lock every write once took
            held = [r[0] for r in outside.execute("SELECT id FROM messages ORDER BY id LIMIT 5 FOR UPDATE")]
            daemon = DaemonProcess(config)
            server.recorder.wait_for(40, timeout=30)  # past the 3 s lock wait, more than once
            time.sleep(5)
            assert daemon.proc.poll() is None
            locked = query(url, f"SELECT state FROM messages WHERE id IN ({','.join(map(str, held))})")
            assert {r[0] for r in locked} == {"scheduled"}  # passed over, never waited for
            outside.rollback()
        for restart in range(3):
            before = len(server.recorder.deliveries)
            private_postgres.halt()
            time.sleep(2)
            private_postgres.resume()
            back = time.monotonic()
            server.recorder.wait_for(before + 5, timeout=20)
            assert time.monotonic() - back <= 10, f"restart {restart}: sent again after {time.monotonic() - back}s"
            assert daemon.proc.poll() is None, "\n".join(daemon.lines[-20:])

        private_postgres.halt()
        late = DaemonProcess(node_config(project, tmp_path, "b", url))
        late.wait_event("store.error", within=30)  # waiting for the database, not exiting
        assert late.proc.poll() is None
        private_postgres.resume()
        late.wait_event("daemon.started", within=60)
        eventually(lambda: query(url, "SELECT count(*) FROM messages WHERE state = 'scheduled'")[0][0] == 0, 120)
        eventually(lambda: "b" in holders(url).values(), 30, "b to take its share")
    finally:
        codes = []
        for d in (daemon, late):
            if d is not None:
                if d.proc.poll() is None:
                    d.signal(signal.SIGTERM)
                codes.append(d.wait(60))
        server.stop()
    assert codes == [0, 0]
    assert sent_once(server.recorder.deliveries)
    rows = query(url, "SELECT state, reason FROM messages")
    assert Counter(r[0] for r in rows)["sent"] + Counter(r[1] for r in rows)["uncertain"] == 300


def test_ten_restarts_and_a_minute_down_stop_no_daemon(
    project: Project, private_postgres: Postgres, tmp_path: Path
) -> None:
    """Two daemons; PostgreSQL restarted ten times (`-m immediate` and `-m fast` in turn, down a second) and
    then down for a minute: after every return each daemon sends again within 10 s, on its own; each holds its
    node's lock again (a third process of a node is refused, as at start); nobody exits; nothing goes twice."""
    url = private_postgres.database()
    server = SmtpServer()
    server.recorder.on_data = lambda rcpt: time.sleep(0.02)
    server.start()
    daemons: dict[str, DaemonProcess] = {}
    try:
        project.database = url
        project.data["daemon"].update({"lease": f"{LEASE:g}s", "log_format": "json", "busy_timeout": "3s"})
        project.data["defaults"].update({"gap": "1s", "daily_limit": 1000})  # 4 a second over 4 mailboxes
        project.add_mailboxes(4, smtp=server.smtp_config())
        project.add_cadence()
        project.config_path = node_config(project, tmp_path, "setup", url)
        assert project.enroll(project.people(900)).json()["enrolled"] == 900
        configs = {n: node_config(project, tmp_path, n, url) for n in "ab"}
        daemons = {n: DaemonProcess(path) for n, path in configs.items()}
        eventually(lambda: sorted(Counter(holders(url).values()).values()) == [2, 2], 60, "2 each")

        def outage(down: float, how: str) -> None:
            marks = {n: d.mark() for n, d in daemons.items()}
            if how == "immediate":
                private_postgres.halt()
            else:
                private_postgres._pg_ctl("-m", "fast", "-w", "stop")
            time.sleep(down)  # the outage itself
            private_postgres.resume()
            back = time.monotonic()
            for node, d in daemons.items():
                d.wait_event("message.sent", within=30, after=marks[node])
                took = time.monotonic() - back
                assert took <= 10, f"{node} sent again {took:.1f} s after the server's return ({how}, {down} s down)"
            all_running(daemons)

        for restart in range(10):
            outage(1.0, "immediate" if restart % 2 else "fast")
        before_last = {n: d.mark() for n, d in daemons.items()}
        outage(60.0, "immediate")
        # The node locks, lost with their sessions, are held again: a second process of node a is refused.
        for node, d in daemons.items():
            d.wait_event("daemon.node_lock_retaken", within=20, after=before_last[node])
        twin = DaemonProcess(configs["a"])
        assert twin.wait(30) == 1 and any("already runs" in line for line in twin.lines), twin.lines[-5:]
        all_running(daemons)
    finally:
        codes = stop_all(daemons)
        server.stop()
    assert codes == {"a": 0, "b": 0}
    assert sent_once(server.recorder.deliveries)


def test_a_daemon_whose_node_lock_another_process_took_stops(
    project: Project, private_postgres: Postgres, tmp_path: Path
) -> None:
    """The node's lock lives in a session: when that session ends (a restart, a cut connection) another process
    of the same node name may take it before the daemon does. Both would pass the lease fence (it knows the
    node, not the process): the daemon that finds its lock taken says so and stops, exit 1."""
    url = private_postgres.database()
    server = SmtpServer().start()
    try:
        project.database = url
        project.data["daemon"].update({"lease": f"{LEASE:g}s", "log_format": "json"})
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        config = node_config(project, tmp_path, "a", url)
        daemon = DaemonProcess(config)
        daemon.wait_event("daemon.started")
        key = "cadenced node a"
        with psycopg.connect(url, autocommit=True, application_name="cadenced run pid 1 on elsewhere") as twin:

            def take() -> bool:  # its session ended, then taken here before the daemon takes it again
                query(
                    url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE "
                    f"'cadenced run pid {daemon.proc.pid} %'",
                )
                return bool(twin.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()[0])  # type: ignore[index]

            eventually(take, 20, "the test to hold node a's lock")
            lost = daemon.wait_event("daemon.node_lock_lost", within=20)
            assert "elsewhere" in lost["detail"] and "node 'a'" in lost["detail"]
            assert daemon.wait(30) == 1
    finally:
        server.stop()


@needs_dovecot
def test_a_daemon_paused_mid_send_past_its_lease_never_causes_a_second_delivery(
    project: Project, private_postgres: Postgres, tmp_path: Path
) -> None:
    """The duplicate a Jepsen-style run found with `sent_copies = "provider"` and `settle_after = "0s"`: daemon a
    is stopped (SIGSTOP) while the server holds its DATA, past its lease; b takes the mailbox over, finds the
    message in `sending`, and its Sent folder (the provider files only what it delivered) has no copy yet. b must
    not send it again: a delivers it when it resumes. Every prospect's first email arrives exactly once."""
    url = private_postgres.database()
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}).start()
    server = SmtpServer()
    arrived, release = threading.Event(), threading.Event()
    first: list[str] = []

    def hold_the_first(rcpt: str) -> None:  # the server keeps the first DATA until the test lets it go
        if not first:
            first.append(rcpt)
            arrived.set()
            release.wait(120)

    server.recorder.on_data = hold_the_first
    server.start()
    (tmp_path / "imap-pw").write_text("imap-pw")
    daemons: dict[str, DaemonProcess] = {}
    try:
        project.database = url
        project.data["daemon"].update({"lease": "3s", "log_format": "json", "settle_after": "0s"})
        project.data["defaults"]["gap"] = "0s"
        imap = dovecot.imap_config("alice", tmp_path / "imap-pw", pki.ca_file, poll="1s")
        project.add_mailboxes(1, smtp=server.smtp_config(), imap=imap, sent_copies="provider")
        project.add_cadence()
        project.config_path = node_config(project, tmp_path, "setup", url)
        assert project.enroll(project.people(5)).json()["enrolled"] == 5
        configs = {n: node_config(project, tmp_path, n, url) for n in "ab"}
        daemons["a"] = DaemonProcess(configs["a"])
        assert arrived.wait(30), "the first DATA never came"
        daemons["a"].signal(signal.SIGSTOP)  # waiting for the server's answer to its DATA
        stopped = time.monotonic()
        daemons["b"] = DaemonProcess(configs["b"])
        taken = daemons["b"].wait_event("message.error", within=30, reason="uncertain")
        assert taken["detail"] == "found in sending at takeover"
        time.sleep(max(0.0, stopped + 2 * 3.0 - time.monotonic()))  # a stays stopped two leases at least
        release.set()  # the server delivers it now: the provider files it in Sent afterwards
        server.recorder.wait_for(5, timeout=30)  # b sends the four others, and not the first again
        held = next(d for d in server.recorder.deliveries if d.recipient == first[0])
        dovecot.deliver("alice", held.headers.as_bytes(), "Sent")
        daemons["a"].signal(signal.SIGCONT)  # it hears 250 for its DATA: recorded as sent

        def settled() -> bool:
            rows = query(url, "SELECT state FROM messages WHERE step = 1")
            return sorted(r[0] for r in rows) == ["sent"] * 5

        eventually(settled, 60, "the held message recorded as sent (by a, or from Sent by b)")
        all_running(daemons)
    finally:
        release.set()
        codes = stop_all(daemons)
        server.stop()
        dovecot.cleanup()
    assert codes == {"a": 0, "b": 0}
    recipients = Counter(d.recipient for d in server.recorder.deliveries)
    assert len(recipients) == 5 and set(recipients.values()) == {1}, recipients
