"""aioimaplib session per mailbox; classifies replies and bounces, and settles uncertain sends."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aioimaplib
import anyio

from daemon import logs
from daemon.config import Config, Mailbox, Server
from daemon.smtp import tls_context
from daemon.store import Store

OUR_MESSAGE_ID = re.compile(r"<cadenced\.\d+\.\d+\.[0-9a-f]+@[^>\s]+>")
_OUT_OF_OFFICE = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response)|autoreply|"
    r"abwesenheitsnotiz|absence|on vacation|vacation reply)\b",
    re.IGNORECASE,
)
_DAEMON_SENDERS = ("mailer-daemon", "postmaster", "mail-daemon")
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_FETCH_UID = re.compile(rb"UID (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
HEADER_PARTS = "BODY.PEEK[HEADER]"
FULL_PART = "BODY.PEEK[]"
FETCH_CHUNK = 200


class ImapFailure(Exception):
    """The IMAP session cannot go on (refused login, NO/BAD answer, lost connection)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # reply | bounce | ignore
    why: str
    message_ids: tuple[str, ...] = ()
    sender: str = ""


def classify_headers(raw: bytes, own: frozenset[str]) -> Verdict:
    """First look, from the headers alone: ignore, reply, or `bounce?` (needs the body)."""
    headers = _HEADERS.parsebytes(raw)
    sender = email.utils.parseaddr(str(headers.get("From", "")))[1].lower()
    if sender in own:
        return Verdict("ignore", "our own mailbox", sender=sender)
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
    thread = f"{headers.get('In-Reply-To', '')} {headers.get('References', '')}"
    ids = tuple(dict.fromkeys(OUR_MESSAGE_ID.findall(thread)))
    if ids:
        return Verdict("reply", "In-Reply-To/References name our message", ids, sender)
    return Verdict("reply", "from the address itself", (), sender)


def classify_bounce(raw: bytes) -> Verdict:
    """A DSN counts only when it names one of our Message-IDs (in the returned headers)."""
    ids = tuple(dict.fromkeys(OUR_MESSAGE_ID.findall(raw.decode("latin-1"))))
    if ids:
        return Verdict("bounce", "delivery status notification naming our message", ids)
    return Verdict("ignore", "delivery status notification for mail that is not ours")


def fetched(lines: list[Any]) -> Iterator[tuple[int, bytes]]:
    """(uid, literal) pairs of a UID FETCH answer: header line, literal, `)`."""
    pending: int | None = None
    for line in lines:
        if isinstance(line, bytearray) and pending is not None:
            yield pending, bytes(line)
            pending = None
        elif isinstance(line, bytes) and b"FETCH" in line:
            match = _FETCH_UID.search(line)
            pending = int(match.group(1)) if match else None


