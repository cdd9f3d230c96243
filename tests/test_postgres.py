"""`database = "postgresql://…"`: what only PostgreSQL has to show. The engine's behaviour on it is the rest of
the suite: every module marked `both_stores` runs each of its tests on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from daemon.errors import StoreBusy, StoreError
from daemon.store import SCHEMA_VERSION, SentRecord, Store
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, query
from tests.postgres_server import Postgres
from tests.servers import SmtpServer

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes

SECRET = "pg-password-of-the-tests-7731"


@pytest.fixture
def with_password(postgres_server: Postgres, postgres_url: str) -> str:
    """The test database's URL as a role with a password would give it (the server trusts loopback: the
    password is not checked, only carried, which is what must never show)."""
    role = f"r_{urlsplit(postgres_url).path[3:11]}"
    postgres_server.admin(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{SECRET}'")
    parts = urlsplit(postgres_url)
    return urlunsplit(parts._replace(netloc=f"{role}:{SECRET}@{parts.hostname}:{parts.port}"))


def test_check_reports_the_server_and_the_schema(project: Project, with_password: str) -> None:
    os.environ["CADENCED_TEST_DB_URL"] = with_password
    try:
        project.data["daemon"] = {"database_url_env": "CADENCED_TEST_DB_URL", "log_format": "json"}
        project.add_mailboxes(1)
        project.add_cadence()
        before = project.run("check")
        assert before.code == 0, before.err
        assert "database: PostgreSQL 1" in before.out and "no cadenced schema yet" in before.out
        assert project.enroll(project.people(2)).code == 0  # makes the schema
        after = project.run("check")
        assert f"schema {SCHEMA_VERSION}" in after.out
        printed = project.run("check", "--print")
        for output in (before.out, before.err, after.out, printed.out, project.run("status").out):
            assert SECRET not in output
        assert ":********@" in printed.out
        project.data["daemon"] = {"database_url_env": "CADENCED_NOT_SET"}
        unset = project.run("check")
        assert (
            unset.code == 2 and "daemon.database_url_env: $CADENCED_NOT_SET must hold a postgresql:// URL" in unset.err
        )
    finally:
        del os.environ["CADENCED_TEST_DB_URL"]


def test_an_unreachable_server_is_named_without_its_password(project: Project) -> None:
    from tests.servers import free_port

    project.data["daemon"]["database"] = f"postgresql://someone:{SECRET}@127.0.0.1:{free_port()}/nothing"
    project.add_mailboxes(1)
    project.add_cadence()
    for args in (("check",), ("status",), ("enroll", "--cadence", "c1", "--as", "alice", str(project.people(1)))):
        result = project.run(*args)
        # `check` checks the config: a server that does not answer is a warning (the daemon waits for it).
        assert result.code == (0 if args == ("check",) else 2) and "cannot connect" in result.err, args
        assert SECRET not in result.err + result.out and "someone:********@127.0.0.1" in result.err


def test_text_postgresql_cannot_hold_matches_nothing_and_breaks_nothing(project: Project, postgres_url: str) -> None:
    """A NUL (a hostile Message-ID, a query parameter) is refused by PostgreSQL's text type: it is looked up
    and kept as U+FFFD, as unmatched as before, instead of failing the IMAP round or the request."""
    store = Store.open(postgres_url)
    try:
        assert store.enrollments_of_message_ids(["<a\x00b@x>"]) == []
        store.suppress("odd\x00@x.example", "operator", 0.0)
        assert [s["email"] for s in store.suppressions()] == ["odd\ufffd@x.example"]
        assert store.outbox(mailbox="m\x00@x") == []
    finally:
        store.close()


def test_the_lease_fence_lets_its_renewal_through_and_holds_a_takeover_until_the_claim_commits(
    postgres_url: str,
) -> None:
    """A claim reads its mailbox's lease row FOR KEY SHARE until it commits. The holder's renewal (an update of
    expires_at) goes through meanwhile: with FOR SHARE each renewal queued behind the claims in flight, and
    every claim behind it. A takeover locks the row FOR UPDATE first, so it waits for the claim (here: its one
    second lock wait runs out) and takes the mailbox once the claim has committed."""
    claimer, renewer, taker = (Store.open(postgres_url, busy_timeout=1.0, wait=False) for _ in range(3))
    try:
        claimer.fence("a", 60.0)
        assert renewer.lease_round("a", ["m@x.example"], 60.0, [], True)[1] == ["m@x.example"]
        with claimer.transaction():
            assert claimer.holding("m@x.example")()  # the row held until this commits
            held, _, _, _ = renewer.lease_round("a", ["m@x.example"], 60.0, [], False)  # no wait for the claim
            assert held == ["m@x.example"]
            query(postgres_url, "UPDATE leases SET expires_at = 0")  # a runs out, as if it had stopped
            with pytest.raises(StoreBusy):
                taker.lease_round("b", ["m@x.example"], 60.0, [], True)  # waits for the claim, a second
        assert taker.lease_round("b", ["m@x.example"], 60.0, [], True)[1] == ["m@x.example"]
        assert taker.leases()["m@x.example"][0] == "b"
    finally:
        for s in (claimer, renewer, taker):
            s.close()


def test_a_send_recorded_again_counts_once(tmp_path: Path, postgres_url: str) -> None:
    """A commit whose answer is lost (the connection cut after COMMIT went out) leaves the daemon holding the
    send, and it records it again once the database answers. The record counts the mailbox's day, the
    recipient's domain, the cadence's first emails and the result only while the message was not sent yet."""
    project = Project(tmp_path, postgres_url)
    address = project.add_mailboxes(1, gap="0s", domain_daily_limit=5)[0]
    project.add_cadence(new_per_day=5)
    project.write()
    assert project.enroll(project.people(1)).code == 0
    store = Store.open(postgres_url)
    try:
        now = time.time()
        claimed = store.claim(address, now, lambda i, a: f"<{i}.{a}@send.example>")
        assert claimed is not None
        day = datetime.now(UTC).date().isoformat()
        record = SentRecord(claimed, now, 250, "ok", "Hello", day, now, None, None, True, True)
        for _ in range(2):
            with store.transaction():
                store.record_sent(record)
    finally:
        store.close()
    assert query(postgres_url, "SELECT sent, first_emails FROM daily_counts") == [(1, 1)]
    assert query(postgres_url, "SELECT domain, sent FROM domain_counts") == [("prospects.example", 1)]
    assert query(postgres_url, "SELECT cadence, first_emails FROM cadence_counts") == [("c1", 1)]
    assert query(postgres_url, "SELECT n FROM results WHERE kind = 'sent'") == [(1,)]
    assert query(postgres_url, "SELECT state FROM messages") == [("sent",)]


def test_a_schema_19_database_keeps_its_cadence_counts_per_node(postgres_url: str) -> None:
    """Schema 20 keys a cadence's counts and its results per day by node (every daemon's sends changed one row
    of each, so each daemon waited for the others' commits): the counts of 19 stay, as the rows of no node, and
    a daemon's changes are counted on rows of its own that readers add up."""
    Store.open(postgres_url).close()
    for table, key in (("enrollment_counts", "cadence, state"), ("result_days", "cadence, day, step, kind")):
        query(postgres_url, f"ALTER TABLE {table} DROP COLUMN node")  # and its primary key with it
        query(postgres_url, f"ALTER TABLE {table} ADD PRIMARY KEY ({key})")
    query(postgres_url, "INSERT INTO enrollment_counts VALUES ('c', 'active', 2), ('c', 'finished', 5)")
    query(postgres_url, "INSERT INTO result_days VALUES ('c', '2026-01-02', 1, 'sent', 7)")
    query(
        postgres_url,
        "INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, state, created_at)"
        " VALUES (1, 'c', 'p@x.example', 'm@x.example', 'a', 'a', '{}', 'active', 0),"
        " (2, 'c', 'q@x.example', 'm@x.example', 'a', 'a', '{}', 'active', 0)",
    )
    query(postgres_url, "UPDATE cadenced_schema SET version = 19")
    store = Store.open(postgres_url)
    try:
        assert store.server()[1] == SCHEMA_VERSION
        assert store.enrollment_counts() == {"c": {"active": 2, "finished": 5}}
        store.fence("node-a", 60.0)  # a daemon's connection: its transactions' changes on rows of its own
        with store.transaction():
            store.finish_enrollment(1, 1_767_312_000.0)
        with store.transaction():
            store.conn.run("UPDATE enrollments SET state = 'stopped', ended_at = 1767312000 WHERE id = 2")
        assert store.enrollment_counts() == {"c": {"finished": 6, "stopped": 1}}  # two active ones ended
    finally:
        store.close()
    rows = query(postgres_url, "SELECT state, node, n FROM enrollment_counts WHERE n <> 0 ORDER BY 1, 2")
    assert rows == [
        ("active", "", 2),
        ("active", "node-a", -2),
        ("finished", "", 5),
        ("finished", "node-a", 1),
        ("stopped", "node-a", 1),
    ]
    days = query(postgres_url, "SELECT day, kind, node, n FROM result_days ORDER BY 1, 2")
    assert days == [
        ("2026-01-02", "finished", "node-a", 1),
        ("2026-01-02", "sent", "", 7),
        ("2026-01-02", "stopped", "node-a", 1),
    ]
    plain = Store.open(postgres_url)
    try:
        assert plain.enrollment_counts() == {"c": {"finished": 6, "stopped": 1}}
    finally:
        plain.close()


