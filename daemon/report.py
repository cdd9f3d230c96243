"""`cadenced report` (SPEC §8b): what each cadence's emails did, from the results the store counts as they happen
(store `results`: sends, blocks, ends and outcomes per cadence, UTC day, step, variant and mailbox).

Counted on the step that earned it: a send on its own step; a reply, bounce, unsubscribe, stop or end on the last
step the prospect was sent (step 0: ended before any email); an enrollment on the mailbox it was given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from daemon.model import Config
from daemon.store import OUTCOMES, Store

BY = ("step", "variant", "mailbox", "day")
ENDS = ("replied", "bounced", "blocked", "unsubscribed", "stopped", "finished")
COUNTS = ("enrolled", "contacted", "sent", *ENDS)
NO_VARIANT = "-"  # a step without variants (and sends from before variants were kept)


def report(config: Config, store: Store, by: str, cadence: str | None, since: str | None) -> dict[str, Any]:
    """The report document (`report --json`): per cadence its totals, and its rows by `by` ("" for none)."""
    totals = _rows(store.results("", cadence, since or ""), 0)
    rows = (
        _rows(store.results(by, cadence, since or ""), {"step": 1, "variant": 2, "mailbox": 1, "day": 1}[by])
        if by
        else {}
    )
    names = [c.name for c in config.cadences if cadence in (None, c.name)]
    names += sorted({name for name, _ in totals} - set(names))
    cadences = []
    for name in names:
        key_names = {"step": ("step",), "variant": ("step", "variant"), "mailbox": ("mailbox",), "day": ("day",)}
        own = sorted((k for c, k in rows if c == name), key=_order)
        cadences.append(
            {
                "cadence": name,
                "configured": any(c.name == name for c in config.cadences),
                "totals": _figures(totals.get((name, ()), {}), by=""),
                "rows": [
                    {**dict(zip(key_names[by], _shown(k), strict=True)), **_figures(rows[(name, k)], by)} for k in own
                ],
            }
        )
    return {"by": by or None, "since": since, "days": "UTC", "cadences": cadences}


def _rows(found: Iterable[tuple[Any, ...]], width: int) -> dict[tuple[str, tuple[Any, ...]], dict[str, int]]:
    """(cadence, key) → kind → n; `contacted` (step 1's sends, a prospect's first email) kept apart."""
    out: dict[tuple[str, tuple[Any, ...]], dict[str, int]] = {}
    for row in found:
        name, key, kind, first, n = (
            row[0],
            tuple(row[1 : 1 + width]),
            row[1 + width],
            row[2 + width],
            int(row[3 + width]),
        )
        counts = out.setdefault((name, key), {})
        counts[kind] = counts.get(kind, 0) + n
        if kind == "sent" and first:
            counts["contacted"] = counts.get("contacted", 0) + n
    return out


def _figures(counts: dict[str, int], by: str) -> dict[str, Any]:
    """One row's figures. On a step's (or variant's) row a prospect reached is one sent that step: contacted is its
    sends, and there is no `enrolled` (enrollments are not of a step)."""
    per_step = by in ("step", "variant")
    figures: dict[str, Any] = {k: counts.get(k, 0) for k in COUNTS}
    if per_step:
        figures["contacted"] = figures["sent"]
        del figures["enrolled"]
    figures["outcomes"] = {o: counts.get(f"outcome:{o}", 0) for o in OUTCOMES}
    reached = figures["contacted"]
    figures["reply_rate"] = round(figures["replied"] / reached, 4) if reached else None
    figures["bounce_rate"] = round(figures["bounced"] / reached, 4) if reached else None
    return figures


def _order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, k) if isinstance(k, int) else (1, str(k)) for k in key)


def _shown(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(NO_VARIANT if k == "" else k for k in key)


def lines(document: dict[str, Any]) -> list[str]:
    """The report as text: a table per cadence, rates as percentages."""
    by = document["by"]
    out: list[str] = []
    head = (
        "enrolled",
        "contacted",
        "sent",
        "replied",
        "bounced",
        "blocked",
        "unsub",
        "stopped",
        "finished",
        "reply%",
        "bounce%",
    )
    for c in document["cadences"]:
        since = f" since {document['since']}" if document["since"] else ""
        removed = "" if c["configured"] else " (removed from the config)"
        out.append(f"cadence {c['cadence']}{removed}{since} (days in UTC)")
        label = {"step": "step", "variant": "step/variant", "mailbox": "mailbox", "day": "day (UTC)", None: ""}[by]
        width = max([len(label), 5, *(len(_label(r, by)) for r in c["rows"])])
        out.append(f"  {label:<{width}} " + " ".join(f"{h:>9}" for h in head))
        for name, figures in [("total", c["totals"]), *((_label(r, by), r) for r in c["rows"])]:
            out.append(f"  {name:<{width}} " + " ".join(f"{v:>9}" for v in _cells(figures)))
        outcomes = {k: v for k, v in c["totals"]["outcomes"].items() if v}
        if outcomes:
            out.append("  outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    return out


def _label(row: dict[str, Any], by: str) -> str:
    if by == "variant":
        return f"{row['step']}/{row['variant']}"
    return str(row[by])


def _cells(f: dict[str, Any]) -> list[str]:
    def rate(r: float | None) -> str:
        return "-" if r is None else f"{r * 100:.1f}"

    counts = [f.get("enrolled", "-"), f["contacted"], f["sent"], f["replied"], f["bounced"], f["blocked"]]
    counts += [f["unsubscribed"], f["stopped"], f["finished"]]
    return [str(v) for v in counts] + [rate(f["reply_rate"]), rate(f["bounce_rate"])]
