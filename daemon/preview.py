"""`cadenced preview` (SPEC §6a): a step's email for one prospect as it would leave, composed where the sender loop
composes it (lifecycle.compose_step): its headers and its parts. Nothing is sent and nothing is written.

The prospect is an enrolled address (its fields, mailbox, thread, variant and unsubscribe link as the daemon has
them) or a row of a CSV file read as `enroll` reads it (its fields as the import would take them; its variant and
`spin` as the row would get them were the file imported now with every row before it enrolled).
"""

from __future__ import annotations

import email
import email.policy
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon import compose, enroll, lifecycle
from daemon.errors import NotFound, UsageError
from daemon.model import Cadence, Config, Mailbox, Step
from daemon.prospects import chosen, find, unknown
from daemon.store import Store

MADE_AT_THE_SEND = "made-at-the-send"  # what a preview shows for what only a send makes


def _cadence(config: Config, name: str) -> Cadence:
    try:
        return config.cadence(name)
    except KeyError:
        raise unknown("cadence", name, (c.name for c in config.cadences)) from None


def _step(cadence: Cadence, number: int) -> Step:
    if not 0 < number <= len(cadence.steps):
        raise UsageError(f"--step {number}: cadence {cadence.name!r} has steps 1 to {len(cadence.steps)}")
    return cadence.steps[number - 1]


def _mailbox(config: Config, address: str, why: str) -> Mailbox:
    try:
        return config.mailbox(address)
    except KeyError:
        raise unknown(f"mailbox ({why})", address, (m.address for m in config.mailboxes)) from None


def _variant(step: Step, name: str | None) -> str | None:
    if name is not None:
        try:
            lifecycle.variant_named(step, name)
        except KeyError as exc:
            raise UsageError(f"--variant: {exc.args[0]}") from None
    return name


def of_prospect(
    config: Config, store: Store, cadence_name: str, address: str, number: int | None, variant: str | None, now: float
) -> dict[str, Any]:
    """The email step `number` (None: the step that waits to go, else step 1) of the address's enrollment in the
    cadence would be, from the mailbox that would send it, in the thread its earlier steps began."""
    cadence = _cadence(config, cadence_name)
    found = find(store, address)
    e = chosen(found, cadence.name)[0]
    messages = e["messages"]
    if number is None:
        waiting = [m["step"] for m in messages if m["state"] in ("scheduled", "error")]
        number = waiting[0] if waiting else 1
    step = _step(cadence, number)
    own = [m for m in messages if m["step"] == number]
    if own and own[0]["state"] != "sent":
        sender, why = own[0]["mailbox"], "the message's"
    else:
        sender, why = step.sender or e["mailbox"], "the step's sender" if step.sender else "the enrollment's"
    mailbox = _mailbox(config, sender, why)
    thread = [
        (m["step"], m["message_id"], m["subject"])
        for m in messages
        if m["state"] == "sent" and m["step"] < number and m["message_id"]
    ]
    key = store.kept_unsubscribe_key()
    notes = []
    links: tuple[str, ...]
    if key is None:
        links = (f"mailto:{mailbox.address}?subject=unsubscribe-{MADE_AT_THE_SEND}",)
        notes.append("the unsubscribe link is made at the send (the daemon has not made its key yet)")
    else:
        links = _links(mailbox, key, int(e["id"]), found["email"])
    if own and own[0]["state"] == "sent":
        notes.append(f"step {number} was sent already; this is how it would be composed now")
    if e["state"] != "active":
        notes.append(f"the enrollment has ended ({e['state']}): nothing more will be sent to it")
    fields = {"email": found["email"], **e["fields"]}
    where = {"enrollment": e["id"], "state": e["state"]}
    return _composed(
        cadence, step, mailbox, fields, int(e["id"]), int(e["seq"]), thread, links, variant, now, where, notes
    )


