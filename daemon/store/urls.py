"""A database as logs, errors and `check` may show it: a path, or a URL with every password masked."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

PASSWORD_PARAMS = frozenset({"password", "sslpassword"})


def shown_database(database: Path | str) -> str:
    """The database as logs, errors and `check` may print it: every password (user part or query) masked."""
    if isinstance(database, Path):
        return str(database)
    try:
        parts = urlsplit(database)
        password = parts.password
    except ValueError:
        return "postgresql://(a URL that cannot be parsed)"
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:********@{host}"
    query = "&".join(
        f"{key}=********" if unquote(key).lower() in PASSWORD_PARAMS else f"{key}{sep}{value}"
        for key, sep, value in (piece.partition("=") for piece in parts.query.split("&") if piece)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
