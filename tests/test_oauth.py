"""OAuth2 mailboxes (SPEC §7a): provider presets, tokens from a real token endpoint, XOAUTH2 against a real
SMTP server that accepts only live tokens, a revoked grant, an endpoint that is down or hostile."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from daemon import oauth, redact, smtp
from daemon.config import PROVIDERS, load_config
from daemon.errors import MailboxDown
from tests.conftest import Project
from tests.daemon_helpers import query, running, states, until
from tests.imap_server import Dovecot, needs_dovecot
from tests.oauth_server import OAuthRecorder, Provider
from tests.servers import Authenticator, Pki, SmtpServer
from tests.test_imap import mail

pytestmark = [pytest.mark.anyio, pytest.mark.both_stores, pytest.mark.slow]


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider().start()
    yield p
    p.stop()


@pytest.fixture
def server(provider: Provider) -> Iterator[SmtpServer]:
    recorder = OAuthRecorder(provider=provider)
    # PLAIN and LOGIN are offered too (aiosmtpd wants an authenticator) and always fail.
    s = SmtpServer("none", auth=Authenticator("nobody", "never-this"), recorder=recorder).start()
    yield s
    s.stop()


def oauth_mailbox(project: Project, provider: Provider, server: SmtpServer, refresh: str) -> str:
    (project.root / "refresh").write_text(refresh + "\n")
    (project.root / "client-secret").write_text("client-secret-value\n")
    project.data["defaults"]["gap"] = "0s"
    project.data["daemon"].update({"retry_delays": ["1s", "1s"], "probe_backoff": "1s-2s"})
    (box,) = project.add_mailboxes(
        1,
        smtp=server.smtp_config(allow_plaintext=True),
        oauth2={
            "client_id": "cadenced-tests",
            "client_secret_file": "client-secret",
            "refresh_token_file": "refresh",
            "token_url": provider.token_url,
            "auth_url": provider.token_url.replace("/token", "/authorize"),
            "scopes": ["mail"],
        },
    )
    project.add_cadence()
    return box


def db(project: Project) -> Path | str:
    return project.database


def test_a_provider_fills_in_servers_and_endpoints_and_the_file_wins(project: Project) -> None:
    (project.root / "rt").write_text("refresh-token-value\n")
    project.data["mailboxes"] = [
        {
            "address": "alice@acme.example",
            "owner": "alice",
            "provider": "google",
            "oauth2": {"client_id": "id", "refresh_token_file": "rt"},
        },
        {
            "address": "bob@acme.example",
            "owner": "alice",
            "provider": "microsoft",
            "oauth2": {"client_id": "id", "refresh_token_file": "rt"},
            "smtp": {"port": 25},
        },
    ]
    project.add_cadence()
    result = project.run("check", "--print")
    assert result.code == 0, result.err
    assert "refresh-token-value" not in result.out
    config = load_config(project.write())
    google, microsoft = config.mailboxes
    assert (google.smtp.host, google.smtp.port, google.smtp.security) == ("smtp.gmail.com", 587, "starttls")
    assert google.imap is not None and google.imap.host == "imap.gmail.com"
    assert google.smtp.auth.mechanism == "oauth2" and google.smtp.auth.username == "alice@acme.example"
    assert google.oauth2 is not None and google.oauth2.token_url == PROVIDERS["google"].token_url
    assert google.sent_copies == "provider"
    assert (microsoft.smtp.host, microsoft.smtp.port) == ("smtp.office365.com", 25)  # the file's key wins
    assert microsoft.oauth2 is not None and "offline_access" in microsoft.oauth2.scopes
    printed = result.out
    assert "smtp.office365.com" in printed and 'auth = "oauth2"' in printed and "refresh_token_file" in printed


def test_oauth_settings_are_checked_where_they_are(project: Project) -> None:
    project.data["mailboxes"] = [
        {
            "address": "alice@acme.example",
            "owner": "alice",
            "provider": "generic",
            "oauth2": {"client_id": "id", "token_url": "http://tokens.example/token"},
            "smtp": {"host": "smtp.acme.example", "auth": "oauth2"},
        }
    ]
    project.add_cadence()
    result = project.run("check")
    assert result.code == 2
    assert "mailboxes[0].oauth2.token_url: must be https:// (plain http only to this machine)" in result.err
    assert "auth_url" not in result.err  # only `mailbox authorize` needs it
    assert "mailboxes[0].oauth2: needs refresh_token_file, refresh_token_env or refresh_token_credential" in result.err


def test_a_refresh_token_from_elsewhere_needs_no_auth_url(project: Project) -> None:
    """A generic provider whose refresh token was made by another tool: the daemon needs only the token endpoint;
    `mailbox authorize` says what it lacks, with the place."""
    (project.root / "refresh").write_text("a-refresh-token\n")
    project.data["mailboxes"] = [
        {
            "address": "alice@acme.example",
            "owner": "alice",
            "provider": "generic",
            "oauth2": {
                "client_id": "id",
                "token_url": "https://login.acme.example/token",
                "refresh_token_file": "refresh",
            },
            "smtp": {"host": "smtp.acme.example", "auth": "oauth2"},
        }
    ]
    project.add_cadence()
    assert project.run("check").code == 0
    assert project.enroll(project.people(2)).code == 0
    result = project.run("mailbox", "authorize", "alice@acme.example")
    assert result.code == 2
    assert "mailboxes[0].oauth2.auth_url: is required by `mailbox authorize`" in result.err
    assert "mailboxes[0].oauth2.scopes: is required by `mailbox authorize`" in result.err


async def test_one_token_serves_every_send_and_a_server_refusal_gets_one_refresh(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    box = oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    config = load_config(project.write())
    mailbox = config.mailbox(box)
    tokens = oauth.Tokens()
    try:
        first = smtp.Connection(mailbox, tokens)
        await first.open()
        await first.close()
        second = smtp.Connection(mailbox, tokens)  # the cached token: no second refresh
        await second.open()
        await second.close()
        assert provider.refreshes == 1
        recorder = server.recorder
        assert isinstance(recorder, OAuthRecorder)
        assert recorder.logins == [(box, True), (box, True)]
        provider.revoke_tokens()  # the provider drops the token early (a password change, an admin)
        third = smtp.Connection(mailbox, tokens)
        await third.open()  # refused once, refreshed once, in
        await third.close()
        assert provider.refreshes == 2
        assert recorder.logins[2:] == [(box, False), (box, True)]
    finally:
        await tokens.aclose()


async def test_a_token_is_refreshed_before_it_expires(project: Project, provider: Provider, server: SmtpServer) -> None:
    box = oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    mailbox = load_config(project.write()).mailbox(box)
    assert mailbox.oauth2 is not None
    now = [1_000_000.0]
    tokens = oauth.Tokens(clock=lambda: now[0])
    try:
        first = await tokens.get(box, mailbox.oauth2)
        assert tokens.expiry(box, mailbox.oauth2) == (now[0] + 3600, "mail")
        now[0] += 3600 - oauth.MARGIN - 1
        assert await tokens.get(box, mailbox.oauth2) == first
        now[0] += 2  # inside the margin: a new token before the old one is refused anywhere
        assert await tokens.get(box, mailbox.oauth2) != first
        assert provider.refreshes == 2
    finally:
        await tokens.aclose()


async def test_a_revoked_grant_waits_for_reauthorisation_and_says_so(
    project: Project, provider: Provider, server: SmtpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    refresh = provider.grant("mb1@alice.example")
    box = oauth_mailbox(project, provider, server, refresh)
    project.enroll(project.people(1))
    async with running(project.write()):
        await until(lambda: states(db(project)) == {"sent": 1})
    # The user removed the app's access: its grant and tokens are gone. The next login needs a new token.
    provider.revoke_grant(refresh)
    provider.revoke_tokens()
    project.enroll(project.people(1, start=1, name="more.csv"))
    async with running(project.write()):
        await until(lambda: states(db(project)) == {"sent": 1, "error": 1})
    status = project.run("status", "--json").json()["mailboxes"][0]
    assert status["state"] == "disconnected" and status["waiting_for"] == "reauthorise"
    assert status["reason"].startswith("reauthorise: the provider revoked or expired the grant (invalid_grant")
    assert f"cadenced mailbox authorize {box}" in status["reason"]
    outbox = project.run("outbox", "--state", "error", "--json").json()["messages"]
    assert [m["reason"] for m in outbox] == ["disconnected"]
    assert outbox[0]["detail"].startswith("reauthorise: the provider revoked")
    logged = capsys.readouterr().out
    assert "reauthorise" in logged
    assert provider.issued and not any(t in logged for t in provider.issued)
    assert refresh not in logged and "client-secret-value" not in logged
    assert query(db(project), "SELECT count(*) FROM messages WHERE state = 'sent'") == [(1,)]


async def test_the_token_endpoint_down_is_retried_and_then_sends(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    provider.down = True
    project.enroll(project.people(1))
    async with running(project.write()):
        await until(lambda: states(db(project)) == {"error": 1})
        reason = project.run("status", "--json").json()["mailboxes"][0]["reason"]
        assert reason.startswith("oauth2: the token endpoint answered HTTP 503")
        provider.down = False
        await until(lambda: states(db(project)) == {"sent": 1})
    assert len(server.recorder.deliveries) == 1


async def test_the_token_is_had_before_a_message_is_claimed(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    """A hostile token endpoint (60,000 nested arrays) stops the mailbox with no message in hand: both wait in the
    error section as `disconnected`, never claimed (no attempt counted), never `sending` or `uncertain`."""
    oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    provider.answer = b"[" * 60_000
    project.enroll(project.people(2))
    with structlog.testing.capture_logs() as logs:
        async with running(project.write()):
            await until(lambda: states(db(project)) == {"error": 2})
            provider.answer = None
            await until(lambda: states(db(project)) == {"sent": 2}, within=30)
    first = next(e for e in logs if e["event"] == "mailbox.disconnected")
    assert "the token endpoint answered HTTP 200 without a JSON object" in first["detail"]
    assert not [e for e in logs if e["event"] == "mailbox.loop_error"]
    assert query(db(project), "SELECT attempts FROM messages") == [(1,), (1,)]  # the one send each, no lost claim
    assert len(server.recorder.deliveries) == 2


async def test_a_token_refused_twice_stops_the_mailbox_and_its_echo_is_masked(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    """The server refuses every token and repeats it in its 535: one refresh, then the refusal stands, masked."""
    box = oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    mailbox = load_config(project.write()).mailbox(box)
    provider.lifetime = 0  # dead on arrival at the SMTP server (the endpoint's expires_in is then ignored)
    tokens = oauth.Tokens()
    try:
        with pytest.raises(MailboxDown) as failure:
            await smtp.Connection(mailbox, tokens).open()
    finally:
        await tokens.aclose()
    assert provider.refreshes == 2 and failure.value.code == 535
    assert "***" in failure.value.text and not any(t in failure.value.text for t in provider.issued)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (b"x" * (oauth.MAX_ANSWER + 10), "over 64 KiB"),
        (b"<html>not json</html>", "without a JSON object"),
        (json.dumps({"access_token": "a b c", "expires_in": 60}).encode(), "no usable access_token"),
        (json.dumps({"access_token": "tok-12345", "token_type": "mac"}).encode(), "not a Bearer token"),
        (json.dumps({"error": "temporarily_unavailable"}).encode(), "(temporarily_unavailable)"),
        (b"[" * 60_000, "without a JSON object"),  # past the JSON parser's recursion limit
    ],
)
async def test_a_hostile_token_endpoint_is_a_transient_failure(
    project: Project, provider: Provider, server: SmtpServer, answer: bytes, problem: str
) -> None:
    box = oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    mailbox = load_config(project.write()).mailbox(box)
    provider.answer = answer
    tokens = oauth.Tokens()
    try:
        with pytest.raises(MailboxDown) as failure:
            await smtp.Connection(mailbox, tokens).open()
        assert problem in failure.value.text and "reauthorise" not in failure.value.text
    finally:
        await tokens.aclose()


async def test_a_token_endpoint_that_trickles_its_answer_is_given_up_on(
    project: Project, provider: Provider, server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each byte within the per-read timeout, the whole never: the exchange is bounded as a whole."""
    box = oauth_mailbox(project, provider, server, provider.grant("mb1@alice.example"))
    mailbox = load_config(project.write()).mailbox(box)
    provider.trickle = True
    monkeypatch.setattr(oauth, "TOTAL", 1.0)
    tokens = oauth.Tokens()
    try:
        with pytest.raises(MailboxDown) as failure:
            await smtp.Connection(mailbox, tokens).open()
    finally:
        provider.trickle = False
        await tokens.aclose()
    assert "gave no whole answer within 1 s" in failure.value.text


