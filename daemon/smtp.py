"""aiosmtplib connection per mailbox; every failure becomes one of the outcome types of errors.py."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import os
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiosmtplib
import anyio
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, PERIOD_REGEX, normalize_message_line_endings

from daemon import oauth, outcomes, redact
from daemon.errors import LeaseExpired, MailboxDown, SmtpFailure
from daemon.model import Mailbox, OAuth2, Server
from daemon.outcomes import AUTH, CONNECT, DATA, EHLO, END, MAIL, RCPT

# asyncio's TLS transport reads into a buffer of 256 KiB per connection, allocated and zeroed whole
# (SSLProtocol.max_size); with an IMAP session per mailbox that was most of the daemon's memory. A TLS
# record is at most 16 KiB, so 32 KiB reads lose nothing. Measured: 303 KB -> 79 KB per IDLE session.
asyncio.sslproto.SSLProtocol.max_size = 32 * 1024

_PLAIN_ADDRESS = re.compile(r"[!-~]+")  # ASCII, no space or control: safe on a command line as it is


@dataclass(frozen=True, slots=True)
class Accepted:
    code: int
    text: str


def tls_context(server: Server) -> ssl.SSLContext:
    """System trust plus the mailbox's own CA bundle; certificates always verified (SMTP and IMAP).

    One context per CA bundle (and version of its file), shared by every
    connection that uses it: each context holds its own copy of the system
    trust store, about 1 MB, which made an IMAP session cost 1.2 MB.
    """
    stamp = None
    if server.ca_file:
        try:
            st = os.stat(server.ca_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            pass  # load_verify_locations says why
    return _shared_context(server.ca_file, stamp)


@functools.lru_cache(maxsize=64)
def _shared_context(ca_file: str | None, stamp: tuple[int, int, int] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


async def command_token(command: tuple[str, ...], username: str) -> str:
    result = await anyio.run_process(list(command), check=False)
    if result.returncode != 0:
        raise MailboxDown(None, f"token_command exited {result.returncode}", stage=AUTH)
    token = result.stdout.decode(errors="replace").strip()
    redact.register(username, token)
    return token


async def access_token(tokens: oauth.Tokens, address: str, settings: OAuth2) -> str:
    """The mailbox's access token, or the failure that stops it: `reauthorise` waits for the operator."""
    try:
        return await tokens.get(address, settings)
    except oauth.GrantRevoked as exc:
        raise MailboxDown(None, str(exc), stage=AUTH) from None
    except oauth.TokenError as exc:
        raise MailboxDown(None, f"oauth2: {exc}", stage=AUTH) from None


def choose_mechanism(offered: list[str], configured: str) -> str | None:
    """The one AUTH mechanism to use: XOAUTH2 when configured, else PLAIN, else LOGIN."""
    if configured in ("xoauth2", "oauth2"):
        return "xoauth2" if "xoauth2" in offered else None
    return next((m for m in ("plain", "login") if m in offered), None)


