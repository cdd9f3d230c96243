"""Real servers on loopback for the tests: aiosmtpd with TLS, AUTH and failure injection."""

from __future__ import annotations

import base64
import email
import email.policy
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Delivery:
    sender: str
    recipient: str
    headers: email.message.EmailMessage

    def __getitem__(self, name: str) -> str:
        value = self.headers[name]
        return "" if value is None else str(value)


@dataclass
class Recorder:
    """The handler: records deliveries; `fail_rcpt`/`fail_data` inject replies per recipient."""

    deliveries: list[Delivery] = field(default_factory=list)
    fail_rcpt: dict[str, str] = field(default_factory=dict)
    fail_data: dict[str, str] = field(default_factory=dict)
    drop: dict[str, str] = field(default_factory=dict)  # recipient → "rcpt" | "data": hang up there
    fail_once: dict[str, str] = field(default_factory=dict)  # recipient → reply, given once at DATA
    fail_mail: list[str] = field(default_factory=list)  # replies to MAIL FROM, one per transaction, in order
    fail_rcpt_seq: list[str] = field(default_factory=list)  # replies to RCPT, whoever the recipient, in order
    helo_names: list[str] = field(default_factory=list)  # every EHLO name a client gave
    pipelining: bool = True  # offer PIPELINING (RFC 2920), as Gmail, Microsoft 365, Postfix and Exim do
    on_data: Callable[[str], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]) -> Any:
        self.helo_names.append(hostname)
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")  # aiosmtpd reads commands in order however they arrive
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.fail_mail:
            return self.fail_mail.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.drop.get(address) == "rcpt":
            server.transport.close()  # the connection is lost before DATA: nothing delivered
            return "250 OK"
        if self.fail_rcpt_seq:
            return self.fail_rcpt_seq.pop(0)
        if address in self.fail_rcpt:
            return self.fail_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        rcpt = envelope.rcpt_tos[0]
        if self.on_data is not None:
            self.on_data(rcpt)
        if rcpt in self.fail_data:
            return self.fail_data[rcpt]
        if rcpt in self.fail_once:
            return self.fail_once.pop(rcpt)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        if self.drop.get(rcpt) == "data":
            # Accepted here, but the client never hears so: delivery is uncertain to it.
            with self.cond:
                self.deliveries.append(Delivery(envelope.mail_from, rcpt, msg))  # type: ignore[arg-type]
                self.cond.notify_all()
            server.transport.close()
            return "250 OK"
        with self.cond:
            for r in envelope.rcpt_tos:
                self.deliveries.append(Delivery(envelope.mail_from, r, msg))  # type: ignore[arg-type]
            self.cond.notify_all()
        return "250 2.0.0 queued"

    def wait_for(self, n: int, timeout: float = 20.0) -> list[Delivery]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.deliveries) >= n, timeout=timeout):
                raise AssertionError(f"waited {timeout}s for {n} deliveries, got {len(self.deliveries)}")
            return list(self.deliveries)


class Authenticator:
    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.logins = 0
        self.attempts: list[str] = []  # the mechanism of every AUTH the server saw, good or bad

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        self.attempts.append(mechanism)
        if isinstance(auth_data, LoginPassword):
            if auth_data.login.decode() == self.username and auth_data.password.decode() == self.password:
                self.logins += 1
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class EchoingAuthenticator(Authenticator):
    """A careless server: its refusal repeats what it was sent, the AUTH PLAIN string and the password."""

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        result = super().__call__(server, session, envelope, mechanism, auth_data)
        if result.success or not isinstance(auth_data, LoginPassword):
            return result
        plain = base64.b64encode(b"\0" + auth_data.login + b"\0" + auth_data.password).decode()
        echo = f"535 5.7.8 Authentication failed for AUTH PLAIN {plain} (password {auth_data.password.decode()})"
        return AuthResult(success=False, handled=False, message=echo)


class Pki:
    """A test CA and a loopback certificate signed by it."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = root / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx


class SmtpServer:
    """aiosmtpd in this process, on a free loopback port: `none`, `starttls` or implicit `tls`."""

    def __init__(
        self,
        security: str = "none",
        pki: Pki | None = None,
        auth: Authenticator | None = None,
        recorder: Recorder | None = None,
        port: int | None = None,
    ) -> None:
        self.recorder = recorder or Recorder()
        self.port = port or free_port()
        self.security = security
        kwargs: dict[str, Any] = {}
        if security == "starttls":
            assert pki is not None
            kwargs.update(tls_context=pki.server_context(), require_starttls=True)
        if security == "tls":
            assert pki is not None
            kwargs.update(ssl_context=pki.server_context())
        if auth is not None:
            # With implicit TLS aiosmtpd does not count the session as TLS; it is, from the first byte.
            kwargs.update(authenticator=auth, auth_require_tls=security == "starttls")
        self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port, **kwargs)
        self._started = False

    def start(self) -> SmtpServer:
        self.controller.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self.controller.stop()
            self._started = False

    def smtp_config(self, **extra: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "security": self.security, "timeout": "5s", **extra}
