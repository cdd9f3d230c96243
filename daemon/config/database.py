"""`[daemon] database`: an SQLite file or a PostgreSQL URL, the node name and lease of several daemons, and
how a URL is shown (its passwords masked)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from daemon import redact
from daemon.config.secrets import _secret_file
from daemon.config.tables import _Table
from daemon.config.values import format_duration, parse_duration

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _node(d: _Table) -> str:
    node = d.string("node", "")
    if not node:  # the host name, made to fit
        return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-._")[:63] or "node"
    if not isinstance(node, str) or not _NODE.fullmatch(node):
        d.problems.add(d.at("node"), f"letters, digits, '.', '_' and '-', at most 63, got {node!r}")
        return "node"
    return node


def _lease(d: _Table) -> float:
    lease = d.parsed("lease", 60.0, parse_duration)
    if isinstance(lease, float) and not 3.0 <= lease <= 3600.0:
        d.problems.add(d.at("lease"), f"must be 3s to 1h, got {format_duration(lease)}")
        return 60.0
    return float(lease)


def _database(d: _Table, base_dir: Path) -> Path | str:
    """`database`: an SQLite file (relative to the config's folder), or `postgresql://…`; or `database_url_env` /
    `database_url_credential`, where the URL (and its password) is kept out of the file."""
    sources = [k for k in ("database", "database_url_env", "database_url_credential") if d.has(k)]
    if len(sources) > 1:
        d.problems.add(d.at(sources[1]), f"give only one of {', '.join(sources)}")
        d.seen.update(sources)
    env = d.string("database_url_env", None)
    credential = d.string("database_url_credential", None)
    if isinstance(env, str):
        url = os.environ.get(env, "")
        if not url.startswith(POSTGRES_SCHEMES):
            d.problems.add(d.at("database_url_env"), f"${env} must hold a postgresql:// URL (it is unset or not one)")
            return "postgresql://unset"
        text: str = url
    elif isinstance(credential, str):
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            d.problems.add(d.at("database_url_credential"), "CREDENTIALS_DIRECTORY is not set (LoadCredential=)")
            return "postgresql://unset"
        secret, _ = _secret_file(
            d, "database_url_credential", Path(folder) / credential, "", f"credential {credential}"
        )
        text = secret.reveal().strip() if secret is not None else ""
        if not text.startswith(POSTGRES_SCHEMES):
            if secret is not None:
                d.problems.add(d.at("database_url_credential"), "the credential must hold a postgresql:// URL")
            return "postgresql://unset"
    else:
        text = d.string("database", "/var/lib/cadenced/cadenced.db")
        if not isinstance(text, str):
            return Path("/var/lib/cadenced/cadenced.db")
    if text.startswith(POSTGRES_SCHEMES):
        try:
            from daemon.store.postgres import database_passwords  # libpq's own reading of the URL

            passwords = database_passwords(text)
        except ValueError as exc:
            d.problems.add(d.at(sources[0] if sources else "database"), f"not a PostgreSQL URL: {exc}")
            return text
        for password in passwords:
            redact.register("database", password)
        if passwords and sources == ["database"]:
            d.problems.warnings.append(
                f"{d.at('database')}: a password in the config file; use database_url_env, "
                "database_url_credential, or a ~/.pgpass / PGPASSFILE of the service's own"
            )
        return text
    return Path(text) if Path(text).is_absolute() else base_dir / text
