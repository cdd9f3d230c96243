"""aioimaplib session per mailbox; classifies replies and bounces, and settles uncertain sends.

Everything the server says is hostile until parsed: numbers are bounded to
32 bits, lines, literals and whole answers are bounded in bytes (a server that
goes past a bound loses the session), and any exception a session raises ends
that session alone with `imap.error` and a backoff. Sending never waits on IMAP.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import email.utils
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any

import aioimaplib
import anyio

from daemon import lifecycle, logs, oauth, outcomes, redact, replies, timing, unsubscribe
from daemon.compose import OUR_MESSAGE_ID
from daemon.errors import AddressRejected
from daemon.model import Config, Mailbox, OAuth2, Server
from daemon.smtp import command_token, tls_context
from daemon.store import Store

_OUT_OF_OFFICE = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response)|autoreply|"
    r"abwesenheitsnotiz|absence|on vacation|vacation reply)\b",
    re.IGNORECASE,
)
_DAEMON_SENDERS = ("mailer-daemon", "postmaster", "mail-daemon")
_PARSER = email.parser.BytesParser(policy=email.policy.compat32)
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_TEXT_HEADERS = email.parser.HeaderParser(policy=email.policy.compat32)
_FETCH_UID = re.compile(rb"UID (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_LIST = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>"(?:[^"\\]|\\.)*"|NIL) (?P<name>.*)$', re.IGNORECASE)
_LITERAL = re.compile(rb"\{(\d+)\}$")

MAX_MESSAGE = 64 * 1024  # bytes of one message read: headers, or the start of a DSN
HEADER_PARTS = f"BODY.PEEK[HEADER]<0.{MAX_MESSAGE}>"
FULL_PART = f"BODY.PEEK[]<0.{MAX_MESSAGE}>"
FETCH_CHUNK = 100
MAX_LINE = 64 * 1024  # one protocol line without its literal
MAX_LITERAL = MAX_MESSAGE + 1024  # a literal bigger than what we asked for is a lie
MAX_ANSWER = 16 * 1024 * 1024  # bytes received for one command (or one IDLE) before we give up on the server
MAX_NUMBER = 2**32 - 1  # UIDs, UIDVALIDITY, counts: RFC 3501 nz-number
COPIES_PER_ROUND = 50  # sent copies saved per round of the session loop
SETTLE_EVERY = 60.0  # seconds between looks in Sent for uncertain messages

_PERMANENT = re.compile(
    r"permanent(ly)? (error|failure|fatal)|could not be delivered|undeliverable|delivery (has )?failed|"
    r"failed permanently|unknown user|user unknown|no such user|does not exist",
    re.IGNORECASE,
)
_TEMPORARY = re.compile(r"delay|will (be )?retr|still trying|warning|not yet been delivered|temporar", re.IGNORECASE)


class ImapFailure(Exception):
    """The IMAP session cannot go on (refused login, NO/BAD answer, a broken bound, lost connection)."""


class _BoundedProtocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol with bounds: a server that sends too much loses the connection."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.received = 0
        self.refused: str | None = None

    def send(self, line: str, scrub: str | None = None) -> None:
        self.received = 0  # the budget is per command
        super().send(line, scrub)

    def data_received(self, d: bytes) -> None:
        if self.refused is not None:
            return
        self.received += len(d)
        waiting = self.current_command is not None and self.current_command.wait_literal_data()
        if self.received > MAX_ANSWER:
            self._refuse(f"the server sent more than {MAX_ANSWER} bytes for one command")
        elif not waiting and len(self.incomplete_line) + len(d) > MAX_LINE and b"\r\n" not in d:
            self._refuse(f"the server sent a line longer than {MAX_LINE} bytes")
        else:
            super().data_received(d)
            command = self.current_command
            if command is not None and command._expected_size > MAX_LITERAL:
                self._refuse(f"the server announced a literal of {command._expected_size} bytes")

    def _refuse(self, why: str) -> None:
        self.refused = why
        self.incomplete_line = b""
        self.current_command = None
        if self.transport is not None:
            self.transport.abort()


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]
    def create_client(self, host: str, port: int, loop: Any, conn_lost_cb: Any = None, ssl_context: Any = None) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _BoundedProtocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


def number(raw: bytes | bytearray | str) -> int:
    """An IMAP number: digits, at most 2^32 - 1; anything else is a protocol error of the server."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes | bytearray) else raw
    if not text.isdigit() or len(text) > 10 or int(text) > MAX_NUMBER:
        raise ImapFailure(f"the server sent a number out of range: {text[:30]!r}")
    return int(text)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # reply | bounce | blocked | expired | ignore | bounce? | unsubscribe
    why: str
    message_ids: tuple[str, ...] = ()
    sender: str = ""
    recipient: str = ""  # a DSN's Final-Recipient
    original: str = ""  # a DSN's Original-Recipient (the address we sent to, before an alias or a forward)
    status: str = ""  # a DSN's Status
    enrollment: int = 0  # an unsubscribe token's


