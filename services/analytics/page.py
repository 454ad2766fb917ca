"""The analytics page: usage and latency drawn as inline SVG (no script, no CDN), refreshed every few seconds."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

REFRESH_S = 5
COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#dc2626")
# Percentile lines differ by colour and by dash, so one hidden under another still shows at its ends and in the key.
PERCENTILE_STYLE = {"p50": ("#2563eb", ""), "p95": ("#ea580c", "6 3"), "p99": ("#dc2626", "2 3")}
LABEL_CHARS = 22
NO_MODEL = "unknown"  # what aggregate records for a request that failed before any Started named its model
FAVICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect width='16' "
    "height='16' rx='3' fill='%2316a34a'/%3E%3Cpath d='M3 12l3-4 3 2 4-6' stroke='white' stroke-width='2' "
    "fill='none'/%3E%3C/svg%3E"
)
# Steps for time ticks, in minutes: the first that gives at most ~7 ticks is used.
_TICK_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440)


def _fmt(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.1f}k"
    if n >= 100 or float(n).is_integer():
        return f"{n:,.0f}"
    return f"{n:.1f}"


def _clock(ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ms / 1000))


def _shorten(text: str, limit: int = LABEL_CHARS) -> str:
    # Keep the end: model names differ at their end (checkpoints, sizes) more often than at their start.
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def short_labels(names: Sequence[str]) -> dict[str, str]:
    """A short label per name, distinct whenever the names are: the last path parts that tell them apart."""
    parts = {name: [p for p in name.replace("\\", "/").split("/") if p] or [name] for name in names}
    depth = dict.fromkeys(names, 1)
    while True:
        labels = {name: "/".join(parts[name][-depth[name] :]) for name in names}
        clashes = {label for label in labels.values() if list(labels.values()).count(label) > 1}
        grow = [n for n in names if labels[n] in clashes and depth[n] < len(parts[n])]
        if not grow:
            break
        for name in grow:
            depth[name] += 1
    short = {name: _shorten(labels[name]) for name in names}
    if len(set(short.values())) < len(short):  # shortening made two equal: keep both ends of the full name
        short = {
            name: name if len(name) <= LABEL_CHARS else f"{name[:8]}…{name[-(LABEL_CHARS - 9) :]}" for name in names
        }
    return short


@dataclass(frozen=True, slots=True)
class TimeAxis:
    """Maps window start times to x positions: time runs evenly, so a stretch without windows shows as a gap."""

    start_ms: int
    end_ms: int
    x0: float
    width: float

    @classmethod
    def over(cls, starts: Sequence[int], window_ms: int, x0: float, width: float) -> TimeAxis:
        return cls(min(starts), max(starts) + window_ms, x0, width)

    def x(self, ms: float) -> float:
        return self.x0 + self.width * (ms - self.start_ms) / max(self.end_ms - self.start_ms, 1)

    def ticks(self) -> list[int]:
        span_min = (self.end_ms - self.start_ms) / 60_000
        step = next((m for m in _TICK_MINUTES if span_min / m <= 7), _TICK_MINUTES[-1]) * 60_000
        first = -(-self.start_ms // step) * step
        # A label centred on either edge would be cut off.
        return [
            t for t in range(first, self.end_ms + 1, step) if self.x0 + 14 <= self.x(t) <= self.x0 + self.width - 14
        ]


def _time_labels(axis: TimeAxis, y: float) -> list[str]:
    return [
        f'<line x1="{axis.x(t):.1f}" y1="{y - 14}" x2="{axis.x(t):.1f}" y2="{y - 10}" class="g"/>'
        f'<text x="{axis.x(t):.1f}" y="{y}" text-anchor="middle" class="l">{_clock(t)}</text>'
        for t in axis.ticks()
    ]


def bar_chart(points: Sequence[tuple[int, float]], window_ms: int, *, width: int = 560, height: int = 160) -> str:
    """Vertical bars at their windows' times (windows without traffic leave a gap)."""
    if not points:
        return _empty(width, height)
    top = max(max(v for _, v in points), 1.0)
    pad_l, pad_b = 44, 20
    inner_w, inner_h = width - pad_l - 4, height - pad_b - 8
    axis = TimeAxis.over([t for t, _ in points], window_ms, pad_l, inner_w)
    bar_w = max(axis.x(window_ms) - axis.x(0) - 1, 1.0)
    parts = [_axis(pad_l, 8, inner_w, inner_h, top)]
    for start, v in points:
        h = inner_h * v / top
        parts.append(
            f'<rect x="{axis.x(start) + 0.5:.1f}" y="{8 + inner_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{COLORS[0]}"><title>{_clock(start)}: {_fmt(v)}</title></rect>'
        )
    parts.extend(_time_labels(axis, height - 4))
    return _svg(width, height, parts)


