"""How an import reads a file: its lines in blocks, the quick check of an everyday row, the staging."""

from __future__ import annotations

import csv
import io
import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from daemon.config import load_config, plainly_valid
from daemon.enroll import (
    MAX_FIELD,
    NOT_UTF8,
    Importer,
    Plain,
    Rejection,
    Report,
    _csv_problem,
    decoded_lines,
    header_names,
    plain_lines,
    read_csv,
    sniff_delimiter,
)
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
            raise UsageError(f"{path}:{number}: {NOT_UTF8}") from None
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


def csv_module_rows(path: Path, data: bytes, read: int, most: int) -> tuple[str, object]:
    """The obvious reading that read_csv's Plain runs must equal: the csv module given every line, its errors
    worded and placed as read_csv words and places them."""
    source = decoded_lines(path, io.BytesIO(data), read, most)
    try:
        try:
            first = next(source)
            sep = sniff_delimiter(path, first.partition("\n")[0])
            reader = csv.reader(itertools.chain([first], source), strict=True, delimiter=sep)
            header = header_names(path, next(reader), sep=sep).names
        except StopIteration:
            return "refused", f"{path}: empty file (a header row with an email column is required)"
        except csv.Error as exc:
            return "refused", f"{path}:1: {_csv_problem(exc)}"
        rows, line = [], reader.line_num + 1
        try:
            for values in reader:
                rows.append((line, values))
                line = reader.line_num + 1
        except csv.Error as exc:
            return "refused", f"{path}:{line}: {_csv_problem(exc)}"
    except UsageError as exc:
        return "refused", str(exc)
    return "rows", (header, rows)


def read_csv_rows(path: Path, data: bytes, read: int, most: int) -> tuple[str, object]:
    """read_csv's rows, a Plain run's lines split at commas as _stage splits them (a blank line gives [''] there,
    where the csv module gives []: both are no prospect to _validate)."""
    try:
        header, items = read_csv(path, io.BytesIO(data), read, most)
        rows = []
        for item in items:
            if isinstance(item, Plain):
                rows.extend(
                    (line, text.split(item.sep) if text else []) for line, text in enumerate(item.lines, item.first)
                )
            else:
                rows.append(item)
    except UsageError as exc:
        return "refused", str(exc)
    return "rows", (header.names, rows)


CSV_PIECES = [
    *(b"a", b"B ", b" ", b",", b",,", b'"', b'""', b"\n", b"\r\n", b"\r", b"\t", b"\\", b"\x00", b"\x1f", b"\x7f"),
    *(b"\xc3\xa9", b"\xc2\x85", b"\xe2\x80\xa8", b"\xc2\xa0", b"\xff", b"x" * 9, b"p@x.example"),
]


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from([b"email,name\n", b'"email","Name"\r\n', b"\xef\xbb\xbfemail\n", b"name\n", b""]),
    st.lists(st.sampled_from(CSV_PIECES), max_size=40),
    st.integers(1, 24),
    st.integers(8, 40),
)
@example(b"email,name\n", [b"a", b",", b"B ", b"\n", b"x" * 9, b"\r\n", b"\n", b"a"], 4, 40)  # plain, CR LF, blank
@example(b"email,name\n", [b"a", b"\n", b'"', b"\n", b'"', b",", b"a", b"\n", b"a"], 3, 40)  # a quoted line end
@example(b"email,name\n", [b"a", b"\n", b'"', b"a", b"\n"], 4, 40)  # a quote never closed
@example(b"name\n", [b"\xff", b"\n"], 3, 8)  # the header's problem (line 1) before a bad byte on line 2
def test_plain_runs_read_as_the_csv_module_reads_every_line(
    header: bytes, pieces: list[bytes], read: int, most: int
) -> None:
    """Rows, their lines, and the file's refusal (a quote never closed, NUL, a CR alone): as the csv module."""
    data = header + b"".join(pieces)
    path = Path("people.csv")
    # A file starting like UTF-16 without a byte-order mark is refused before it is read (test_crm_exports).
    assume(not (len(data) >= 4 and b"\0\0" in (data[1:4:2], data[0:4:2])))
    assert read_csv_rows(path, data, read, most) == csv_module_rows(path, data, read, most)


def test_a_plain_file_comes_in_plain_runs_and_the_rest_line_by_line() -> None:
    plain = b"email,name\r\n" + b"".join(b"p%d@x.example,Ann %d\r\n" % (i, i) for i in range(100))
    header, items = read_csv(Path("p.csv"), io.BytesIO(plain), 256, 256)
    runs = list(items)
    assert header.names == ["email", "name"]
    assert all(isinstance(r, Plain) for r in runs) and len(runs) == 9  # a run per block of 256 bytes
    lines = [line for r in runs if isinstance(r, Plain) for line in range(r.first, r.first + len(r.lines))]
    assert lines == list(range(2, 102))
    quoted = list(read_csv(Path("p.csv"), io.BytesIO(plain.replace(b"Ann 50", b'"Ann, 50"')), 256, 256)[1])
    assert (52, ["p50@x.example", "Ann, 50"]) in quoted  # its block read by the csv module, a row at a time
    assert sum(isinstance(r, Plain) for r in quoted) == 8  # that block only


