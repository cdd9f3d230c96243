"""Variants and results (SPEC §6a, §8b): a step's variants spread evenly by weight and kept, and `report` equal to
what the SMTP server received and what the replies and DSNs in Dovecot said."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import pytest
import structlog

from daemon import api, lifecycle
from daemon.config import load_config
from daemon.model import Step, Variant
from daemon.store import Store
from tests.conftest import Project
from tests.daemon_helpers import query, running, until
from tests.imap_server import Dovecot, needs_dovecot
from tests.servers import Pki, SmtpServer
from tests.test_imap import dsn, events, mail


def _step(weights: tuple[int, ...]) -> Step:
    base = Step(1, 0.0, None, None, "", "")  # type: ignore[arg-type]
    return Step(
        1, 0.0, None, None, "", "", variants=tuple(Variant(chr(65 + i), w, base) for i, w in enumerate(weights))
    )  # type: ignore[arg-type]


def test_variants_are_even_by_weight_at_every_count_and_unrelated_to_rotation() -> None:
    step = _step((1, 1))
    names = [lifecycle.variant_of("c", step, seq)[1] for seq in range(101)]
    for n in range(1, 101):
        counts = Counter(names[:n])
        assert abs(counts["A"] - counts["B"]) <= 1, n
    assert names == [lifecycle.variant_of("c", step, seq)[1] for seq in range(101)]  # a retry: the same
    # Rotation gives even numbers to one mailbox and odd to the other: each gets both variants.
    even = Counter(names[0:100:2])
    assert 15 <= even["A"] <= 35, even
    assert [lifecycle.variant_of("c", step, s)[1] for s in range(40)] != [
        lifecycle.variant_of("d", step, s)[1] for s in range(40)
    ]
    weighted = Counter(lifecycle.variant_of("c", _step((3, 1)), seq)[1] for seq in range(400))
    assert weighted == {"A": 300, "B": 100}


def test_variants_are_checked_by_their_path(project: Project) -> None:
    project.add_mailboxes(1)
    cadence = project.add_cadence()
    cadence["steps"][0]["variants"] = [{"subject": "One"}]
    r = project.run("check")
    assert r.code == 2 and "steps[0].variants: give 2 to 26 variants, got 1" in r.err
    cadence["steps"][0]["variants"] = [{"subject": "One"}, {"name": "B!", "body": "Hi {{ nme }}"}]
    r = project.run("check")
    assert r.code == 2 and "steps[0].variants[1].name: 'B!'" in r.err
    assert "steps[0].variants[1].body: undefined variable: 'nme'" in r.err
    cadence["steps"][0]["variants"] = [{"subject": "One"}, {"name": "Two", "weight": 2}]
    assert project.run("check").code == 0


@pytest.mark.both_stores
@pytest.mark.slow
@needs_dovecot
@pytest.mark.anyio
async def test_variants_at_the_server_and_the_report_equals_what_happened(project: Project, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}).start()
    smtp = SmtpServer().start()
    try:
        (tmp_path / "imap-pw").write_text("imap-pw")
        project.data["defaults"].update({"gap": "0s", "daily_limit": 500})
        (box,) = project.add_mailboxes(
            1,
            smtp=smtp.smtp_config(),
            imap=dovecot.imap_config("alice", tmp_path / "imap-pw", pki.ca_file, poll="60s"),
        )
        cadence = project.add_cadence(steps=2)
        cadence["steps"][0]["variants"] = [
            {"subject": "Quick question, {{ company }}"},
            {"name": "bold", "subject": "An idea for {{ company }}", "body": "Hello {{ first_name }}, variant two"},
        ]
        cadence["steps"][1]["wait"] = "6s"
        assert project.enroll(project.people(100)).code == 0
        with structlog.testing.capture_logs() as logs:
            async with running(project.config_path):
                await until(lambda: events(logs, "imap.watching"), what="the watcher")
                firsts = await anyio.to_thread.run_sync(smtp.recorder.wait_for, 100)
                variant = {d.recipient: "A" if d["Subject"].startswith("Quick") else "bold" for d in firsts}
                assert Counter(variant.values()) in ({"A": 50, "bold": 50},)
                mid = {d.recipient: d["Message-ID"] for d in firsts}
                repliers = [f"p{i}@prospects.example" for i in range(10)]
                for p in repliers:
                    dovecot.deliver("alice", mail(p, box, "Re: hi", in_reply_to=mid[p]))
                bounced = ["p20@prospects.example", "p21@prospects.example"]
                for p in bounced:
                    dovecot.deliver("alice", dsn(box, mid[p], p))
                active = "SELECT count(*) FROM enrollments WHERE state = 'active'"
                await until(
                    lambda: query(project.database, active)[0][0] == 0, what="every enrollment ended", within=60
                )
        got = smtp.recorder.deliveries
        seconds = [d for d in got if d["In-Reply-To"]]
        # Under load a reply or DSN may be read after the prospect's follow-up left and its enrollment finished:
        # what the report must say is what the daemon concluded, on the step the prospect last received.
        states = dict(query(project.database, "SELECT email, state FROM enrollments"))  # type: ignore[arg-type]
        repliers = [p for p in repliers if states[p] == "replied"]
        bounced = [p for p in bounced if states[p] == "bounced"]
        assert len(repliers) + len(bounced) >= 1
        ended_early = set(repliers) | set(bounced)
        # Under load a reply may be read after its follow-up left: it then counts on step 2 (its last email).
        assert len(seconds) == 100 - sum(
            1 for d in firsts if d.recipient in ended_early and not any(s.recipient == d.recipient for s in seconds)
        )
        for d in seconds:  # a follow-up says Re: its own thread's variant
            first = next(f for f in firsts if f.recipient == d.recipient)
            assert d["Subject"] == f"Re: {first['Subject']}"
        last_step = {d.recipient: (2 if d["In-Reply-To"] else 1) for d in got}
        expected: dict[tuple[int, str], Counter[str]] = {}
        for d in got:
            key = (1, variant[d.recipient]) if not d["In-Reply-To"] else (2, "-")
            expected.setdefault(key, Counter())["sent"] += 1
        for p in repliers:
            expected[(1, variant[p]) if last_step[p] == 1 else (2, "-")]["replied"] += 1
        for p in bounced:
            expected[(1, variant[p]) if last_step[p] == 1 else (2, "-")]["bounced"] += 1
        shown = project.run("report", "--by", "variant", "--json")
        assert shown.code == 0, shown.err
        document = shown.json()
        [c1] = document["cadences"]
        rows = {(r["step"], r["variant"]): r for r in c1["rows"]}
        assert set(rows) == set(expected)
        for key, counts in expected.items():
            assert (rows[key]["sent"], rows[key]["replied"], rows[key]["bounced"]) == (
                counts["sent"],
                counts["replied"],
                counts["bounced"],
            ), key
        totals = c1["totals"]
        assert (totals["enrolled"], totals["contacted"], totals["sent"]) == (100, 100, len(got))
        finished = sum(1 for d in seconds if d.recipient not in ended_early)
        assert (totals["replied"], totals["bounced"], totals["finished"]) == (len(repliers), len(bounced), finished)
        assert totals["reply_rate"] == round(len(repliers) / 100, 4)
        stored = query(project.database, "SELECT variant, count(*) FROM messages WHERE step = 1 GROUP BY variant")
        assert dict(stored) == {"A": 50, "bold": 50}  # type: ignore[arg-type]
        store = Store.open(project.database)
        try:  # /metrics: the same counts, configured names only
            family = api.cadence_messages(load_config(project.config_path), store.results_of_messages())
        finally:
            store.close()
        metric = {tuple(s.labels.values()): s.value for s in family.samples}
        for (step, name), counts in expected.items():
            assert metric[("c1", str(step), name, "sent")] == counts["sent"]
        assert sum(v for k, v in metric.items() if k[3] == "replied") == len(repliers)
        shown_p0 = project.run("prospect", "show", "p50@prospects.example", "--json").json()
        [first_sent] = [m for e in shown_p0["enrollments"] for m in e["messages"] if m["step"] == 1]
        assert first_sent["variant"] == variant["p50@prospects.example"]
        listed = project.run("outbox", "--state", "sent", "--prospect", "p50@prospects.example", "--json").json()
        assert variant["p50@prospects.example"] in {m["variant"] for m in listed["messages"]}
        # The rollups the triggers keep equal the results they roll up, and --since the first day reads them.
        for rollup, grouped in (
            ("result_totals", "cadence, step, variant, mailbox, kind"),
            ("result_days", "cadence, day, step, kind"),
        ):
            kept = query(  # on PostgreSQL result_days is kept per node too (the daemon's, and '' for commands)
                project.database, f"SELECT {grouped}, sum(n) FROM {rollup} GROUP BY {grouped} HAVING sum(n) <> 0"
            )
            summed = query(
                project.database, f"SELECT {grouped}, sum(n) FROM results GROUP BY {grouped} HAVING sum(n) <> 0"
            )
            assert sorted(map(tuple, kept)) == sorted(map(tuple, summed)), rollup
        since = project.run("report", "--by", "variant", "--json", "--since", "2000-01-01").json()
        assert since["cadences"][0]["rows"] == c1["rows"] and since["cadences"][0]["totals"] == totals
        text = project.run("report", "--by", "step").out
        assert "cadence c1" in text and "total" in text
        assert project.run("report", "--cadence", "nope").code == 1
    finally:
        smtp.stop()
        dovecot.cleanup()


def test_a_database_from_before_counts_its_past_results_once(tmp_path: Path) -> None:
    """Migrations 18 and 19 on SQLite: what was sent, ended and marked before results were kept is counted once,
    in the results and in their rollups (all time, and per day from --since)."""
    import sqlite3

    db = tmp_path / "old.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        for table in ("results", "result_totals", "result_days", "web_sessions"):  # what 18 and 19 made
            conn.execute(f"DROP TABLE {table}")
        conn.execute("ALTER TABLE messages DROP COLUMN variant")
        conn.execute("ALTER TABLE enrollments DROP COLUMN seq")
        day = 1_700_000_000.0  # 2023-11-14 UTC
        for i, (state, outcome) in enumerate([("replied", "interested"), ("finished", None), ("active", None)]):
            conn.execute(
                "INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, state, created_at,"
                " ended_at, outcome) VALUES (?, 'c', ?, 'm@x.example', 'a', 'a', '{}', ?, ?, ?, ?)",
                (i + 1, f"p{i}@x.example", state, day, None if state == "active" else day + 60, outcome),
            )
            conn.execute(
                "INSERT INTO messages (enrollment_id, step, mailbox, state, due_at, sent_at)"
                " VALUES (?, 1, 'm@x.example', 'sent', ?, ?)",
                (i + 1, day, day + 1),
            )
        conn.execute("PRAGMA user_version = 17")
    store = Store.open(db)
    try:
        got = {(r[1], r[2], r[4]) for r in store.results("step", "c", "")}
        since = {(r[1], r[2], r[4]) for r in store.results("step", "c", "2023-11-14")}
        by_variant = {(r[1], r[3], r[5]) for r in store.results("variant", "c", "2023-11-14")}
        total = {(r[1], r[2]): r[3] for r in store.results("", "c", "")}
        later = store.results("", "c", "2023-11-15")
        # An end taken back (an unsuppress makes the enrollment active again) is taken back in every rollup.
        store.conn.run("UPDATE enrollments SET state = 'active', ended_at = NULL WHERE id = 2")
        again = {(r[1], r[2], r[4]) for r in store.results("step", "c", "")}
        again_since = {(r[1], r[2], r[4]) for r in store.results("step", "c", "2023-11-14")}
    finally:
        store.close()
    assert got == {(1, "replied", 1), (1, "finished", 1), (1, "sent", 3), (1, "outcome:interested", 1)}
    assert since == got == by_variant
    assert total[("enrolled", 0)] == 3 and total[("sent", 1)] == 3 and later == []
    assert again == again_since == got - {(1, "finished", 1)} | {(1, "finished", 0)}


def test_a_schema_18_database_loses_its_permanent_result_triggers(tmp_path: Path) -> None:
    """Schema 18 counted results by permanent triggers; 19 counts by TEMP ones (by hand on the group commit): an
    upgraded file must keep none of the old, or each send would count twice; its rollups start from its results."""
    import sqlite3

    db = tmp_path / "v18.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        for table in ("result_totals", "result_days", "web_sessions"):
            conn.execute(f"DROP TABLE {table}")
        for name, table in (("result_sent", "messages"), ("result_ended", "enrollments")):
            conn.execute(
                f"CREATE TRIGGER {name} AFTER UPDATE OF state ON {table} BEGIN "
                "INSERT INTO results VALUES ('x', '2020-01-01', 9, '', 'x', 'wrong', 1); END"
            )
        conn.execute("INSERT INTO results VALUES ('c', '2026-01-02', 1, 'A', 'm@x.example', 'sent', 5)")
        conn.execute("INSERT INTO results VALUES ('c', '2026-01-03', 1, 'A', 'm@x.example', 'sent', 2)")
        conn.execute("PRAGMA user_version = 18")
    store = Store.open(db)
    try:
        store.conn.run(
            "INSERT INTO enrollments (id, cadence, email, mailbox, owner, adder, fields, state, created_at)"
            " VALUES (1, 'c', 'p@x.example', 'm@x.example', 'a', 'a', '{}', 'active', 0)"
        )
        store.conn.run("UPDATE enrollments SET state = 'stopped', ended_at = 1767312000 WHERE id = 1")
        totals = {(r[1], r[2]): r[3] for r in store.results("", "c", "")}
        by_day = {(r[1], r[2]): r[4] for r in store.results("day", "c", "")}
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        kept = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'result%'").fetchall()
        wrong = conn.execute("SELECT count(*) FROM results WHERE kind = 'wrong'").fetchone()[0]
    assert kept == [] and wrong == 0
    assert totals == {("sent", 1): 7, ("stopped", 0): 1}
    assert by_day == {("2026-01-02", "sent"): 5, ("2026-01-03", "sent"): 2, ("2026-01-02", "stopped"): 1}
