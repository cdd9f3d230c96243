"""The project's few exception types; only cli.py turns them into exit codes."""

from __future__ import annotations


class CadencedError(Exception):
    """Base of every error cadenced reports to a user."""

    exit_code = 1


class ConfigError(CadencedError):
    """The configuration is invalid; carries every problem found, each naming its place."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.problems))


class UsageError(CadencedError):
    """A command was given something it cannot use (a missing file, a bad argument)."""

    exit_code = 2


class StoreError(CadencedError):
    """The database cannot be used (not a database, a newer schema, unwritable)."""

    exit_code = 2


class Refused(CadencedError):
    """The operation is understood but refused; nothing was changed."""

    exit_code = 1
