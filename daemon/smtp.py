"""aiosmtplib connection per mailbox; every failure becomes one of the outcome types of errors.py."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiosmtplib
import anyio

from daemon import outcomes, redact
from daemon.config import Mailbox, Server
from daemon.errors import MailboxDown, SmtpFailure
from daemon.outcomes import AUTH, CONNECT, DATA, END, MAIL, RCPT


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


async def _token(command: tuple[str, ...], username: str) -> str:
    result = await anyio.run_process(list(command), check=False)
    if result.returncode != 0:
        raise MailboxDown(None, f"token_command exited {result.returncode}", stage=AUTH)
    token = result.stdout.decode(errors="replace").strip()
    redact.register(username, token)
    return token


def choose_mechanism(offered: list[str], configured: str) -> str | None:
    """The one AUTH mechanism to use: XOAUTH2 when configured, else PLAIN, else LOGIN."""
    if configured == "xoauth2":
        return "xoauth2" if "xoauth2" in offered else None
    return next((m for m in ("plain", "login") if m in offered), None)


class Connection:
    """One SMTP connection of one mailbox, opened on demand and reused across its sends."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
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
        if auth.mechanism != "xoauth2" and auth.secret is None:
            return
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()  # connect() says EHLO only around STARTTLS: the AUTH offer comes with it
        mechanism = choose_mechanism(client.server_auth_methods, auth.mechanism)
        if mechanism is None:
            offered = " ".join(client.server_auth_methods).upper() or "no AUTH"
            wanted = "XOAUTH2" if auth.mechanism == "xoauth2" else "PLAIN or LOGIN"
            raise MailboxDown(None, f"the server offers {offered}, not {wanted}", stage=AUTH)
        if mechanism == "xoauth2":
            await client.auth_xoauth2(auth.username, await _token(auth.token_command, auth.username))
        else:
            assert auth.secret is not None
            login = client.auth_plain if mechanism == "plain" else client.auth_login
            await login(auth.username, auth.secret.reveal())

    async def open(self) -> None:
        """Connect, TLS, EHLO and AUTH; raise the classified failure (the mailbox's, or throttled)."""
        await self.close()
        client = self._client()
        stage = CONNECT
        try:
            with anyio.fail_after(self.mailbox.smtp.timeout * 3):
                await client.connect()
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

    async def send(self, message: bytes, sender: str, recipient: str) -> Accepted:
        """One transaction; raise the SmtpFailure that the reply and the stage it came at make it."""
        if not self.is_open:
            await self.open()
        client = self.client
        assert client is not None and client.protocol is not None
        stage = MAIL
        protocol = client.protocol
        plain_write = protocol.write

        def write(data: bytes) -> None:
            # aiosmtplib sends DATA and the content in one call: the content leaving is the end of DATA.
            nonlocal stage
            if stage == DATA and data != b"DATA\r\n":
                stage = END
            plain_write(data)

        protocol.write = write  # type: ignore[method-assign]
        try:
            with anyio.fail_after(self.mailbox.smtp.timeout * 4):
                await client.mail(sender)
                stage = RCPT
                await client.rcpt(recipient)
                stage = DATA
                response = await client.data(message)
            return Accepted(response.code, redact.clean(response.message))
        except aiosmtplib.SMTPResponseException as exc:
            failure = outcomes.classify(stage, exc.code, redact.clean(exc.message))
            if exc.code < 200 or exc.code == 421 or not client.is_connected:
                await self.close()
            else:
                await _reset(client)
            raise failure from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise outcomes.classify(stage, None, f"{_describe(exc)} during {stage.upper()}") from None
        except BaseException:
            await self.close()  # cancelled mid-transaction: the protocol is out of step
            raise
        finally:
            protocol.write = plain_write  # type: ignore[method-assign]

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _abort(client)


def is_stale_connection(failure: SmtpFailure, reused: bool) -> bool:
    """An idle connection the server closed under us: nothing was sent, one fresh try is safe."""
    return reused and isinstance(failure, MailboxDown) and failure.code is None and failure.stage in (MAIL, RCPT, DATA)


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    return redact.clean(text)
