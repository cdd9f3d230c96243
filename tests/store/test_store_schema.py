"""The store's statements and schemas: every named statement loads and prepares, the two engines' schemas
agree, and a database of the first release migrates to the schema a new one gets."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.store import SCHEMA_VERSION, Store
from daemon.store.engine import compose, load, read_blocks, sources
from daemon.store.sqlite import MIGRATIONS, statements

# Heads the store completes with conditions (outbox): a partial index is usable only with its state.
COMPLETED = {"outbox_scheduled": " WHERE m.state = 'scheduled'", "outbox_by_state": " WHERE m.state = 'error'"}
PG_ONLY_TABLES = {"cadenced_schema", "daemons", "leases"}  # SQLite: PRAGMA user_version, one daemon
PG_ONLY_COLUMNS = {"enrollment_counts": "node", "result_days": "node"}  # counted per daemon, last (SQLite: one)


def test_a_statement_named_twice_or_empty_is_refused() -> None:
    with pytest.raises(ValueError, match=r"x\.sql: the statement 'a' is named twice"):
        read_blocks("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n", "x.sql")
    with pytest.raises(ValueError, match=r"x\.sql: the statement 'b' is empty"):
        read_blocks("-- name: b\n\n-- name: c\nSELECT 1;\n", "x.sql")
    blocks = read_blocks("-- name: a\nSELECT 1;\n\n-- what comes next\n-- name: b\nSELECT ?;\n", "x.sql")
    assert blocks == {"a": "SELECT 1", "b": "SELECT ?"}


def test_a_composed_statement_runs_its_parts_side_by_side_with_their_parameters_in_turn() -> None:
    written = {"a": "SELECT 1 FROM t WHERE x = ? AND y = ? FOR KEY SHARE", "b": "SELECT ?2, ?1", "c": "SELECT ?, ?1"}
    assert compose("ab", ["a", "b"], written) == (
        "WITH q0 AS (SELECT 1 FROM t WHERE x = ?1 AND y = ?2 FOR KEY SHARE), q1 AS (SELECT ?4, ?3)"
        " SELECT q0.*, q1.* FROM (SELECT 1) AS one LEFT JOIN q0 ON true LEFT JOIN q1 ON true"
    )
    with pytest.raises(ValueError, match="ab: composes 'z', which is not a statement"):
        compose("ab", ["a", "z"], written)
    with pytest.raises(ValueError, match="ac: 'c' has numbered and unnumbered placeholders"):
        compose("ac", ["a", "c"], written)


def test_each_engine_has_every_statement_the_store_runs_in_its_own_placeholders() -> None:
    lite, pg = load("sqlite"), load("postgres")
    # SQLite's group commit counts a cadence's ends and results per day by hand, on rows without a node
    assert lite.names - pg.names == {"uncount_active", "count_finished", "count_result_day"}
    assert {n for n in pg.names - lite.names if n.startswith("ask_")} == {
        "ask_lease_snapshot",  # a turn's reads, composed of the statements of these names (see compose)
        "ask_lease_snapshot_next_due",
        "ask_lease_snapshot_next_due_follow_up",
        "ask_lease_snapshot_next_due_follow_ups_first",
        "ask_lease_snapshot_next_due_new_first",
    }
    assert {n for n in pg.names - lite.names if not n.startswith(("lease", "server_now", "ask_"))} == {
        "daemon_seen",
        "forget_daemons",
        "live_daemons",
        "let_go",
        "renew_leases",
        "free_mailboxes",
        "take_lease",
        "orphaned_to_uncertain",
        "holds_lease",
        "lock_taken",
        "schedule_step_counted",
        "mark_sent_counted",
        "claim_counted",
        "release_leases",
        "release_daemon",
        "daemons",
    }
    for name in pg.names:
        text = getattr(pg, name)
        assert "?" not in text and "json_each" not in text and "INDEXED BY" not in text, name
        assert text.numbered == bool(re.search(r"%\(p\d+\)s", text)), name
    assert "LIKE 'deferred: paused (%%'" in pg.forget_pause_details
    assert "LIKE 'deferred: paused (%'" in lite.forget_pause_details
    for name in lite.names:
        assert "pg_temp" not in getattr(lite, name) and "greatest(" not in getattr(lite, name), name


def test_every_sqlite_statement_prepares_on_a_new_database(tmp_path: Path) -> None:
    """A statement with a typo, or naming a column no schema has, fails here, not at its first use."""
    store = Store.open(tmp_path / "s.db")
    store.start_import()
    for create in ("create_import_cycles", "create_import_turns", "create_import_cycle"):
        store.conn.execute(getattr(store.q, create))
    conn: sqlite3.Connection = store.conn.conn  # type: ignore[attr-defined]
    for name, sql in sources("sqlite").items():
        if name.startswith("create_"):
            continue  # made above: a CREATE of what exists does not prepare
        sql += COMPLETED.get(name, "")
        numbered = [int(n) for n in re.findall(r"\?(\d+)", sql)]
        count = max(numbered) if numbered else sql.count("?")
        try:
            conn.execute(f"EXPLAIN {sql}", [None] * count)
        except sqlite3.Error as exc:  # an unknown table or column, a typo
            raise AssertionError(f"{name}: {exc}") from None
    store.close()


def _fresh_sqlite(path: Path) -> dict[str, Any]:
    store = Store.open(path)
    try:
        return store.conn.describe()
    finally:
        store.close()


def test_a_first_release_database_migrates_to_the_schema_of_a_new_one(tmp_path: Path) -> None:
    """Schema 1, then every migration: the same tables, columns (in order, NULL or not) and indexes as a new
    database made from schema/sqlite.sql."""
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        for statement in statements(MIGRATIONS[1]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
    migrated = Store.open(old)
    assert migrated.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    got = migrated.conn.describe()
    migrated.close()
    fresh = _fresh_sqlite(tmp_path / "new.db")
    assert got == fresh
    assert list(fresh["tables"]["messages"])[-3:] == ["uncertain_at", "held_due", "variant"]  # migrations 2, 17, 18


def test_the_two_engines_schemas_agree(tmp_path: Path, postgres_url: str) -> None:
    """The same tables, columns in the same order (statements insert without naming them), the same columns
    NOT NULL, the same indexes on the same columns: but for PostgreSQL's own tables."""
    lite = _fresh_sqlite(tmp_path / "s.db")
    store = Store.open(postgres_url)
    try:
        pg = store.conn.describe()
    finally:
        store.close()
    assert set(pg["tables"]) - set(lite["tables"]) == PG_ONLY_TABLES
    assert set(lite["tables"]) <= set(pg["tables"])
    for table, columns in lite["tables"].items():
        theirs = list(pg["tables"][table].items())
        if table in PG_ONLY_COLUMNS:
            assert theirs[-1] == (PG_ONLY_COLUMNS[table], True), table
            theirs = theirs[:-1]
        assert list(columns.items()) == theirs, table
    assert lite["indexes"] == pg["indexes"]


def test_a_schema_10_postgresql_database_keeps_the_schema_of_a_new_one(postgres_url: str) -> None:
    store = Store.open(postgres_url)
    fresh = store.conn.describe()
    store.conn.execute("UPDATE cadenced_schema SET version = 10")
    store.close()
    store = Store.open(postgres_url)
    try:
        assert store.server()[1] == SCHEMA_VERSION
        assert store.conn.describe() == fresh
    finally:
        store.close()
