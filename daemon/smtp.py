"""aiosmtplib connection per mailbox; maps every failure to one of our error classes."""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass

import aiosmtplib
import anyio

from daemon.config import Mailbox, Server

# SPEC §5 classes
DISCONNECTED = "disconnected"  # unreachable or refuses us, nothing was sent: the retry queue
UNCERTAIN = "uncertain"  # lost after DATA: maybe delivered, never retried by itself
TRANSIENT = "transient"  # 4xx: retried per retry_delays
PERMANENT = "permanent"  # 5xx for the recipient: failed, bounced, suppressed
QUOTA = "quota"  # the provider's own daily quota: defer to the next window day

_QUOTA = re.compile(r"\b5\.4\.5\b|\b4\.7\.28\b|quota|rate limit|too many messages", re.IGNORECASE)


class SmtpFailure(Exception):
    """A send or probe that did not succeed, classified; the message never holds a secret."""

    def __init__(self, kind: str, code: int | None, text: str) -> None:
        self.kind = kind
        self.code = code
        self.text = text
        super().__init__(f"{kind}: {code or '-'} {text}")


@dataclass(frozen=True, slots=True)
class Accepted:
    code: int
    text: str


def tls_context(server: Server) -> ssl.SSLContext:
    """System trust plus the mailbox's own CA bundle; certificates always verified (SMTP and IMAP)."""
    ctx = ssl.create_default_context()
    if server.ca_file:
        ctx.load_verify_locations(cafile=server.ca_file)
    return ctx


def _classify_response(code: int, text: str) -> str:
    if _QUOTA.search(text) and code >= 400:
        return QUOTA
    if 400 <= code < 500:
        return TRANSIENT
    return PERMANENT


async def _token(command: tuple[str, ...]) -> str:
    result = await anyio.run_process(list(command), check=False)
    if result.returncode != 0:
        raise SmtpFailure(DISCONNECTED, None, f"token_command exited {result.returncode}")
    return result.stdout.decode().strip()


class Connection:
    """One SMTP connection of one mailbox, opened on demand and reused across its sends."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.client: aiosmtplib.SMTP | None = None

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
        )

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        # Our own step after connect(), so a refused login leaves the connection in our hands to close.
        auth = self.mailbox.smtp.auth
        if auth.mechanism == "xoauth2":
            await client.auth_xoauth2(auth.username, await _token(auth.token_command))
        elif auth.secret is not None:
            await client.login(auth.username, auth.secret.reveal())

    async def open(self) -> None:
        """Connect, TLS, EHLO and AUTH; raise SmtpFailure(DISCONNECTED) on any failure."""
        await self.close()
        client = self._client()
        try:
            with anyio.fail_after(self.mailbox.smtp.timeout * 3):
                await client.connect()
                await self._login(client)
        except aiosmtplib.SMTPResponseException as exc:
            await _abort(client)
            raise SmtpFailure(DISCONNECTED, exc.code, _clean(exc.message)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
            await _abort(client)
            raise SmtpFailure(DISCONNECTED, None, _describe(exc)) from None
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

    async def send(self, message: bytes, sender: str, recipient: str) -> Accepted:
        """One transaction; raise SmtpFailure classified by where it failed."""
        if not self.is_open:
            await self.open()
        client = self.client
        assert client is not None
        phase = "mail"
        try:
            with anyio.fail_after(self.mailbox.smtp.timeout * 4):
                await client.mail(sender)
                phase = "rcpt"
                await client.rcpt(recipient)
                phase = "data"
                response = await client.data(message)
            return Accepted(response.code, _clean(response.message))
        except aiosmtplib.SMTPResponseException as exc:
            # A definite answer: nothing was delivered (or DATA was refused).
            code, text = exc.code, _clean(exc.message)
            if code == 421 or not client.is_connected:
                await self.close()
            else:
                await _reset(client)
            if phase == "mail" and code >= 500 and not _QUOTA.search(text):
                raise SmtpFailure(DISCONNECTED, code, f"sender refused: {text}") from None
            raise SmtpFailure(_classify_response(code, text), code, text) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            kind = UNCERTAIN if phase == "data" else DISCONNECTED
            raise SmtpFailure(kind, None, f"{_describe(exc)} during {phase.upper()}") from None
        except BaseException:
            await self.close()  # cancelled mid-transaction: the protocol is out of step
            raise

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _abort(client)


async def _reset(client: aiosmtplib.SMTP) -> None:
    try:
        with anyio.fail_after(10):
            await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


async def _abort(client: aiosmtplib.SMTP) -> None:
    """Say QUIT when the connection is healthy, else drop it; never raise.

    Returns once the transport is really gone (a TLS close needs the loop a
    moment longer), so a short-lived loop such as `mailbox test` leaks nothing.
    """
    protocol = client.protocol
    if client.is_connected:
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


def _clean(text: str) -> str:
    return " ".join(text.split())[:300]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    return _clean(text)