class Connection:
    """One SMTP connection of one mailbox, opened on demand and reused across its sends."""

    def __init__(self, mailbox: Mailbox, tokens: oauth.Tokens | None = None) -> None:
        self.mailbox = mailbox
        self.tokens = tokens if tokens is not None else oauth.Tokens()
        self.client: aiosmtplib.SMTP | None = None
        auth = mailbox.smtp.auth
        if auth.secret is not None:
            redact.register(auth.username, auth.secret.reveal())

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.is_connected

    def _client(self) -> aiosmtplib.SMTP:
        server = self.mailbox.smtp
        return aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            use_tls=server.security == "tls",
            start_tls=server.security == "starttls",
            validate_certs=True,
            tls_context=tls_context(server) if server.security != "none" else None,
            timeout=server.timeout,
            local_hostname=self.mailbox.helo_name or None,
        )

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        """One AUTH attempt with one mechanism: a wrong password costs one failed login, not two."""
        auth = self.mailbox.smtp.auth
        if auth.mechanism == "password" and auth.secret is None:
            return
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()  # connect() says EHLO only around STARTTLS: the AUTH offer comes with it
        mechanism = choose_mechanism(client.server_auth_methods, auth.mechanism)
        if mechanism is None:
            offered = " ".join(client.server_auth_methods).upper() or "no AUTH"
            wanted = "PLAIN or LOGIN" if auth.mechanism == "password" else "XOAUTH2"
            raise MailboxDown(None, f"the server offers {offered}, not {wanted}", stage=AUTH)
        if auth.mechanism == "oauth2":
            await self._oauth2_login(client)
        elif mechanism == "xoauth2":
            await client.auth_xoauth2(auth.username, await command_token(auth.token_command, auth.username))
        else:
            assert auth.secret is not None
            login = client.auth_plain if mechanism == "plain" else client.auth_login
            await login(auth.username, auth.secret.reveal())

    async def _oauth2_login(self, client: aiosmtplib.SMTP) -> None:
        """XOAUTH2 with the mailbox's cached token; refused, once more with a fresh one (it may have been revoked
        or expired early), then the refusal stands."""
        auth = self.mailbox.smtp.auth
        assert auth.oauth2 is not None
        token = await access_token(self.tokens, self.mailbox.address, auth.oauth2)
        try:
            await client.auth_xoauth2(auth.username, token)
        except aiosmtplib.SMTPAuthenticationError:
            self.tokens.refused(self.mailbox.address, auth.oauth2, token)
            if not client.is_connected:
                raise
            await client.auth_xoauth2(auth.username, await access_token(self.tokens, self.mailbox.address, auth.oauth2))

    async def open(self) -> None:
        """Connect, TLS, EHLO and AUTH; raise the classified failure (the mailbox's, or throttled)."""
        await self.close()
        client = self._client()
        stage = CONNECT
        try:
            with anyio.fail_after(self.mailbox.smtp.timeout * 4):
                await client.connect()
                stage = EHLO
                if client.is_ehlo_or_helo_needed:
                    try:
                        await client.ehlo()
                    except aiosmtplib.SMTPHeloError:
                        if not client.is_connected:
                            raise
                        await client.helo()
                stage = AUTH
                await self._login(client)
        except SmtpFailure:
            await _abort(client)
            raise
        except aiosmtplib.SMTPResponseException as exc:
            await _abort(client)
            raise outcomes.classify(stage, exc.code, redact.clean(exc.message)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
            await _abort(client)
            raise MailboxDown(None, _describe(exc), stage=stage) from None
        except BaseException:
            await _abort(client)
            raise
        self.client = client

    async def probe(self) -> None:
        """Connect + EHLO + AUTH, no mail; raise SmtpFailure when the mailbox is still unusable."""
        try:
            await self.open()
        finally:
            await self.close()

    async def send(
        self, message: bytes, sender: str, recipient: str, still_ours: Callable[[], bool] | None = None
    ) -> Accepted:
        """One transaction; raise the SmtpFailure that the reply and the stage it came at make it.

        `still_ours` is asked just before the content and its final dot leave (the end of DATA): False abandons
        the transaction (the connection is dropped, the server discards it) with LeaseExpired.

        Pipelined (RFC 2920) when the server offers it: MAIL, RCPT and DATA go
        in one write, and the content after the 354, so a message costs two
        round trips instead of four (Gmail, Microsoft 365, Postfix and Exim all
        offer PIPELINING). aiosmtplib has no pipelining of its own; its
        commands are used otherwise.
        """
        if not self.is_open:
            await self.open()
        client = self.client
        assert client is not None and client.protocol is not None
        at = _Stage()
        at.still_ours = still_ours
        try:
            if (
                client.supports_extension("pipelining")
                and _PLAIN_ADDRESS.fullmatch(sender)
                and _PLAIN_ADDRESS.fullmatch(recipient)
            ):
                return await self._send_pipelined(client, message, sender, recipient, at)
            return await self._send_stepwise(client, message, sender, recipient, at)
        except LeaseExpired:
            await self.close(quit=False)  # mid-DATA: the server discards what it has when the connection drops
            raise
        except _Refusal as refusal:
            raise await self._refused(client, refusal.stage, refusal.reply.code, refusal.reply.message) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise await self._refused(client, at.stage, exc.code, exc.message) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close(quit=False)  # out of step with the server (it may be reading content): no QUIT
            raise outcomes.classify(at.stage, None, f"{_describe(exc)} during {at.stage.upper()}") from None
        except BaseException:
            await self.close()  # cancelled mid-transaction: the protocol is out of step
            raise

    async def _send_pipelined(
        self, client: aiosmtplib.SMTP, message: bytes, sender: str, recipient: str, at: _Stage
    ) -> Accepted:
        protocol = client.protocol
        assert protocol is not None
        replies = _Replies(protocol, self.mailbox.smtp.timeout * 4)
        try:
            protocol.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
            mail = await replies.next()
            at.stage = RCPT
            rcpt = await replies.next()
            at.stage = DATA
            data = await replies.next()
            if mail.code != 250 or rcpt.code not in (250, 251):
                if data.code == 354:
                    # A server that takes DATA with no valid recipient gets an empty message to refuse.
                    protocol.write(b".\r\n")
                    await replies.next()
                raise _Refusal(MAIL, mail) if mail.code != 250 else _Refusal(RCPT, rcpt)
            if data.code != 354:
                raise _Refusal(DATA, data)
            at.check()
            at.stage = END
            protocol.write(PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n")
            final = await replies.next()
            if final.code != 250:
                raise _Refusal(END, final)
        finally:
            replies.close()
        return Accepted(final.code, redact.clean(final.message))

    async def _send_stepwise(
        self, client: aiosmtplib.SMTP, message: bytes, sender: str, recipient: str, at: _Stage
    ) -> Accepted:
        protocol = client.protocol
        assert protocol is not None
        plain_write = protocol.write

        def write(data: bytes) -> None:
            # aiosmtplib sends DATA and the content in one call: the content leaving is the end of DATA.
            if at.stage == DATA and data != b"DATA\r\n":
                at.check()
                at.stage = END
            plain_write(data)

        protocol.write = write  # type: ignore[method-assign]
        try:
            with anyio.fail_after(self.mailbox.smtp.timeout * 4):
                await client.mail(sender)
                at.stage = RCPT
                await client.rcpt(recipient)
                at.stage = DATA
                response = await client.data(message)
            return Accepted(response.code, redact.clean(response.message))
        finally:
            protocol.write = plain_write  # type: ignore[method-assign]

    async def _refused(self, client: aiosmtplib.SMTP, stage: str, code: int, text: str) -> SmtpFailure:
        """The failure a reply makes; the connection is reset for the next message, or closed."""
        failure = outcomes.classify(stage, code, redact.clean(text))
        if code < 200 or not client.is_connected:
            await self.close(quit=False)  # no valid reply: out of step with the server
        elif code == 421:
            await self.close()
        else:
            await _reset(client)
        return failure

    async def close(self, quit: bool = True) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _abort(client, quit)


class _Stage:
    """How far one transaction got: the stage a failure is classified at."""

    __slots__ = ("stage", "still_ours")

    def __init__(self) -> None:
        self.stage = MAIL
        self.still_ours: Callable[[], bool] | None = None

    def check(self) -> None:
        """Before the end of DATA: the message may still be sent by this daemon (its lease)."""
        if self.still_ours is not None and not self.still_ours():
            raise LeaseExpired("the lease on the mailbox ran out by this daemon's clock before the end of DATA")


class _Refusal(Exception):
    """A pipelined reply that is not the one wanted, with the stage of the command it answers."""

    def __init__(self, stage: str, reply: aiosmtplib.SMTPResponse) -> None:
        super().__init__(stage)
        self.stage = stage
        self.reply = reply


class _Replies:
    """The replies to pipelined commands, in order, read off aiosmtplib's connection.

    aiosmtplib's protocol keeps one reply and drops what follows it in the same
    packet, so while commands are pipelined its `data_received` is replaced by
    this reader (as `send` replaces `write`), and restored by `close()`. The
    bounds are aiosmtplib's: a line of 8 KiB, a reply of 32 KiB.
    """

    def __init__(self, protocol: Any, timeout: float) -> None:
        self.protocol = protocol
        self.buffer = bytearray()  # the line being received
        self._lines: list[bytes] = []  # the reply being received (continuation lines so far)
        self._size = 0
        self.replies: deque[aiosmtplib.SMTPResponse] = deque()
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._lost = protocol.connection_lost
        protocol.data_received = self._received
        protocol.eof_received = self._eof
        protocol.connection_lost = self._connection_lost
        # One timer for the whole transaction (cheaper than a cancel scope per message).
        self._timer = asyncio.get_running_loop().call_later(
            timeout, self._fail, aiosmtplib.SMTPTimeoutError("timed out")
        )

    def close(self) -> None:
        self._timer.cancel()
        for name in ("data_received", "eof_received", "connection_lost"):
            self.protocol.__dict__.pop(name, None)

    async def next(self) -> aiosmtplib.SMTPResponse:
        while not self.replies:
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.replies.popleft()

    def _received(self, data: bytes) -> None:
        """Each line is looked at once as it completes: a reply trickled a byte at a time costs its length."""
        self.buffer += data
        while self.error is None and (end := self.buffer.find(b"\n")) != -1:
            line = bytes(self.buffer[: end + 1])
            del self.buffer[: end + 1]
            if len(line) > MAX_LINE_LENGTH or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed reply line: {line[:80]!r}"))
            elif (size := self._size + len(line)) > MAX_RESPONSE_LENGTH:
                self._fail(aiosmtplib.SMTPResponseException(-1, "reply too long"))
            elif line[3:4] == b"-":
                self._lines.append(line[4:].strip(b" \t\r\n"))
                self._size = size
            else:
                self._lines.append(line[4:].strip(b" \t\r\n"))
                text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                self.replies.append(aiosmtplib.SMTPResponse(int(line[:3]), text))
                self._lines, self._size = [], 0
        if self.error is None and len(self.buffer) > MAX_LINE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(-1, "reply line too long"))
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _eof(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the server closed the connection"))
        return False

    def _connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("connection lost"))
        self._lost(exc)


def is_stale_connection(failure: SmtpFailure, reused: bool) -> bool:
    """An idle connection the server closed under us: nothing was sent, one fresh try is safe."""
    return reused and isinstance(failure, MailboxDown) and failure.code is None and failure.stage in (MAIL, RCPT, DATA)


async def _reset(client: aiosmtplib.SMTP) -> None:
    try:
        with anyio.fail_after(10):
            await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


async def _abort(client: aiosmtplib.SMTP, quit: bool = True) -> None:
    """Say QUIT when the connection is healthy (and `quit`), else drop it; never raise.

    Returns once the transport is really gone (a TLS close needs the loop a
    moment longer), so a short-lived loop such as `mailbox test` leaks nothing.
    """
    protocol = client.protocol
    if quit and client.is_connected:
        try:
            with anyio.fail_after(5):
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
    transport = client.transport
    if isinstance(transport, asyncio.Transport):
        transport.abort()  # no TLS close handshake to wait for: the socket goes now
    client.close()
    if protocol is not None:
        with anyio.move_on_after(2):
            # aiosmtplib exposes no event for a finished close: look, briefly and bounded.
            while protocol.transport is not None:  # noqa: ASYNC110
                await anyio.sleep(0.005)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    return redact.clean(text)