def test_a_schema_10_database_is_brought_to_this_schema(project: Project, postgres_url: str) -> None:
    """Schema 11 changed only how SQLite keeps its counts: a PostgreSQL database made at 10 is marked 11 and
    keeps its counting triggers."""
    store = Store.open(postgres_url)
    store.close()
    query(postgres_url, "UPDATE cadenced_schema SET version = 10")
    store = Store.open(postgres_url)
    try:
        assert store.conn.execute("SELECT version FROM cadenced_schema").fetchone()[0] == SCHEMA_VERSION == 21
    finally:
        store.close()
    indexes = {r[0] for r in query(postgres_url, "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")}
    assert {"messages_due_follow_ups", "messages_uncertain"} <= indexes  # 13 and 15 made on the way
    triggers = query(postgres_url, "SELECT DISTINCT trigger_name FROM information_schema.triggers ORDER BY 1")
    assert ("message_recounted",) in triggers and ("enrollment_recounted",) in triggers
    query(postgres_url, "UPDATE cadenced_schema SET version = 9")
    with pytest.raises(StoreError, match="schema 9: this cadenced cannot upgrade it"):
        Store.open(postgres_url)


COUNTING = ("message_recounted", "enrollment_recounted", "result_sent", "result_ended", "result_rolled_up")


