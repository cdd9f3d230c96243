"""A TOML table as the checks read it: every value fetched by type, every problem named by its TOML path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


_MISSING: Any = object()


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


class _Table:
    """One TOML table being read: typed getters that record problems, then unknown keys."""

    def __init__(self, data: dict[str, Any], path: str, problems: _Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, kind: type | tuple[type, ...], kind_name: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.problems.add(self.at(key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.add(self.at(key), f"must be {kind_name}, got {_type_name(value)}")
            return default if default is not _MISSING else None
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, str, "a string", default)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, bool, "true or false", default)

    def integer(self, key: str, default: Any, low: int, high: int) -> Any:
        value = self._get(key, int, "an integer", default)
        if isinstance(value, int) and not low <= value <= high:
            self.problems.add(self.at(key), f"must be {low}-{high}, got {value}")
            return default
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> Any:
        value = self.string(key, default)
        if isinstance(value, str) and value not in choices:
            self.problems.add(self.at(key), f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, list, "a list of strings", default)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    self.problems.add(f"{self.at(key)}[{i}]", f"must be a string, got {_type_name(item)}")
                    return default
        return value

    def parsed(self, key: str, default: Any, parse: Callable[[str], T]) -> T | Any:
        text = self.string(key, _MISSING if default is _MISSING else None)
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError as exc:
            self.problems.add(self.at(key), str(exc))
            return default

    def table(self, key: str, required: bool = False) -> _Table | None:
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.problems.add(self.at(key), "is required")
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            self.problems.add(self.at(key), f"must be a table, got {_type_name(value)}")
            return None
        return _Table(value, self.at(key), self.problems)

    def tables(self, key: str, label: Callable[[int, dict[str, Any]], str] | None = None) -> Iterator[_Table]:
        self.seen.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problems.add(self.at(key), f"must be an array of tables ([[{key}]]), got {_type_name(value)}")
            return
        for i, item in enumerate(value):
            suffix = label(i, item) if label else f"[{i}]"
            yield _Table(item, self.at(key) + suffix, self.problems)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problems.add(self.at(key), "unknown key")


def _type_name(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
