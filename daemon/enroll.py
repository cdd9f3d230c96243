"""CSV import: validate each row on its own, place it, store it in batches."""

from __future__ import annotations

import codecs
import csv
import errno
import io
import itertools
import json
import operator
import os
import re
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from daemon import compose, headers, lifecycle, rotation, timing
from daemon.config import address_problem, plainly_valid
from daemon.errors import Refused, UsageError
from daemon.headers import HeaderMap
from daemon.model import Cadence, Config, Mailbox
from daemon.store import Pin, Store

BATCH = 5000
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":")).encode
_quote = json.encoder.encode_basestring  # a string as _encode writes it (ensure_ascii=False)


@dataclass(slots=True)
class Rejection:
    line: int
    email: str
    reason: str
    field: str = ""  # the field at fault, when one is: the API names it
    kind: str = "row"  # "row" (the row itself is bad), "duplicate", "suppressed", "placement"

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "email": self.email, "reason": self.reason}


@dataclass(slots=True)
class Report:
    enrolled: int = 0
    skipped: int = 0
    rejected: list[Rejection] = field(default_factory=list)  # the first MAX_REJECTIONS_LISTED
    rejected_total: int = 0
    assignments: dict[str, int] = field(default_factory=dict)

    def reject(self, rejection: Rejection) -> None:
        self.rejected_total += 1
        if len(self.rejected) < MAX_REJECTIONS_LISTED:
            self.rejected.append(rejection)

    @property
    def failed(self) -> bool:
        """Rows were given and none could be enrolled: the import as a whole did not work."""
        return self.enrolled == 0 and self.rejected_total > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "enrolled": self.enrolled,
            "skipped": self.skipped,
            "rejected": [r.as_dict() for r in self.rejected],
            "rejected_total": self.rejected_total,
            "assignments": dict(self.assignments),
        }


class Rejected(Exception):
    """A strict import refused as a whole: nothing was enrolled; the report says which rows and why."""

    def __init__(self, report: Report) -> None:
        super().__init__(f"{report.rejected_total} prospect(s) refused")
        report.rejected.sort(key=lambda r: r.line)
        self.report = report


class _DryRun(Exception):
    """Ends a dry run's enrolling transaction: rolled back, as any exception rolls it back."""


Staged = tuple[int, str, str, str]  # a valid row as staged: line, address (lower case), owner, other fields as JSON


LEGACY_DEFAULT = "cadence"  # rotate_among's default before the seed's "adder" became it


def rotate_among(cadence: Cadence, pins: dict[str, Pin]) -> str:
    """The rule in force: a cadence pinned under the old default keeps it while the file does not say."""
    pin = pins.get(cadence.name)
    if pin is not None and pin.enrollments and not cadence.rotate_among_set and pin.rotate_among == LEGACY_DEFAULT:
        return LEGACY_DEFAULT
    return cadence.rotate_among


def pin_warnings(config: Config, pins: dict[str, Pin]) -> list[str]:
    """Cadences that keep the old default because their enrollments were made under it."""
    return [
        f'cadences."{c.name}".rotate_among: not set; kept at "{LEGACY_DEFAULT}" (the default when its '
        f'{pins[c.name].enrollments} enrollments were made; the default is now "adder"): '
        f'write rotate_among = "{LEGACY_DEFAULT}" to say so'
        for c in config.cadences
        if rotate_among(c, pins) != c.rotate_among
    ]


def pin_problems(config: Config, pins: dict[str, Pin]) -> list[str]:
    """SPEC §3: a config may not change auto_rotate/rotate_among of a cadence in use."""
    problems = []
    for cadence in config.cadences:
        pin = pins.get(cadence.name)
        if pin is None or pin.enrollments == 0:
            continue
        # Judged by the rule in force, which for a cadence pinned under the old default is that default: the
        # legacy case keeps rotate_among, never the right to change auto_rotate.
        among = rotate_among(cadence, pins)
        changes = []
        if pin.auto_rotate != cadence.auto_rotate:
            changes.append(
                f"auto_rotate was {str(pin.auto_rotate).lower()}, the config says {str(cadence.auto_rotate).lower()}"
            )
        if pin.auto_rotate and cadence.auto_rotate and pin.rotate_among != among:
            changes.append(f"rotate_among was {pin.rotate_among!r}, the config says {among!r}")
        if changes:
            problems.append(
                f'cadences."{cadence.name}": {"; ".join(changes)}: fixed by {pin.enrollments} '
                f"enrollment{'s' if pin.enrollments != 1 else ''} made under the old rule "
                "(start a new cadence to change it)"
            )
    return problems


MAX_FIELD = 128 * 1024  # characters in one CSV field
MAX_COLUMNS = 200  # columns of a CSV file (as fields of an API request): a CRM export has a few dozen
MAX_REJECTIONS_LISTED = 10_000  # a report lists this many rejected rows; the count says how many in all
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")  # what may not reach a header
_LINE_BREAK = re.compile(r"[\r\n\x85\u2028\u2029]")  # kept in a field no subject reads (a note, a body's text)
_NOT_LINE_BREAK = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # refused in every field
_CR = re.compile(r"\r\n?")
csv.field_size_limit(MAX_FIELD)
MAX_LINE_BYTES = 4 * 1024 * 1024
READ_BYTES = 1024 * 1024  # read and decoded this much at a time (a line at a time cost a microsecond a row)


