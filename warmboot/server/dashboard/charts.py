"""Charts as SVG, drawn on the server: labelled axes, and the numbers that matter written beside the points, so
they read without hovering. Pure functions of their data (tested on their output).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from html import escape

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 28, 44
#: One colour per start kind, the same on every chart.
COLOURS = {"cold": "#c0392b", "restore": "#2471a3", "warm": "#1e8449", "none": "#7f8c8d"}


def _log_scale(values: Sequence[float]) -> tuple[float, float]:
    low = min(values) if values else 1.0
    high = max(values) if values else 1000.0
    low, high = max(low, 0.1), max(high, 1.0)
    return math.floor(math.log10(low)), math.ceil(math.log10(high)) or 1


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def _frame(title: str, body: list[str], *, css_class: str) -> str:
    return (
        f'<svg class="chart {css_class}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{LEFT}" y="18" class="title">{escape(title)}</text>' + "".join(body) + "</svg>"
    )


def _y_axis(lo: int, hi: int) -> tuple[list[str], Callable[[float], float]]:
    span = max(hi - lo, 1)
    plot_h = HEIGHT - TOP - BOTTOM

    def y(value: float) -> float:
        return TOP + plot_h - (math.log10(max(value, 0.1)) - lo) / span * plot_h

    parts = [f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" class="axis"/>']
    for power in range(lo, hi + 1):
        ty = y(10**power)
        parts.append(f'<line x1="{LEFT}" y1="{ty:.1f}" x2="{WIDTH - RIGHT}" y2="{ty:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" class="tick" text-anchor="end">{_ms(10**power)}</text>')
    return parts, y


def by_kind(durations: dict[str, list[float]], title: str) -> str:
    """A strip plot of durations (ms, log scale) in one column per start kind, each column labelled with its
    count and median."""
    kinds = [k for k in ("cold", "restore", "warm", "none") if durations.get(k)]
    values = [v for k in kinds for v in durations[k]]
    if not values:
        return _frame(title + ": no calls yet", [], css_class="by-kind")
    lo, hi = _log_scale(values)
    parts, y = _y_axis(lo, hi)
    column = (WIDTH - LEFT - RIGHT) / len(kinds)
    for i, kind in enumerate(kinds):
        centre = LEFT + column * (i + 0.5)
        points = durations[kind]
        for j, value in enumerate(points):
            jitter = ((j * 37) % 21 - 10) * column / 60  # spread equal values sideways, the same at every render
            parts.append(
                f'<circle class="point" data-kind="{kind}" cx="{centre + jitter:.1f}" cy="{y(value):.1f}" r="4" '
                f'fill="{COLOURS[kind]}" fill-opacity="0.6"/>'
            )
        median = statistics.median(points)
        parts.append(
            f'<line x1="{centre - column / 4:.1f}" y1="{y(median):.1f}" x2="{centre + column / 4:.1f}" '
            f'y2="{y(median):.1f}" stroke="{COLOURS[kind]}" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{centre + column / 4 + 4:.1f}" y="{y(median) + 4:.1f}" class="label">{_ms(median)}</text>'
        )
        label = {"cold": "cold boot", "restore": "snapshot restore", "warm": "warm container", "none": "no container"}
        parts.append(
            f'<text x="{centre:.1f}" y="{HEIGHT - BOTTOM + 18}" class="kind" text-anchor="middle">'
            f"{label[kind]} (n={len(points)})</text>"
        )
    parts.append(f'<text x="{LEFT}" y="{HEIGHT - 6}" class="note">time to result per call; bar: median</text>')
    return _frame(title, parts, css_class="by-kind")


def over_time(points: list[tuple[float, float]], title: str) -> str:
    """Durations (ms, log scale) against when they happened, oldest left; the first, last and median labelled."""
    if not points:
        return _frame(title + ": no restores yet", [], css_class="over-time")
    points = sorted(points)
    lo, hi = _log_scale([ms for _, ms in points])
    parts, y = _y_axis(lo, hi)
    t0, t1 = points[0][0], points[-1][0]
    plot_w = WIDTH - LEFT - RIGHT - 20

    def x(t: float) -> float:
        return LEFT + 10 + ((t - t0) / (t1 - t0) * plot_w if t1 > t0 else plot_w / 2)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x(t):.1f},{y(ms):.1f}" for i, (t, ms) in enumerate(points))
    parts.append(f'<path d="{path}" class="series" fill="none" stroke="{COLOURS["restore"]}"/>')
    for t, ms in points:
        parts.append(f'<circle class="point" cx="{x(t):.1f}" cy="{y(ms):.1f}" r="3.5" fill="{COLOURS["restore"]}"/>')
    for t, ms in (points[0], points[-1]):
        parts.append(f'<text x="{x(t) + 6:.1f}" y="{y(ms) - 6:.1f}" class="label">{_ms(ms)}</text>')
    median = statistics.median(ms for _, ms in points)
    parts.append(
        f'<text x="{WIDTH - RIGHT}" y="{TOP + 12}" class="label" text-anchor="end">'
        f"n={len(points)}, median {_ms(median)}</text>"
    )
    for t, anchor in ((t0, "start"), (t1, "end")):
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(t))
        parts.append(
            f'<text x="{x(t):.1f}" y="{HEIGHT - BOTTOM + 18}" class="tick" text-anchor="{anchor}">{stamp}</text>'
        )
    return _frame(title, parts, css_class="over-time")