def of_csv(
    config: Config,
    store: Store,
    cadence_name: str,
    path: Path,
    row: int,
    dialect: enroll.Dialect,
    number: int | None,
    variant: str | None,
    sender: str | None,
    now: float,
) -> dict[str, Any]:
    """The email step `number` (None: 1) would be for row `row` of a CSV file (1: the first under the header), read
    and checked as `enroll` reads it. The mailbox: `sender`, else the step's own, else the cadence's first (rotation
    chooses at the import)."""
    cadence = _cadence(config, cadence_name)
    step = _step(cadence, number or 1)
    if row < 1:
        raise UsageError(f"--row {row}: rows are numbered from 1 (the first row under the header)")
    adder = cadence.users[0] if cadence.users else config.users[0].name
    importer = enroll.Importer(store, config, cadence.name, adder, dialect)
    with enroll.open_csv(path) as stream:
        header, rows = enroll.read_csv(path, stream, dialect=dialect, wanted=cadence.used_fields())
        importer.check_columns(f"{path}:1", header.names)
        found = next(itertools.islice(_rows(rows), row - 1, None), None)
        if found is None:
            raise NotFound(f"{path}: no row {row} (rows under the header, blank lines not counted)")
        line, values = found
        fields = importer.prospect_of(str(path), line, header.names, values)
    if sender is not None:
        mailbox = _mailbox(config, sender, "--mailbox")
    else:
        address = step.sender or (cadence.pool[0] if cadence.pool else "")
        mailbox = _mailbox(config, address, "the step's sender" if step.sender else "the cadence's first")
    enrollment, seq = store.next_enrollment_id() + row - 1, store.enrolled_in(cadence.name) + row - 1
    links = (f"mailto:{mailbox.address}?subject=unsubscribe-{MADE_AT_THE_SEND}",)
    notes = [
        "rotation chooses the mailbox at the import" + ("" if sender or step.sender else "; --mailbox to pick one"),
        "the variant and spin() are as this row would get them were the file imported now, every row before it "
        "enrolled",
    ]
    if step.number > 1:
        notes.append(f"the steps before step {step.number} are not sent yet: no thread headers")
    where = {"file": str(path), "row": row, "line": line}
    return _composed(cadence, step, mailbox, fields, enrollment, seq, [], links, variant, now, where, notes)


def _rows(rows: enroll.Rows) -> Iterator[tuple[int, list[str]]]:
    """The file's rows as (line, values), blank lines left out (the import skips them)."""
    for item in rows:
        pairs = (
            zip(itertools.count(item.first), (t.split(item.sep) for t in item.lines))
            if isinstance(item, enroll.Plain)
            else (item,)
        )
        for line, values in pairs:
            if any(v.strip() for v in values):
                yield line, values


def _links(mailbox: Mailbox, key: bytes, enrollment: int, address: str) -> tuple[str, ...]:
    try:
        return lifecycle.unsubscribe_links(mailbox, key, enrollment, address)
    except compose.TemplateProblem as exc:
        raise UsageError(f"{mailbox.address}: {exc}") from None


def _composed(
    cadence: Cadence,
    step: Step,
    mailbox: Mailbox,
    fields: dict[str, str],
    enrollment: int,
    seq: int,
    thread: list[tuple[int, str, str]],
    links: tuple[str, ...],
    variant: str | None,
    now: float,
    where: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    variant = _variant(step, variant)
    message_id = f"<cadenced.preview.{MADE_AT_THE_SEND}@{mailbox.address.rpartition('@')[2]}>"
    try:
        out, chosen_variant = lifecycle.compose_step(
            cadence,
            step,
            mailbox,
            fields,
            enrollment=enrollment,
            seq=seq,
            thread=thread,
            links=links,
            message_id=message_id,
            date=now,
            variant=variant,
        )
    except compose.TemplateProblem as exc:
        raise UsageError(
            f"cadence {cadence.name!r} step {step.number}: {exc} (the daemon would keep it in the error section)"
        ) from None
    raw = compose.build_message(out)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    parts = [
        {"type": part.get_content_type(), "content": part.get_content()}
        for part in parsed.walk()
        if not part.is_multipart()
    ]
    return {
        "cadence": cadence.name,
        "step": step.number,
        "variant": chosen_variant,
        "mailbox": mailbox.address,
        "to": fields["email"],
        "prospect": where,
        "headers": [[name, str(value)] for name, value in parsed.items()],
        "parts": parts,
        "raw": raw.decode("utf-8", "replace"),
        "notes": notes,
        "sent": False,
    }


def lines(document: dict[str, Any]) -> Iterator[str]:
    """`preview` in words: who and what, the headers as a mail client shows them (decoded), then each part."""
    variant = f" variant {document['variant']}" if document["variant"] else ""
    yield (
        f"# cadence {document['cadence']!r} step {document['step']}{variant} to {document['to']} from "
        f"{document['mailbox']}: a preview (nothing sent, nothing written)"
    )
    for note in document["notes"]:
        yield f"# {note}"
    for name, value in document["headers"]:
        yield f"{name}: {value}"
    for part in document["parts"]:
        yield ""
        yield f"--- {part['type']} ---"
        yield from part["content"].rstrip("\n").split("\n")
