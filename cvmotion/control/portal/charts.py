"""control layer (portal): histograms as server-drawn SVG — no chart library, no script, readable by a screen reader.

Each chart is an ``<svg role="img">`` with a ``<title>`` and ``<desc>`` summing it up (count, median,
p99, max) and one ``<title>`` per bar, so the numbers are there for people who cannot see the bars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = ["Summary", "histogram_svg", "summarise"]

_W, _H = 480, 200
_LEFT, _RIGHT, _BOTTOM, _TOP = 40, 22, 36, 12


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    p50: float
    p99: float
    max: float


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Nearest rank: the value at rank ceil(q * n), as latency reports usually define percentiles.
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summarise(values: Sequence[float]) -> Summary | None:
    if not values:
        return None
    ordered = sorted(values)
    return Summary(len(ordered), _quantile(ordered, 0.5), _quantile(ordered, 0.99), ordered[-1])


def _edges(values: Sequence[float], bins: int) -> list[float]:
    top = max(values)
    if top <= 0:
        top = 1.0
    # A round bin width (1, 2, 5 x 10^k) so the axis labels read as numbers people use.
    raw = top / bins
    magnitude = 10 ** math.floor(math.log10(raw))
    width = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = max(1, math.ceil(top / width + 1e-9))
    if top == count * width:
        count += 1  # the maximum falls in a bin of its own rather than on the right edge
    return [i * width for i in range(count + 1)]


def histogram_svg(values: Sequence[float], *, title: str, unit: str, bins: int = 10) -> Markup:
    """An SVG histogram of ``values`` (``unit`` labels the x axis); a short note when there are none."""
    summary = summarise(values)
    if summary is None:
        return Markup("<p class='empty'>{}</p>").format(f"No data yet for {title.lower()}.")
    edges = _edges(values, bins)
    counts = [0] * (len(edges) - 1)
    width = edges[1] - edges[0]
    for v in values:
        counts[min(len(counts) - 1, max(0, int(v // width)))] += 1
    peak = max(counts)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _BOTTOM - _TOP
    bar_w = plot_w / len(counts)
    desc = (
        f"{summary.count} values; median {summary.p50:g} {unit}, p99 {summary.p99:g} {unit}, max {summary.max:g} {unit}"
    )
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}"'
        f' aria-labelledby="t-{id(values)} d-{id(values)}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="t-{id(values)}">{escape(title)}</title><desc id="d-{id(values)}">{escape(desc)}</desc>',
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_W - _RIGHT}" y2="{_TOP + plot_h}" class="axis"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}" class="axis"/>',
        f'<text x="{_LEFT - 4}" y="{_TOP + 8}" class="tick" text-anchor="end">{peak}</text>',
        f'<text x="{_LEFT - 4}" y="{_TOP + plot_h}" class="tick" text-anchor="end">0</text>',
    ]
    for i, count in enumerate(counts):
        h = plot_h * count / peak
        x = _LEFT + i * bar_w
        lo, hi = edges[i], edges[i + 1]
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{_TOP + plot_h - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}">'
            f"<title>{lo:g}–{hi:g} {escape(unit)}: {count}</title></rect>"
        )
    step = max(1, len(counts) // 5)
    for i in range(0, len(edges), step):
        x = _LEFT + i * bar_w
        parts.append(f'<text x="{x:.1f}" y="{_H - _BOTTOM + 14}" class="tick" text-anchor="middle">{edges[i]:g}</text>')
    parts.append(f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_H - 4}" class="label" text-anchor="middle">')
    parts.append(f"{escape(unit)}</text></svg>")
    return Markup("".join(parts))
