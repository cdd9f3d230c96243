"""Passwords and tokens from a file, an environment variable or a systemd credential: read, bounded, and
warned about when others may read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from daemon.config.tables import _Problems, _Table
from daemon.model import (
    Secret,
)


def _named_secret(t: _Table, name: str, base_dir: Path, missing_ok: bool = False) -> tuple[Secret | None, str]:
    """`<name>_file`, `<name>_env` or `<name>_credential`: the secret and where it came from.

    `missing_ok`: a file that does not exist yet is no error (a refresh token before `mailbox authorize`).
    """
    picked = _one_source(t, (f"{name}_file", f"{name}_env", f"{name}_credential"))
    if picked is None:
        return None, ""
    key, value = picked
    kind = key.rpartition("_")[2]
    return _read_secret(t, key, kind, value, base_dir, missing_ok)


def _one_source(t: _Table, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """The one key of `keys` the table gives, with its value; giving two is a problem."""
    sources = [k for k in keys if t.has(k)]
    if len(sources) > 1:
        t.problems.add(t.path, f"give only one of {', '.join(sources)}")
    if not sources:
        return None
    for other in sources[1:]:
        t.seen.add(other)
    value = t.string(sources[0])
    return (sources[0], value) if isinstance(value, str) else None


def _read_secret(
    t: _Table, key: str, kind: str, value: str, base_dir: Path, missing_ok: bool = False
) -> tuple[Secret | None, str]:
    """A secret from a file, an environment variable or a systemd credential, and its source."""
    if kind == "file":
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if missing_ok and not path.exists():
            return None, f"{key}:{path}"
        return _secret_file(t, key, path, f"{key}:{path}", str(path))
    if kind == "env":
        if value not in os.environ:
            t.problems.add(t.at(key), f"environment variable {value} is not set")
            return None, ""
        return Secret(os.environ[value]), f"{key}:{value}"
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        t.problems.add(t.at(key), "CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        return None, ""
    return _secret_file(t, key, Path(creds) / value, f"{key}:{value}", f"credential {value}")


def _secret(t: _Table, base_dir: Path, problems: _Problems, config_path: Path) -> tuple[Secret | None, str]:
    picked = _one_source(t, ("password_file", "password_env", "credential", "password"))
    if picked is None:
        return None, ""
    key, value = picked
    if key != "password":
        return _read_secret(
            t, key, {"password_file": "file", "password_env": "env"}.get(key, "credential"), value, base_dir
        )
    try:
        mode = config_path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IROTH | stat.S_IRGRP):
        problems.warnings.append(
            f"{t.at('password')}: inline password in {config_path}, which others can read; "
            "use password_file, password_env or credential"
        )
    return Secret(value), "password"


MAX_SECRET = 64 * 1024  # characters of a secret file (a refresh token is under 2 KB; a key file under 16 KB)


def _secret_file(t: _Table, key: str, path: Path, source: str, label: str) -> tuple[Secret | None, str]:
    try:
        with path.open(encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read(MAX_SECRET + 1)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        t.problems.add(t.at(key), f"cannot read {label}: {reason}")
        return None, ""
    if len(text) > MAX_SECRET:
        t.problems.add(t.at(key), f"{label} is larger than a secret can be ({MAX_SECRET} characters)")
        return None, ""
    if mode & (stat.S_IRGRP | stat.S_IROTH) and not label.startswith("credential"):
        t.problems.warnings.append(
            f"{t.at(key)}: {path} can be read by its group or by others (mode {stat.S_IMODE(mode):04o}); "
            "chmod 600 it (or 640 with a group of the service's own)"
        )
    return Secret(text.rstrip("\r\n")), source