def says_unsubscribe(raw: bytes) -> bool:
    """Is the new text of this reply (its first text/plain part) only an unsubscribe phrase? (replies.py)"""
    message = _PARSER.parsebytes(raw)
    part = next((p for p in message.walk() if p.get_content_type() == "text/plain"), None)
    if part is None:
        return False
    try:
        payload = part.get_payload(decode=True)
        text = payload.decode(part.get_content_charset() or "utf-8", "replace") if isinstance(payload, bytes) else ""
    except (LookupError, ValueError):
        return False
    return replies.only_unsubscribe(text)


_DMARC_FAIL = re.compile(r"\bdmarc\s*=\s*fail\b", re.IGNORECASE)


def classify_headers(raw: bytes, own: frozenset[str], key: bytes = b"") -> Verdict:
    """First look, from the headers alone: ignore, reply, unsubscribe, or `bounce?` (needs the body)."""
    headers = _HEADERS.parsebytes(raw)
    sender = email.utils.parseaddr(str(headers.get("From", "")))[1].lower()
    if sender in own:
        return Verdict("ignore", "our own mailbox", sender=sender)
    enrollment = unsubscribe.found(key, str(headers.get("Subject", ""))) if key else None
    if enrollment is not None:  # the List-Unsubscribe mailto came back (a mail client's unsubscribe button)
        return Verdict("unsubscribe", "List-Unsubscribe mailto", sender=sender, enrollment=enrollment)
    content_type = str(headers.get("Content-Type", "")).lower()
    is_report = "multipart/report" in content_type and "delivery-status" in content_type
    if is_report or sender.partition("@")[0] in _DAEMON_SENDERS:
        return Verdict("bounce?", "delivery status notification", sender=sender)
    auto = str(headers.get("Auto-Submitted", "")).strip().lower()
    if auto and auto != "no":
        return Verdict("ignore", f"auto-submitted ({auto})", sender=sender)
    if headers.get("X-Autoreply") or headers.get("X-Autorespond"):
        return Verdict("ignore", "auto-reply header", sender=sender)
    if str(headers.get("Precedence", "")).strip().lower() == "auto_reply":
        return Verdict("ignore", "precedence auto_reply", sender=sender)
    if _OUT_OF_OFFICE.search(str(headers.get("Subject", ""))):
        return Verdict("ignore", "out-of-office subject", sender=sender)
    # The receiving provider's verdict on the From domain (the topmost Authentication-Results is the one it
    # added; a sender's own come below it). A From that fails DMARC may be forged: it stops or unsubscribes no one.
    results = headers.get_all("Authentication-Results") or []
    if results and _DMARC_FAIL.search(str(results[0])[:4000]):
        return Verdict("ignore", "the From fails DMARC (Authentication-Results): maybe forged", sender=sender)
    thread = f"{headers.get('In-Reply-To', '')} {headers.get('References', '')}"
    ids = tuple(dict.fromkeys(OUR_MESSAGE_ID.findall(thread)))
    if ids:
        return Verdict("reply", "In-Reply-To/References name our message", ids, sender)
    return Verdict("reply", "from the address itself", (), sender)


def _address(field: str) -> str:
    """`rfc822; a@b` → `a@b` (RFC 3464 address-type; value)."""
    value = field.partition(";")[2] if ";" in field else field
    return email.utils.parseaddr(value.strip())[1].lower() or value.strip().strip("<>").lower()


def _status_code(status: str, diagnostic: str) -> tuple[int, str]:
    """The reply code and text a DSN block stands for: its Diagnostic-Code when it has one."""
    text = diagnostic.partition(";")[2].strip() if ";" in diagnostic else diagnostic.strip()
    match = re.match(r"([245]\d\d)[ -]", text)
    if match:
        return int(match.group(1)), text[4:].strip() or status
    return int(status[:1]) * 100 + 50, f"{status} {text}".strip()


