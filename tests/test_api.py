"""[api] through a real daemon process: /metrics parses and matches what the server received; playbooks enroll
from the owner's mailboxes, once per Idempotency-Key; status, outbox, retry and reassign need the token and
answer as the CLI does; bad input gets a 4xx naming the field and changes nothing; schemathesis finds no 5xx."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Project
from tests.daemon_helpers import query
from tests.servers import SmtpServer, free_port

pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

TOKEN = "api-token-for-the-tests-0123456789"


def wait_listening(port: int, proc: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.communicate()[0] if proc.stdout is not None else b""  # read: no pipe left open
            raise AssertionError(f"the daemon exited ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("the API never listened")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(port: int, when: Callable[[Samples], bool] = lambda _: True, within: float = 20.0) -> Samples:
    """A scrape in which `when` holds: /metrics is a snapshot up to METRICS_TTL old, so a fact may show late."""
    deadline = time.monotonic() + within
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        if when(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture
def server() -> SmtpServer:
    s = SmtpServer().start()
    yield s  # type: ignore[misc]
    s.stop()


def test_metrics_status_and_outbox(project: Project, server: SmtpServer, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    project.data["defaults"]["gap"] = "0s"
    project.data["api"] = {"listen": f"127.0.0.1:{port}", "token_file": str(tmp_path / "api-token")}
    (box,) = project.add_mailboxes(1, smtp=server.smtp_config())
    project.add_cadence()
    project.enroll(project.people(3))
    project.write()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(project.config_path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CADENCED_LOG_FORMAT": "json"},
    )
    try:
        wait_listening(port, proc)
        server.recorder.wait_for(3)
        found = metrics(port, lambda f: f.get(("cadenced_messages_sent_total", ())) == 3)
        assert found[("cadenced_messages_sent_total", ())] == len(server.recorder.deliveries) == 3
        assert found[("cadenced_events_total", (("event", "message.sent"), ("reason", "")))] == 3
        assert found[("cadenced_mailbox_sent_today", (("mailbox", box),))] == 3
        assert found[("cadenced_mailbox_state", (("mailbox", box), ("state", "connected")))] == 1
        assert found[("cadenced_messages", (("state", "scheduled"),))] == 0
        assert found[("cadenced_last_commit_timestamp_seconds", ())] > 0

        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/status", timeout=10).status_code == 401
        wrong = httpx.get(f"{url}/v1/status", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and TOKEN not in wrong.text
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status = httpx.get(f"{url}/v1/status", headers=auth, timeout=10).json()
        cli = project.run("status", "--json").json()
        assert status["mailboxes"] == cli["mailboxes"] and status["cadences"] == cli["cadences"]
        outbox = httpx.get(f"{url}/v1/outbox?state=sent", headers=auth, timeout=10).json()
        assert outbox["messages"] == project.run("outbox", "--state", "sent", "--all", "--json").json()["messages"]
        for query, field in (
            ("state=bogus", "state"),
            ("limit=0", "limit"),
            ("limit=x", "limit"),
            ("colour=red", "colour"),
        ):
            bad = httpx.get(f"{url}/v1/outbox?{query}", headers=auth, timeout=10)
            assert bad.status_code == 400 and bad.json()["field"] == field, query
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert TOKEN.encode() not in out


def test_a_unix_socket_listener(project: Project, server: SmtpServer, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    (tmp_path / "api-token").write_text(TOKEN)
    project.data["api"] = {"listen": f"unix:{sock}", "token_file": str(tmp_path / "api-token")}
    project.add_mailboxes(1, smtp=server.smtp_config())
    project.add_cadence()
    project.write()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(project.config_path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():  # bound by the daemon (a connect before that leaves httpx a socket open)
            assert proc.poll() is None and time.monotonic() < deadline, "never listened"
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as client:
            answer = client.get("http://cadenced/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200 and answer.json()["mailboxes"][0]["state"] == "connected"
        assert sock.stat().st_mode & 0o777 == 0o660  # the service's user and group only
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()[-2000:]


class Daemon:
    """`cadenced run` with [api] on a loopback port; stopped (and its exit checked) by the fixture."""

    def __init__(self, project: Project, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        (tmp_path / "api-token").write_text(TOKEN)
        project.data["api"] = {"listen": f"127.0.0.1:{self.port}", "token_file": str(tmp_path / "api-token")}
        self.project = project
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        for _ in range(3):
            self.project.write()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--config", str(self.project.config_path), "run"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_listening(self.port, self.proc)
                return self
            except AssertionError as exc:
                if "cannot listen there" not in str(exc):
                    raise
            # free_port's port was taken by another test between its choice and the daemon's start: another
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.project.data["api"]["listen"] = f"127.0.0.1:{self.port}"
        raise AssertionError("three ports taken in a row")

    def stop(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out.decode()[-2000:]
        assert TOKEN.encode() not in out
        return out.decode()

    def post(self, path: str, body: Any = None, *, content: bytes | None = None, **headers: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}",
            json=body if content is None else None,
            content=content,
            headers={**self.auth, **headers},
            timeout=30,
        )

    def enrolled(self) -> int:
        status = httpx.get(f"{self.url}/v1/status", headers=self.auth, timeout=10).json()
        return sum(sum(c["enrollments"].values()) for c in status["cadences"])


@pytest.fixture
def daemon(project: Project, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(project, tmp_path)
    yield d
    if d.proc is not None and d.proc.returncode is None:
        d.stop()


def test_a_playbook_enrolls_from_its_owners_mailboxes_once_per_key(
    project: Project, server: SmtpServer, daemon: Daemon
) -> None:
    project.data["defaults"]["gap"] = "0s"
    project.add_mailboxes(2, owner="alice", smtp=server.smtp_config())
    bobs = project.add_mailboxes(2, owner="bob", smtp=server.smtp_config())
    project.add_cadence(users=["alice", "bob"])
    project.data["playbooks"] = [
        {"name": "crm-stage", "cadence": "c1", "owner": "bob", "fields": {"first_name": "FirstName"}}
    ]
    daemon.start()
    # The CRM's whole record comes along: with `fields`, keys it does not map are left alone.
    people = [{"email": f"Lead{i}@Prospects.example", "FirstName": f"Lead{i}", "crm": {"id": i}} for i in range(4)]
    first = daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": people}, **{"Idempotency-Key": "hook-1"})
    assert first.status_code == 200, first.text
    report = first.json()
    today = datetime.now(UTC).date().isoformat()  # the project's mailboxes send around the clock, in UTC
    assert report == {
        "enrolled": 4,
        "skipped": 0,
        "rejected": [],
        "rejected_total": 0,
        "assignments": {bobs[0]: 2, bobs[1]: 2},
        "first_emails_by": {bobs[0]: today, bobs[1]: today},
    }
    deliveries = server.recorder.wait_for(4)
    assert sorted(d.sender for d in deliveries) == sorted(bobs * 2)  # the owner's mailboxes, evenly
    assert sorted(d.recipient for d in deliveries) == [f"lead{i}@prospects.example" for i in range(4)]
    assert all(f"Hi {d.recipient.split('@')[0].title()}," in d.headers.get_body().get_content() for d in deliveries)

    # A webhook retried with the same key: the first answer again, nothing enrolled twice.
    again = daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": people}, **{"Idempotency-Key": "hook-1"})
    assert again.status_code == 200 and again.json() == report
    assert again.headers["idempotent-replayed"] == "true"
    reused = daemon.post(
        "/v1/playbooks/crm-stage/enrollments", {"prospects": people[:1]}, **{"Idempotency-Key": "hook-1"}
    )
    assert reused.status_code == 422 and reused.json()["field"] == "Idempotency-Key"
    # Twins in flight at once: one enrolls, the other gets its answer.
    twins = [{"email": f"twin{i}@prospects.example", "FirstName": "Twin"} for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda _: daemon.post(
                    "/v1/playbooks/crm-stage/enrollments", {"prospects": twins}, **{"Idempotency-Key": "hook-2"}
                ),
                range(2),
            )
        )
    assert [a.status_code for a in answers] == [200, 200] and answers[0].json() == answers[1].json()
    assert answers[0].json()["enrolled"] == 50
    assert sorted("idempotent-replayed" in a.headers for a in answers) == [False, True]
    server.recorder.wait_for(54)
    # Without a key the cadence's own rule holds: already enrolled addresses are skipped.
    plain = daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": people})
    assert plain.status_code == 200 and plain.json()["enrolled"] == 0 and plain.json()["skipped"] == 4
    assert daemon.enrolled() == 54

    new = {"email": "fresh@prospects.example", "FirstName": "Fresh"}
    refusals: list[tuple[httpx.Response, int, str]] = [
        (
            daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": [new, {"email": "not an address"}]}),
            422,
            "prospects[1].email",
        ),
        (
            daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": [new] * 10_001}),
            413,
            "prospects",
        ),
        (
            daemon.post(
                "/v1/playbooks/crm-stage/enrollments",
                content=b'{"prospects": [',
                **{"Content-Type": "application/json"},
            ),
            400,
            "body",
        ),
        (
            daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": [{**new, "FirstName": ["a"]}]}),
            422,
            "prospects[0].FirstName",
        ),
        (
            daemon.post("/v1/playbooks/crm-stage/enrollments", {"prospects": [{"FirstName": "No address"}]}),
            422,
            "prospects[0].email",
        ),
        (daemon.post("/v1/playbooks/crm-stage/enrollments", {"people": [new]}), 422, "people"),
        (
            daemon.post("/v1/playbooks/crm-stage/enrollments", content=b"email=x", **{"Content-Type": "text/plain"}),
            415,
            "Content-Type",
        ),
        (daemon.post("/v1/playbooks/nope/enrollments", {"prospects": [new]}), 404, "name"),
        (
            daemon.post(
                "/v1/playbooks/crm-stage/enrollments",
                content=b" " * (16 * 1024 * 1024 + 1),
                **{"Content-Type": "application/json"},
            ),
            413,
            "body",
        ),
        (
            daemon.post(
                "/v1/playbooks/crm-stage/enrollments", {"prospects": [new]}, **{"Idempotency-Key": "has space"}
            ),
            422,
            "Idempotency-Key",
        ),
    ]
    for answer, status, field in refusals:
        assert (answer.status_code, answer.json().get("field")) == (status, field), answer.text
    bad = refusals[0][0].json()
    assert (
        bad["rejected"][0]["reason"].startswith("not a valid email address") and "nothing was enrolled" in bad["detail"]
    )
    wrong = httpx.post(
        f"{daemon.url}/v1/playbooks/crm-stage/enrollments",
        json={"prospects": [new]},
        headers={"Authorization": "Bearer wrong"},
        timeout=10,
    )
    assert wrong.status_code == 401 and wrong.headers["connection"] == "close"  # its body unread: not reusable
    assert daemon.enrolled() == 54  # none of the refused requests enrolled anything, not even its good prospect

    found = metrics(daemon.port, lambda f: f.get(("cadenced_messages_sent_total", ())) == 54)
    assert found[("cadenced_messages_sent_total", ())] == len(server.recorder.deliveries) == 54
    assert found[("cadenced_events_total", (("event", "api.enrolled"), ("reason", "")))] == 3
    assert found[("cadenced_store_commit_seconds_count", ())] > 0
    assert found[("cadenced_imap_sessions", ())] == 0
    log = [json.loads(line) for line in daemon.stop().splitlines() if line.startswith("{")]
    enrolled = [(e["playbook"], e["idempotency_key"], e["enrolled"]) for e in log if e["event"] == "api.enrolled"]
    assert enrolled == [("crm-stage", "hook-1", 4), ("crm-stage", "hook-2", 50), ("crm-stage", None, 0)]


def test_retry_and_reassign_over_http_follow_the_clis_rules(
    project: Project, server: SmtpServer, daemon: Daemon
) -> None:
    project.data["defaults"]["gap"] = "0s"
    a1, a2 = project.add_mailboxes(2, smtp=server.smtp_config())
    project.add_cadence()
    assert project.enroll(project.people(4)).code == 0  # two each
    project.data["mailboxes"][1]["paused"] = True  # a2's two wait
    daemon.start()
    server.recorder.wait_for(2)
    waiting = httpx.get(f"{daemon.url}/v1/outbox?mailbox={a2}&state=scheduled", headers=daemon.auth, timeout=10)
    ids = [m["id"] for m in waiting.json()["messages"]]
    assert len(ids) == 2

    not_error = daemon.post("/v1/outbox/retry", {"ids": ids})
    assert not_error.status_code == 409 and "only error messages can be retried" in not_error.json()["detail"]
    assert daemon.post("/v1/outbox/retry", {"all": True}).status_code == 409
    for body, field in (
        ({}, "ids"),
        ({"ids": ids, "all": True}, "ids"),
        ({"ids": [0]}, "ids[0]"),
        ({"ids": "1"}, "ids"),
        ({"all": "yes"}, "all"),
        ({"colour": "red"}, "colour"),
    ):
        answer = daemon.post("/v1/outbox/retry", body)
        assert (answer.status_code, answer.json()["field"]) == (422, field), body
    assert daemon.post("/v1/outbox/reassign", {"ids": ids}).json()["field"] == "to"
    ghost = daemon.post("/v1/outbox/reassign", {"ids": ids, "to": "ghost@x.example"})
    assert ghost.status_code == 422 and "unknown mailbox" in ghost.json()["detail"]

    moved = daemon.post("/v1/outbox/reassign", {"from": a2, "to": a1})
    assert moved.status_code == 200, moved.text
    assert moved.json() == {"reassigned": sorted(ids), "enrollments": 2, "to": a1, "goes_at": None, "waiting_for": None}
    deliveries = server.recorder.wait_for(4)
    assert [d.sender for d in deliveries].count(a1) == 4


def test_prospects_and_cadences_over_http(project: Project, server: SmtpServer, daemon: Daemon) -> None:
    """SPEC §8a over HTTP: the CLI's rules and answers; unknown names are 404 with the nearest."""
    project.data["defaults"]["gap"] = "0s"
    project.add_mailboxes(1, smtp=server.smtp_config())
    cadence = project.add_cadence(steps=2)
    cadence["steps"][1]["wait"] = "1h"
    assert project.enroll(project.people(3)).code == 0
    daemon.start()
    server.recorder.wait_for(3)
    auth = daemon.auth
    shown = httpx.get(f"{daemon.url}/v1/prospects/p0@prospects.example", headers=auth, timeout=10)
    assert shown.status_code == 200
    assert shown.json() == project.run("prospect", "show", "p0@prospects.example", "--json").json()
    typo = httpx.get(f"{daemon.url}/v1/prospects/p0@prospects.exmaple", headers=auth, timeout=10)
    assert typo.status_code == 404 and "did you mean p0@prospects.example?" in typo.json()["detail"]
    patched = httpx.patch(
        f"{daemon.url}/v1/prospects/p1@prospects.example", json={"fields": {"first_name": "Zed"}}, headers=auth
    )
    assert patched.status_code == 200, patched.text
    fields = json.loads(
        query(project.database, "SELECT fields FROM enrollments WHERE email = ?", "p1@prospects.example")[0][0]
    )
    assert fields["first_name"] == "Zed"
    bad = httpx.patch(f"{daemon.url}/v1/prospects/p1@prospects.example", json={"fields": {"email": "x"}}, headers=auth)
    assert bad.status_code == 422 and bad.json()["field"] == "fields"
    stopped = daemon.post("/v1/prospects/p0@prospects.example/stop", {"reason": "by phone"})
    assert stopped.status_code == 200 and stopped.json()["stopped"] == ["c1"]
    assert daemon.post("/v1/prospects/p0@prospects.example/stop", {}).status_code == 409
    marked = daemon.post("/v1/prospects/p2@prospects.example/mark", {"outcome": "interested"})
    assert marked.status_code == 200 and marked.json()["ended"] == ["c1"]
    assert daemon.post("/v1/prospects/p2@prospects.example/mark", {"outcome": "maybe"}).json()["field"] == "outcome"
    assert daemon.post("/v1/cadences/c1/pause", {"reason": "review"}).json()["paused"] is True
    assert daemon.post("/v1/cadences/c2/pause", {}).status_code == 404
    resumed = daemon.post("/v1/cadences/c1/resume")
    assert resumed.status_code == 200 and resumed.json()["released"] == 0
    assert daemon.post("/v1/cadences/c1/resume").status_code == 409
    states = dict(query(project.database, "SELECT email, state FROM enrollments"))
    assert states == {
        "p0@prospects.example": "stopped",
        "p1@prospects.example": "active",
        "p2@prospects.example": "replied",
    }


