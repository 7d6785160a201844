"""SVG line and bar charts written with the standard library (no plotting package needed).

The text renders anywhere markdown shows images (GitHub, VS Code, a browser), so a run's
report.md needs nothing but the run's own files.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from xml.sax.saxutils import escape

Series = dict[str, list[tuple[float, float]]]  # name -> [(x, y), ...]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
FONT = 'font-family="Helvetica, Arial, sans-serif"'
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 34, 44  # margins around the plot area, in pixels


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), debiased at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else avg)
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    """A tick label: 3 significant digits, thousands as k / M / G (15000 -> 15k)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= 10 * scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def _frame(width: int, height: int, legend: int, title: str, xlabel: str, ylabel: str) -> list[str]:
    """The SVG header, background, title and axis labels; `legend` pixels below `height`."""
    total = height + legend
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" '
        f'viewBox="0 0 {width} {total}" {FONT} font-size="11">',
        f'<rect width="{width}" height="{total}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" '
        f'font-weight="bold">{escape(title)}</text>',
        f'<text x="{(LEFT + width - RIGHT) / 2}" y="{height - 8}" '
        f'text-anchor="middle">{escape(xlabel)}</text>',
    ]
    if ylabel:
        out.append(f'<text transform="translate(14 {(TOP + height - BOTTOM) / 2}) rotate(-90)" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')  # fmt: skip
    return out


def _y_axis(ys: Sequence[float], width: int, height: int) -> tuple[list[float], list[str]]:
    """Round y ticks covering `ys` and their grid lines and labels."""
    lo, hi = min(ys), max(ys)
    pad = 0.0 if hi > lo else abs(hi) * 0.1 or 1.0  # a constant series gets a band around it
    yt = _ticks(lo - pad, hi + pad)

    def sy(y: float) -> float:
        return height - BOTTOM - (y - yt[0]) / (yt[-1] - yt[0]) * (height - TOP - BOTTOM)

    out = []
    for y in yt:
        out.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   f'stroke="#eee"/>')  # fmt: skip
        out.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    return yt, out


def _legend(
    entries: Sequence[tuple[str, str, bool]], width: int, top: float
) -> tuple[list[str], int]:
    """(name, colour, dashed) entries in columns below the chart (from y = `top`), so they
    never hide a line; (SVG lines, height used). A single entry needs no legend."""
    if len(entries) < 2:
        return [], 0
    longest = max(len(name) for name, _, _ in entries)
    cols = max(1, min(len(entries), int((width - LEFT) // (6.5 * longest + 34))))
    col_width, rows = (width - LEFT) / cols, -(-len(entries) // cols)
    out = []
    for i, (name, color, dashed) in enumerate(entries):
        x, y = LEFT + (i % cols) * col_width, top + 16 * (i // cols) + 8
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        out.append(f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')  # fmt: skip
        out.append(f'<text x="{x + 23:.1f}" y="{y + 4:.1f}">{escape(name)}</text>')
    return out, 16 * rows + 6


def line_chart(
    series: Series,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    smooth: float = 0.0,
    colors: dict[str, str] | None = None,
    width: int = 480,
    height: int = 300,
    dashed: Collection[str] = (),
    raw: Collection[str] = (),
) -> str:
    """An SVG line chart of one or more series, with axes, grid, ticks and a legend.

    With `smooth` > 0 each series is drawn faintly as measured and boldly as its EMA, except
    the series named in `raw` (e.g. sparse held-out points), drawn as measured. `colors` maps
    series names to colours (default: a fixed palette in series order); series in `dashed`
    are drawn dashed. Empty series are left out; no points at all is a ValueError.
    """
    series = {name: pts for name, pts in series.items() if pts}
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"chart {title!r}: no data points")
    xs = [p[0] for p in points]
    xt = _ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, n=6)
    yt, y_grid = _y_axis([p[1] for p in points], width, height)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (width - LEFT - RIGHT)

    def sy(y: float) -> float:
        return height - BOTTOM - (y - y0) / (y1 - y0) * (height - TOP - BOTTOM)

    def polyline(pts: list[tuple[float, float]], color: str, extra: str) -> str:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        return f'<polyline points="{coords}" fill="none" stroke="{color}" {extra}/>'

    out = []
    for x in xt:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(y0):.1f}" '
                   f'y2="{sy(y1):.1f}" stroke="#eee"/>')  # fmt: skip
        out.append(f'<text x="{sx(x):.1f}" y="{height - BOTTOM + 15}" '
                   f'text-anchor="middle">{_label(x)}</text>')  # fmt: skip
    out += y_grid
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{width - LEFT - RIGHT}" '
               f'height="{height - TOP - BOTTOM}" fill="none" stroke="#888"/>')  # fmt: skip
    legend = []
    for i, (name, pts) in enumerate(series.items()):
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        dash = ' stroke-dasharray="5 3"' if name in dashed else ""
        if smooth > 0 and name not in raw and len(pts) > 1:
            out.append(polyline(pts, color, f'stroke-width="1" stroke-opacity="0.3"{dash}'))
            pts = list(zip([x for x, _ in pts], ema([y for _, y in pts], smooth), strict=True))
        out.append(polyline(pts, color, f'stroke-width="2"{dash}'))
        if len(pts) == 1:  # a lone point draws no line: mark it
            (x, y), = pts  # fmt: skip
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        legend.append((name, color, name in dashed))
    legend_svg, legend_height = _legend(legend, width, height)
    out = _frame(width, height, legend_height, title, xlabel, ylabel) + out + legend_svg
    out.append("</svg>")
    return "\n".join(out) + "\n"


def bar_chart(
    groups: dict[str, dict[str, float]],
    title: str,
    ylabel: str = "",
    colors: dict[str, str] | None = None,
    width: int = 480,
    height: int = 300,
    include: Sequence[float] = (0.0,),
) -> str:
    """Grouped vertical bars: `groups` maps a group label (x axis) to {bar name: value}; bars
    of the same name share a colour and a legend entry. The y axis covers the values and
    `include` (e.g. (0, 1) for accuracies)."""
    names = list(dict.fromkeys(n for bars in groups.values() for n in bars))
    values = [v for bars in groups.values() for v in bars.values()]
    if not values:
        raise ValueError(f"chart {title!r}: no bars")
    yt, y_grid = _y_axis([*include, *values], width, height)
    color = {n: (colors or {}).get(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)}
    y0, y1 = yt[0], yt[-1]

    def sy(y: float) -> float:
        return height - BOTTOM - (y - y0) / (y1 - y0) * (height - TOP - BOTTOM)

    legend_svg, legend_height = _legend([(n, color[n], False) for n in names], width, height - 20)
    out = _frame(width, height, legend_height, title, "", ylabel) + y_grid + legend_svg
    slot = (width - LEFT - RIGHT) / len(groups)  # one slot per group
    bar = slot * 0.8 / max(len(names), 1)
    for g, (label, bars) in enumerate(groups.items()):
        x = LEFT + g * slot + slot * 0.1
        for i, name in enumerate(names):
            if name in bars:
                top, base = sy(max(bars[name], 0.0)), sy(min(bars[name], 0.0))
                out.append(f'<rect x="{x + i * bar:.1f}" y="{top:.1f}" width="{bar * 0.9:.1f}" '
                           f'height="{base - top:.1f}" fill="{color[name]}"/>')  # fmt: skip
        out.append(f'<text x="{LEFT + (g + 0.5) * slot:.1f}" y="{height - BOTTOM + 15}" '
                   f'text-anchor="middle">{escape(label)}</text>')  # fmt: skip
    out.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" '
               f'stroke="#888"/>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"