@pytest.mark.parametrize("c", ['"', "\\", "\t", "\r", "\x00", "\x1f", "\x7f", "\x85", "\u2028", "\u2029"])
def test_a_line_with_what_csv_json_or_the_control_check_treat_specially_is_not_plain(c: str) -> None:
    assert plain_lines(f"p@x.example,Ann\np@x.example,A{c}n\n", 2) is None
    assert plain_lines(f"p@x.example,A{c}n", 2) is None


def test_a_line_of_everyday_text_is_plain_and_cr_lf_ends_it() -> None:
    run = plain_lines("p@x.example, Ann\xa0é ,\r\n\r\nq@x.example,Bo", 7)
    assert run == Plain(7, ["p@x.example, Ann\xa0é ,", "", "q@x.example,Bo"])


def test_a_field_too_long_for_the_csv_module_is_refused_in_a_plain_block_too() -> None:
    data = b"email,name\np@x.example," + b"n" * (MAX_FIELD + 1) + b"\n"
    got = read_csv_rows(Path("p.csv"), data, 1024 * 1024, 4 * 1024 * 1024)
    assert got == ("refused", f"p.csv:2: a field longer than {MAX_FIELD} characters (an unterminated quote?)")


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


def staged_by(
    importer: Importer, header: list[str], rows: list[tuple[int, list[str]] | Plain]
) -> tuple[list[tuple[int, str, str, str]], list[Rejection]]:
    """What _stage puts in the scratch table, in line order, and the rows it rejects."""
    report = Report()
    importer.store.start_import()
    with importer.store.staging():
        importer._stage(header, rows, report)
    staged = importer.store.conn.execute("SELECT line, email, owner, fields FROM temp.import_rows ORDER BY line")
    return staged.fetchall(), report.rejected


@example(
    HEADERS[0],
    [
        ["p@x.example", "a\\b", "Acme", "C\tTO"],
        ["q@x.example", "x\x1fy", "Acme", "CTO"],
        ["r@x.example", "Ann", "Acme", "CTO"],
        ["s@x.example", "Ann", " Acme Ltd ", "CTO"],
        ["t@x.example", "", "Acme", "CTO"],
    ],
)  # a backslash and a tab JSON escapes, a control character refused, an everyday row, one to strip, one with a gap
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
    assert staged_by(importer, header, numbered) == (expected, expected_report.rejected)
    # The same rows as a reader gives them from a plain block of the file, where it can: each its own line.
    runs: list[tuple[int, list[str]] | Plain] = []
    for line, values in numbered:
        text = ",".join(values)
        run = plain_lines(text + "\n", line)
        if run is not None and run.lines == [text] and text.split(",") == values:  # one line, as written
            runs.append(run)
        else:
            runs.append((line, values))
    assert staged_by(importer, header, runs) == (expected, expected_report.rejected)
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
    from daemon.config import load as config

    assert plainly_valid("Person.Name+tag@Sales.Prospect-Co.example")
    assert not plainly_valid("a@b")  # no TLD: email-validator's to judge (it refuses)
    assert not plainly_valid("x@test")  # a special-use domain
    assert not plainly_valid("x@xn--a.example")  # Punycode
    for i in range(config._DOMAINS_KEPT + 10):
        assert plainly_valid(f"p@d{i}.example")
    assert len(config._DOMAIN_VERDICTS) <= config._DOMAINS_KEPT


def test_an_import_enrolls_with_foreign_keys_unchecked_and_checks_them_again_after(importer: Importer) -> None:
    """Its messages name its enrollments (foreign_key_check finds nothing); the check is on again after it,
    whether it committed or was rolled back."""
    header = ["email", "first_name", "company", "title"]
    conn = importer.store.conn
    seen: list[int] = []

    def fail(report: Report) -> None:
        seen.append(conn.execute("PRAGMA foreign_keys").fetchone()[0])
        raise RuntimeError("the request's answer could not be kept")

    with pytest.raises(RuntimeError):
        importer.enroll_rows("people.csv:1", header, [(2, ["p@x.example", "Ann", "Acme", "CTO"])], 1.0, within=fail)
    assert seen == [0]
    assert conn.execute("SELECT count(*) FROM enrollments").fetchone()[0] == 0
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    rows = [(i + 2, [f"p{i}@x.example", "Ann", "Acme", "CTO"]) for i in range(50)]
    assert importer.enroll_rows("people.csv:1", header, rows, 1.0).enrolled == 50
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 50
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.sampled_from(["utf-16", "utf-32", "cp1252"]))
def test_a_file_in_another_encoding_reads_as_its_utf8_twin(read: int, encoding: str) -> None:
    """Decoded as read, in reads that end inside a character: the same header and rows as the UTF-8 file."""
    from daemon.enroll import Dialect

    text = 'email;first_name;note\r\np@x.example;Jörg;"a; b"\r\nq@x.example;Zoë;Café\r\n'
    given_encoding = None if encoding.startswith("utf") else encoding
    other = read_csv_rows_in(Path("o.csv"), text.encode(encoding), read, Dialect(encoding=given_encoding))
    assert other == read_csv_rows_in(Path("o.csv"), text.encode("utf-8"), read, Dialect())


def read_csv_rows_in(path: Path, data: bytes, read: int, dialect: object) -> tuple[object, object]:
    header, items = read_csv(path, io.BytesIO(data), read, 64, dialect)  # type: ignore[arg-type]
    rows = []
    for item in items:
        if isinstance(item, Plain):
            rows.extend(text.split(item.sep) for text in item.lines)
        else:
            rows.append(item[1])
    return header.names, rows
