"""How an import reads a file: its lines in blocks, the quick check of an everyday row, the staging."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from daemon.config import load_config, plainly_valid
from daemon.enroll import Importer, Report, decoded_lines
from daemon.errors import UsageError
from daemon.store import Store
from tests.conftest import Project


def line_at_a_time(path: Path, binary: io.BytesIO, max_line: int) -> Iterator[str]:
    """The obvious reading the block reader must equal: one line, one decode, one check."""
    number = 0
    while raw := binary.readline(max_line + 1):
        number += 1
        if len(raw) > max_line:
            raise UsageError(f"{path}:{number}: a line longer than {max_line} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}:{number}: not UTF-8 text (save the file as UTF-8 CSV)") from None
        yield text.removeprefix("\ufeff") if number == 1 else text


def outcome(lines: Iterator[str]) -> tuple[str, list[str] | str]:
    try:
        return "lines", list(lines)
    except UsageError as exc:
        return "refused", str(exc)


PIECES = [b"a", b",", b'"', b"\n", b"\r", b"\r\n", b"\xc3\xa9", b"\xff", b"\xef\xbb\xbf", b"\xe2\x80\xa8", b"x" * 9]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(1, 24), st.integers(8, 40))
@example([b"x" * 9, b"x" * 9, b"\n", b"a"], 4, 18)  # a line longer than a read, then one at the limit
@example([b"a", b"\n", b"\xc3\xa9", b"\xff", b"\n"], 3, 40)  # an invalid byte after a split character
def test_lines_read_in_blocks_are_those_read_one_at_a_time(pieces: list[bytes], read: int, most: int) -> None:
    """Lines, line numbers of an invalid byte or an over-long line, the BOM: as reading a line at a time."""
    data = b"".join(pieces)
    path = Path("people.csv")
    expected = outcome(line_at_a_time(path, io.BytesIO(data), most))
    if expected == ("lines", [""]):
        expected = ("lines", [])  # a file that is only a BOM is empty (it used to be a header with no columns)
    assert outcome(decoded_lines(path, io.BytesIO(data), read, most)) == expected


@pytest.fixture
def importer(project: Project) -> Iterator[Importer]:
    project.add_mailboxes(2)
    cadence = project.add_cadence(users=["alice", "bob"], fields=["title"])
    body = "Hi {{ first_name | default('there') }} at {{ title }}"
    cadence["steps"] = [{"subject": "For {{ company }}", "body": body}]
    project.write()
    config = load_config(project.config_path)
    store = Store.open(config.daemon.database)
    try:
        yield Importer(store, config, "c1", "alice")
    finally:
        store.close()


HEADERS = [
    ["email", "first_name", "company", "title"],
    ["title", "owner", "email", "company", "100% sure"],  # a % in a column name, an owner column
    ["email", "company"],  # a required field with no column: every row is checked the long way
]
VALUE = st.one_of(
    st.sampled_from(["", " ", "Ann", " Acme Ltd ", "bob", "carol", "alice", 'say "hi"', "a\\b", "ünï", "%s", "CTO"]),
    st.sampled_from(["p@x.example", "P.Q@Sub.X.Example", " r@x.example ", "no-at", "a@b", "x@localhost", "a@xn--z.io"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(HEADERS),
    st.lists(st.lists(VALUE, min_size=1, max_size=6), max_size=12),
)
def test_the_quick_check_stages_what_the_full_check_would(
    importer: Importer, header: list[str], rows: list[list[str]]
) -> None:
    """Every row staged by the quick check is staged byte for byte as the full check stages it; every other
    row gets the full check's verdict (the same rejection, or the same staged row)."""
    # Every other row is made as wide as the header (the quick check's case), the rest left as drawn.
    numbered = [
        (i + 2, values + values[:1] * (len(header) - len(values)) if i % 2 else values) for i, values in enumerate(rows)
    ]
    expected_report = Report()
    expected = [r for line, values in numbered if (r := importer._validate(line, header, values, expected_report))]
    report = Report()
    importer.store.start_import()
    with importer.store.staging():
        importer._stage(header, numbered, report)
    staged = importer.store.conn.execute("SELECT line, email, owner, fields FROM temp.import_rows ORDER BY line")
    assert staged.fetchall() == expected
    assert report.rejected == expected_report.rejected
    for _, _, _, fields in expected:
        assert not {"owner", "email"} & set(json.loads(fields))  # each in its own column


def test_staging_holds_no_lock_on_the_database(importer: Importer, project: Project) -> None:
    """While a file is staged (Python reading rows, the scratch table written in one transaction), another
    process commits and a checkpoint empties the whole WAL: nothing of the real database is held."""
    header = ["email", "first_name", "company", "title"]
    other = sqlite3.connect(project.database, isolation_level=None, timeout=0)
    seen: list[tuple[int, int, int]] = []

    def rows() -> Iterator[tuple[int, list[str]]]:
        for i in range(12_000):
            if i == 11_000:  # after two batches were staged
                other.execute("BEGIN IMMEDIATE")
                other.execute("INSERT INTO suppressions VALUES ('late@x.example', 'operator', 0, NULL)")
                other.execute("COMMIT")
                seen.append(other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            yield i + 2, [f"p{i}@x.example", "Ann", "Acme", "CTO"]

    report = importer.enroll_rows("people.csv:1", header, rows(), 1.0)
    other.close()
    assert report.enrolled == 12_000
    assert seen == [(0, 0, 0)]  # not busy; every frame of the WAL copied back and the WAL emptied


def test_the_address_shortcut_takes_everyday_addresses_and_keeps_its_memory_bounded() -> None:
    from daemon import config

    assert plainly_valid("Person.Name+tag@Sales.Prospect-Co.example")
    assert not plainly_valid("a@b")  # no TLD: email-validator's to judge (it refuses)
    assert not plainly_valid("x@test")  # a special-use domain
    assert not plainly_valid("x@xn--a.example")  # Punycode
    for i in range(config._DOMAINS_KEPT + 10):
        assert plainly_valid(f"p@d{i}.example")
    assert len(config._DOMAIN_VERDICTS) <= config._DOMAINS_KEPT