@dataclass(frozen=True, slots=True)
class Plain:
    """Whole lines of a file in which the csv module would find nothing special: no quote, no control character
    (a line may end in CR LF), no line longer than a field may be. Each is a row split at its commas, exactly as
    the csv module reads it, and no field of them needs escaping in JSON (no backslash or tab either)."""

    first: int  # the line number of lines[0]
    lines: list[str]  # without their line ends
    sep: str = ","  # the delimiter the lines are split at


Rows = Iterable["tuple[int, list[str]] | Plain"]  # (line, fields) as the csv module read them, or plain lines
# What may be in a plain line, byte by byte: neither a quote (the csv module's), a backslash (JSON's), nor an ASCII
# control character (JSON's and _CONTROL's; a CR before an LF ends the line). Beyond ASCII, _CONTROL's three.
_PLAIN_BYTES = bytes(b for b in range(256) if b == 0x0A or (0x20 <= b < 0x7F and b not in b'"\\') or b >= 0x80)
_PLAIN_BYTES_TAB = _PLAIN_BYTES + b"\t"  # in a tab-separated file a tab is the delimiter: no field holds one
_NOT_PLAIN_BEYOND_ASCII = tuple(c.encode() for c in "\x85\u2028\u2029")


def plain_lines(text: str, first: int, raw: bytes | None = None, sep: str = ",") -> Plain | None:
    """The lines of `text` (whole lines, numbered from `first`; `raw`: its UTF-8) as a Plain run split at `sep`,
    or None when any is not plain. Judged on the bytes: a tenth of the time of a regular expression over the text."""
    raw = text.encode() if raw is None else raw
    if left := raw.translate(None, _PLAIN_BYTES_TAB if sep == "\t" else _PLAIN_BYTES):
        if left != b"\r" * len(left) or len(left) != raw.count(b"\r\n"):
            return None  # a CR alone is the csv module's to judge (it refuses one outside quotes)
        text = text.replace("\r\n", "\n")
    if not raw.isascii() and any(c in raw for c in _NOT_PLAIN_BEYOND_ASCII):
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the end of the last line, not a line
    if len(text) > MAX_FIELD and max(map(len, lines)) > MAX_FIELD:
        return None  # the csv module refuses a field this long: let it say so
    return Plain(first, lines, sep)


class _Lines:
    """The file's lines for the csv module, a block at a time; `number` counts the lines given out so far."""

    def __init__(self, blocks: Iterator[tuple[bytes, str]]) -> None:
        self.blocks = blocks
        self.pending: deque[str] = deque()
        self.number = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if not self.pending:
            self.pending.extend(io.StringIO(next(self.blocks)[1], newline="\n"))
        self.number += 1
        return self.pending.popleft()


@dataclass(frozen=True, slots=True)
class Dialect:
    """How a file is read: its delimiter (None: found from the header row), its encoding (None: UTF-8, or UTF-16 or
    UTF-32 by a byte-order mark), its columns named to fields beyond the usual names (`--map`: column → field,
    '' to leave it out)."""

    delimiter: str | None = None
    encoding: str | None = None
    mapping: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.delimiter is not None and self.delimiter not in DELIMITERS:
            raise UsageError(f"--delimiter {self.delimiter!r}: one of ',' ';' or tab (written '\\t' or 'tab')")
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise UsageError(f"--encoding {self.encoding!r}: not an encoding Python knows (cp1252…)") from None


DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}


def delimiter_of(name: str) -> str:
    """`--delimiter`'s value: ',' ';' or a tab ('\\t', 'tab')."""
    return "\t" if name.lower() in ("\\t", "tab", "\t") else name


def read_csv(
    path: Path,
    stream: BinaryIO,
    read_bytes: int = READ_BYTES,
    max_line: int = MAX_LINE_BYTES,
    dialect: Dialect = Dialect(),
    wanted: Iterable[str] = (),
) -> tuple[HeaderMap, Iterator[tuple[int, list[str]] | Plain]]:
    """The header read into fields (`wanted`: the names the cadence's templates use) and the rows, read as a
    stream; UsageError names the line.

    A block of the file in which the csv module would find nothing special comes as one Plain run of lines,
    which _stage splits at the delimiter and checks with less to look at (reading and checking a row: 2.9 µs,
    against 5.8 µs through the csv module); any other row comes as (line, fields), read by the csv module.
    """
    blocks = decoded_blocks(path, as_utf8(path, stream, dialect.encoding), read_bytes, max_line)
    first = next(blocks, None)
    if first is None:
        raise UsageError(f"{path}: empty file (a header row with an email column is required)")
    sep = dialect.delimiter or sniff_delimiter(path, first[1].partition("\n")[0])
    blocks = itertools.chain([first], blocks)
    lines = _Lines(blocks)
    reader = csv.reader(lines, strict=True, delimiter=sep)
    try:
        header = next(reader)
    except StopIteration:
        raise UsageError(f"{path}: empty file (a header row with an email column is required)") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}:1: {_csv_problem(exc)}") from None
    names = header_names(path, header, dict(dialect.mapping), wanted, sep)

    def rows() -> Iterator[tuple[int, list[str]] | Plain]:
        pending = lines.pending
        judge = True  # what is left of the first block after the header has not been looked at
        while True:
            if pending and judge:
                judge = False
                run = plain_lines("".join(pending), lines.number + 1, sep=sep)
                if run is not None:
                    pending.clear()
                    lines.number += len(run.lines)
                    yield run
                    continue
            if pending:  # lines of a block that is not plain, or the rest of one a quoted field ran into
                at = lines.number + 1
                try:
                    values = next(reader, None)
                except (csv.Error, UnicodeDecodeError) as exc:
                    raise UsageError(f"{path}:{at}: {_csv_problem(exc)}") from None
                if values is None:
                    return
                yield at, values
                continue
            block = next(blocks, None)
            if block is None:
                return
            run = plain_lines(block[1], lines.number + 1, block[0], sep)
            if run is None:
                pending.extend(io.StringIO(block[1], newline="\n"))
                continue
            lines.number += len(run.lines)
            yield run

    return names, rows()


