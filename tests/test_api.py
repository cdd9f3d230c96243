"""[api] through a real daemon process: /metrics parses and matches what the server received; status and
outbox need the token and answer as the CLI does; bad input gets a 4xx naming the field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Project
from tests.servers import SmtpServer, free_port

TOKEN = "api-token-for-the-tests-0123456789"


def wait_listening(port: int, proc: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the daemon exited"
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("the API never listened")


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


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
        deadline = time.monotonic() + 20
        while metrics(port).get(("cadenced_messages_sent_total", ())) != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = metrics(port)
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
        assert outbox == project.run("outbox", "--state", "sent", "--json").json()
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
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()[-2000:]