def classify_bounce(raw: bytes) -> list[Verdict]:
    """A delivery status notification (the start of it, ≤ 64 KiB), read as RFC 3464 says.

    One verdict per recipient block: `bounce` (the address does not exist: suppress), `blocked`
    (refused for another permanent reason: stop, keep the address), or `ignore` with why (a delay,
    a relay, a success, mail that is not ours). A DSN that is not RFC 3464 counts only when it
    states a permanent failure for the recipient.
    """
    ids = tuple(dict.fromkeys(OUR_MESSAGE_ID.findall(raw.decode("latin-1"))))
    if not ids:
        return [Verdict("ignore", "delivery status notification for mail that is not ours")]
    message = _PARSER.parsebytes(raw)
    blocks = _delivery_status(message)
    if blocks is None:
        return [_legacy_bounce(message, ids)]
    verdicts = []
    for block in blocks:
        final = _address(str(block.get("Final-Recipient", "")))
        original = _address(str(block.get("Original-Recipient", "")))
        recipient = final or original
        action = str(block.get("Action", "")).strip().lower()
        status = str(block.get("Status", "")).strip().split(" ")[0]
        diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
        if not recipient or not action:
            continue
        original = original if original != recipient else ""
        if action != "failed":
            verdicts.append(
                Verdict("ignore", f"Action: {action}", ids, recipient=recipient, original=original, status=status)
            )
            continue
        if re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", status):
            # Failed with a temporary status: the relay gave up after its queue lifetime. Final for this
            # message (stop the enrollment), but nothing says the address is bad: it is kept.
            why = f"Status {status} (delivery expired): {diagnostic[:200]}".strip().rstrip(":")
            verdicts.append(Verdict("expired", why, ids, recipient=recipient, original=original, status=status))
            continue
        if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", status):
            verdicts.append(
                Verdict("ignore", f"failed with status {status!r}", ids, recipient=recipient, original=original)
            )
            continue
        code, text = _status_code(status, diagnostic)
        outcome = outcomes.classify(outcomes.DSN, code if code >= 500 else 550, f"{status} {text}")
        kind = "bounce" if isinstance(outcome, AddressRejected) else "blocked"
        why = f"Status {status}: {text}"[:300]
        verdicts.append(Verdict(kind, why, ids, recipient=recipient, original=original, status=status))
    return verdicts or [Verdict("ignore", "a report without recipient blocks", ids)]


def _delivery_status(message: Message) -> list[Message] | None:
    """The per-recipient blocks of the message/delivery-status part, or None when there is none."""
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            # The first block is per message; the others are per recipient.
            return [b for b in payload[1:] if isinstance(b, Message)] or [
                b for b in payload if isinstance(b, Message) and b.get("Final-Recipient")
            ]
        text = payload if isinstance(payload, str) else ""
        return [_TEXT_HEADERS.parsestr(chunk) for chunk in re.split(r"\r?\n\r?\n", text)[1:] if chunk.strip()]
    return None


