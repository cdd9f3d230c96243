"""A throwaway PostgreSQL for the tests: `initdb` in a temporary folder and `pg_ctl` on a random loopback port,
run as an unprivileged user when the tests run as root (PostgreSQL refuses to run as root).

`CADENCED_TEST_POSTGRES=postgresql://user:pw@host:port/db` uses that server instead: each test still gets a
database of its own, made from the server's template and dropped afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.servers import free_port


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


BIN = _binaries()
EXTERNAL = os.environ.get("CADENCED_TEST_POSTGRES", "")
needs_postgres = pytest.mark.skipif(
    BIN is None and not EXTERNAL,
    reason="no PostgreSQL here: install Debian's postgresql (as .ci/run does) or set CADENCED_TEST_POSTGRES",
)


class Postgres:
    """One server for the test session; `database()` makes a fresh database on it."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="cadenced-pg-"))
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        self.url = EXTERNAL or f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
        self.proc_started = False
        self.fsync = False  # the tests need no durability across a power cut; a benchmark does

    def _as_owner(self, *argv: str) -> list[str]:
        if os.geteuid() != 0:
            return list(argv)
        return ["runuser", "-u", self.user, "--", *argv]

    def start(self) -> Postgres:
        if EXTERNAL:
            return self
        assert BIN is not None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                self.user = "nobody"
                self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
            os.chmod(self.folder, 0o755)
            shutil.chown(self.folder, self.user)
        data = self.folder / "data"
        subprocess.run(
            self._as_owner(str(BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", self.user, "-E", "UTF8"),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.proc_started = True
        self.resume()
        return self

    def _pg_ctl(self, *args: str) -> None:
        assert BIN is not None
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder}"
        if not self.fsync:
            options += " -c fsync=off -c full_page_writes=off"
        data, log = str(self.folder / "data"), str(self.folder / "log")
        pg_ctl = self._as_owner(str(BIN / "pg_ctl"), "-D", data, "-l", log, "-o", options)
        subprocess.run([*pg_ctl, *args], check=True, stdout=subprocess.DEVNULL)

    def halt(self) -> None:
        """Down at once, as a crash or a power cut takes it (`-m immediate`): a private server's tests only."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        self._pg_ctl("-w", "start")

    def stop(self) -> None:
        if self.proc_started:
            subprocess.run(
                self._as_owner(str(BIN / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        shutil.rmtree(self.folder, ignore_errors=True)

    def admin(self, sql: str) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(sql)  # type: ignore[arg-type]
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.admin(f"CREATE DATABASE {name}")
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    if BIN is None and not EXTERNAL:
        pytest.skip("no PostgreSQL here: install Debian's postgresql or set CADENCED_TEST_POSTGRES")
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> Iterator[str]:
    url = postgres_server.database()
    yield url
    postgres_server.drop(url)