async def test_a_rotated_refresh_token_is_kept_in_its_file(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    first = provider.grant("mb1@alice.example")
    box = oauth_mailbox(project, provider, server, first)
    mailbox = load_config(project.write()).mailbox(box)
    assert mailbox.oauth2 is not None
    provider.rotate = True
    tokens = oauth.Tokens()
    try:
        await tokens.get(box, mailbox.oauth2)
        written = (project.root / "refresh").read_text().strip()
        assert written != first and written in provider.grants and first not in provider.grants
        assert (project.root / "refresh").stat().st_mode & 0o777 == 0o600
        tokens.refused(box, mailbox.oauth2, next(iter(provider.live)))
        await tokens.get(box, mailbox.oauth2)  # the rotated one is used: the old one is gone at the provider
        assert provider.refreshes == 2
    finally:
        await tokens.aclose()


def test_access_tokens_are_masked_the_old_one_until_the_next_whole_build() -> None:
    redact.register_rotating("oauth:t@x.example", "t@x.example", "at-first-token-abcdef")
    assert "at-first-token-abcdef" not in redact.redact("535 bad at-first-token-abcdef")
    redact.register_rotating("oauth:t@x.example", "t@x.example", "at-second-token-ghijkl")
    text = redact.redact("at-first-token-abcdef at-second-token-ghijkl")
    assert "token" not in text
    for i in range(redact.REBUILD_AT // 5 + 1):  # enough refreshes elsewhere to build the pattern whole again
        redact.register_rotating(f"oauth:other{i}@x.example", "o@x.example", f"at-other-token-{i:06d}")
    redact.forget("oauth:t@x.example")
    assert redact.redact("x at-other-token-000003 y") == "x *** y"
    assert "at-first-token-abcdef" in redact.redact("at-first-token-abcdef")  # an old token is not kept forever


@needs_dovecot
async def test_imap_logs_in_with_the_token_smtp_uses_and_sees_the_reply(
    project: Project, provider: Provider, server: SmtpServer, tmp_path: Path
) -> None:
    """Dovecot with an oauth2 passdb asks the provider about each bearer token: IMAP and SMTP share one."""
    pki = Pki(tmp_path)
    box = "mb1@alice.example"
    dovecot = Dovecot(pki, {box: "only-for-the-tests-own-client"}, introspection_url=provider.introspection_url)
    dovecot.start()
    try:
        oauth_mailbox(project, provider, server, provider.grant(box))
        imap = {"host": "127.0.0.1", "port": dovecot.port, "security": "tls", "ca_file": str(pki.ca_file)}
        project.data["mailboxes"][0]["imap"] = {**imap, "timeout": "10s", "poll": "60s"}
        project.add_cadence("c1", steps=2)["steps"][1]["wait"] = "1h"
        project.data["cadences"] = project.data["cadences"][1:]
        project.enroll(project.people(1))
        with structlog.testing.capture_logs() as logs:
            async with running(project.write()):
                await until(lambda: [e for e in logs if e["event"] == "imap.watching"], what="the watcher")
                (first,) = await anyio.to_thread.run_sync(server.recorder.wait_for, 1)
                reply = mail("p0@prospects.example", box, "Re: hi", in_reply_to=first["Message-ID"])
                dovecot.deliver(box, reply)
                await until(lambda: query(db(project), "SELECT state FROM enrollments") == [("replied",)])
        assert provider.refreshes == 1  # one token for the SMTP and the IMAP session
        assert not any(t in json.dumps(logs, default=str) for t in provider.issued)
        tested = await anyio.to_thread.run_sync(project.run, "mailbox", "test", box)
        assert tested.code == 0, tested.err
        assert "OAuth2 access token valid until" in tested.out and "scopes: mail" in tested.out
        assert f"IMAP 127.0.0.1:{dovecot.port} tls: AUTHENTICATE XOAUTH2 ok" in tested.out
        assert "INBOX has 1 messages" in tested.out and "Sent folder: 'Sent'" in tested.out
        assert not any(t in tested.out + tested.err for t in provider.issued)
        provider.revoke_tokens()
        provider.revoke_grant(next(iter(provider.grants)))
        refused = await anyio.to_thread.run_sync(project.run, "mailbox", "test", box)
        assert refused.code == 1 and "reauthorise: the provider revoked" in refused.err
    finally:
        dovecot.cleanup()


def start_authorize(project: Project, box: str) -> tuple[subprocess.Popen[str], str]:
    """`cadenced mailbox authorize` as a process; returns it and the URL it printed for the browser."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(project.config_path), "mailbox", "authorize", box],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("http://127.0.0.1") and "/authorize?" in line:
            return proc, line.strip()
        assert line, f"no URL printed: {proc.stderr.read() if proc.stderr else ''}"
    raise AssertionError("no URL printed in time")


@pytest.mark.parametrize("completed_by", ["the browser reaching the loopback listener", "the redirect pasted"])
def test_authorize_stores_a_refresh_token_that_then_logs_in(
    project: Project, provider: Provider, server: SmtpServer, completed_by: str
) -> None:
    box = oauth_mailbox(project, provider, server, "")
    (project.root / "refresh").unlink()  # nothing authorized yet
    project.write()
    assert project.run("check").code == 0
    proc, url = start_authorize(project, box)
    redirect = provider.consent(url)
    if completed_by.startswith("the browser"):
        with urllib.request.urlopen(redirect, timeout=10) as page:  # stdin stays open, as a terminal's would
            assert b"authorization received" in page.read()
        proc.wait(timeout=20)
        out, err = proc.communicate(timeout=20)
    else:
        wrong = redirect.replace("state=", "state=x")  # another authorization's redirect: refused, still waiting
        out, err = proc.communicate(f"{wrong}\n{redirect}\n", timeout=20)
        assert "that is not the address the browser was sent to" in err
    assert proc.returncode == 0, err
    stored = (project.root / "refresh").read_text().strip()
    assert stored in provider.grants and (project.root / "refresh").stat().st_mode & 0o777 == 0o600
    assert stored not in out and "client-secret-value" not in out + err
    assert "Reload the daemon" in out
    assert smtp_login_works(project, box)


def smtp_login_works(project: Project, box: str) -> bool:
    async def probe() -> None:
        await smtp.Connection(load_config(project.config_path).mailbox(box)).probe()

    anyio.run(probe)
    return True


def test_authorize_reports_a_refusal_by_the_user(project: Project, provider: Provider, server: SmtpServer) -> None:
    box = oauth_mailbox(project, provider, server, "")
    (project.root / "refresh").unlink()
    project.write()
    proc, url = start_authorize(project, box)
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["state"]
    redirect = f"http://127.0.0.1/?error=access_denied&state={state}"
    _, err = proc.communicate(redirect + "\n", timeout=20)
    assert proc.returncode == 1 and "not authorized: the provider said access_denied" in err
    assert not (project.root / "refresh").exists()


def appending(project: Project, tmp_path: Path, extra_conf: str = "") -> tuple[Dovecot, SmtpServer]:
    """A mailbox with sent_copies = "append" on a Dovecot (polled each second) and an aiosmtpd."""
    pki = Pki(tmp_path)
    dovecot = Dovecot(pki, {"alice": "imap-pw"}, idle=False, extra_conf=extra_conf).start()
    server = SmtpServer().start()
    (tmp_path / "imap-pw").write_text("imap-pw")
    project.data["defaults"]["gap"] = "0s"
    imap = dovecot.imap_config("alice", tmp_path / "imap-pw", pki.ca_file, poll="1s")
    project.add_mailboxes(1, smtp=server.smtp_config(), imap=imap, sent_copies="append")
    project.add_cadence()
    return dovecot, server


@needs_dovecot
async def test_append_saves_each_sent_message_once_in_sent_seen(project: Project, tmp_path: Path) -> None:
    """sent_copies = "append": each message the server took appears once in Sent, flagged \\Seen, through a
    restart and a copy whose removal from the queue was lost (a crash between APPEND and its commit)."""
    dovecot, server = appending(project, tmp_path)
    try:
        project.enroll(project.people(3))
        with structlog.testing.capture_logs() as logs:
            async with running(project.write()):
                await until(lambda: len([e for e in logs if e["event"] == "message.copied"]) == 3, what="copies")
        assert query(db(project), "SELECT count(*) FROM sent_copies") == [(0,)]
        sent = [d["Message-ID"] for d in server.recorder.deliveries]
        # A crash after the APPEND but before its commit: the copy is still queued at the next start.
        query(
            db(project),
            "INSERT INTO sent_copies (message, mailbox, message_id, content) VALUES (1, ?, ?, ?)",
            "mb1@alice.example",
            sent[0],
            b"Message-ID: " + sent[0].encode() + b"\r\n\r\nbody\r\n",
        )
        with structlog.testing.capture_logs() as logs:
            async with running(project.config_path):
                await until(lambda: query(db(project), "SELECT count(*) FROM sent_copies") == [(0,)])
        client = dovecot.client("alice")
        try:
            client.select("Sent", readonly=True)
            typ, data = client.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert typ == "OK"
            ids = [bytes(part[1]).decode().split(":", 1)[1].strip() for part in data if isinstance(part, tuple)]
            flags = [bytes(part[0]) for part in data if isinstance(part, tuple)]
        finally:
            client.logout()
        assert sorted(ids) == sorted(sent) and len(ids) == 3
        assert all(b"\\Seen" in f for f in flags)
        assert len(server.recorder.deliveries) == 3  # no copy is ever a reason to send again
    finally:
        server.stop()
        dovecot.cleanup()


@needs_dovecot
async def test_a_refused_append_keeps_the_copy_and_sends_nothing_again(project: Project, tmp_path: Path) -> None:
    """The server refuses the APPEND (over quota): logged, kept for the next round, no second delivery."""
    quota = (
        "mail_plugins = $mail_plugins quota\nplugin {\n  quota = maildir:User quota\n  quota_rule = *:storage=1B\n}\n"
    )
    dovecot, server = appending(project, tmp_path, quota)
    try:
        project.enroll(project.people(1))
        with structlog.testing.capture_logs() as logs:
            async with running(project.write()):
                await until(lambda: len([e for e in logs if e["event"] == "imap.copy_failed"]) >= 2, what="retries")
        failed = [e for e in logs if e["event"] == "imap.copy_failed"]
        assert "APPEND NO" in failed[0]["detail"]
        assert query(db(project), "SELECT message, attempts >= 2 FROM sent_copies") == [(1, 1)]
        assert len(server.recorder.deliveries) == 1
        assert query(db(project), "SELECT state FROM messages") == [("sent",)]
    finally:
        server.stop()
        dovecot.cleanup()


def test_a_microsoft_mailbox_is_sent_back_to_localhost(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    """Microsoft matches the registered `http://localhost` to the letter: the redirect says localhost, and the
    listener answers there (IPv4 or IPv6, whichever the browser takes)."""
    box = oauth_mailbox(project, provider, server, "")
    (project.root / "refresh").unlink()
    project.data["mailboxes"][0]["provider"] = "microsoft"
    project.write()
    proc, url = start_authorize(project, box)
    redirect_uri = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["redirect_uri"]
    assert redirect_uri.startswith("http://localhost:") and redirect_uri.endswith("/")
    with urllib.request.urlopen(provider.consent(url), timeout=10) as page:
        assert b"authorization received" in page.read()
    proc.wait(timeout=20)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (project.root / "refresh").read_text().strip() in provider.grants


def test_authorize_gives_up_after_its_timeout(project: Project, provider: Provider, server: SmtpServer) -> None:
    box = oauth_mailbox(project, provider, server, "")
    (project.root / "refresh").unlink()
    project.write()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "--config",
            str(project.config_path),
            "mailbox",
            "authorize",
            box,
            "--timeout=1s",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "no redirect came within 1 s (--timeout)" in proc.stderr
    assert not (project.root / "refresh").exists()


def test_authorize_serves_a_bounded_number_of_connections(
    project: Project, provider: Provider, server: SmtpServer
) -> None:
    """Idle connections (400 crashed it with EMFILE) are closed past the cap at once; the redirect then works."""
    box = oauth_mailbox(project, provider, server, "")
    (project.root / "refresh").unlink()
    project.write()
    proc, url = start_authorize(project, box)
    redirect = provider.consent(url)
    port = urllib.parse.urlsplit(redirect).port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        # Those past the cap are closed at once (EOF); the served ones wait for their request: read together.
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + 10
        while len(closed) < 40 - 16 and time.monotonic() < deadline:
            ready, _, _ = select.select([c for c in idle if c not in closed], [], [], deadline - time.monotonic())
            closed |= {conn for conn in ready if conn.recv(1) == b""}
        assert len(closed) >= 40 - 16
    finally:
        for conn in idle:
            conn.close()
    with urllib.request.urlopen(redirect, timeout=10) as page:
        assert b"authorization received" in page.read()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def test_authorize_never_leaves_the_ipv6_loopback_to_another_program(project: Project) -> None:
    """Microsoft's redirect is http://localhost:PORT: a program already on [::1]:PORT would get the code."""
    squatter = socket.socket(socket.AF_INET6)
    try:
        squatter.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no IPv6 loopback: nothing can listen there")
    squatter.listen()
    port = squatter.getsockname()[1]
    (project.root / "secret").write_text("client-secret-value\n")
    project.data["mailboxes"] = [
        {
            "address": "alice@acme.example",
            "owner": "alice",
            "provider": "microsoft",
            "oauth2": {"client_id": "id", "client_secret_file": "secret", "refresh_token_file": "refresh"},
        }
    ]
    project.add_cadence()
    project.write()
    try:
        result = project.run("mailbox", "authorize", "alice@acme.example", "--port", str(port), "--timeout", "2s")
    finally:
        squatter.close()
    assert result.code == 1 and f"[::1]:{port} is in use by another program" in result.err
    assert "Open this address" not in result.out
