"""Plots of the web catalog as inline SVG, drawn on the server (no JavaScript, no images).

:func:`histogram_svg` draws a histogram from bin edges and counts (the dataset card's
per-position entropy and top-1 mass); :func:`line_plot_svg` draws one or more series of
(step, value) points on shared axes (a run's training curves, two runs compared). Colours
and sizes are SVG attributes, so the pages need no inline style (their Content Security
Policy allows none). Every text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

__all__ = ["histogram_svg", "line_plot_svg", "valid_histogram", "COLOURS"]

WIDTH, HEIGHT = 560, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 46
COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#4a5568")
"""Series colours, in order (the first series of a compare is run A, the second run B)."""


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5:
        return f"{value:.2g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values between ``lo`` and ``hi`` (about ``count`` of them) for an axis."""
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / max(count, 1)
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


class _Frame:
    """Maps data coordinates onto the plot area of one SVG."""

    def __init__(self, x: tuple[float, float], y: tuple[float, float], top: int = TOP):
        self.x0, self.x1 = x
        self.y0, self.y1 = y
        self.top = top
        self.w, self.h = WIDTH - LEFT - RIGHT, HEIGHT - top - BOTTOM

    def sx(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * self.w

    def sy(self, value: float) -> float:
        return self.top + self.h - (value - self.y0) / (self.y1 - self.y0) * self.h

    def axes(
        self, title: str, xlabel: str, ylabel: str, xticks: list[float], yticks: list[float]
    ) -> list[str]:
        parts = [
            f'<text x="{WIDTH / 2:.1f}" y="18" text-anchor="middle" font-size="14" '
            f'font-weight="600" fill="#1a202c">{escape(title)}</text>',
            f'<line x1="{LEFT}" y1="{self.top + self.h}" x2="{LEFT + self.w}" y2="{self.top + self.h}" '
            'stroke="#4a5568" stroke-width="1"/>',
            f'<line x1="{LEFT}" y1="{self.top}" x2="{LEFT}" y2="{self.top + self.h}" '
            'stroke="#4a5568" stroke-width="1"/>',
        ]
        for t in xticks:
            x = self.sx(t)
            parts.append(
                f'<line x1="{x:.1f}" y1="{self.top + self.h}" x2="{x:.1f}" y2="{self.top + self.h + 4}" '
                'stroke="#4a5568"/>'
                f'<text x="{x:.1f}" y="{self.top + self.h + 16}" text-anchor="middle" font-size="11" '
                f'fill="#4a5568">{_fmt(t)}</text>'
            )
        for t in yticks:
            y = self.sy(t)
            parts.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + self.w}" y2="{y:.1f}" stroke="#e2e8f0"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                f'fill="#4a5568">{_fmt(t)}</text>'
            )
        parts.append(
            f'<text x="{LEFT + self.w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12" '
            f'fill="#2d3748">{escape(xlabel)}</text>'
        )
        if ylabel:
            middle = self.top + self.h / 2
            parts.append(
                f'<text x="14" y="{middle:.1f}" text-anchor="middle" font-size="12" fill="#2d3748" '
                f'transform="rotate(-90 14 {middle:.1f})">{escape(ylabel)}</text>'
            )
        return parts


def _svg(kind: str, title: str, parts: list[str]) -> Markup:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot {kind}" role="img" '
        f'aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
    )
    return Markup(head + "".join(parts) + "</svg>")


def valid_histogram(found: object) -> bool:
    """Whether ``found`` is ``{"edges": [n + 1 increasing numbers], "counts": [n counts]}``."""
    if not isinstance(found, dict):
        return False
    edges, counts = found.get("edges"), found.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts:
        return False
    if len(edges) != len(counts) + 1:
        return False
    if not all(isinstance(e, int | float) and math.isfinite(e) for e in edges):
        return False
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        return False
    return all(a < b for a, b in zip(edges, edges[1:], strict=False))


def histogram_svg(
    edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str, ylabel: str = "positions"
) -> Markup:
    """A histogram: one bar (``<rect class="bar">``, its range and count as its tooltip) per bin.

    Args:
        edges: n + 1 increasing bin edges.
        counts: n counts (bin i covers [edges[i], edges[i + 1])).
    """
    if not valid_histogram({"edges": list(edges), "counts": list(counts)}):
        raise ValueError(
            f"a histogram needs n + 1 increasing edges and n counts, got {len(edges)} edges and "
            f"{len(counts)} counts"
        )
    top = max(max(counts), 1)
    yticks = [t for t in _ticks(0, top, 4) if float(t).is_integer()] or [0.0]
    frame = _Frame((edges[0], edges[-1]), (0.0, max(top, yticks[-1])))
    parts = frame.axes(title, xlabel, ylabel, _ticks(edges[0], edges[-1], 5), yticks)
    total = sum(counts)
    for i, count in enumerate(counts):
        x0, x1 = frame.sx(edges[i]), frame.sx(edges[i + 1])
        y = frame.sy(count)
        share = f" ({count / total:.1%})" if total else ""
        parts.append(
            f'<rect class="bar" x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
            f'height="{frame.top + frame.h - y:.1f}" fill="{COLOURS[0]}">'
            f"<title>{_fmt(edges[i])} to {_fmt(edges[i + 1])}: {count} {escape(ylabel)}{share}</title></rect>"
        )
    return _svg("histogram", title, parts)


def line_plot_svg(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
) -> Markup:
    """Series of (x, y) points on one pair of axes: a ``<polyline class="series">`` each
    (points marked when there are few), a legend when there is more than one. Points
    that are not finite numbers are left out.

    Args:
        series: (label, points) per series, points in x order.
    """
    clean = [
        (label, [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)])
        for label, points in series
    ]
    every = [p for _, points in clean for p in points]
    if not every:
        return _svg(
            "lines empty",
            title,
            [
                f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                f'fill="#718096">{escape(title)}: no values</text>'
            ],
        )
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = (y1 - y0) * 0.05 if y1 > y0 else max(abs(y0) * 0.1, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    legend = len(clean) > 1  # a row of labels above the plot area, so no line runs under it
    frame = _Frame((x0, x1), (y0, y1), top=TOP + 16 if legend else TOP)
    parts = frame.axes(title, xlabel, ylabel, _ticks(x0, x1, 5), _ticks(y0, y1, 4))
    for i, (label, points) in enumerate(clean):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" stroke-width="2">'
            f"<title>{escape(label)}</title></polyline>"
        )
        if len(points) <= 60:
            for x, y in points:
                parts.append(
                    f'<circle cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="2.5" fill="{colour}">'
                    f"<title>{escape(label)}: {escape(xlabel)} {_fmt(x)}, {_fmt(y)}</title></circle>"
                )
    if legend:
        slot = (WIDTH - LEFT - RIGHT) / len(clean)
        for i, (label, _) in enumerate(clean):
            x = LEFT + slot * i
            colour = COLOURS[i % len(COLOURS)]
            parts.append(
                f'<rect x="{x:.1f}" y="{TOP + 1}" width="14" height="4" fill="{colour}"/>'
                f'<text x="{x + 20:.1f}" y="{TOP + 7}" font-size="11" fill="#2d3748">'
                f"{escape(label[: max(int(slot / 7) - 3, 8)])}</text>"
            )
    return _svg("lines", title, parts)