class Watcher:
    """Watches one mailbox's INBOX: IDLE where offered, polling otherwise; never stops sending."""

    def __init__(
        self, mailbox: Mailbox, db: Any, config: Callable[[], Config], wake: Callable[[], None] = lambda: None
    ) -> None:
        self.wake = wake  # the mailbox's sender loop: a settled message may be due now
        self.mailbox = mailbox
        self.address = mailbox.address
        self.db = db  # dispatch.AsyncStore: calls fn(store, *args) without blocking the loop on a lock
        self.config = config
        self.log = logs.get(mailbox=mailbox.address)
        self.backoff = 1.0

    async def run(self) -> None:
        while True:
            try:
                await self.session()
            except (ImapFailure, OSError, TimeoutError, aioimaplib.AioImapException) as exc:
                self.log.warning("imap.error", detail=str(exc) or type(exc).__name__, retry_in=self.backoff)
            await anyio.sleep(self.backoff)
            self.backoff = min(self.backoff * 2, 300.0)

    async def session(self) -> None:
        server = self.mailbox.imap
        assert server is not None
        with anyio.CancelScope() as scope:
            client = aioimaplib.IMAP4(
                host=server.host,
                port=server.port,
                timeout=server.timeout,
                conn_lost_cb=lambda exc: scope.cancel(),
                ssl_context=tls_context(server) if server.security == "tls" else None,
            )
            try:
                await self._serve(client, server)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await _logout(client)
        raise ImapFailure("connection lost")

    async def _serve(self, client: aioimaplib.IMAP4, server: Server) -> None:
        await client.wait_hello_from_server()
        secret = server.auth.secret.reveal() if server.auth.secret is not None else ""
        _ok(await client.login(server.auth.username, secret), "LOGIN")
        await self.settle_uncertain(client)
        selected = _ok(await client.select("INBOX"), "SELECT INBOX")
        text = b" ".join(x for x in selected.lines if isinstance(x, bytes | bytearray))
        validity_match, next_match = _UIDVALIDITY.search(text), _UIDNEXT.search(text)
        validity = int(validity_match.group(1)) if validity_match else 0
        uidnext = int(next_match.group(1)) if next_match else 1
        position = await self.db(Store.imap_position, self.address)
        if position is None or position[0] != validity:
            # First watch (or a recreated INBOX): start with what arrives from now on.
            await self.db(_set_position, self.address, validity, uidnext - 1)
            position = (validity, uidnext - 1)
        self.backoff = 1.0
        idle = client.has_capability("IDLE")
        self.log.info("imap.watching", uidvalidity=validity, after_uid=position[1], idle=idle)
        while True:
            await self.fetch_new(client, validity)
            if idle:
                await self._idle(client, server.poll)
            else:
                await anyio.sleep(server.poll)
                _ok(await client.noop(), "NOOP")

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
        uids = sorted(u for u in (int(x) for x in bytes(first).split() if x.isdigit()) if u > last)
        for start in range(0, len(uids), FETCH_CHUNK):
            # Chunks: one FETCH answer of thousands of literals overflows aioimaplib's parser.
            await self._fetch_chunk(client, validity, uids[start : start + FETCH_CHUNK])
        return len(uids)

    async def _fetch_chunk(self, client: aioimaplib.IMAP4, validity: int, uids: list[int]) -> None:
        wanted = ",".join(str(u) for u in uids)
        answer = _ok(await client.uid("fetch", wanted, f"(UID {HEADER_PARTS})"), "UID FETCH")
        new = sorted((uid, raw) for uid, raw in fetched(answer.lines) if uid in set(uids))
        own = frozenset(m.address.lower() for m in self.config().mailboxes)
        verdicts: list[tuple[int, Verdict]] = []
        for uid, raw in new:
            verdict = classify_headers(raw, own)
            if verdict.kind == "bounce?":
                full = _ok(await client.uid("fetch", str(uid), f"(UID {FULL_PART})"), "UID FETCH")
                bodies = [body for u, body in fetched(full.lines) if u == uid]
                verdict = classify_bounce(bodies[0] if bodies else raw)
            verdicts.append((uid, verdict))
        events = await self.db(self.apply, verdicts, validity, uids[-1])
        for name, fields in events:
            self.log.info(name, **fields)

    def apply(
        self, store: Store, verdicts: list[tuple[int, Verdict]], validity: int, last_uid: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """Act on a batch and move the position in the same commit: nothing missed, nothing twice."""
        config = self.config()
        now = time.time()
        events: list[tuple[str, dict[str, Any]]] = []
        with store.transaction():
            for uid, v in verdicts:
                if v.kind == "reply":
                    found = (
                        store.enrollments_of_message_ids(v.message_ids)
                        if v.message_ids
                        else store.enrollments_of_sender(v.sender, self.address)
                    )
                    stop = [
                        eid
                        for eid, cadence, _email, state in found
                        if state == "active" and _stop_on_reply(config, cadence)
                    ]
                    if not stop:
                        continue
                    cancelled = store.end_enrollments(stop, "replied", now, "the prospect replied")
                    for eid, cadence, prospect, state in found:
                        if eid in stop and state == "active":
                            events.append(
                                (
                                    "reply.detected",
                                    {"uid": uid, "cadence": cadence, "prospect": prospect, "how": v.why},
                                )
                            )
                    events += [("message.cancelled", {"message": m, "reason": "replied"}) for m in cancelled]
                elif v.kind == "bounce":
                    for _eid, cadence, prospect, _state in store.enrollments_of_message_ids(v.message_ids):
                        cancelled = store.bounce_address(prospect, now, f"bounced (DSN in {self.address})")
                        events.append(("bounce.detected", {"uid": uid, "cadence": cadence, "prospect": prospect}))
                        events += [("message.cancelled", {"message": m, "reason": "bounced"}) for m in cancelled]
            store.set_imap_position(self.address, validity, last_uid)
        return events

    async def settle_uncertain(self, client: aioimaplib.IMAP4) -> None:
        """An `uncertain` send is looked up in the Sent folder (SPECIAL-USE \\Sent) by its Message-ID."""
        pending = await self.db(Store.uncertain_message_ids, self.address)
        if not pending:
            return
        listing = _ok(await client.list('""', "*"), "LIST")
        sent = None
        for line in listing.lines:
            if isinstance(line, bytes) and b"\\Sent" in line:
                sent = line.rsplit(b" ", 1)[-1].decode().strip('"')
        if sent is None:
            return
        _ok(await client.select(sent), f"SELECT {sent}")
        for message, message_id in pending:
            found = _ok(await client.uid_search("HEADER", "Message-ID", f'"{message_id}"', charset=None), "SEARCH")
            first = found.lines[0] if found.lines else b""
            delivered = isinstance(first, bytes | bytearray) and bool(bytes(first).split())
            await self.db(self._settle, message, delivered, sent)
            self.log.info("message.settled", message=message, message_id=message_id, sent=delivered, folder=sent)
        self.wake()

    def _settle(self, store: Store, message: int, delivered: bool, folder: str) -> None:
        """Found in Sent: it was delivered (and the next step is scheduled); not found: send it."""
        now = time.time()
        detail = f"settled from {folder}: {'found' if delivered else 'not found'} there"
        with store.transaction():
            row = store.settle_uncertain(message, delivered, now, detail)
            if row is None or not delivered:
                return
            enrollment, step, cadence_name, sticky = row
            try:
                steps = self.config().cadence(cadence_name).steps
            except KeyError:
                return
            if step < len(steps):
                nxt = steps[step]
                store.schedule_step(enrollment, nxt.number, nxt.sender or sticky, now + nxt.wait)
            else:
                store.finish_enrollment(enrollment, now)


def _set_position(store: Store, mailbox: str, validity: int, last_uid: int) -> None:
    with store.transaction():
        store.set_imap_position(mailbox, validity, last_uid)


def _stop_on_reply(config: Config, cadence: str) -> bool:
    try:
        return config.cadence(cadence).stop_on_reply
    except KeyError:
        return True


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        text = b" ".join(x for x in response.lines if isinstance(x, bytes)).decode(errors="replace")
        raise ImapFailure(f"{what}: {response.result} {text[:200]}")
    return response


async def _logout(client: aioimaplib.IMAP4) -> None:
    """LOGOUT when we can, then drop the transport and wait (bounded) until it is really closed."""
    protocol = client.protocol
    lost = anyio.Event()
    protocol.conn_lost_cb = lambda exc: lost.set()
    try:
        if protocol.transport is not None and not protocol.transport.is_closing():
            with anyio.move_on_after(3):
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
