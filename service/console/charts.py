"""Small charts as inline SVG, drawn on the server: no script, no image request, no library.

A chart is a fixed-size ``<svg>`` with a ``<title>`` and a ``<desc>`` that say in words what
it shows (a screen reader, a test and a text browser read those), the largest value as the
top label and the time span along the bottom. Every text that goes into it is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

WIDTH = 360
HEIGHT = 96
# Room for the labels: the top value on the left, the times below.
PAD_LEFT = 40
PAD_RIGHT = 4
PAD_TOP = 6
PAD_BOTTOM = 16


@dataclass(frozen=True, slots=True)
class Series:
    """One line (or the bars) of a chart: a value per bucket, None where there is none."""

    name: str
    values: Sequence[float | None]
    css_class: str


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _scale(series: Sequence[Series]) -> float:
    top = max((v for s in series for v in s.values if v is not None), default=0.0)
    return top if top > 0 else 1.0


def _frame(title: str, desc: str, top_label: str, start: datetime, end: datetime) -> list[str]:
    bottom = HEIGHT - PAD_BOTTOM
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(desc)}</desc>",
        f'<line class="axis" x1="{PAD_LEFT}" y1="{bottom}" x2="{WIDTH - PAD_RIGHT}" '
        f'y2="{bottom}"/>',
        f'<line class="axis" x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{PAD_LEFT}" y2="{bottom}"/>',
        f'<text class="label" x="{PAD_LEFT - 3}" y="{PAD_TOP + 8}" '
        f'text-anchor="end">{escape(top_label)}</text>',
        f'<text class="label" x="{PAD_LEFT - 3}" y="{bottom}" text-anchor="end">0</text>',
        f'<text class="label" x="{PAD_LEFT}" y="{HEIGHT - 3}">'
        f"{escape(start.strftime('%H:%M'))}</text>",
        f'<text class="label" x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - 3}" text-anchor="end">'
        f"{escape(end.strftime('%H:%M'))} UTC</text>",
    ]


def bar_chart(
    series: Series, *, title: str, unit: str, start: datetime, end: datetime, summary: str
) -> Markup:
    """One bar per bucket (an empty bucket draws nothing)."""
    top = _scale([series])
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    n = max(len(series.values), 1)
    step = plot_w / n
    parts = _frame(title, summary, f"{_number(top)}{unit}", start, end)
    parts.append(f'<g class="{escape(series.css_class)}">')
    for i, value in enumerate(series.values):
        if not value:
            continue
        h = max(value / top * plot_h, 1.0)
        x = PAD_LEFT + i * step
        parts.append(
            f'<rect x="{x:.1f}" y="{PAD_TOP + plot_h - h:.1f}" width="{max(step - 0.5, 0.5):.1f}" '
            f'height="{h:.1f}"><title>{escape(_number(value))}{escape(unit)}</title></rect>'
        )
    parts.append("</g></svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above is escaped


def line_chart(
    series: Sequence[Series], *, title: str, unit: str, start: datetime, end: datetime, summary: str
) -> Markup:
    """A line per series, broken where a bucket has no value."""
    top = _scale(series)
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    parts = _frame(title, summary, f"{_number(top)}{unit}", start, end)
    for one in series:
        n = max(len(one.values), 1)
        step = plot_w / n
        runs: list[list[str]] = [[]]
        for i, value in enumerate(one.values):
            if value is None:
                if runs[-1]:
                    runs.append([])
                continue
            x = PAD_LEFT + (i + 0.5) * step
            y = PAD_TOP + plot_h - value / top * plot_h
            runs[-1].append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:  # a lone value: a dot, a line needs two points
                cx, cy = run[0].split(",")
                parts.append(
                    f'<circle class="{escape(one.css_class)}" cx="{cx}" cy="{cy}" r="1.5"/>'
                )
            elif run:
                parts.append(
                    f'<polyline class="{escape(one.css_class)}" fill="none" '
                    f'points="{" ".join(run)}"/>'
                )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above is escaped