def test_a_schema_20_database_gets_counting_triggers_that_stand_aside(postgres_url: str) -> None:
    """Schema 21: the counting triggers do not fire on the group commit's session (its statements count); a
    database of 20, whose triggers always fired, has them made again, and still counts on other sessions."""
    Store.open(postgres_url).close()
    tables = dict(
        query(postgres_url, "SELECT DISTINCT trigger_name, event_object_table FROM information_schema.triggers")
    )
    for name in COUNTING:  # as schema 20 made them: no condition on the session (each calls its namesake)
        query(postgres_url, f"DROP TRIGGER {name} ON {tables[name]}")
        query(
            postgres_url, f"CREATE TRIGGER {name} AFTER UPDATE ON {tables[name]} FOR EACH ROW EXECUTE FUNCTION {name}()"
        )
    query(postgres_url, "UPDATE cadenced_schema SET version = 20")
    Store.open(postgres_url).close()
    definitions = dict(
        query(postgres_url, "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")
    )
    for name in COUNTING:
        assert "cadenced.counting" in definitions[name], name
    assert query(postgres_url, "SELECT version FROM cadenced_schema") == [(SCHEMA_VERSION,)]


def test_one_daemon_per_node_name(project: Project, postgres_url: str) -> None:
    """Daemons share a database under their own node names; a second one under a name already running (from
    any machine) is refused and says who runs, and the name is free again once that process is gone."""
    project.database = project.data["daemon"]["database"] = postgres_url
    project.data["defaults"]["gap"] = "0s"
    project.data["daemon"]["node"] = "n1"
    server = SmtpServer().start()
    try:
        project.add_mailboxes(1, smtp=server.smtp_config())
        project.add_cadence()
        project.enroll(project.people(3))
        first = DaemonProcess(project.config_path)
        try:
            first.wait_event("daemon.started")
            server.recorder.wait_for(3)
            second = DaemonProcess(project.config_path)
            assert second.wait(within=20) == 1
            assert any(f"(pid {first.proc.pid} on " in line and "as node 'n1'" in line for line in second.lines), (
                second.lines
            )
        finally:
            first.signal(signal.SIGTERM)
            assert first.wait() == 0
        assert query(project.database, "SELECT state, count(*) FROM messages GROUP BY state") == [("sent", 3)]
        # Released with the process: a new daemon starts at once.
        again = DaemonProcess(project.config_path)
        again.wait_event("daemon.started")
        again.signal(signal.SIGTERM)
        assert again.wait() == 0
    finally:
        server.stop()


