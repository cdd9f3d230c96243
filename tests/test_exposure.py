"""SPEC §13: what cadenced exposes and how it is locked: API tokens, the listener, /metrics, database URLs,
secret files. Each test failed before its fix (round three's findings)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import ssl
from pathlib import Path

import anyio
import httpx
import pytest

from daemon import api
from daemon.config import load_config, shown_database
from tests.conftest import Project
from tests.daemon_helpers import DaemonProcess, eventually
from tests.servers import Pki, free_port

pytestmark = pytest.mark.slow  # end to end: a daemon, its servers, real processes

TOKEN = "a-token-long-enough-for-the-tests-0123"


def api_project(project: Project, token: str = TOKEN, **api_keys: object) -> Project:
    (project.root / "api-token").write_text(token)
    project.add_mailboxes(1)
    project.add_cadence()
    project.data["api"] = {"listen": "127.0.0.1:8025", "token_file": "api-token", **api_keys}
    return project


@pytest.mark.parametrize(("token", "length"), [("", 0), ("\n", 0), ("   \n", 0), ("hunter2-short-token", 19)], ids=str)
def test_an_empty_or_short_api_token_is_a_config_error(project: Project, token: str, length: int) -> None:
    """An empty token file made `Authorization: Bearer` open every route; a short one can be guessed."""
    api_project(project, token)
    result = project.run("check")
    assert result.code == 2
    assert f"api.token_file: the token must be at least 32 characters, got {length}" in result.err
    assert "hunter2" not in result.err + result.out


def test_an_empty_token_env_is_a_config_error(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCED_TEST_TOKEN", "")
    api_project(project)
    project.data["api"] = {"token_env": "CADENCED_TEST_TOKEN"}
    result = project.run("check")
    assert result.code == 2 and "api.token_env: the token must be at least 32 characters, got 0" in result.err


def test_an_empty_presented_token_matches_nothing() -> None:
    expected = TOKEN.encode()
    assert api.bearer_matches(f"Bearer {TOKEN}", expected)
    assert api.bearer_matches(f"bearer {TOKEN}", expected)
    for header in ("Bearer", "Bearer ", "Bearer  ", "", f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        assert not api.bearer_matches(header, expected), header
    assert not api.bearer_matches("Bearer ", b"")
    assert not api.bearer_matches("Bearer", None)


def app_of(project: Project) -> tuple[object, object]:
    config = load_config(project.write())
    assert config.api is not None
    app = api.build_app(config.api, lambda: config, lambda: None)
    return app, api.HostCheck(app, config.api)


@pytest.mark.anyio
async def test_a_scrape_storm_costs_one_snapshot_over_one_connection(project: Project) -> None:
    """100 clients at once: one read of the database, one connection kept for the next snapshot (it exhausted a
    PostgreSQL of 30 connections before); the rest get the same text."""
    api_project(project)
    project.enroll(project.people(3))
    app, _ = app_of(project)
    snapshot = app.state.metrics  # type: ignore[attr-defined]
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    bodies: list[str] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:

        async def scrape() -> None:
            answer = await client.get("/metrics")
            assert answer.status_code == 200
            bodies.append(answer.text)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(scrape)
        assert snapshot.made == 1 and len(set(bodies)) == 1
        assert 'cadenced_messages{state="scheduled"} 3.0' in bodies[0]
        kept = snapshot.collector.db
        snapshot.made_at -= api.METRICS_TTL  # the snapshot is old now: the next scrape makes a new one
        assert (await client.get("/metrics")).status_code == 200
        assert snapshot.made == 2 and snapshot.collector.db is kept
    snapshot.close()


@pytest.mark.anyio
async def test_metrics_token_and_the_host_header(project: Project) -> None:
    """`metrics_token` locks /metrics; on loopback, a Host that names another site (DNS rebinding) gets 421."""
    (project.root / "metrics-token").write_text("m" * 40)
    api_project(project, metrics_token_file="metrics-token", hosts=["dash.acme.example"], listen="127.0.0.7:8025")
    project.enroll(project.people(1))
    app, guarded = app_of(project)
    transport = httpx.ASGITransport(app=guarded)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer " + "m" * 40})).status_code == 200
        for host in ("127.0.0.1:8025", "127.0.0.7:8025", "localhost:8025", "[::1]:8025", "dash.acme.example"):
            answer = await client.get("/v1/status", headers={"Host": host, "Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200, host
        for host in ("rebind.attacker.example:8025", "127.0.0.1.attacker.example", ""):
            answer = await client.get("/v1/status", headers={"Host": host, "Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 421 and answer.json()["error"] == "misdirected", host
    app.state.metrics.close()  # type: ignore[attr-defined]


def test_a_listener_other_machines_reach_needs_tls_or_a_word(project: Project) -> None:
    api_project(project, listen="0.0.0.0:8025")
    result = project.run("check")
    assert result.code == 2
    assert "api.listen: 0.0.0.0:8025 can be reached from other machines: give tls_cert and tls_key" in result.err
    project.data["api"]["allow_plain_http"] = True
    result = project.run("check")
    assert result.code == 0 and "warning: api.listen: 0.0.0.0:8025 serves plain HTTP to other machines" in result.err
    del project.data["api"]["allow_plain_http"]
    project.data["api"]["tls_cert"] = "missing.pem"
    result = project.run("check")
    assert result.code == 2 and "api: give both tls_cert and tls_key, or neither" in result.err
    for listen in ("127.0.0.1:8025", "127.0.0.7:8025", "[::1]:8025", "localhost:8025"):
        project.data["api"] = {"listen": listen, "token_file": "api-token"}
        assert project.run("check").code == 0, listen


def test_the_listener_serves_https_with_a_certificate(project: Project, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    pki.cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    port = free_port()
    api_project(
        project, listen=f"127.0.0.1:{port}", tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem")
    )
    daemon = DaemonProcess(project.write(), env={"CADENCED_LOG_FORMAT": "json"})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_file)), timeout=5) as client:

            def status() -> httpx.Response | None:
                assert daemon.proc.poll() is None, "the daemon exited"
                try:
                    return client.get(f"https://127.0.0.1:{port}/v1/status", headers=auth)
                except httpx.ConnectError:
                    return None

            answer = eventually(status, what="the HTTPS listener")
        assert answer.status_code == 200 and "mailboxes" in answer.json()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=5)  # no plain HTTP on a TLS listener
    finally:
        daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, "\n".join(daemon.lines[-20:])


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://cadenced@127.0.0.1:1/cadenced?password=s3cret-pw-in-query",
        "postgresql://cadenced:s3cret-pw%2Fenc@127.0.0.1:1/cadenced",
        "postgresql://cadenced@127.0.0.1:1/cadenced?sslmode=disable&password=s3cret-pw+plus",
    ],
    ids=["query", "user-part", "plus"],
)
def test_a_database_password_is_masked_in_every_form(project: Project, url: str) -> None:
    """libpq's `?password=` and an encoded user-part password: never in check, check --print, or an error."""
    project.add_mailboxes(1)
    project.add_cadence()
    project.data["daemon"]["database"] = url
    project.write()
    project.config_path.chmod(0o600)
    checked = project.run("check", write=False)
    printed = project.run("check", "--print", write=False)
    everything = checked.out + checked.err + printed.out + printed.err + shown_database(url)
    assert "s3cret" not in everything
    assert "********" in checked.err  # "postgresql://cadenced@127.0.0.1:1/cadenced?password=********: cannot connect"
    assert "warning: daemon.database: a password in the config file" in checked.err


