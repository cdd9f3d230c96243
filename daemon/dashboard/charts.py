"""Pure: the dashboard's charts as SVG, drawn on the server (no chart library, no script in the browser).

Each bar carries its figures as data attributes (`data-date`, `data-new`, …), so a test or a curious user can
read exactly what is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 760, 260
LEFT, BOTTOM, TOP = 44, 28, 26  # TOP: room for the legend


@dataclass(frozen=True, slots=True)
class PlanDay:
    date: str
    new: int
    follow_ups: int
    limit: int  # what the mailboxes shown may send that day (daily limits, warm-up and skip dates applied)


def _scale(highest: int) -> int:
    """A round top for the axis at or above `highest`."""
    top = 1
    while True:
        for m in (1, 2, 5):
            if top * m >= highest:
                return top * m
        top *= 10


@dataclass(frozen=True, slots=True)
class _Frame:
    """The plotting area of a chart of `n` days whose highest figure is `highest`: each day's slot, the axis."""

    n: int
    highest: int

    @property
    def top(self) -> int:
        return _scale(max(1, self.highest))

    @property
    def slot(self) -> float:
        return (WIDTH - LEFT - 8) / max(self.n, 1)

    def y(self, v: int) -> float:
        inner_h = HEIGHT - BOTTOM - TOP
        return TOP + inner_h - inner_h * v / self.top

    def axes(self) -> str:
        ticks = []
        for k in range(5):
            yy = TOP + (HEIGHT - BOTTOM - TOP) * (1 - k / 4)
            ticks.append(
                f'<line class="grid" x1="{LEFT}" x2="{WIDTH - 8}" y1="{yy:.1f}" y2="{yy:.1f}"/>'
                f'<text x="{LEFT - 4}" y="{yy + 4:.1f}" text-anchor="end">{self.top * k // 4}</text>'
            )
        return "".join(ticks)


def plan_chart(days: Sequence[PlanDay]) -> str:
    """Stacked bars per day (first emails below, follow-ups above) with each day's limit drawn as a line."""
    frame = _Frame(len(days), max([0, *(d.new + d.follow_ups for d in days), *(d.limit for d in days)]))
    slot, y = frame.slot, frame.y
    bar = max(slot * 0.6, 2)
    parts = [frame.axes()]
    for i, d in enumerate(days):
        x = LEFT + i * slot + (slot - bar) / 2
        parts.append(
            f'<g class="bar" data-date="{escape(d.date)}" data-new="{d.new}" data-follow-ups="{d.follow_ups}" '
            f'data-limit="{d.limit}"><title>{escape(d.date)}: {d.new} first emails, {d.follow_ups} follow-ups '
            f"(limit {d.limit})</title>"
            f'<rect class="new" x="{x:.1f}" y="{y(d.new):.1f}" width="{bar:.1f}" height="{y(0) - y(d.new):.1f}"/>'
            f'<rect class="follow-ups" x="{x:.1f}" y="{y(d.new + d.follow_ups):.1f}" width="{bar:.1f}" '
            f'height="{y(d.new) - y(d.new + d.follow_ups):.1f}"/>'
            f'<line class="limit" x1="{x - 2:.1f}" x2="{x + bar + 2:.1f}" y1="{y(d.limit):.1f}" y2="{y(d.limit):.1f}"/>'
            f'<text x="{x + bar / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(d.date[5:])}</text></g>'
        )
    legend = (
        '<g class="legend"><rect class="new" x="50" y="2" width="10" height="8"/><text x="64" y="10">first emails'
        '</text><rect class="follow-ups" x="150" y="2" width="10" height="8"/><text x="164" y="10">follow-ups</text>'
        '<line class="limit" x1="250" x2="262" y1="6" y2="6"/><text x="266" y="10">limit</text></g>'
    )
    return _svg("plan-chart", "Sends per day: first emails and follow-ups, with the daily limit", [*parts, legend])


def results_chart(days: Sequence[tuple[str, int, int]]) -> str:
    """Replies and bounces per day (date, replied, bounced), side by side."""
    frame = _Frame(len(days), max([0, *(r for _, r, _ in days), *(b for _, _, b in days)]))
    slot, y = frame.slot, frame.y
    bar = max(slot * 0.35, 1.5)
    parts = [frame.axes()]
    for i, (day, replied, bounced) in enumerate(days):
        x = LEFT + i * slot + slot * 0.15
        parts.append(
            f'<g class="day" data-date="{escape(day)}" data-replied="{replied}" data-bounced="{bounced}">'
            f"<title>{escape(day)}: {replied} replied, {bounced} bounced</title>"
            f'<rect class="replied" x="{x:.1f}" y="{y(replied):.1f}" width="{bar:.1f}" '
            f'height="{y(0) - y(replied):.1f}"/>'
            f'<rect class="bounced" x="{x + bar:.1f}" y="{y(bounced):.1f}" width="{bar:.1f}" '
            f'height="{y(0) - y(bounced):.1f}"/></g>'
        )
    if days:
        parts.append(f'<text x="{LEFT}" y="{HEIGHT - 10}">{escape(days[0][0])}</text>')
        parts.append(f'<text x="{WIDTH - 8}" y="{HEIGHT - 10}" text-anchor="end">{escape(days[-1][0])}</text>')
    legend = (
        '<g class="legend"><rect class="replied" x="50" y="2" width="10" height="8"/><text x="64" y="10">replied'
        '</text><rect class="bounced" x="130" y="2" width="10" height="8"/><text x="144" y="10">bounced</text></g>'
    )
    return _svg("results-chart", "Replies and bounces per day (UTC)", [*parts, legend])


def _svg(name: str, label: str, parts: list[str]) -> str:
    return (
        f'<svg class="{name}" role="img" aria-label="{escape(label)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )
