"""CSV import: validate each row on its own, place it, store it in batches."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import compose, rotation
from daemon.config import Cadence, Config, valid_address
from daemon.errors import Refused, UsageError
from daemon.store import Pin, Store

BATCH = 5000
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":")).encode
UNAVAILABLE = ("disconnected",)


@dataclass(slots=True)
class Rejection:
    line: int
    email: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "email": self.email, "reason": self.reason}


@dataclass(slots=True)
class Report:
    enrolled: int = 0
    skipped: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    assignments: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "enrolled": self.enrolled,
            "skipped": self.skipped,
            "rejected": [r.as_dict() for r in self.rejected],
            "assignments": dict(self.assignments),
        }


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    email: str
    owner: str
    fields: dict[str, str]


def pin_problems(config: Config, pins: dict[str, Pin]) -> list[str]:
    """SPEC §3: a config may not change auto_rotate/rotate_among of a cadence in use."""
    problems = []
    for cadence in config.cadences:
        pin = pins.get(cadence.name)
        if pin is None or pin.enrollments == 0:
            continue
        changes = []
        if pin.auto_rotate != cadence.auto_rotate:
            changes.append(
                f"auto_rotate was {str(pin.auto_rotate).lower()}, the config says {str(cadence.auto_rotate).lower()}"
            )
        if pin.auto_rotate and cadence.auto_rotate and pin.rotate_among != cadence.rotate_among:
            changes.append(f"rotate_among was {pin.rotate_among!r}, the config says {cadence.rotate_among!r}")
        if changes:
            problems.append(
                f'cadences."{cadence.name}": {"; ".join(changes)}: fixed by {pin.enrollments} '
                f"enrollment{'s' if pin.enrollments != 1 else ''} made under the old rule "
                "(start a new cadence to change it)"
            )
    return problems


def read_csv(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header (lower-cased) and (line, fields) rows; UsageError on an unusable file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (save the file as UTF-8 CSV)") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise UsageError(f"{path}: empty file (a header row with an email column is required)") from None
    except csv.Error as exc:
        raise UsageError(f"{path}:1: {exc}") from None
    names = [h.strip().lower() for h in header]
    if "email" not in names:
        raise UsageError(
            f"{path}:1: no 'email' column in the header row (found: {', '.join(repr(n) for n in names) or 'nothing'})"
        )
    seen: set[str] = set()
    for name in names:
        if not name:
            raise UsageError(f"{path}:1: a column has no name")
        if name in seen:
            raise UsageError(f"{path}:1: column {name!r} appears twice")
        seen.add(name)

    def rows() -> Iterator[tuple[int, list[str]]]:
        line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise UsageError(f"{path}:{line}: {exc}") from None
            yield line, fields
            line = reader.line_num + 1

    return names, rows()


class Importer:
    """Enrolls the rows of CSV files into one cadence on behalf of one adder."""

    def __init__(self, store: Store, config: Config, cadence_name: str, adder: str) -> None:
        try:
            self.cadence: Cadence = config.cadence(cadence_name)
        except KeyError:
            raise UsageError(f"unknown cadence {cadence_name!r}") from None
        if adder not in config.user_names():
            raise UsageError(f"unknown user {adder!r} (--as names a [[users]] entry)")
        self.store = store
        self.config = config
        self.adder = adder
        self.required = self.cadence.required_fields()
        self.users = config.user_names()

    def check_pins(self) -> None:
        problems = pin_problems(self.config, self.store.pins())
        mine = [p for p in problems if p.startswith(f'cadences."{self.cadence.name}"')]
        if mine:
            raise Refused(mine[0])

    def run(self, path: Path, now: float) -> Report:
        header, rows = read_csv(path)
        self.check_pins()
        self._check_columns(path, header)
        report = Report()
        seen: dict[str, int] = {}
        batch: list[Row] = []
        for line, values in rows:
            row = self._validate(line, header, values, seen, report)
            if row is not None:
                batch.append(row)
                if len(batch) >= BATCH:
                    self._store_batch(batch, now, report)
                    batch = []
        if batch:
            self._store_batch(batch, now, report)
        report.rejected.sort(key=lambda r: r.line)
        return report

    def _check_columns(self, path: Path, header: list[str]) -> None:
        """Refuse the file before any row when it cannot fill a template at all."""
        variables = compose.sample_variables(tuple(header))
        for step in self.cadence.steps:
            for part, template in (("subject", step.subject), ("body", step.body)):
                if template is None:
                    continue
                try:
                    template.render({k: v for k, v in variables.items() if k in header or k.startswith("sender_")})
                except compose.TemplateProblem as exc:
                    raise UsageError(
                        f"{path}:1: cadence {self.cadence.name!r} step {step.number} {part} cannot be filled "
                        f"from this file's columns: {exc}"
                    ) from None

    def _validate(
        self, line: int, header: list[str], values: list[str], seen: dict[str, int], report: Report
    ) -> Row | None:
        def reject(email: str, reason: str) -> None:
            report.rejected.append(Rejection(line, email, reason))

        if not any(v.strip() for v in values):
            return None  # a blank line is not a prospect
        if len(values) != len(header):
            email_guess = values[header.index("email")].strip() if len(values) > header.index("email") else ""
            reject(email_guess, f"expected {len(header)} fields, got {len(values)}")
            return None
        fields = {name: value.strip() for name, value in zip(header, values, strict=True)}
        email = fields["email"]
        if "\n" in "".join(values) or "\r" in "".join(values):
            name = next(n for n, v in fields.items() if "\r" in v or "\n" in v)
            reject(email if name != "email" else "", f"line break in field {name!r}")
            return None
        if not valid_address(email):
            reject(email, "not a valid email address")
            return None
        key = email.lower()
        fields["email"] = key
        first = seen.setdefault(key, line)
        if first != line:
            reject(email, f"duplicate of line {first}")
            return None
        owner = fields.pop("owner", "") or self.adder
        if owner not in self.users:
            reject(email, f"unknown owner {owner!r}")
            return None
        if not self.required.issubset(fields) or not all(fields[n] for n in self.required):
            problem = self._render_problem(fields)
            if problem:
                reject(email, problem)
                return None
        return Row(line, key, owner, fields)

    def _render_problem(self, fields: dict[str, str]) -> str:
        variables = compose.prospect_variables(fields, "sender", "sender@example.com")
        for step in self.cadence.steps:
            for part, template in (("subject", step.subject), ("body", step.body)):
                if template is None:
                    continue
                try:
                    template.render(variables)
                except compose.TemplateProblem as exc:
                    return f"step {step.number} {part}: {exc}"
        return ""

    def _store_batch(self, batch: list[Row], now: float, report: Report) -> None:
        cadence = self.cadence
        step1 = cadence.steps[0]
        with self.store.transaction():
            self.store.pin(cadence.name, cadence.auto_rotate, cadence.rotate_among, now)
            suppressed = self.store.suppressed([r.email for r in batch])
            live = []
            for row in batch:
                if row.email in suppressed:
                    report.rejected.append(
                        Rejection(row.line, row.email, f"address is suppressed ({suppressed[row.email]})")
                    )
                else:
                    live.append(row)
            already = self.store.enrolled(cadence.name, [r.email for r in live])
            rotator = self._rotator()
            enrollments, first_due = [], []
            added: dict[str, int] = {}
            for row in live:
                if row.email in already:
                    report.skipped += 1
                    continue
                try:
                    mailbox = rotator.place(row.owner, self.adder)
                except rotation.Placement as exc:
                    report.rejected.append(Rejection(row.line, row.email, str(exc)))
                    continue
                enrollments.append((cadence.name, row.email, mailbox, row.owner, self.adder, _encode(row.fields), now))
                first_due.append((step1.sender or mailbox, now + step1.wait))
                added[mailbox] = added.get(mailbox, 0) + 1
            self.store.insert_enrollments(enrollments, first_due)
            self.store.count_enrollments(cadence.name, added)
            for mailbox, n in added.items():
                report.assignments[mailbox] = report.assignments.get(mailbox, 0) + n
            report.enrolled += len(enrollments)

    def _rotator(self) -> rotation.Rotator:
        cadence = self.cadence
        states = self.store.mailbox_states()
        pool = []
        for address in cadence.pool:
            mailbox = self.config.mailbox(address)
            available = not mailbox.paused and states.get(address, "connected") not in UNAVAILABLE
            pool.append(rotation.PoolMember(address, mailbox.owner, available))
        rules = rotation.Rules(cadence.auto_rotate, cadence.rotate_among, cadence.sender, cadence.steps[0].sender)
        return rotation.Rotator(rules, pool, self.store.rotation_counts(cadence.name))


# --- list automations ----------------------------------------------------------------

SETTLE_SECONDS = 2.0  # a CSV must be unchanged this long before it is read (half-written files wait)


@dataclass(slots=True)
class FolderState:
    """What one automation's folder looked like at the last scan: path → (size, mtime)."""

    seen: dict[str, tuple[int, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Imported:
    file: str
    moved_to: str
    report: Report | None
    error: str


def ready_files(folder: Path, state: FolderState, now: float) -> list[Path]:
    """*.csv files in `folder` that have not changed for SETTLE_SECONDS (and since the last scan)."""
    ready, current = [], {}
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    except OSError:
        return []
    for path in entries:
        try:
            st = path.stat()
        except OSError:
            continue
        current[str(path)] = (st.st_size, st.st_mtime)
        unchanged = state.seen.get(str(path)) == (st.st_size, st.st_mtime)
        if unchanged and now - st.st_mtime >= SETTLE_SECONDS:
            ready.append(path)
    state.seen = current
    return ready


def _place(path: Path, folder: Path, now: float) -> Path:
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = folder / f"{stamp}-{path.name}"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{stamp}-{n}-{path.name}"
    return target


def import_dropped(store: Store, config: Config, cadence: str, owner: str, path: Path, now: float) -> Imported:
    """Enroll one dropped CSV with the automation's owner as the adder, then file it away.

    processed/ gets the CSV and a `.report.json` (rejected rows with their lines);
    failed/ gets a file that could not be read at all, with a `.error.txt` saying why.
    A crash before the move re-reads the file: its rows are then skipped, not doubled.
    """
    try:
        report = Importer(store, config, cadence, owner).run(path, now)
    except (UsageError, Refused) as exc:
        target = _place(path, path.parent / "failed", now)
        path.rename(target)
        target.with_name(target.name + ".error.txt").write_text(f"{exc}\n", encoding="utf-8")
        return Imported(path.name, str(target), None, str(exc))
    target = _place(path, path.parent / "processed", now)
    path.rename(target)
    target.with_name(target.name + ".report.json").write_text(
        json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8"
    )
    return Imported(path.name, str(target), report, "")