def test_migrate_copies_an_sqlite_database_and_the_daemon_goes_on_there(
    project: Project, postgres_url: str, with_password: str
) -> None:
    server = SmtpServer().start()
    try:
        project.data["defaults"]["gap"] = "0s"
        project.add_mailboxes(2, smtp=server.smtp_config())
        cadence = project.add_cadence(steps=2)
        cadence["steps"][1]["wait"] = "1s"
        assert project.enroll(project.people(6)).code == 0
        assert project.run("suppress", "gone@prospects.example").code == 0
        first = DaemonProcess(project.write())
        try:
            server.recorder.wait_for(6)  # step 1 of each; their follow-ups are scheduled
            # Offline only: the running daemon holds the file.
            busy = project.run("migrate", "--to", postgres_url)
            assert busy.code == 1 and "already runs" in busy.err
        finally:
            first.signal(signal.SIGTERM)
            assert first.wait() == 0
        before = project.run("status", "--json").json()
        outbox = project.run("outbox", "--all", "--json").json()
        key = query(project.database, "SELECT value FROM daemon_state WHERE key = 'unsubscribe_key'")
        os.environ["CADENCED_TEST_DB_URL"] = with_password
        try:
            moved = project.run("migrate", "--to", "$CADENCED_TEST_DB_URL", "--json")
        finally:
            del os.environ["CADENCED_TEST_DB_URL"]
        assert moved.code == 0, moved.err
        report = moved.json()
        assert report["tables"]["enrollments"] == 6 and report["tables"]["messages"] == 12
        assert report["tables"]["suppressions"] == 1 and SECRET not in moved.out
        again = project.run("migrate", "--to", postgres_url)
        assert again.code == 2 and "is not empty" in again.err

        project.database = project.data["daemon"]["database"] = postgres_url
        after = project.run("status", "--json").json()
        assert after["cadences"] == before["cadences"]
        assert [(m["address"], m["sent_today"], m["scheduled"]) for m in after["mailboxes"]] == [
            (m["address"], m["sent_today"], m["scheduled"]) for m in before["mailboxes"]
        ]
        assert project.run("outbox", "--all", "--json").json() == outbox
        assert query(postgres_url, "SELECT value FROM daemon_state WHERE key = 'unsubscribe_key'") == key
        # The daemon goes on on PostgreSQL: the follow-ups leave, in the same threads, and new ids follow on.
        second = DaemonProcess(project.write())
        try:
            later = server.recorder.wait_for(12)[6:]
            assert {d.recipient for d in later} == {f"p{i}@prospects.example" for i in range(6)}
            assert all(d["In-Reply-To"] for d in later)
        finally:
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
        assert project.enroll(project.people(1, start=6, name="more.csv")).json()["enrolled"] == 1
        assert query(postgres_url, "SELECT max(id) FROM messages") == [(13,)]
    finally:
        server.stop()


def test_a_refusal_ends_the_start_and_a_server_that_does_not_answer_is_waited_for(
    project: Project, postgres_url: str
) -> None:
    """A database that does not exist is a configuration error: `run` exits 2 at once, saying so. A port where
    nothing listens may be a server restarting: the daemon waits (store.error), it does not exit."""
    from tests.servers import free_port

    project.add_mailboxes(1)
    project.add_cadence()
    parts = urlsplit(postgres_url)
    project.data["daemon"]["database"] = urlunsplit(parts._replace(path="/no_such_database"))
    refused = DaemonProcess(project.write())
    try:
        assert refused.wait(30) == 2
    finally:
        refused.kill()
    assert any('database "no_such_database" does not exist' in line for line in refused.lines)
    project.data["daemon"]["database"] = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    waiting = DaemonProcess(project.write())
    try:
        event = waiting.wait_event("store.error", within=30)
        assert "waiting for the database" in event["action"] and waiting.proc.poll() is None
        waiting.signal(signal.SIGTERM)
        waiting.wait(30)
    finally:
        waiting.kill()
