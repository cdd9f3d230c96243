"""`cadenced enroll`: rows validated one by one, rotation, pinning, the read side."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.daemon_helpers import query

pytestmark = pytest.mark.both_stores


def senders(project: Project, cadence: str = "c1") -> Counter[str]:
    result = project.run("outbox", "--cadence", cadence, "--all", "--json")
    assert result.code == 0, result.err
    return Counter(m["mailbox"] for m in result.json()["messages"])


def test_ten_over_two_and_three(project: Project) -> None:
    two = project.add_mailboxes(2)
    project.add_cadence("two", mailboxes=two, users=[])
    three = project.add_mailboxes(3, owner="bob")
    project.add_cadence("three", users=["bob"])
    r = project.enroll(project.people(10), cadence="two")
    assert r.code == 0, r.err
    assert r.json()["assignments"] == {two[0]: 5, two[1]: 5}
    r = project.enroll(project.people(10), cadence="three", adder="bob")  # bob's import: bob's mailboxes
    assert sorted(r.json()["assignments"].values(), reverse=True) == [4, 3, 3]
    assert r.json()["assignments"][three[0]] == 4  # ties go to the first in the file
    assert senders(project, "three") == Counter({three[0]: 4, three[1]: 3, three[2]: 3})


def test_batches_keep_the_balance(project: Project) -> None:
    boxes = project.add_mailboxes(3)
    project.add_cadence()
    project.enroll(project.people(4))
    project.enroll(project.people(5, start=4, name="more.csv"))
    assert sorted(senders(project).values()) == [3, 3, 3]
    assert set(senders(project)) == set(boxes)


def test_bad_rows_are_rejected_alone(project: Project) -> None:
    project.add_mailboxes(2)
    project.add_cadence()
    project.write()
    first = project.enroll(project.csv(["old@prospects.example,Old,Co"], name="first.csv"))
    assert first.json()["enrolled"] == 1
    csv_text = (
        "email,first_name,company,owner\n"  # line 1
        "good1@prospects.example,A,Co,\n"  # 2
        "not-an-address,B,Co,\n"  # 3
        '"evil@prospects.example",C,"Co\r\nBcc: x@y.example",\n'  # 4-5: the subject reads company
        "carl@prospects.example,C,Co,zed\n"  # 6
        "GOOD1@prospects.example,A,Co,\n"  # 7
        "old@prospects.example,Old,Co,\n"  # 8
        "good2@prospects.example,D,Co,bob\n"  # 9
        "short@prospects.example,E\n"  # 10
        "\n"  # 11: blank, ignored
        "good3@prospects.example,F,Co,alice\n"  # 12
    )
    r = project.enroll(project.csv(csv_text))
    assert r.code == 0, r.err
    report = r.json()
    assert report["enrolled"] == 3
    assert report["skipped"] == 1
    assert [(x["line"], x["reason"]) for x in report["rejected"]] == [
        (3, "not a valid email address: An email address must have an @-sign."),
        (4, "a line break in field 'company' (a subject uses it)"),
        (6, "unknown owner 'zed'"),
        (7, "duplicate of line 2"),
        (10, "expected 4 fields, got 2"),
    ]
    emails = {m["prospect"] for m in project.run("outbox", "--all", "--json").json()["messages"]}
    assert emails == {
        "old@prospects.example",
        "good1@prospects.example",
        "good2@prospects.example",
        "good3@prospects.example",
    }


def test_a_field_ending_in_a_control_character_is_refused_by_name(project: Project) -> None:
    """U+001F at a field's end is stripped with the spaces, but the row is still refused, and named (it
    once ended the import with an internal error: the check looked for it in the stripped field)."""
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    rows = ["p@prospects.example,Ann\x1f,Co", "q@prospects.example,Bo,Co\x1c ", "r@prospects.example,Cy,Co"]
    r = project.enroll(project.csv(rows))
    assert r.code == 0, r.err
    assert r.json()["enrolled"] == 1
    assert [(x["line"], x["reason"]) for x in r.json()["rejected"]] == [
        (2, "a control character in field 'first_name'"),
        (3, "a control character in field 'company'"),
    ]


def test_suppressed_addresses_are_rejected(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    path = project.people(3)
    project.run("status")  # creates the database
    query(
        project.database,
        "INSERT INTO suppressions (email, reason, created_at) VALUES ('p1@prospects.example', 'bounced 550 5.1.1', 0)",
    )
    r = project.enroll(path).json()
    assert r["enrolled"] == 2
    assert r["rejected"] == [
        {"line": 3, "email": "p1@prospects.example", "reason": "address is suppressed (bounced 550 5.1.1)"}
    ]


def test_unusable_files_change_nothing(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    project.enroll(project.people(2))
    before = project.run("outbox", "--all", "--json").out
    (project.root / "latin1.csv").write_bytes(
        b"email,first_name\nok@prospects.example,Ann\nj@prospects.example,J\xf6rg\n"
    )
    r = project.enroll(project.root / "latin1.csv")
    assert r.code == 2 and "latin1.csv:3: not UTF-8" in r.err
    r = project.enroll(project.csv("p@prospects.example,Pat\nq@prospects.example,Q\n", name="nohead.csv"))
    assert r.code == 2 and "nohead.csv:1: no email column" in r.err
    r = project.enroll(project.csv("", name="empty.csv"))
    assert r.code == 2 and "empty file" in r.err
    r = project.enroll(project.root / "missing.csv")
    assert r.code == 2 and "missing.csv: cannot read" in r.err
    r = project.run("enroll", "--cadence", "nope", "--as", "alice", str(project.people(1)))
    assert r.code == 2 and "unknown cadence 'nope'" in r.err
    r = project.run("enroll", "--cadence", "c1", "--as", "zed", str(project.people(1)))
    assert r.code == 2 and "unknown user 'zed'" in r.err
    assert project.run("outbox", "--all", "--json").out == before


def test_unavailable_mailboxes_take_no_new_enrollments(project: Project) -> None:
    a, b, c = project.add_mailboxes(3)
    project.data["mailboxes"][2]["paused"] = True
    project.add_cadence()
    project.write()
    project.run("status")
    query(project.database, "INSERT INTO mailbox_health (mailbox, state, since) VALUES (?, 'disconnected', 0)", a)
    r = project.enroll(project.people(4)).json()
    assert r["assignments"] == {b: 4}
    status = {m["address"]: m for m in project.run("status", "--json").json()["mailboxes"]}
    assert (status[a]["state"], status[b]["state"], status[c]["state"]) == ("disconnected", "connected", "paused")
    assert status[a]["waiting_for"] == "reconnect"


def test_rotate_among_owner_and_adder(project: Project) -> None:
    a1, a2 = project.add_mailboxes(2, owner="alice")
    (b1,) = project.add_mailboxes(1, owner="bob")
    project.add_cadence("own", users=["alice", "bob"], rotate_among="owner")
    project.add_cadence("add", users=["alice", "bob"], rotate_among="adder")
    project.write()
    rows = [f"a{i}@prospects.example,alice" for i in range(4)] + [f"b{i}@prospects.example,bob" for i in range(3)]
    path = project.csv(rows, header="email,owner")
    assert project.enroll(path, cadence="own").json()["assignments"] == {a1: 2, a2: 2, b1: 3}
    r = project.enroll(path, cadence="add", adder="bob").json()
    assert r["assignments"] == {b1: 7}
    project.data["users"].append({"name": "carol"})
    r = project.enroll(path, cadence="add", adder="carol").json()
    assert r["enrolled"] == 0 and r["skipped"] == 7
    r = project.enroll(project.people(1), cadence="add", adder="carol").json()
    assert r["rejected"][0]["reason"] == "adder 'carol' has no mailbox in this cadence's pool"


def test_without_auto_rotate(project: Project) -> None:
    a1, a2 = project.add_mailboxes(2)
    (b1,) = project.add_mailboxes(1, owner="bob")
    project.add_cadence("fixed", users=["alice", "bob"], auto_rotate=False, sender=a2)
    project.add_cadence("first", users=["alice", "bob"], auto_rotate=False)
    step_sender = project.add_cadence("stepped", users=["alice", "bob"], auto_rotate=False, steps=2)
    step_sender["steps"][0]["sender"] = b1
    project.write()
    assert project.enroll(project.people(3), cadence="fixed").json()["assignments"] == {a2: 3}
    assert project.enroll(project.people(3), cadence="first", adder="bob").json()["assignments"] == {b1: 3}
    assert project.enroll(project.people(3), cadence="first", adder="alice").json()["skipped"] == 3
    assert project.enroll(project.people(2, start=5), cadence="first").json()["assignments"] == {a1: 2}
    assert project.enroll(project.people(2), cadence="stepped").json()["assignments"] == {b1: 2}


def test_rotation_rules_are_pinned(project: Project) -> None:
    project.add_mailboxes(2)
    cadence = project.add_cadence(auto_rotate=False)
    project.add_cadence("other")
    assert project.run("check").code == 0  # nothing enrolled: free to change
    project.enroll(project.people(3))
    cadence["auto_rotate"] = True
    result = project.run("check")
    assert result.code == 2
    assert 'cadences."c1": auto_rotate was false, the config says true: fixed by 3 enrollments' in result.err
    r = project.enroll(project.people(2, start=10))
    assert r.code == 1 and "fixed by 3 enrollments" in r.err
    r = project.enroll(project.people(2, start=10), cadence="other")
    assert r.code == 0  # another cadence is not held back
    cadence["auto_rotate"] = False
    project.data["cadences"][1]["rotate_among"] = "owner"
    result = project.run("check")
    assert (
        result.code == 2 and "rotate_among was 'adder', the config says 'owner': fixed by 2 enrollments" in result.err
    )


def test_a_cadence_pinned_under_the_old_default_still_cannot_turn_auto_rotate_off(project: Project) -> None:
    """Enrolled under rotate_among = "cadence"; the file then drops rotate_among (the legacy default keeps it) and
    sets auto_rotate = false: refused by check, enroll and a reload alike, as any other change of the rule."""
    project.add_mailboxes(2)
    cadence = project.add_cadence(rotate_among="cadence")
    project.enroll(project.people(3))
    del cadence["rotate_among"]
    assert project.run("check").code == 0  # the old default is kept: nothing changed
    cadence["auto_rotate"] = False
    result = project.run("check")
    assert result.code == 2
    assert 'cadences."c1": auto_rotate was true, the config says false: fixed by 3 enrollments' in result.err
    r = project.enroll(project.people(2, start=10))
    assert r.code == 1 and "fixed by 3 enrollments" in r.err


def test_templates_need_their_columns(project: Project) -> None:
    project.add_mailboxes(1)
    cadence = project.add_cadence(fields=["title"])
    cadence["steps"][0]["body"] = "Dear {{ title }} {{ last_name | default('') }}"
    project.write()
    r = project.enroll(project.people(2))
    assert r.code == 2 and "step 1 body cannot be filled from this file's columns" in r.err
    path = project.csv(["a@prospects.example,CTO", "b@prospects.example,"], header="email,title")
    r = project.enroll(path).json()
    assert r["enrolled"] == 1
    assert r["rejected"][0]["line"] == 3 and "'title' is undefined" in r["rejected"][0]["reason"]


def test_status_and_outbox_shapes(project: Project) -> None:
    boxes = project.add_mailboxes(2)
    project.add_cadence(steps=2)
    project.enroll(project.people(3))
    status = project.run("status", "--json").json()
    assert {"mailboxes", "cadences"} <= set(status)
    for m in status["mailboxes"]:
        assert {
            "address",
            "state",
            "sent_today",
            "daily_limit",
            "next_send_at",
            "waiting_for",
            "scheduled",
            "error",
        } <= set(m)
    assert [m["scheduled"] for m in status["mailboxes"]] == [2, 1]
    assert status["cadences"][0]["enrollments"]["active"] == 3
    messages = project.run("outbox", "--state", "scheduled", "--mailbox", boxes[0], "--all", "--json").json()[
        "messages"
    ]
    assert len(messages) == 2
    keys = {
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
    }
    assert all(keys <= set(m) for m in messages)
    assert {m["step"] for m in messages} == {1}
    text = project.run("status")
    assert text.code == 0 and boxes[0] in text.out
    assert project.run("outbox", "--state", "sent").out.strip() == "no messages"


def test_database_problems(project: Project) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    if isinstance(project.database, str):  # PostgreSQL: a newer schema, and another program's database
        assert project.run("status").code == 0
        query(project.database, "UPDATE cadenced_schema SET version = 99")
        r = project.run("status")
        assert r.code == 2 and "schema 99 is newer than this cadenced knows" in r.err
        query(project.database, "DROP SCHEMA public CASCADE")
        query(project.database, "CREATE SCHEMA public")
        query(project.database, "CREATE TABLE other (x INTEGER)")
        r = project.enroll(project.people(1))
        assert r.code == 2 and "another program" in r.err
        return
    db = project.database
    db.write_bytes(b"this is not sqlite at all" * 100)
    r = project.run("status")
    assert r.code == 2 and "not a cadenced database" in r.err
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    r = project.run("status")
    assert r.code == 2 and "schema 99 is newer than this cadenced knows" in r.err
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE other (x)")
    r = project.enroll(project.people(1))
    assert r.code == 2 and "another program" in r.err


def test_readers_and_writers_in_separate_processes(project: Project) -> None:
    project.add_mailboxes(3)
    project.add_cadence()
    project.write()
    paths = [project.people(2000, start=i * 2000, name=f"part{i}.csv") for i in range(3)]
    cmd = [sys.executable, "-m", "daemon", "--config", str(project.config_path)]
    procs = [subprocess.Popen([*cmd, "enroll", "--cadence", "c1", "--as", "alice", str(p)]) for p in paths]
    readers = [subprocess.run([*cmd, "status", "--json"], capture_output=True, check=False) for _ in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    assert all(r.returncode == 0 for r in readers), [r.stderr for r in readers]
    counts = senders(project)
    assert sum(counts.values()) == 6000
    assert max(counts.values()) - min(counts.values()) <= 1


def test_entry_point_runs(project: Project, tmp_path: Path) -> None:
    project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    exe = str(Path(sys.executable).parent / "cadenced")
    r = subprocess.run([exe, "--config", str(project.config_path), "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_an_import_places_each_row_as_one_at_a_time_placement_would(project: Project) -> None:
    """Rows are placed in bulk (SQL numbers each group's rows): the mailbox of every row, the ids in file
    order and the cursor left for the next import are those of placing the rows one by one, with owners
    interleaved, a group with no mailbox, duplicates, invalid and already enrolled rows in between."""
    from daemon import rotation

    alice = project.add_mailboxes(3)
    bob = project.add_mailboxes(2, owner="bob")
    project.data["users"].append({"name": "carol"})
    project.add_cadence("own", users=["alice", "bob", "carol"], rotate_among="owner")
    project.add_cadence("all", users=["alice", "bob", "carol"], rotate_among="cadence")
    project.write()
    owners = ["alice", "bob", "bob", "carol", "alice", "alice", "bob", "alice"]
    rows = [f"p{i}@x.example,{owners[i % len(owners)]}" for i in range(40)]
    rows[7] = "not an address,alice"
    rows[12] = rows[3]  # a duplicate
    members = [rotation.PoolMember(a, "alice", True) for a in alice] + [
        rotation.PoolMember(b, "bob", True) for b in bob
    ]
    for cadence, among in (("own", "owner"), ("all", "cadence")):
        rotator = rotation.Rotator(rotation.Rules(True, among, "", ""), members)
        expected: list[tuple[str, str]] = []
        for start, count in ((0, 25), (20, 20)):  # the second import repeats five rows (skipped)
            path = project.csv(rows[start : start + count], name=f"{cadence}{start}.csv", header="email,owner")
            report = project.enroll(path, cadence=cadence).json()
            seen = {e for e, _ in expected}
            for row in rows[start : start + count]:
                email, owner = row.split(",")
                if "@" not in email or email in seen:
                    continue
                seen.add(email)
                try:
                    expected.append((email, rotator.place(owner, "alice")))
                except rotation.Placement:
                    assert any(r["email"] == email for r in report["rejected"])
        got = query(
            project.database,
            "SELECT email, mailbox FROM enrollments WHERE cadence = ? ORDER BY id",
            cadence,
        )
        assert got == expected, cadence
    ids = [r[0] for r in query(project.database, "SELECT id FROM enrollments ORDER BY id")]
    assert ids == list(range(1, len(ids) + 1))


def test_the_address_is_stored_once_and_reaches_the_templates(project: Project) -> None:
    """The address is kept in its own column, not again among the fields (a sixth of an enrollment's bytes); a
    claim hands it to the templates, for these rows and for rows an earlier release stored with it inside."""
    from daemon.config import load_config
    from daemon.store import Store

    (mailbox,) = project.add_mailboxes(1)
    project.add_cadence()
    project.write()
    r = project.enroll(project.csv(["Ann@Prospects.Example,Ann,Acme"]))
    assert r.code == 0, r.err
    assert query(project.database, "SELECT email, fields FROM enrollments") == [
        ("ann@prospects.example", '{"first_name":"Ann","company":"Acme"}')
    ]
    query(
        project.database,
        """INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, created_at)
           VALUES (100, 'c1', 'old@prospects.example', ?, 'alice', 'alice', ?, 0)""",
        mailbox,
        '{"email":"old@prospects.example","first_name":"Old","company":"Co"}',
    )
    query(
        project.database,
        "INSERT INTO messages (enrollment_id, step, mailbox, state, due_at) VALUES (100, 1, ?, 'scheduled', 1e9)",
        mailbox,
    )
    store = Store.open(load_config(project.config_path).daemon.database)
    try:
        claimed = [store.claim(mailbox, 2e9, lambda i, a: f"<{i}.{a}@x.example>") for _ in range(2)]
    finally:
        store.close()
    assert [c.fields if c else None for c in claimed] == [
        {"email": "old@prospects.example", "first_name": "Old", "company": "Co"},
        {"email": "ann@prospects.example", "first_name": "Ann", "company": "Acme"},
    ]


def test_enroll_tells_when_the_last_first_email_goes(project: Project) -> None:
    """10,000 prospects on two mailboxes at 50 a day: their last first emails go on the 100th sending day, and
    `plan` says the same; a paused mailbox's backlog is not told a date."""
    from datetime import UTC, datetime, timedelta

    project.data["defaults"]["gap"] = "1s"
    project.data["defaults"]["daily_limit"] = 50
    project.add_mailboxes(2)
    project.add_cadence()
    result = project.enroll(project.people(10_000))
    assert result.code == 0
    by = result.json()["first_emails_by"]
    hundredth = (datetime.now(UTC).date() + timedelta(days=99)).isoformat()
    assert by == {"mb1@alice.example": hundredth, "mb2@alice.example": hundredth}
    planned = project.run("plan", "--days", "120", "--json").json()
    last = {row["mailbox"]: row["date"] for row in planned["days"] if row["new"]}
    assert last == by and planned["past_horizon"] == []
    short = project.run("plan", "--days", "10", "--json").json()  # the backlog outlasts it: its cadence is named
    assert {r["mailbox"]: r["new"] for r in short["past_horizon"] if r["cadence"] == "c1"} == {
        m: 5000 - sum(r["new"] for r in short["days"] if r["mailbox"] == m) for m in by
    }
    text = project.run("plan", "--days", "10").out
    assert "cadence 'c1' on mb1@alice.example: " in text and "its backlog runs past this plan" in text
    project.data["mailboxes"][1]["paused"] = True
    text = project.run("enroll", "--cadence", "c1", "--as", "alice", str(project.people(1, 10_000, "one.csv"))).out
    assert "mb1@alice.example: 1 (first emails by " in text  # the one new prospect went to the running mailbox
    from daemon import readside
    from daemon.config import load_config
    from daemon.store import Store

    config = load_config(project.write())
    store = Store.open(config.daemon.database)
    try:  # the paused mailbox's 5,000 wait for it to resume: no date is told
        assert readside.first_emails_by(config, store, time.time(), ["mb2@alice.example"]) == {
            "mb2@alice.example": None
        }
    finally:
        store.close()