_QUOTED = re.compile(r'"[^"]*"')


def sniff_delimiter(path: Path, line: str) -> str:
    """The delimiter of a file, from its header row: the one of ',' ';' and tab found most outside quotes (a
    single column: ','); UsageError when two are found as often."""
    bare = _QUOTED.sub("", line)
    counts = {d: bare.count(d) for d in DELIMITERS}
    most = max(counts.values())
    found = [d for d, n in counts.items() if n == most]
    if most and len(found) > 1:
        told = ", ".join(f"{counts[d]} {DELIMITERS[d]}s" for d in found)
        raise UsageError(f"{path}:1: cannot tell the delimiter from the header row ({told}): give --delimiter")
    return found[0] if most else ","


def header_names(
    path: Path, header: list[str], mapping: dict[str, str] | None = None, wanted: Iterable[str] = (), sep: str = ","
) -> HeaderMap:
    """The columns' fields (headers.read_header), or UsageError naming the file: no email column, two columns
    on one field, more columns than MAX_COLUMNS."""
    if len(header) > MAX_COLUMNS:
        raise UsageError(f"{path}:1: {len(header)} columns in the header row; at most {MAX_COLUMNS}")
    try:
        return headers.read_header(header, mapping or {}, wanted)
    except headers.HeaderProblem as exc:
        hint = ""
        others = [name for d, name in DELIMITERS.items() if d != sep and any(d in h for h in header)]
        if others and len(header) == 1:
            hint = f" (the header has {others[0]}s in it: give --delimiter)"
        raise UsageError(f"{path}:1: {exc}{hint}") from None


