"""Pure: a CSV header row (or the keys of a prospect POSTed to a playbook) → the fields cadenced stores.

CRM exports name their columns as people do (`First Name`, `E-mail`, `Company Name`): case, spaces, dashes and
underscores do not matter, the usual CRM names map to ours, and `--map "Column=field"` names the rest (SPEC §2a).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# The usual CRM names of our fields, written as `squash` leaves them (lower case, nothing but letters and digits).
# HubSpot, Salesforce, Apollo, Pipedrive and Excel templates, as their exports name the columns.
ALIASES: dict[str, str] = {
    **dict.fromkeys(
        ("email", "emailaddress", "workemail", "businessemail", "emailwork", "primaryemail", "contactemail"),
        "email",
    ),
    **dict.fromkeys(("firstname", "givenname", "forename"), "first_name"),
    **dict.fromkeys(("lastname", "surname", "familyname"), "last_name"),
    **dict.fromkeys(
        ("company", "companyname", "accountname", "organization", "organisation", "organizationname"), "company"
    ),
    "jobtitle": "job_title",
    "owner": "owner",
}
LEFT_OUT = "-"  # the field of a column the map leaves out (`Column=`): its cells are not read
FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")  # what --map and `map` may name: a template variable in lower case
_SEPARATORS = re.compile(r"[\W_]+")  # anything but letters and digits separates the words of a column's name


def squash(name: str) -> str:
    """The name as it is compared: lower case, its letters and digits only (`E-mail` and `email` are one)."""
    return _SEPARATORS.sub("", name.casefold())


def field_name(column: str, wanted: Iterable[str] = ()) -> str:
    """The field a column fills: an alias's field, else a field in `wanted` (the names the cadence's templates use)
    spelt the same but for case and separators, else the column's words in lower case joined by `_`; '' for a
    column with no letter or digit in its name."""
    key = squash(column)
    if key in ALIASES:
        return ALIASES[key]
    for name in wanted:
        if squash(name) == key:
            return name
    return "_".join(w for w in _SEPARATORS.split(column.strip().lower()) if w)


@dataclass(frozen=True, slots=True)
class HeaderMap:
    """How a header was read: per column (in the file's order) its text and the field it fills: '' for a column
    with no name (its cells must be empty), LEFT_OUT for one the map leaves out (its cells are not read)."""

    columns: tuple[tuple[str, str], ...]

    @property
    def names(self) -> list[str]:
        return [field for _, field in self.columns]

    def as_list(self) -> list[dict[str, str | None]]:
        return [
            {"column": column, "field": field if field not in ("", LEFT_OUT) else None}
            for column, field in self.columns
        ]


class HeaderProblem(ValueError):
    """The header cannot be used; the text says why (the caller adds the place)."""


def parse_map(items: Sequence[str]) -> dict[str, str]:
    """`--map "Column=field"` arguments → {column: field}; `Column=` leaves the column out. ValueError says which."""
    out: dict[str, str] = {}
    for item in items:
        column, sep, field = item.rpartition("=")
        if not sep or not column.strip():
            raise ValueError(f'--map {item!r}: write it as "Column=field" ("Column=" leaves the column out)')
        out[column] = field.strip()
    return check_map(out, "--map")


def check_map(mapping: Mapping[str, str], where: str) -> dict[str, str]:
    """The map's fields are names a template can use (or '' for a column left out); ValueError names the entry."""
    for column, field in mapping.items():
        if field and not FIELD_NAME.fullmatch(field):
            raise ValueError(
                f"{where} {column!r}: {field!r} is not a field name (lower-case letters, digits and '_', "
                "as a template names it)"
            )
    seen = {squash(c) for c in mapping}
    if len(seen) < len(mapping):
        raise ValueError(f"{where}: a column is named twice (case, spaces, dashes and underscores do not count)")
    return dict(mapping)


def read_header(header: Sequence[str], mapping: Mapping[str, str] = {}, wanted: Iterable[str] = ()) -> HeaderMap:
    """The header's columns → fields, or HeaderProblem: no email column, two columns on one field, a map entry
    no column matches. A nameless column fills no field (its cells must be empty: the rows say so)."""
    wanted = tuple(wanted)
    given = {squash(c): (c, f) for c, f in mapping.items()}
    used: set[str] = set()
    columns: list[tuple[str, str]] = []
    for text in header:
        column = text.strip()
        key = squash(column)
        if key in given and column:
            used.add(key)
            columns.append((column, given[key][1] or LEFT_OUT))
        elif column:  # a name of punctuation alone (`#`) still names a column
            columns.append((column, field_name(column, wanted) or f"column_{len(columns) + 1}"))
        else:
            columns.append((column, ""))
    for key, (column, _) in given.items():
        if key not in used:
            raise HeaderProblem(f"map {column!r}: no such column in the header row (found: {_shown(header)})")
    first: dict[str, int] = {}
    for at, (column, field) in enumerate(columns):
        if field in ("", LEFT_OUT):
            continue
        if field in first:
            other = first[field]
            raise HeaderProblem(
                f"columns {other + 1} ({columns[other][0]!r}) and {at + 1} ({column!r}) both fill the field "
                f'{field!r}: map one of them elsewhere (--map "{column}=other_name") or leave it out '
                f'(--map "{column}=")'
            )
        first[field] = at
    if "email" not in first:
        raise HeaderProblem(
            f"no email column in the header row (found: {_shown(header)}); a column named Email, E-mail, "
            'Email Address, Work Email or Business Email is the address, --map "Column=email" names another'
        )
    return HeaderMap(tuple(columns))


def _shown(header: Sequence[str]) -> str:
    return ", ".join(repr(h.strip()[:40]) for h in header[:20]) or "nothing"