def _log_ticks(low: float, high: float) -> list[float]:
    ticks = []
    for exp in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**exp
            if low <= v <= high:
                ticks.append(v)
    return ticks


def line_chart(
    series: Mapping[str, Sequence[tuple[int, float | None]]], window_ms: int, *, width: int = 560, height: int = 170
) -> str:
    """Percentile lines over time on a log scale (a spike does not flatten the rest); a line breaks where windows are
    missing or have no value."""
    values = [v for s in series.values() for _, v in s if v is not None and v > 0]
    starts = [t for s in series.values() for t, _ in s]
    if not values:
        return _empty(width, height)
    low, high = min(values) / 1.25, max(values) * 1.25
    if high / low < 10:  # at least one decade, centred on the data, so small wiggles are not magnified
        mid = math.sqrt(low * high)
        low, high = mid / math.sqrt(10), mid * math.sqrt(10)
    pad_l, pad_b, pad_r = 44, 20, 64
    inner_w, inner_h = width - pad_l - pad_r, height - pad_b - 8
    axis = TimeAxis.over(starts, window_ms, pad_l, inner_w)

    def y(v: float) -> float:
        return 8 + inner_h * (1 - (math.log10(v) - math.log10(low)) / (math.log10(high) - math.log10(low)))

    parts = []
    for tick in _log_ticks(low, high):
        parts.append(f'<line x1="{pad_l}" y1="{y(tick):.1f}" x2="{pad_l + inner_w}" y2="{y(tick):.1f}" class="g"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y(tick) + 4:.1f}" text-anchor="end" class="l">{_fmt(tick)}</text>')
    for idx, (name, points) in enumerate(series.items()):
        color, dash = PERCENTILE_STYLE.get(name, (COLORS[idx % len(COLORS)], ""))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        path: list[str] = []
        previous: int | None = None
        for start, v in sorted(points):
            if v is None or v <= 0:
                previous = None
                continue
            # Points are drawn at their window's middle; a missing window in between breaks the line.
            x, yy = axis.x(start + window_ms / 2), y(v)
            joined = previous is not None and start - previous <= window_ms
            path.append(f"{'L' if joined else 'M'}{x:.1f},{yy:.1f}")
            previous = start
            parts.append(
                f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="2.5" fill="{color}">'
                f"<title>{escape(name)} {_clock(start)}: {_fmt(v)} ms</title></circle>"
            )
        if path:
            parts.append(
                f'<path d="{" ".join(path)}" fill="none" stroke="{color}" stroke-width="2"{dash_attr} '
                'stroke-linejoin="round"/>'
            )
        key_y = 14 + idx * 16
        parts.append(
            f'<line x1="{width - 58}" y1="{key_y}" x2="{width - 36}" y2="{key_y}" stroke="{color}" stroke-width="2"'
            f"{dash_attr}/>"
        )
        parts.append(f'<text x="{width - 32}" y="{key_y + 4}" class="l">{escape(name)}</text>')
    parts.extend(_time_labels(axis, height - 4))
    return _svg(width, height, parts)


def hbar_chart(rows: Mapping[str, float], *, width: int = 560) -> str:
    """Horizontal bars, one per model or tenant, largest first; rows of zero are left out, labels are short and
    distinct (the full name is the tooltip)."""
    items = sorted(((k, v) for k, v in rows.items() if v > 0), key=lambda kv: -kv[1])[:12]
    if not items:
        return _empty(width, 60)
    labels = short_labels([name for name, _ in items])
    top = max(max(v for _, v in items), 1.0)
    row_h, pad_l = 22, 160
    height = row_h * len(items) + 8
    parts = []
    for i, (name, v) in enumerate(items):
        w = (width - pad_l - 70) * v / top
        y = 4 + i * row_h
        label = "(no model: failed before start)" if name == NO_MODEL else labels[name] or "(none)"
        parts.append(
            f'<text x="{pad_l - 6}" y="{y + 15}" text-anchor="end" class="l"><title>{escape(name or "(none)")}'
            f"</title>{escape(label)}</text>"
        )
        parts.append(
            f'<rect x="{pad_l}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 6}" '
            f'fill="{COLORS[i % len(COLORS)]}"/>'
        )
        parts.append(f'<text x="{pad_l + w + 6:.1f}" y="{y + 15}" class="l">{_fmt(v)}</text>')
    return _svg(width, height, parts)