@pytest.mark.skipif(
    shutil.which("schemathesis") is None and not Path(sys.executable).with_name("schemathesis").exists(),
    reason="schemathesis is not installed (pip install -e '.[test]')",
)
def test_schemathesis_finds_no_server_error(
    project: Project, server: SmtpServer, daemon: Daemon, tmp_path: Path
) -> None:
    """Property-based requests from the OpenAPI document: no 5xx, answers as documented (bounded examples)."""
    project.add_mailboxes(2, smtp=server.smtp_config())
    project.add_mailboxes(1, owner="bob", smtp=server.smtp_config())
    project.add_cadence(users=["alice", "bob"])
    project.data["playbooks"] = [{"name": "forms", "cadence": "c1", "owner": "alice"}]
    daemon.start()
    assert httpx.get(f"{daemon.url}/v1/openapi.json", timeout=10).status_code == 401
    document = httpx.get(f"{daemon.url}/v1/openapi.json", headers=daemon.auth, timeout=10).json()
    assert document["paths"]["/v1/playbooks/{name}/enrollments"]["post"]["parameters"][0]["schema"]["enum"] == ["forms"]
    tool = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    run = subprocess.run(
        [
            tool,
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{daemon.url}/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # its cache stays out of the source tree
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert TOKEN not in daemon.stop()


def test_the_scrapes_mailbox_gauges_are_what_status_says(project: Project) -> None:
    """/metrics reads sent today, allowance and state of all mailboxes at once; status reads them one by one."""
    from daemon import readside, timing
    from daemon.config import load_config
    from daemon.store import Store

    boxes = project.add_mailboxes(4)
    project.data["mailboxes"][1]["timezone"] = "Pacific/Auckland"
    project.data["mailboxes"][2]["warmup"] = {"start": 5, "step": 5, "every": "1d", "ceiling": 40}
    project.data["mailboxes"][3]["paused"] = True
    project.add_cadence()
    config = load_config(project.write())
    now = time.time()
    store = Store.open(config.daemon.database)
    try:
        for i, box in enumerate(boxes):
            today = timing.local_day(now, config.mailbox(box).schedule.timezone)
            for back, sent in ((0, 3 + i), (1, 7), (3, 2)):
                day = (date.fromisoformat(today) - timedelta(days=back)).isoformat()
                query(
                    config.daemon.database,
                    "INSERT INTO daily_counts (mailbox, day, sent) VALUES (?, ?, ?)",
                    box,
                    day,
                    sent,
                )
        store.pause(boxes[0], "operator: checking the list", now)
        status = readside.status(config, store, now)["mailboxes"]
        expected = [(m["address"], m["state"], m["sent_today"], m["allowance_today"]) for m in status]
        assert readside.gauges(config, store, now) == expected
        assert [e[1] for e in expected] == ["paused", "connected", "connected", "paused"]
        assert expected[2][3] == 20  # day 4 of the ramp: 5 + 3 * 5
    finally:
        store.close()


def test_events_are_counted_under_any_log_level() -> None:
    """log_level = "warning" hides a send's line, not its count in /metrics."""
    import io

    from daemon import logs

    out = io.StringIO()
    sent, deferred = ("message.sent", ""), ("message.deferred", "window")
    before = {k: logs.event_counts.get(k, 0) for k in (sent, deferred)}
    kept, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure("json", "warning", out)
    try:
        log = logs.get(mailbox="m@x.example")
        log.info("message.sent", message=1)
        log.warning("message.deferred", reason="window")
        log.debug("message.sent", message=2)  # not even counted: debug is below every counted event
        log.exception("store.error", detail="shown at warning")
    finally:  # as other tests found it
        structlog.configure(**kept)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert logs.event_counts[sent] == before[sent] + 1
    assert logs.event_counts[deferred] == before[deferred] + 1
    shown = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert shown == ["message.deferred", "store.error"]


def test_a_port_another_program_listens_on_is_named_not_a_traceback(project: Project, tmp_path: Path) -> None:
    """[api] listen on a port already taken: the daemon says which address and why, exits 1 (systemd starts it
    again: the other program may go), and has sent nothing."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        (tmp_path / "api-token").write_text(TOKEN)
        (tmp_path / "api-token").chmod(0o600)
        project.data["api"] = {"listen": f"127.0.0.1:{port}", "token_file": str(tmp_path / "api-token")}
        project.add_mailboxes(1)
        project.add_cadence()
        result = subprocess.run(
            [sys.executable, "-m", "daemon", "--config", str(project.write()), "run"],
            capture_output=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert result.returncode == 1
    said = result.stderr.decode()
    assert f"[api] listen 127.0.0.1:{port}: cannot listen there (Address already in use)" in said
    assert "Traceback" not in said and "Traceback" not in result.stdout.decode()
