"""Shared fixtures: a project folder with a config, and the CLI run in process."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from daemon.cli import main
from tests.postgres_server import postgres_server, postgres_url  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def mailbox(address: str, owner: str, **extra: Any) -> dict[str, Any]:
    smtp = extra.pop("smtp", {})
    return {
        "address": address,
        "name": address.split("@")[0].title(),
        "owner": owner,
        "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none", **smtp},
        **extra,
    }


class Project:
    """A config file (and its folder) that tests edit and run commands against."""

    def __init__(self, root: Path, database: str = "") -> None:
        self.root = root
        self.config_path = root / "cadenced.toml"
        self.database: Path | str = database or root / "cadenced.db"  # an SQLite file or a PostgreSQL URL
        self.data: dict[str, Any] = {
            "daemon": {"database": str(self.database), "log_format": "json"},
            "defaults": {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "hours": ["00:00-24:00"]},
            "users": [{"name": "alice"}, {"name": "bob"}],
            "mailboxes": [],
            "cadences": [],
        }

    def add_mailboxes(self, n: int, owner: str = "alice", prefix: str = "mb", **extra: Any) -> list[str]:
        start = len(self.data["mailboxes"])
        addresses = [f"{prefix}{start + i + 1}@{owner}.example" for i in range(n)]
        for a in addresses:
            self.data["mailboxes"].append(mailbox(a, owner, **extra))
        return addresses

    def add_cadence(self, name: str = "c1", steps: int = 1, **extra: Any) -> dict[str, Any]:
        cadence = {
            "name": name,
            "users": ["alice"],
            "steps": [
                {"wait": "0s" if i == 0 else "1d", "body": f"Hi {{{{ first_name | default('there') }}}}, note {i + 1}"}
                | ({"subject": "Hello {{ company | default('you') }}"} if i == 0 else {})
                for i in range(steps)
            ],
        }
        cadence.update(extra)
        self.data["cadences"].append(cadence)
        return cadence

    def write(self, text: str | None = None) -> Path:
        self.config_path.write_text(text if text is not None else tomli_w.dumps(self.data), encoding="utf-8")
        return self.config_path

    def csv(self, rows: list[str] | str, name: str = "people.csv", header: str = "email,first_name,company") -> Path:
        path = self.root / name
        body = rows if isinstance(rows, str) else "\n".join([header, *rows]) + "\n"
        path.write_text(body, encoding="utf-8")
        return path

    def people(self, n: int, start: int = 0, name: str = "people.csv") -> Path:
        return self.csv([f"p{i}@prospects.example,P{i},Co{i}" for i in range(start, start + n)], name)

    def run(self, *args: str, write: bool = True) -> Result:
        if write:
            self.write()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(self.config_path), *args])
        return Result(code, out.getvalue(), err.getvalue())

    def enroll(self, path: Path, cadence: str = "c1", adder: str = "alice") -> Result:
        return self.run("enroll", "--cadence", cadence, "--as", adder, "--json", str(path))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked `both_stores` run each test on SQLite and on PostgreSQL (SPEC §10: one store interface)."""
    if "project" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_stores"):
        metafunc.parametrize("project", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def project(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Project]:
    old = os.environ.get("CADENCED_CONFIG")
    database = ""
    if getattr(request, "param", "sqlite") == "postgresql":
        database = request.getfixturevalue("postgres_url")
    yield Project(tmp_path, database)
    if old is not None:
        os.environ["CADENCED_CONFIG"] = old