def _axis(x: float, y: float, w: float, h: float, top: float) -> str:
    lines = []
    for frac in (0.0, 0.5, 1.0):
        yy = y + h - h * frac
        lines.append(f'<line x1="{x}" y1="{yy:.1f}" x2="{x + w:.1f}" y2="{yy:.1f}" class="g"/>')
        lines.append(f'<text x="{x - 4}" y="{yy + 4:.1f}" text-anchor="end" class="l">{_fmt(top * frac)}</text>')
    return "".join(lines)


def _svg(width: int, height: int, parts: list[str]) -> str:
    return f'<svg viewBox="0 0 {width} {height}" width="100%" role="img">{"".join(parts)}</svg>'


def _empty(width: int, height: int) -> str:
    return _svg(
        width, height, [f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="l">no data yet</text>']
    )


def render(usage: dict[str, Any], latency: dict[str, Any]) -> str:
    """The whole HTML page from the /usage and /latency JSON."""
    totals = usage["totals"]
    recent = latency["recent"]
    windows = latency["windows"]
    window_ms = usage["window_s"] * 1000
    tiles = [
        ("requests", _fmt(totals["requests"])),
        ("completion tokens", _fmt(totals["completion_tokens"])),
        ("prompt tokens", _fmt(totals["prompt_tokens"])),
        ("failed", _fmt(totals["failed"])),
        ("TTFT p50 / p95", f"{_fmt(recent['ttft']['p50'])} / {_fmt(recent['ttft']['p95'])} ms"),
        ("inter-token p50", f"{_fmt(recent['itl']['p50'])} ms"),
    ]
    charts = [
        (
            f"Completion tokens per {usage['window_s']} s window",
            bar_chart([(w["start_ms"], w["completion_tokens"]) for w in usage["windows"]], window_ms),
        ),
    ]
    for kind, title in (("ttft", "Time to first token"), ("itl", "Inter-token latency"), ("e2e", "End to end")):
        series = {q: [(w["start_ms"], w[kind][q]) for w in windows] for q in ("p50", "p95", "p99")}
        charts.append((f"{title} (ms, log scale)", line_chart(series, window_ms)))
    charts.append(
        (
            "Completion tokens by model",
            hbar_chart({k: v["completion_tokens"] for k, v in usage["by_model"].items()}),
        )
    )
    charts.append(
        (
            "Completion tokens by tenant / API key",
            hbar_chart({k: v["completion_tokens"] for k, v in usage["by_tenant"].items()}),
        )
    )
    tile_html = "".join(f'<div class="t"><b>{v}</b><span>{escape(k)}</span></div>' for k, v in tiles)
    chart_html = "".join(f"<section><h2>{escape(t)}</h2>{svg}</section>" for t, svg in charts)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>tokenrelay analytics</title><link rel="icon" href="{FAVICON}">
<style>
body{{font:14px system-ui,sans-serif;margin:24px;background:#f8fafc;color:#0f172a}}
h1{{font-size:20px;margin:0 0 4px}} h2{{font-size:14px;margin:0 0 8px;color:#334155}}
.sub{{color:#64748b;margin-bottom:16px}} .tiles{{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:16px}}
.t{{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:10px 14px;min-width:120px}}
.t b{{display:block;font-size:20px}} .t span{{color:#64748b;font-size:12px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px}}
section{{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px}}
.l{{font-size:11px;fill:#475569}} .g{{stroke:#e2e8f0}}
</style></head><body>
<h1>tokenrelay analytics</h1>
<div class="sub">from the token log · {usage["window_s"]} s tumbling windows · percentiles over the last
{recent["windows"]} windows · JSON: <a href="usage">/usage</a> <a href="latency">/latency</a> · refreshes every
{REFRESH_S} s</div>
<div class="tiles">{tile_html}</div>
<div class="grid">{chart_html}</div>
</body></html>
"""