def _csv_problem(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return NOT_UTF8
    text = str(exc)
    if "field larger than field limit" in text:
        return f"a field longer than {MAX_FIELD} characters (an unterminated quote?)"
    if "unexpected end of data" in text or "EOF" in text:
        return "a quote that is never closed"
    return text


NOT_UTF8 = (
    "not UTF-8 text (read as UTF-8: the file has no byte-order mark; an Excel export on Windows is often "
    "cp1252: give --encoding cp1252, or save it as CSV UTF-8)"
)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def as_utf8(path: Path, stream: Readable, encoding: str | None) -> Readable:
    """The file as UTF-8 bytes: as it is when it is UTF-8 (a BOM is dropped by decoded_blocks), else decoded as
    its byte-order mark or `encoding` says and encoded again as it is read."""
    head = stream.read(4)
    joined = _Joined(head, stream)
    if encoding is None:
        for bom, name in _BOMS:
            if head.startswith(bom):
                return _Recoded(path, joined, name)
        if len(head) == 4 and (head[1::2] == b"\0\0" or head[0::2] == b"\0\0"):
            raise UsageError(
                f"{path}:1: UTF-16 text without a byte-order mark: give --encoding utf-16-le (or utf-16-be)"
            )
        return joined
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
        return joined
    return _Recoded(path, joined, encoding)


class _Joined:
    """A stream whose first bytes were read already: they come first."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(size)
        if size < 0:
            head, self.head = self.head, b""
            return head + self.rest.read()
        if size < len(self.head):  # no more than asked: the blocks end where they would without the look ahead
            head, self.head = self.head[:size], self.head[size:]
            return head
        head, self.head = self.head, b""
        return head + self.rest.read(size - len(head))


class _Recoded:
    """A file in another encoding read as UTF-8: decoded as it is read, a bad byte named by its line."""

    def __init__(self, path: Path, source: Readable, encoding: str) -> None:
        self.path, self.source, self.encoding = path, source, encoding
        self.decoder = codecs.getincrementaldecoder(encoding)()
        self.lines = 0  # line ends given so far

    def read(self, size: int = -1) -> bytes:
        while True:  # a chunk that ends inside a character gives nothing yet: read on
            chunk = self.source.read(size)
            state = self.decoder.getstate()
            try:
                text = self.decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                lenient = codecs.getincrementaldecoder(self.encoding)(errors="replace")
                lenient.setstate(state)
                partial = lenient.decode(chunk, final=not chunk)
                at = self.lines + partial[: partial.find("\ufffd")].count("\n") + 1
                raise UsageError(
                    f"{self.path}:{at}: not {self.encoding} text (read as {self.encoding}: give the file's --encoding)"
                ) from None
            self.lines += text.count("\n")
            if text or not chunk:
                return text.encode("utf-8")


def decoded_lines(
    path: Path, binary: Readable, read_bytes: int = READ_BYTES, max_line: int = MAX_LINE_BYTES
) -> Iterator[str]:
    """The file's lines (ended by LF only, ends kept) as text; a decoding error or an over-long line names its line."""
    for _, text in decoded_blocks(path, binary, read_bytes, max_line):
        yield from io.StringIO(text, newline="\n")


def decoded_blocks(
    path: Path, binary: Readable, read_bytes: int = READ_BYTES, max_line: int = MAX_LINE_BYTES
) -> Iterator[tuple[bytes, str]]:
    """The file in blocks of whole lines, as read and as text; a decoding error or an over-long line names its line.

    Read in blocks that end at a line's end, so a block decodes whole and its lines cost nothing apiece.
    """
    read_bytes = min(read_bytes, max_line)  # so every line of a block but its first lies within one read
    number = 0  # lines given so far
    rest = b""
    while True:
        chunk = binary.read(read_bytes)
        data = rest + chunk if rest else chunk
        if not data:
            return
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        first = data.find(b"\n") + 1 or len(data)  # the one line of a block that may be longer than a read
        if first > max_line:
            raise UsageError(f"{path}:{number + 1}: a line longer than {_size(max_line)}")
        if cut == 0:
            rest = data
            continue
        block, rest = data[:cut], data[cut:]
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = number + block.count(b"\n", 0, exc.start) + 1
            raise UsageError(f"{path}:{at}: {NOT_UTF8}") from None
        if number == 0:
            text = text.removeprefix("\ufeff")
        number += block.count(b"\n")
        if text:
            yield block, text
        if not chunk:
            return


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def open_csv(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None


class Importer:
    """Enrolls the rows of CSV files into one cadence on behalf of one adder."""

    def __init__(
        self, store: Store, config: Config, cadence_name: str, adder: str, dialect: Dialect = Dialect()
    ) -> None:
        try:
            self.cadence: Cadence = config.cadence(cadence_name)
        except KeyError:
            raise UsageError(f"unknown cadence {cadence_name!r}") from None
        if adder not in config.user_names():
            raise UsageError(f"unknown user {adder!r} (--as names a [[users]] entry)")
        self.store = store
        self.config = config
        self.adder = adder
        self.dialect = dialect
        self.required = self.cadence.required_fields()
        self.headed = self.cadence.subject_fields() | {"email", "owner"}  # fields that reach a header
        self.users = config.user_names()
        self.row_name: Callable[[int], str] = "line {}".format  # how a report names a row
        self.columns_name = "this file's columns"
        self.header: HeaderMap | None = None  # how the file's columns were read (the last run's)
        self.first_id = 0  # the id of the import's first enrollment (when it enrolled any)
        self.first_seq = 0  # its number in the cadence

    def check_pins(self) -> None:
        problems = pin_problems(self.config, self.store.pins())
        mine = [p for p in problems if p.startswith(f'cadences."{self.cadence.name}"')]
        if mine:
            raise Refused(mine[0])

    def run(
        self,
        path: Path,
        now: float,
        stream: BinaryIO | None = None,
        *,
        within: Callable[[Report], None] | None = None,
        dry_run: bool = False,
    ) -> Report:
        """Enroll a whole file, or nothing of it: one transaction, read as a stream in batches.

        A file-level problem (encoding, a quote never closed, an oversized field)
        rolls everything back; a row rejected on its own is reported with its line.
        """
        own = stream is None
        stream = open_csv(path) if stream is None else stream
        try:
            self.header, rows = read_csv(path, stream, dialect=self.dialect, wanted=self.cadence.used_fields())
            return self.enroll_rows(f"{path}:1", self.header.names, rows, now, within=within, dry_run=dry_run)
        finally:
            if own:
                stream.close()

    def unused_columns(self) -> list[str]:
        """The file's columns whose fields no template of the cadence reads (kept with the enrollment all the same)."""
        used = self.cadence.used_fields() | {"email", "owner"}
        used |= {"", headers.LEFT_OUT}
        return [column for column, field in (self.header.columns if self.header else ()) if field not in used]

    def first_email(self) -> dict[str, Any] | None:
        """In the enrolling transaction: the import's first enrollment's step 1 as it would leave (its mailbox,
        From, To, Subject and body), with a sample unsubscribe link (the real one is made at the send)."""
        found = self.store.first_message_of(self.first_id) if self.first_id else None
        if found is None:
            return None
        email, fields, address = found
        mailbox = self.config.mailbox(address)
        try:
            out, variant = lifecycle.compose_step(
                self.cadence,
                self.cadence.steps[0],
                mailbox,
                {"email": email, **fields},
                enrollment=self.first_id,
                seq=self.first_seq,
                thread=(),
                links=(f"mailto:{address}?subject=unsubscribe-(made-at-the-send)",),
                message_id="",
                date=0.0,
            )
        except compose.TemplateProblem as exc:
            return {"mailbox": address, "to": email, "problem": str(exc)}
        sender = f"{mailbox.name} <{address}>" if mailbox.name else address
        shown = {"mailbox": address, "from": sender, "to": email, "subject": out.subject, "body": out.body}
        return {**shown, "variant": variant} if variant else shown

    def enroll_rows(
        self,
        where: str,
        header: list[str],
        rows: Rows,
        now: float,
        *,
        strict: bool = False,
        within: Callable[[Report], None] | None = None,
        dry_run: bool = False,
    ) -> Report:
        """Rows (numbered for the report) enrolled in one transaction, or none of them.

        `strict` (the API): a row bad in itself, or one no mailbox can take, refuses the whole request
        (Rejected, nothing changed); duplicates, suppressed and already enrolled addresses are reported.
        `within` runs in the enrolling transaction once the report is made (an Idempotency-Key kept with it).
        `dry_run`: all of it done and the transaction rolled back after `within`: the report says what an
        import would do, and nothing of the database changed.
        """
        self.check_pins()
        self.check_columns(where, header)
        report = Report()
        # 1. Parse and validate the whole file into a scratch table, holding no lock on the database:
        #    a problem of the file as a whole stops here, having changed nothing.
        self.store.start_import()
        with self.store.staging():
            self._stage(header, rows, report)
        if strict and report.rejected_total:
            raise Rejected(report)
        for line, email, first in self.store.drop_staged_duplicates():
            report.reject(Rejection(line, email, f"duplicate of {self.row_name(first)}", "email", "duplicate"))
        # 2. Enroll what was staged in one transaction: all of the file's good rows, or none.
        try:
            with self.store.enrolling():
                self._enroll_staged(now, report)
                if strict and any(r.kind == "placement" for r in report.rejected):
                    raise Rejected(report)
                report.rejected.sort(key=lambda r: r.line)
                if within is not None:
                    within(report)
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass  # rolled back: nothing was written
        return report

    def check_columns(self, where: str, header: list[str]) -> None:
        """Refuse the file before any row when it cannot fill a template at all."""
        variables = compose.sample_variables(tuple(n for n in header if n not in ("", headers.LEFT_OUT)))
        columns = set(header)
        shown = {
            k: v
            for k, v in variables.items()
            if k in columns or k in compose.SENDER_FIELDS or k in ("unsubscribe_url", compose.SPIN_SEED)
        }
        problems = lifecycle.unfilled(self.cadence.steps, shown)
        if problems:
            step, part, exc = problems[0]
            raise UsageError(
                f"{where}: cadence {self.cadence.name!r} step {step.number} {part} cannot be filled "
                f"from {self.columns_name}: {exc}"
            ) from None

    def _stage(self, header: list[str], rows: Rows, report: Report) -> None:
        """Every row validated and the good ones staged, BATCH at a time.

        The everyday row (every field there, a plainly valid address, no control character, a known owner,
        the required fields filled) is judged here in a few microseconds; any other row goes to `_validate`,
        which gives the same verdict the long way and names what is wrong. Both stage the same JSON. The rows
        of a Plain run need neither the check for control characters nor JSON escaping.
        """
        width = len(header)
        at_email = header.index("email")
        at_owner = header.index("owner") if "owner" in header else -1
        # The required fields, with the address twice so that the getter always gives a tuple.
        filled = operator.itemgetter(
            at_email, at_email, *(header.index(n) for n in sorted(self.required & set(header)))
        )
        quick = self.required.issubset(header) and "owner" not in self.required
        # The fields stored, in the file's order: not the owner, nor the address (its own column; a claim puts it
        # back), which was a sixth of an enrollment's bytes: an import 6-8% faster (bench/enroll.py --against).
        kept = [name for name in header if name not in ("owner", "email", "", headers.LEFT_OUT)]
        nameless = [at for at, name in enumerate(header) if not name]  # their cells must be empty
        blank = operator.itemgetter(*nameless, *nameless) if nameless else None  # a tuple, even of one
        left_out = [at for at, name in enumerate(header) if name == headers.LEFT_OUT]
        gone = sorted({at_email, at_owner, *nameless, *left_out} - {-1}, reverse=True)
        names = [_quote(name).replace("%", "%%") for name in kept]
        template = "{" + ",".join(f"{name}:%s" for name in names) + "}"
        bare = "{" + ",".join(f'{name}:"%s"' for name in names) + "}"  # for values that need no escaping
        users, adder, control, plain, quote = self.users, self.adder, _CONTROL.search, plainly_valid, _quote
        stage = self.store.stage_import
        batch: list[Staged] = []
        for item in rows:
            # A Plain run: nothing in its lines is quoted or a control character, and no field needs escaping.
            clean = isinstance(item, Plain)
            if isinstance(item, Plain):
                pairs: Iterable[tuple[int, list[str]]] = zip(count(item.first), (t.split(item.sep) for t in item.lines))
            else:
                pairs = (item,)
            for line, values in pairs:
                if quick and len(values) == width:
                    stripped = [v.strip() for v in values]
                    email = stripped[at_email]
                    owner = (stripped[at_owner] or adder) if at_owner >= 0 else adder
                    if (
                        owner in users
                        and plain(email)
                        and (clean or control("".join(values)) is None)
                        and all(filled(stripped))
                        and (blank is None or not any(blank(stripped)))
                    ):
                        for at in gone:
                            del stripped[at]
                        fields = bare % tuple(stripped) if clean else template % tuple(map(quote, stripped))
                        batch.append((line, email.lower(), owner, fields))
                        continue
                row = self._validate(line, header, values, report)
                if row is not None:
                    batch.append(row)
            if len(batch) >= BATCH:
                stage(batch)
                batch = []
        stage(batch)

    def _validate(self, line: int, header: list[str], values: list[str], report: Report) -> Staged | None:
        def reject(email: str, reason: str, field: str = "") -> None:
            report.reject(Rejection(line, email[:254], reason, field))

        stripped = [v.strip() for v in values]
        if not any(stripped):
            return None  # a blank line is not a prospect
        width = len(header)
        if len(values) > width and not any(stripped[width:]):
            values, stripped = values[:width], stripped[:width]  # empty cells past the header's end: nothing lost
        elif len(values) < width and not any(header[len(values) :]):
            values = values + [""] * (width - len(values))  # the nameless columns at the end left out
            stripped = stripped + [""] * (width - len(stripped))
        at = header.index("email")
        if len(values) != width:
            reject(stripped[at] if len(values) > at else "", f"expected {width} fields, got {len(values)}")
            return None
        email = stripped[at]
        for column, (name, value) in enumerate(zip(header, stripped, strict=True), 1):
            if not name and value:
                reject(email, f"a value in column {column}, which has no name in the header row")
                return None
        fields: dict[str, str] = {}
        for name, raw, value in zip(header, values, stripped, strict=True):
            if name in ("", headers.LEFT_OUT):
                continue
            if _CONTROL.search(raw) is not None:
                # Judged on the field as written: one that stripping would end (a trailing U+001F) is refused too.
                other = _NOT_LINE_BREAK.search(raw) is not None
                if other or name in self.headed:
                    what = "a control character" if other else "a line break"
                    why = " (a subject uses it)" if not other and name not in ("email", "owner") else ""
                    reject(email if name != "email" else "", f"{what} in field {name!r}{why}", name)
                    return None
                value = _CR.sub("\n", value)  # a body's line break, kept as one
            fields[name] = value
        problem = address_problem(email)
        if problem is not None:
            reject(email, f"not a valid email address: {problem}", "email")
            return None
        key = fields["email"] = email.lower()
        owner = fields.pop("owner", "") or self.adder
        if owner not in self.users:
            reject(email, f"unknown owner {owner!r}", "owner")
            return None
        if not self.required.issubset(fields) or not all(fields[n] for n in self.required):
            problem, field = self._render_problem(fields)
            if problem:
                reject(email, problem, field)
                return None
        del fields["email"]  # stored in its own column only
        return line, key, owner, _encode(fields)

    def prospect_of(self, where: str, line: int, header: list[str], values: list[str]) -> dict[str, str]:
        """One row's fields as the import would take them (a preview's), or UsageError naming its line and why."""
        report = Report()
        staged = self._validate(line, header, values, report)
        if staged is None:
            raise UsageError(f"{where}:{line}: {report.rejected[0].reason if report.rejected else 'a blank row'}")
        _, email, _, fields = staged
        return {"email": email, **json.loads(fields)}

    def _render_problem(self, fields: dict[str, str]) -> tuple[str, str]:
        """What keeps a template from being filled by these fields, and the first empty required field."""
        variables = compose.prospect_variables(fields, "sender", "sender@example.com")
        problems = lifecycle.unfilled(self.cadence.steps, variables)
        if not problems:
            return "", ""
        step, part, exc = problems[0]
        empty = sorted(n for n in self.required if not fields.get(n))
        return f"step {step.number} {part}: {exc}", (empty[0] if empty else "")

    def _enroll_staged(self, now: float, report: Report) -> None:
        """In the enrolling transaction: suppressed and already enrolled addresses out, the rest placed."""
        cadence = self.cadence
        step1 = cadence.steps[0]
        rotator = self._rotator()
        self.store.pin(cadence.name, cadence.auto_rotate, rotator.rules.rotate_among, now)
        for line, email, reason in self.store.drop_staged_suppressed():
            report.reject(Rejection(line, email, f"address is suppressed ({reason})", "email", "suppressed"))
        report.skipped += self.store.drop_staged_enrolled(cadence.name)
        first_id = next_id = self.store.next_enrollment_id()
        seq = self.store.enrolled_in(cadence.name)
        self.first_id = 0
        added: dict[str, int] = {}
        if self._enroll_in_turns(rotator, now, first_id, seq, added, report):
            next_id += sum(added.values())
            staged: Iterator[list[Staged]] = iter(())
        else:
            staged = self.store.staged(BATCH)
        for staged_rows in staged:
            enrollments = []
            for line, email, owner, fields in staged_rows:
                try:
                    mailbox = rotator.place(owner, self.adder)
                except rotation.Placement as exc:
                    report.reject(Rejection(line, email, str(exc), "owner", "placement"))
                    continue
                seq_of = seq + next_id - first_id
                enrollments.append((next_id, cadence.name, email, mailbox, owner, self.adder, fields, now, seq_of))
                next_id += 1
                added[mailbox] = added.get(mailbox, 0) + 1
            self.store.insert_enrollments(cadence.name, enrollments)
        self.store.schedule_first_steps(first_id, step1.sender or None, now + step1.wait, added)
        self.store.count_enrollments(cadence.name, added)
        self.store.count_result(cadence.name, timing.utc_day(now), "enrolled", added)
        self.store.save_rotation(cadence.name, rotator.cursors, rotator.credits)
        for mailbox, n in added.items():
            report.assignments[mailbox] = report.assignments.get(mailbox, 0) + n
        report.enrolled += next_id - first_id
        if next_id > first_id:
            self.first_id, self.first_seq = first_id, seq

    def _enroll_in_turns(
        self, rotator: rotation.Rotator, now: float, first_id: int, seq: int, added: dict[str, int], report: Report
    ) -> bool:
        """Round robin (or one sender) places each group's rows in a cycle: enrolled by SQL, not row by row.

        False, having changed nothing, for weighted rotation (its rows are placed one at a time).
        """
        by_owner = rotator.rules.auto_rotate and rotator.rules.rotate_among == "owner"
        cycles: dict[str, tuple[str, ...]] = {}
        for owner, n in self.store.staged_groups(by_owner):
            if n == 0:
                continue
            try:
                cycle = rotator.cycle(owner, self.adder, n)
            except rotation.Placement as exc:
                for line, email in self.store.drop_staged_group(owner if by_owner else None):
                    report.reject(Rejection(line, email, str(exc), "owner", "placement"))
                continue
            if cycle is None:
                return False
            cycles[owner] = cycle
            for i, mailbox in enumerate(cycle):
                added[mailbox] = added.get(mailbox, 0) + len(range(i, n, len(cycle)))
        self.store.enroll_staged(self.cadence.name, self.adder, now, first_id, cycles, by_owner, seq)
        return True

    def _rotator(self) -> rotation.Rotator:
        return build_rotator(self.store, self.config, self.cadence)


def _capacity(store: Store, m: Mailbox) -> int:
    """What the mailbox may send today: its daily limit, or less while it warms up (weighted rotation)."""
    if m.schedule.warmup is None:
        return m.schedule.daily_limit
    today = timing.local_day(time.time(), m.schedule.timezone)
    return timing.allowance(m.schedule, today, store.first_send_day(m.address))[0]


def build_rotator(store: Store, config: Config, cadence: Cadence) -> rotation.Rotator:
    """The cadence's rotation as stored, over its pool as it is now (who may take new enrollments)."""
    states = store.mailbox_states()
    pool = []
    for address in cadence.pool:
        m = config.mailbox(address)
        state = lifecycle.mailbox_state(m.paused, *states.get(address, ("connected", None)))
        ok = lifecycle.takes_new_prospects(state, m.schedule.daily_limit)
        pool.append(rotation.PoolMember(address, m.owner, ok, float(_capacity(store, m))))
    among = rotate_among(cadence, store.pins())
    rules = rotation.Rules(cadence.auto_rotate, among, cadence.sender, cadence.steps[0].sender, cadence.rotation)
    cursors, credits = store.rotation_state(cadence.name)
    return rotation.Rotator(rules, pool, cursors, credits)


def hand_over(store: Store, config: Config, mailbox: str) -> list[tuple[int, str, list[int]]]:
    """reassign_after: the never-contacted enrollments of a mailbox that stays down go to its cadences'
    eligible mailboxes by the cadences' own rotation (the cursors move as for an import). An enrollment that
    only this mailbox could take stays. Returns (enrollment, new mailbox, its messages moved), one commit."""
    moved: list[tuple[int, str, list[int]]] = []
    with store.transaction():
        rotators: dict[str, rotation.Rotator] = {}
        for enrollment, cadence_name, owner, adder in store.never_contacted(mailbox):
            try:
                cadence = config.cadence(cadence_name)
            except KeyError:
                continue  # a cadence no longer configured: nothing to place it by
            rotator = rotators.get(cadence_name) or rotators.setdefault(
                cadence_name, build_rotator(store, config, cadence)
            )
            eligible = {m.address for m in rotator.pool if m.eligible}
            if not rotator.rules.auto_rotate or not eligible - {mailbox}:
                continue  # a fixed sender, or nowhere else to go
            try:
                to = rotator.place(owner, adder)
            except rotation.Placement:
                continue
            if to == mailbox or to not in eligible:
                continue
            moved.append((enrollment, to, store.reassign([enrollment], to)))
        for name, rotator in rotators.items():
            store.save_rotation(name, rotator.cursors, rotator.credits)
    return moved


# --- list automations ----------------------------------------------------------------
#
# A watched folder is untrusted input: anyone who can write there can plant a
# symbolic link to a secret, a hard link, a FIFO, a huge file, or a link where
# our report will be written. Files are opened with O_NOFOLLOW and judged on the
# open descriptor; reports are created with O_EXCL | O_NOFOLLOW; nothing of a
# refused file's content is ever repeated in an error.


@dataclass(slots=True)
class FolderState:
    """What one automation's folder looked like at the last scan."""

    seen: dict[str, tuple[int, float]] = field(default_factory=dict)  # name → (size, mtime)
    parts: set[str] = field(default_factory=set)  # *.csv.part names seen last time
    stuck: dict[str, tuple[int, float]] = field(default_factory=dict)  # imported but could not be moved
    problem: tuple[str, float] | None = None  # (what, folder mtime) reported once until the folder changes


@dataclass(frozen=True, slots=True)
class Imported:
    file: str
    moved_to: str
    report: Report | None
    error: str


def ready_files(folder: Path, state: FolderState, now: float, settle: float = 10.0) -> list[Path]:
    """*.csv entries that are complete: renamed from *.csv.part since the last look, or unchanged for `settle`.

    Entries of any type are returned (a symbolic link too): `import_dropped` judges them on the open descriptor.
    """
    ready, current, parts = [], {}, set()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if name.lower().endswith(".csv.part"):
            parts.add(name[: -len(".part")])
            continue
        if not name.lower().endswith(".csv"):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.is_dir(follow_symlinks=False):
            continue
        current[name] = (st.st_size, st.st_mtime)
        if state.stuck.get(name) == current[name]:
            continue  # imported already; the folder would not let us move it (reported once)
        renamed = name in state.parts
        unchanged = state.seen.get(name) == current[name] and now - st.st_mtime >= settle
        if renamed or unchanged:
            ready.append(Path(entry.path))
    state.seen, state.parts = current, parts
    state.stuck = {k: v for k, v in state.stuck.items() if k in current}
    return ready


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _filed_folder(folder_fd: int, name: str) -> int:
    """processed/ or failed/ inside the watched folder, opened as a descriptor: made by us and a real folder. What
    is written there goes through this descriptor, so a link put in its place afterwards changes nothing."""
    try:
        os.mkdir(name, 0o750, dir_fd=folder_fd)
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIRECTORY, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(f"{name} is not a folder (a link or a file is in its place)") from None
        raise


def _file_away(path: Path, kind: str, now: float, note: str, text: str) -> Path:
    """Move the dropped entry into processed/ or failed/ and write its note beside it: by descriptors of the
    watched folder and of the target folder (`dir_fd`), never by a name that a link could be swapped into."""
    folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        target_fd = _filed_folder(folder_fd, kind)
        try:
            return path.parent / kind / _move_into(folder_fd, target_fd, path.name, now, note, text)
        finally:
            os.close(target_fd)
    finally:
        os.close(folder_fd)


def _move_into(folder_fd: int, target_fd: int, name: str, now: float, note: str, text: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    for n in range(1, 1000):
        target = f"{stamp}-{name}" if n == 1 else f"{stamp}-{n}-{name}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(target + note, flags, 0o640, dir_fd=target_fd)
        except FileExistsError:
            continue
        try:
            os.stat(target, dir_fd=target_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:  # the name is taken (by anything, a link too): the next one
            os.close(fd)
            os.unlink(target + note, dir_fd=target_fd)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.rename(name, target, src_dir_fd=folder_fd, dst_dir_fd=target_fd)  # the entry itself: a link as a link
        return target
    raise OSError(f"{name}: no free name in the folder it goes to")


def import_dropped(
    store: Store,
    config: Config,
    cadence: str,
    owner: str,
    path: Path,
    now: float,
    max_size: int,
    dialect: Dialect = Dialect(),
) -> Imported:
    """Enroll one dropped CSV with the automation's owner as the adder, then file it away.

    processed/ gets the CSV and a `.report.json` (rejected rows with their lines);
    failed/ gets a file that could not be used at all, with a `.error.txt` saying
    why (and nothing of its content). The import is all-or-nothing; a crash before
    the move re-reads the file: its rows are then skipped, not doubled.
    """
    problem, stream = _open_dropped(path, max_size)
    report: Report | None = None
    if stream is not None:
        try:
            report = Importer(store, config, cadence, owner, dialect).run(path, now, stream)
        except (UsageError, Refused) as exc:
            problem = str(exc)
        finally:
            stream.close()
    if report is None:
        target = _file_away(path, "failed", now, ".error.txt", f"{problem}\n")
        return Imported(path.name, str(target), None, problem)
    target = _file_away(path, "processed", now, ".report.json", json.dumps(report.as_dict(), indent=2) + "\n")
    return Imported(path.name, str(target), report, "")


def _open_dropped(path: Path, max_size: int) -> tuple[str, BinaryIO | None]:
    """The dropped entry opened for reading, or why it is refused (judged on the descriptor, not the name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path.name}: a symbolic link, not a file: copy the file itself into the folder", None
        return f"{path.name}: cannot open: {exc.strerror}", None
    st = os.fstat(fd)
    why = ""
    if not stat.S_ISREG(st.st_mode):
        why = f"{path.name}: not a regular file"
    elif st.st_nlink > 1:
        why = f"{path.name}: a hard link to another file: copy the file itself into the folder"
    elif st.st_size > max_size:
        why = f"{path.name}: {st.st_size} bytes, over max_file_size ({max_size} bytes)"
    if why:
        os.close(fd)
        return why, None
    return "", os.fdopen(fd, "rb")
