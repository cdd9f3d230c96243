"""The dashboard (SPEC §12) on a real daemon's [api] listener: sign-in, sessions and CSRF over HTTP, then a real
browser (Playwright driving Debian's chromium) that moves a disconnected mailbox's emails to another mailbox and
sees them leave from it at the SMTP server; the plan chart's bars are `plan --json`'s figures."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Project
from tests.servers import SmtpServer, free_port
from tests.test_api import TOKEN, Daemon

VIEWER = "viewer-token-for-the-tests-0123456789"
PAGES = ("/mailboxes", "/outbox", "/plan", "/results", "/prospect")
ACTIONS = ("/outbox/retry", "/outbox/reassign", "/mailboxes/pause", "/prospect/stop", "/prospect/mark")


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    s = SmtpServer().start()
    yield s
    s.stop()


@pytest.fixture
def daemon(project: Project, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(project, tmp_path)
    (tmp_path / "viewer-token").write_text(VIEWER)
    project.data["api"]["read_only_token_file"] = str(tmp_path / "viewer-token")
    yield d
    if d.proc is not None and d.proc.returncode is None:
        d.stop()


def _sign_in(client: httpx.Client, token: str) -> httpx.Response:
    form = client.get("/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert form.status_code == 200 and csrf
    return client.post("/signin", data={"csrf": csrf.group(1), "token": token, "next": "/outbox"})


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    return found.group(1)


def test_sessions_csrf_and_the_read_only_token(project: Project, server: SmtpServer, daemon: Daemon) -> None:
    project.add_mailboxes(1, smtp=server.smtp_config())
    project.add_cadence()
    daemon.start()
    with httpx.Client(base_url=daemon.url, timeout=10) as anonymous:
        for path in PAGES:  # without a session every page sends to sign-in, and every action is refused
            r = anonymous.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/signin?next=")
        for path in ACTIONS:
            assert anonymous.post(path, data={"csrf": "x", "id": "1"}).status_code == 401
        assert anonymous.get("/outbox", headers=daemon.auth).status_code == 303  # a bearer token is no session
        refused = _sign_in(anonymous, "not-the-token-but-long-enough-0123456789")
        assert refused.status_code == 401 and "That token is not right" in refused.text
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        form = client.get("/signin")
        forged = client.post("/signin", data={"csrf": "forged", "token": TOKEN})
        assert form.status_code == 200 and forged.status_code == 403  # the sign-in form's own CSRF value
        signed = _sign_in(client, TOKEN)
        assert signed.status_code == 303 and signed.headers["location"] == "/outbox"
        cookie = next(v for k, v in signed.headers.multi_items() if k == "set-cookie" and "cadenced_session" in v)
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie  # loopback
        page = client.get("/outbox")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert client.post("/mailboxes/pause", data={"address": "mb1@alice.example"}).status_code == 403
        assert client.post("/mailboxes/pause", data={"csrf": "0" * 64, "address": "x"}).status_code == 403
        csrf = _csrf(page.text)
        paused = client.post("/mailboxes/pause", data={"csrf": csrf, "address": "mb1@alice.example"})
        assert paused.status_code == 303 and "paused" in paused.headers["location"]
        told = client.get(paused.headers["location"]).text
        assert '<p class="note" role="status">mb1@alice.example: paused</p>' in told  # the action's own note
        forged = client.get("/mailboxes?note=Your+session+ended%3A+sign+in+at+evil.example&ns=0").text
        assert "evil.example" not in forged  # a link made elsewhere puts no words on our pages
        assert client.get("/outbox?state=error&am=x&ad=nan&ai=1").status_code == 400
        assert client.get("/mailboxes").text.count('class="badge paused"') == 1
        old = client.cookies.get("cadenced_session")
        assert client.post("/signout", data={"csrf": csrf}).status_code == 303
    with httpx.Client(base_url=daemon.url, timeout=10, cookies={"cadenced_session": old or ""}) as replay:
        assert replay.get("/mailboxes").status_code == 303  # signed out: the old cookie is no session
    with httpx.Client(base_url=daemon.url, timeout=10) as viewer:
        assert _sign_in(viewer, VIEWER).status_code == 303
        page = viewer.get("/mailboxes")
        assert page.status_code == 200 and "viewer (read-only)" in page.text and "/mailboxes/resume" not in page.text
        r = viewer.post("/mailboxes/resume", data={"csrf": _csrf(page.text), "address": "mb1@alice.example"})
        assert r.status_code == 403 and "read-only" in r.text
    out = daemon.stop()
    assert VIEWER not in out


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.mark.slow
def test_in_a_browser_a_disconnected_mailboxs_emails_change_sender(
    project: Project, server: SmtpServer, daemon: Daemon, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is a test dependency: pip install -e '.[test]'"
    )
    browser_path = _chromium()
    project.data["defaults"]["gap"] = "0s"
    dead = {**server.smtp_config(), "port": free_port()}  # nothing listens there: the mailbox is disconnected
    down, up = project.add_mailboxes(1, smtp=dead, prefix="down") + project.add_mailboxes(1, smtp=server.smtp_config())
    project.add_cadence(steps=2)
    project.write()
    assert project.enroll(project.people(4)).code == 0  # rotation: two on each mailbox
    daemon.start()
    server.recorder.wait_for(2)  # the connected mailbox sends its two
    shots = Path(os.environ.get("CADENCED_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{daemon.url}/outbox?state=error")
            assert "/signin" in page.url  # no session: sign in first
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r"/outbox\?state=error"))
            rows = page.locator("tbody tr[data-reason=disconnected]")
            rows.first.wait_for(timeout=20_000)
            deadline = time.monotonic() + 20
            while rows.count() < 2:  # the second may be moved to the error section a moment later
                assert time.monotonic() < deadline, "the second email never reached the error section"
                page.reload()
            assert rows.count() == 2
            assert "disconnected: the mailbox could not connect" in page.inner_text("tbody")
            page.screenshot(path=str(shots / "outbox-error.png"), full_page=True)
            page.check("input.all")
            page.select_option("select[name=to]", up)
            page.click("button[name=reassign]")
            assert "can send now" in page.inner_text(".sends-at") or "sends at" in page.inner_text(".sends-at")
            page.click("text=Move them to")
            page.wait_for_url(re.compile(r"note="))
            assert "2 message(s) now go from" in page.inner_text(".note")
            got = server.recorder.wait_for(4)
            assert {d.sender for d in got} == {up} and down not in {d.sender for d in got}
            assert len({d.recipient for d in got}) == 4
            # The plan chart's bars are plan --json's figures, day by day.
            page.goto(f"{daemon.url}/plan")
            bars = page.locator("svg.plan-chart g.bar")
            drawn = {
                bars.nth(i).get_attribute("data-date"): (
                    int(bars.nth(i).get_attribute("data-new") or 0),
                    int(bars.nth(i).get_attribute("data-follow-ups") or 0),
                )
                for i in range(bars.count())
            }
            planned = project.run("plan", "--days", "14", "--json").json()["days"]
            for day in {r["date"] for r in planned}:
                rows_of = [r for r in planned if r["date"] == day]
                assert drawn.get(day, (0, 0)) == (sum(r["new"] for r in rows_of), sum(r["follow_ups"] for r in rows_of))
            assert sum(f for _, f in drawn.values()) == 4  # every prospect's follow-up, tomorrow
            page.screenshot(path=str(shots / "plan.png"), full_page=True)
            for name, path in (
                ("mailboxes", "/mailboxes"),
                ("results", "/results?by=mailbox"),
                ("prospect", "/prospect?email=p0%40prospects.example"),
            ):
                page.goto(f"{daemon.url}{path}")
                assert page.locator("h1").count() == 1, page.content()[:1500]
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            assert page.locator("ol.timeline li").count() >= 2  # enrolled, sent
            # A form sent without its CSRF token is refused, session or not.
            refused = page.request.post(f"{daemon.url}/outbox/retry", form={"id": "1"})
            assert refused.status == 403
        finally:
            browser.close()


def test_the_outbox_pages_through_every_message_once(project: Project, server: SmtpServer, daemon: Daemon) -> None:
    dead = {**server.smtp_config(), "port": free_port()}
    project.add_mailboxes(2, smtp=dead)
    project.add_cadence()
    project.write()
    assert project.enroll(project.people(130)).code == 0
    daemon.start()
    deadline = time.monotonic() + 30
    while sum(m["error"] for m in project.run("status", "--json", write=False).json()["mailboxes"]) < 130:
        assert time.monotonic() < deadline, "the messages never all reached the error section"
        time.sleep(0.1)
    seen: list[int] = []
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        assert _sign_in(client, TOKEN).status_code == 303
        url: str | None = "/outbox?state=error"
        while url is not None:
            page = client.get(url)
            assert page.status_code == 200
            ids = [int(i) for i in re.findall(r'<tr data-id="(\d+)"', page.text)]
            assert 0 < len(ids) <= 50
            seen += ids
            found = re.search(r'<a href="([^"]+)" class="next">', page.text)
            url = found.group(1).replace("&amp;", "&") if found else None
        assert "Error <small>130</small>" in client.get("/outbox?state=error").text
        narrowed = client.get("/outbox?state=error&mailbox=mb1%40alice.example").text
        assert set(re.findall(r"<td>(mb\d@alice.example)</td>", narrowed)) == {"mb1@alice.example"}
    assert len(seen) == 130 and len(set(seen)) == 130  # every message once, none twice


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """One request on an open connection and its whole response (headers and the Content-Length body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head


def test_a_refused_action_leaves_the_connection_usable(project: Project, server: SmtpServer, daemon: Daemon) -> None:
    """A browser (or a pooled client) sends its next request on the same connection: an action refused for want
    of a session reads the form it was sent, so the connection carries the next request; a refusal that leaves
    the body unread says `Connection: close` rather than dropping a connection the client would reuse."""
    project.add_mailboxes(1, smtp=server.smtp_config())
    project.add_cadence()
    daemon.start()
    form = b"csrf=x&id=1&" + b"pad=" + b"a" * 20000
    host = f"Host: 127.0.0.1:{daemon.port}\r\n".encode()
    post = (
        b"POST /outbox/retry HTTP/1.1\r\n%sContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host, len(form), form)
    )
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        for _ in range(3):
            head = _exchange(sock, post)
            assert head.startswith(b"HTTP/1.1 401") and b"connection: close" not in head.lower()
        # the body arriving after the headers, as a browser may send it: no answer before the form is read
        sock.sendall(post[: len(post) - 10000])
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(10)
        head = _exchange(sock, post[len(post) - 10000 :])
        assert head.startswith(b"HTTP/1.1 401")
        head = _exchange(sock, b"GET /signin HTTP/1.1\r\n%s\r\n" % host)
        assert head.startswith(b"HTTP/1.1 200")
        wrong = post.replace(b"application/x-www-form-urlencoded", b"text/plain")
        with httpx.Client(base_url=daemon.url, timeout=10) as client:  # a session, then a form of the wrong kind
            assert _sign_in(client, TOKEN).status_code == 303
            cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        head = _exchange(sock, wrong.replace(host, host + f"Cookie: {cookie}\r\n".encode()))
        assert head.startswith(b"HTTP/1.1 415") and b"connection: close" in head.lower()