def test_the_database_url_from_a_credential(project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-url").write_text("postgresql://cadenced:s3cret-pw@127.0.0.1:1/cadenced\n")
    (creds / "db-url").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    project.add_mailboxes(1)
    project.add_cadence()
    project.data["daemon"].pop("database", None)
    project.data["daemon"]["database_url_credential"] = "db-url"
    config = load_config(project.write())
    assert config.daemon.database == "postgresql://cadenced:s3cret-pw@127.0.0.1:1/cadenced"
    printed = project.run("check", "--print")
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning")]
    assert "s3cret" not in printed.out + printed.err
    assert [w.split(": cannot connect")[0] for w in warnings] == [  # nothing listens there: said, not fatal
        "warning: postgresql://cadenced:********@127.0.0.1:1/cadenced"
    ]
    project.data["daemon"]["database"] = "/tmp/x.db"
    assert "give only one of database, database_url_credential" in project.run("check").err


def test_a_secret_file_others_can_read_is_warned_of(project: Project) -> None:
    secret = project.root / "smtp-password"
    secret.write_text("pw-of-the-mailbox\n")
    secret.chmod(0o644)
    project.add_mailboxes(1, smtp={"username": "u", "password_file": str(secret), "security": "tls"})
    project.add_cadence()
    result = project.run("check")
    assert result.code == 0
    assert f"warning: mailboxes[0].smtp.password_file: {secret} can be read by its group or by others (mode 0644)" in (
        result.err
    )
    secret.chmod(0o600)
    assert "can be read by" not in project.run("check").err


def test_jinja2_is_required_past_its_published_sandbox_escapes() -> None:
    """3.1.5 and older let a template break out of the sandbox (CVE-2024-56326, CVE-2025-27516)."""
    required = [r for r in importlib.metadata.requires("cadenced") or [] if r.replace(" ", "").startswith("jinja2")]
    assert required and ">=3.1.6" in required[0].replace(" ", "")
    installed = tuple(int(p) for p in importlib.metadata.version("jinja2").split(".")[:3])
    assert installed >= (3, 1, 6)


def test_the_unit_runs_with_a_writable_state_and_a_socket_folder() -> None:
    """A rotated refresh token is written under the unit (StateDirectory), /run/cadenced/api.sock has its folder
    (RuntimeDirectory), and the token stays out of `ps` in the README's curl line."""
    root = Path(__file__).resolve().parent.parent
    unit = (root / "systemd" / "cadenced.service").read_text(encoding="utf-8")
    keys = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["StateDirectory"].split()[0] == "cadenced"
    assert keys["RuntimeDirectory"] == "cadenced" and keys["RuntimeDirectoryMode"] == "0750"
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"curl[^\n]*Bearer \$\(|-H \"Authorization: Bearer \$\(", readme)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")
def test_a_refresh_token_written_by_root_belongs_to_the_services_folder(project: Project) -> None:
    """`mailbox authorize` as root into /var/lib/cadenced/oauth (the dynamic user's): the service can read it and
    write the next rotated one."""
    from daemon import oauth

    folder = project.root / "oauth"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    project.add_mailboxes(
        1,
        oauth2={
            "client_id": "id",
            "token_url": "https://login.acme.example/token",
            "refresh_token_file": str(folder / "alice.refresh"),
        },
        smtp={"host": "127.0.0.1", "auth": "oauth2", "security": "tls"},
    )
    project.add_cadence()
    settings = load_config(project.write()).mailboxes[0].oauth2
    assert settings is not None
    written = oauth.save_refresh_token(settings, "a-refresh-token")
    assert written is not None
    st = written.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