def _legacy_bounce(message: Message, ids: tuple[str, ...]) -> Verdict:
    """A mailer-daemon text with no RFC 3464 part: only an explicit permanent failure counts."""
    text = ""
    for part in message.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                text += payload.decode("utf-8", "replace") + "\n"
    first = text[:4000]
    if _TEMPORARY.search(first) or not _PERMANENT.search(first):
        return Verdict("ignore", "a mailer-daemon message that states no permanent failure", ids)
    match = re.search(r"\b(5\d\d)[ -]+(5\.\d{1,3}\.\d{1,3})?([^\n]{0,200})", first)
    code, line = (int(match.group(1)), " ".join(g for g in match.groups()[1:] if g)) if match else (550, first)
    outcome = outcomes.classify(outcomes.DSN, code, line[:300])
    kind = "bounce" if isinstance(outcome, AddressRejected) else "blocked"
    addresses = re.findall(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", first)
    return Verdict(kind, f"mailer-daemon: {line.strip()[:200]}", ids, recipient=(addresses or [""])[0].lower())


def fetched(lines: list[Any]) -> Iterator[tuple[int, bytes]]:
    """(uid, literal) pairs of a UID FETCH answer: header line, literal, `)`."""
    pending: int | None = None
    for line in lines:
        if isinstance(line, bytearray) and pending is not None:
            yield pending, bytes(line)
            pending = None
        elif isinstance(line, bytes) and b"FETCH" in line:
            match = _FETCH_UID.search(line)
            pending = number(match.group(1)) if match else None


def list_folders(lines: list[Any]) -> list[tuple[frozenset[str], str]]:
    """(flags, name) from a LIST answer, names exactly as the server spelled them (quoted, literal, mUTF-7)."""
    out: list[tuple[frozenset[str], str]] = []
    items = list(lines)
    for i, line in enumerate(items):
        if not isinstance(line, bytes):
            continue
        match = _LIST.match(line.strip())
        if match is None:
            continue
        flags = frozenset(f.lower() for f in match.group("flags").decode("ascii", "replace").split())
        raw = match.group("name")
        literal = _LITERAL.search(raw)
        if literal and i + 1 < len(items) and isinstance(items[i + 1], bytes | bytearray):
            name = bytes(items[i + 1]).decode("utf-8", "replace")
        elif raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
            name = re.sub(rb"\\(.)", rb"\1", raw[1:-1]).decode("utf-8", "replace")
        else:
            name = raw.decode("utf-8", "replace")
        out.append((flags, name))
    return out


def quoted(name: str) -> str:
    """A mailbox name as an IMAP quoted string (aioimaplib sends arguments as they are)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Watcher:
    """Watches one mailbox's INBOX: IDLE where offered, polling otherwise; never stops sending."""

    def __init__(
        self,
        mailbox: Mailbox,
        db: Any,
        config: Callable[[], Config],
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        opening: anyio.CapacityLimiter | None = None,
        tokens: oauth.Tokens | None = None,
        wake_other: Callable[[str], None] = lambda address: None,
    ) -> None:
        self.tokens = tokens if tokens is not None else oauth.Tokens(clock)  # shared with the SMTP sessions
        self.clock = clock  # the daemon's one clock: instants recorded by replies, bounces and settlements
        self.opening = opening  # sessions being opened at once, shared by the daemon's watchers
        self.wake = wake  # the mailbox's sender loop: a settled message may be due now
        self.wake_other = wake_other  # another mailbox's loop, whose queue a settlement changed
        self.woken: set[str] = set()  # mailboxes given a follow-up by the settlements of this round
        self.mailbox = mailbox
        self.address = mailbox.address
        self.db = db  # dispatch.AsyncStore: calls fn(store, *args) without blocking the loop on a lock
        self.config = config
        self.log = logs.get(mailbox=mailbox.address)
        self.backoff = 1.0
        self._settled_at = 0.0
        self.unsubscribe_key = b""  # read from the database at the first fetch
        self.watching = False  # a session is logged in and watching INBOX (/metrics counts them)

    async def run(self) -> None:
        while True:
            try:
                await self.session()
            except Exception as exc:  # whatever one session raises ends that session alone
                detail = redact.clean(str(exc) or type(exc).__name__)
                self.log.warning("imap.error", detail=detail, kind=type(exc).__name__, retry_in=self.backoff)
            await anyio.sleep(self.backoff)
            self.backoff = min(self.backoff * 2, 300.0)

    async def session(self) -> None:
        server = self.mailbox.imap
        assert server is not None
        if server.auth.secret is not None:
            redact.register(server.auth.username, server.auth.secret.reveal())
        client: _Client | None = None
        with anyio.CancelScope() as scope:
            try:
                # A few sessions open at a time (TLS, LOGIN, SELECT): 2,000 mailboxes starting together
                # timed out half their logins against one Dovecot; the server and the loop take turns.
                async with self.opening or contextlib.nullcontext():
                    client = _Client(
                        host=server.host,
                        port=server.port,
                        timeout=server.timeout,
                        conn_lost_cb=lambda exc: scope.cancel(),
                        ssl_context=tls_context(server) if server.security == "tls" else None,
                    )
                    validity = await self._open(client, server)
                self.watching = True
                await self._serve(client, server, validity)
            finally:
                self.watching = False
                if client is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await _logout(client)
        refused = client.protocol.refused if client is not None else None
        raise ImapFailure(refused or "connection lost")

    async def _open(self, client: aioimaplib.IMAP4, server: Server) -> int:
        """Greeting, LOGIN and SELECT INBOX: the session's UIDVALIDITY."""
        await client.wait_hello_from_server()
        await login(client, server, self.address, self.tokens)
        return await self._select_inbox(client)

    async def _serve(self, client: aioimaplib.IMAP4, server: Server, validity: int) -> None:
        self.backoff = 1.0
        idle = client.has_capability("IDLE")
        position = await self.db(Store.imap_position, self.address)
        self.log.info("imap.watching", uidvalidity=validity, after_uid=position[1] if position else 0, idle=idle)
        while True:
            if await self.settle_uncertain(client) | await self.file_copies(client):
                validity = await self._select_inbox(client)
            await self.fetch_new(client, validity)
            if idle:
                await self._idle(client, server.poll)
            else:
                await anyio.sleep(server.poll)
                _ok(await client.noop(), "NOOP")

    async def _select_inbox(self, client: aioimaplib.IMAP4) -> int:
        selected = _ok(await client.select("INBOX"), "SELECT INBOX")
        text = b" ".join(x for x in selected.lines if isinstance(x, bytes | bytearray))
        validity_match, next_match = _UIDVALIDITY.search(text), _UIDNEXT.search(text)
        validity = number(validity_match.group(1)) if validity_match else 0
        uidnext = number(next_match.group(1)) if next_match else 1
        position = await self.db(Store.imap_position, self.address)
        if position is None or position[0] != validity:
            # First watch (or a recreated INBOX): start with what arrives from now on.
            await self.db(_set_position, self.address, validity, max(uidnext - 1, 0))
        return validity

    async def _idle(self, client: aioimaplib.IMAP4, poll: float) -> None:
        task = await client.idle_start(timeout=max(poll, 60.0))
        try:
            await client.wait_server_push(timeout=max(poll, 60.0) + 10)
        except TimeoutError:
            pass
        client.idle_done()
        with anyio.fail_after(30):
            await task

    async def fetch_new(self, client: aioimaplib.IMAP4, validity: int) -> int:
        """Read what arrived after the last seen UID, in chunks, acting on each chunk in one commit."""
        position = await self.db(Store.imap_position, self.address)
        last = position[1] if position else 0
        found = _ok(await client.uid_search("UID", f"{last + 1}:*", charset=None), "UID SEARCH")
        first = found.lines[0] if found.lines and isinstance(found.lines[0], bytes | bytearray) else b""
        # `n:*` always matches the highest UID, even below n: keep only what is new.
        uids = sorted(u for u in (number(x) for x in bytes(first).split() if x.isdigit()) if u > last)
        for start in range(0, len(uids), FETCH_CHUNK):
            # Chunks: one FETCH answer of thousands of literals overflows aioimaplib's parser.
            await self._fetch_chunk(client, validity, uids[start : start + FETCH_CHUNK])
        return len(uids)

    async def _fetch_chunk(self, client: aioimaplib.IMAP4, validity: int, uids: list[int]) -> None:
        wanted = ",".join(str(u) for u in uids)
        answer = _ok(await client.uid("fetch", wanted, f"(UID {HEADER_PARTS})"), "UID FETCH")
        asked = set(uids)
        new = sorted((uid, raw) for uid, raw in fetched(answer.lines) if uid in asked)
        own = frozenset(m.address.lower() for m in self.config().mailboxes)
        if not self.unsubscribe_key:
            self.unsubscribe_key = await self.db(Store.unsubscribe_key)
        verdicts: list[tuple[int, Verdict]] = []
        for uid, raw in new:
            verdict = classify_headers(raw, own, self.unsubscribe_key)
            if verdict.kind == "bounce?" or (verdict.kind == "reply" and await self._from_a_prospect(verdict)):
                full = _ok(await client.uid("fetch", str(uid), f"(UID {FULL_PART})"), "UID FETCH")
                bodies = [body for u, body in fetched(full.lines) if u == uid]
                body = bodies[0] if bodies else raw
                if verdict.kind == "bounce?":
                    verdicts += [(uid, v) for v in classify_bounce(body)]
                    continue
                if says_unsubscribe(body):
                    why = "a reply that says only to unsubscribe"
                    verdict = Verdict("unsubscribe", why, verdict.message_ids, verdict.sender)
            verdicts.append((uid, verdict))
        for uid, v in verdicts:
            if v.kind == "ignore":
                self.log.debug("imap.ignored", uid=uid, why=v.why, sender=v.sender, recipient=v.recipient)
        events = await self.db(self.apply, verdicts, validity, uids[-1])
        for name, fields in events:
            (self.log.debug if name == "imap.ignored" else self.log.info)(name, **fields)

    async def _from_a_prospect(self, v: Verdict) -> bool:
        """Worth reading the body of (to see whether it only says "unsubscribe"): it answers one of our
        messages, or comes from an address enrolled here. The rep's other mail is never fetched whole."""
        if v.message_ids:
            return True
        return bool(await self.db(Store.enrollments_of_sender, v.sender, self.address))

    def apply(
        self, store: Store, verdicts: list[tuple[int, Verdict]], validity: int, last_uid: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """Act on a batch and move the position in the same commit: nothing missed, nothing twice."""
        config = self.config()
        now = self.clock()
        events: list[tuple[str, dict[str, Any]]] = []
        with store.transaction():
            for uid, v in verdicts:
                if v.kind == "reply":
                    events += self._reply(store, config, uid, v, now)
                elif v.kind == "unsubscribe":
                    events += self._unsubscribe(store, uid, v, now)
                elif v.kind in ("bounce", "blocked", "expired"):
                    events += self._bounce(store, uid, v, now)
            mailbox = next((m for m in config.mailboxes if m.address == self.address), self.mailbox)  # as reloaded
            if any(name == "bounce.detected" for name, _ in events) and mailbox.pause_on is not None:
                rule = mailbox.pause_on
                since = timing.first_day_of(now, rule.window_days, self.mailbox.schedule.timezone)
                paused = store.pause_if(self.address, rule, since, now)
                if paused is not None:
                    reason, (attempts, bounces, blocks) = paused
                    fields = {"detail": reason, "sends": attempts, "bounces": bounces, "blocks": blocks, "since": since}
                    events.append(("mailbox.auto_paused", fields))
            store.set_imap_position(self.address, validity, last_uid)
        if any(name == "mailbox.auto_paused" for name, _ in events):
            self.wake()  # its loop marks what is due as paused
        return events

    def _reply(self, store: Store, config: Config, uid: int, v: Verdict, now: float) -> list[tuple[str, Any]]:
        found = (
            store.enrollments_of_message_ids(v.message_ids)
            if v.message_ids
            else store.enrollments_of_sender(v.sender, self.address)
        )
        stop = [eid for eid, cadence, _email, state in found if state == "active" and _stop_on_reply(config, cadence)]
        events: list[tuple[str, Any]] = []
        cancelled: list[int] = []
        if stop:
            cancelled = store.end_enrollments(stop, "replied", now, "the prospect replied")
            events = [
                ("reply.detected", {"uid": uid, "cadence": cadence, "prospect": prospect, "how": v.why})
                for eid, cadence, prospect, state in found
                if eid in stop and state == "active"
            ]
        # stop_on_reply = "company": the reply's domain (the prospect's, or a colleague's writing without reply
        # headers) stops the cadence for everyone there, but for free-mail domains, where it is no company.
        domain = v.sender.rpartition("@")[2].lower()
        companies = [c.name for c in config.cadences if c.stop_company]
        if companies and domain and domain not in FREE_MAIL:
            for cadence in companies:
                ours = any(c == cadence for _eid, c, _email, _state in found) or store.wrote_to_domain(
                    cadence, domain, self.address
                )
                if not ours:
                    continue
                detail = f"a reply from {domain} (stop_on_reply = company)"
                prospects, done = store.stop_domain(cadence, domain, now, detail)
                events += [
                    ("reply.detected", {"uid": uid, "cadence": cadence, "prospect": p, "how": "company"})
                    for p in prospects
                ]
                cancelled += done
        return events + [("message.cancelled", {"message": m, "reason": "replied"}) for m in cancelled]

    def _unsubscribe(self, store: Store, uid: int, v: Verdict, now: float) -> list[tuple[str, Any]]:
        """The prospect asked to hear no more: suppressed, every cadence of theirs stopped (SPEC §11)."""
        detail = "the prospect unsubscribed"
        if v.enrollment:
            found = store.unsubscribe(v.enrollment, now, detail)
            done = [found] if found is not None else []
        else:  # a reply: the prospects of the thread it answers, or of its sender here; no one else
            known = (
                store.enrollments_of_message_ids(v.message_ids)
                if v.message_ids
                else store.enrollments_of_sender(v.sender, self.address)
            )
            prospects = dict.fromkeys(email for _eid, _cadence, email, _state in known)
            done = [(p, store.unsubscribe_address(p, now, detail)) for p in prospects]
        events: list[tuple[str, Any]] = []
        for prospect, cancelled in done:
            events.append(("unsubscribe.detected", {"uid": uid, "prospect": prospect, "how": v.why}))
            events += [("message.cancelled", {"message": m, "reason": "unsubscribed"}) for m in cancelled]
        return events

    def _bounce(self, store: Store, uid: int, v: Verdict, now: float) -> list[tuple[str, Any]]:
        """A failed DSN for one of our messages to this very recipient (its Final- or Original-Recipient):
        suppress (bounce), stop (blocked), or stop and keep the address (expired). What changes nothing is
        logged at debug with why."""
        events: list[tuple[str, Any]] = []
        named = {v.recipient, v.original} - {""}
        found = store.enrollments_of_message_ids(v.message_ids)
        for eid, cadence, prospect, _state in found:
            if prospect not in named:
                why = f"the DSN names {' / '.join(sorted(named))}, not {prospect}, the recipient of that message"
                events.append(("imap.ignored", {"uid": uid, "why": why, "recipient": v.recipient}))
                continue
            detail = f"DSN in {self.address}: {v.why}"[:300]
            if v.kind == "bounce":
                cancelled = store.bounce_address(prospect, eid, now, detail)
                reason = "bounced"
            elif v.kind == "blocked":
                cancelled = store.end_enrollments([eid], "stopped", now, f"stopped after a block: {v.status}")
                reason = "blocked"
            else:
                cancelled = store.end_enrollments([eid], "stopped", now, f"stopped: delivery expired ({v.status})")
                reason = "expired"
            store.dsn_failed(v.message_ids, prospect, reason, detail, self.address)
            if reason != "expired":  # a relay's expired queue entry says nothing of the address or the sender
                day = timing.local_day(now, self.mailbox.schedule.timezone)
                store.count_failure(self.address, day, reason, False)
            events.append(
                (
                    "bounce.detected",
                    {"uid": uid, "cadence": cadence, "prospect": prospect, "status": v.status, "kind": reason},
                )
            )
            events += [("message.cancelled", {"message": m, "reason": reason}) for m in cancelled]
        if not found:
            why = "a DSN for a message that is no longer in the outbox"
            events.append(("imap.ignored", {"uid": uid, "why": why, "recipient": v.recipient}))
        return events

    async def settle_uncertain(self, client: aioimaplib.IMAP4) -> bool:
        """Where the provider files submitted mail in Sent itself, look there for `uncertain` sends.

        Found → sent. Not found after `settle_after` (providers file late) → sent again, unless another
        daemon's takeover left it uncertain (that daemon may deliver it yet): it waits for the operator, as
        an uncertain message does everywhere else. True when the session left INBOX.
        """
        if self.mailbox.sent_copies != "provider" or time.monotonic() - self._settled_at < SETTLE_EVERY:
            return False
        self._settled_at = time.monotonic()
        pending = await self.db(Store.uncertain_message_ids, self.address)
        if not pending:
            return False
        sent = await sent_folder(client)
        if sent is None:
            self.log.warning("imap.no_sent_folder", detail="no SPECIAL-USE \\Sent folder: uncertain sends wait")
            return False
        _ok(await client.select(quoted(sent)), f"SELECT {sent}")
        settle_after = self.config().daemon.settle_after
        changed = False
        for message, message_id, since, taken_over in pending:
            found = _ok(await client.uid_search("HEADER", "Message-ID", quoted(message_id), charset=None), "SEARCH")
            first = found.lines[0] if found.lines else b""
            delivered = isinstance(first, bytes | bytearray) and bool(bytes(first).split())
            if not delivered and (taken_over or self.clock() - since < settle_after):
                # Not filed yet; or orphaned by a takeover: the daemon that claimed it may be stopped or cut
                # off, not dead, and deliver it after any settle_after. Found, it is sent; else the operator says.
                continue
            await self.db(self._settle, message, delivered, sent, since)
            changed = True
            self.log.info("message.settled", message=message, message_id=message_id, sent=delivered, folder=sent)
        if changed:
            self.wake()
            for address in self.woken - {self.address}:
                self.wake_other(address)  # a follow-up scheduled on another mailbox (a step's own sender)
            self.woken.clear()
        return True

    async def file_copies(self, client: aioimaplib.IMAP4) -> bool:
        """sent_copies = "append": save what the server took to the Sent folder, flagged \\Seen, once.

        A copy already there (saved before a crash could forget it) is not saved again; a refused APPEND is
        logged and tried at the next round, and never sends anything again. True when the session left INBOX.
        """
        if self.mailbox.sent_copies != "append":
            return False
        due = await self.db(Store.sent_copies_due, self.address, COPIES_PER_ROUND)
        if not due:
            return False
        sent = await sent_folder(client)
        if sent is None:
            self.log.warning("imap.no_sent_folder", detail=f"no SPECIAL-USE \\Sent folder: {len(due)}+ copies wait")
            return False
        _ok(await client.select(quoted(sent)), f"SELECT {sent}")
        for message, message_id, content in due:
            found = _ok(await client.uid_search("HEADER", "Message-ID", quoted(message_id), charset=None), "SEARCH")
            first = found.lines[0] if found.lines else b""
            if not (isinstance(first, bytes | bytearray) and bytes(first).split()):
                answer = await client.append(content, mailbox=quoted(sent), flags="\\Seen")
                if answer.result != "OK":
                    text = b" ".join(x for x in answer.lines if isinstance(x, bytes)).decode(errors="replace")
                    detail = f"APPEND {answer.result} {redact.clean(text, 200)}"
                    await self.db(Store.copy_failed, message, detail)
                    self.log.warning("imap.copy_failed", message=message, folder=sent, detail=detail)
                    continue
            await self.db(Store.copy_filed, message)
            self.log.info("message.copied", message=message, message_id=message_id, folder=sent)
        return True

    def _settle(self, store: Store, message: int, delivered: bool, folder: str, since: float) -> None:
        """Found in Sent: it was delivered when it was attempted (`since`): sent then, counted in that day, and
        the next step scheduled from then, as a send the server answered; not found: send it."""
        now = self.clock()
        sent_at = since or now
        day = timing.local_day(sent_at, self.mailbox.schedule.timezone)
        detail = f"settled from {folder}: {'found' if delivered else 'not found'} there"
        with store.transaction():
            row = store.settle_uncertain(message, delivered, sent_at, detail, day)
            if row is None or not delivered:
                return
            enrollment, step, cadence_name, sticky = row
            following = lifecycle.next_step(self.config(), cadence_name, step, sticky, sent_at)
            if following is None:
                store.finish_enrollment(enrollment, now)  # the last step, or a cadence no longer configured
            else:
                store.schedule_step(enrollment, *following)
                self.woken.add(following.sender)


def _set_position(store: Store, mailbox: str, validity: int, last_uid: int) -> None:
    with store.transaction():
        store.set_imap_position(mailbox, validity, last_uid)


# Where an address is a person's, not a company's: a reply from one stops that prospect only (stop_on_reply =
# "company" does not reach its neighbours). The big providers of free mail, by market.
FREE_MAIL = frozenset(
    (
        "gmail.com googlemail.com outlook.com hotmail.com hotmail.co.uk hotmail.fr hotmail.de live.com msn.com "
        "yahoo.com yahoo.co.uk yahoo.fr yahoo.de ymail.com rocketmail.com icloud.com me.com mac.com aol.com "
        "proton.me protonmail.com pm.me tutanota.com tuta.io fastmail.com hey.com zoho.com mail.com gmx.com "
        "gmx.de gmx.net gmx.at web.de t-online.de freenet.de posteo.de orange.fr wanadoo.fr free.fr laposte.net "
        "sfr.fr libero.it virgilio.it btinternet.com sky.com comcast.net verizon.net att.net sbcglobal.net "
        "yandex.ru yandex.com mail.ru rambler.ru qq.com 163.com 126.com naver.com seznam.cz wp.pl o2.pl "
        "interia.pl bluewin.ch shaw.ca rogers.com bigpond.com optusnet.com.au uol.com.br bol.com.br"
    ).split()
)


def _stop_on_reply(config: Config, cadence: str) -> bool:
    try:
        return config.cadence(cadence).stop_on_reply
    except KeyError:
        return True


async def login(client: aioimaplib.IMAP4, server: Server, address: str, tokens: oauth.Tokens) -> None:
    """LOGIN with the password, or AUTHENTICATE XOAUTH2 with the mailbox's token (refused: one fresh one)."""
    auth = server.auth
    if auth.mechanism == "oauth2":
        assert auth.oauth2 is not None
        token = await _token(tokens, address, auth.oauth2)
        answer = await client.xoauth2(auth.username, token)
        if answer.result != "OK" and client.protocol.state == aioimaplib.NONAUTH:
            tokens.refused(address, auth.oauth2, token)  # expired early or revoked: once more
            answer = await client.xoauth2(auth.username, await _token(tokens, address, auth.oauth2))
        _ok(answer, "AUTHENTICATE XOAUTH2")
    elif auth.mechanism == "xoauth2":
        token = await command_token(auth.token_command, auth.username)
        _ok(await client.xoauth2(auth.username, token), "AUTHENTICATE XOAUTH2")
    else:
        secret = auth.secret.reveal() if auth.secret is not None else ""
        _ok(await client.login(auth.username, secret), "LOGIN")


async def _token(tokens: oauth.Tokens, address: str, settings: OAuth2) -> str:
    try:
        return await tokens.get(address, settings)
    except oauth.TokenError as exc:
        raise ImapFailure(f"oauth2: {exc}") from None


async def check(mailbox: Mailbox, tokens: oauth.Tokens, report: Callable[[str], None]) -> None:
    """`cadenced mailbox test`: connect, log in, INBOX and the Sent folder, each step reported as it passes."""
    server = mailbox.imap
    assert server is not None
    client = _Client(
        host=server.host,
        port=server.port,
        timeout=server.timeout,
        ssl_context=tls_context(server) if server.security == "tls" else None,
    )
    where = f"IMAP {server.host}:{server.port} {server.security}"
    try:
        with anyio.fail_after(server.timeout * 4):
            await client.wait_hello_from_server()
            report(f"{where}: connected")
            await login(client, server, mailbox.address, tokens)
            how = "AUTHENTICATE XOAUTH2" if server.auth.mechanism != "password" else "LOGIN"
            report(f"{where}: {how} ok")
            selected = _ok(await client.select("INBOX"), "SELECT INBOX")
            exists = next((bytes(x).split()[0].decode() for x in selected.lines if bytes(x).endswith(b" EXISTS")), "?")
            report(f"{where}: INBOX has {exists} messages")
            sent = await sent_folder(client)
            report(f"{where}: Sent folder: {sent!r}" if sent else f"{where}: no SPECIAL-USE \\Sent folder")
    except TimeoutError:
        raise ImapFailure(f"{where}: no answer within {server.timeout * 4:.0f} s") from None
    except OSError as exc:
        raise ImapFailure(f"{where}: {redact.clean(str(exc) or type(exc).__name__)}") from None
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await _logout(client)


async def sent_folder(client: aioimaplib.IMAP4) -> str | None:
    """The name of the SPECIAL-USE \\Sent folder (RFC 6154), or None when the server marks none."""
    listing = _ok(await client.list('""', "*"), "LIST")
    return next((name for flags, name in list_folders(listing.lines) if "\\sent" in flags), None)


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        text = b" ".join(x for x in response.lines if isinstance(x, bytes)).decode(errors="replace")
        raise ImapFailure(f"{what}: {response.result} {redact.clean(text, 200)}")
    return response


async def _logout(client: aioimaplib.IMAP4) -> None:
    """LOGOUT when we can, then drop the transport and wait (bounded) until it is really closed."""
    protocol = client.protocol
    lost = anyio.Event()
    protocol.conn_lost_cb = lambda exc: lost.set()
    try:
        if protocol.transport is not None and not protocol.transport.is_closing():
            with anyio.move_on_after(3):
                if client.has_pending_idle():
                    client.idle_done()  # DONE first: a server answers nothing else while IDLE runs
                await client.logout()
    except Exception:  # the connection may already be gone; nothing to report
        pass
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.abort()
    elif transport is None:
        return
    with anyio.move_on_after(2):
        await lost.wait()
