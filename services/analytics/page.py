"""The analytics page: usage and latency drawn as inline SVG (no script, no CDN), refreshed every few seconds."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

REFRESH_S = 5
COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#dc2626")


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


def bar_chart(values: Sequence[float], labels: Sequence[str], *, width: int = 560, height: int = 160) -> str:
    """Vertical bars, one per window."""
    if not values:
        return _empty(width, height)
    top = max(max(values), 1.0)
    pad_l, pad_b = 44, 20
    inner_w, inner_h = width - pad_l - 4, height - pad_b - 8
    step = inner_w / len(values)
    parts = [_axis(pad_l, 8, inner_w, inner_h, top)]
    for i, v in enumerate(values):
        h = inner_h * v / top
        x = pad_l + i * step + step * 0.1
        parts.append(
            f'<rect x="{x:.1f}" y="{8 + inner_h - h:.1f}" width="{max(step * 0.8, 1):.1f}" height="{h:.1f}" '
            f'fill="{COLORS[0]}"><title>{escape(labels[i])}: {_fmt(v)}</title></rect>'
        )
    parts.extend(_x_labels(labels, pad_l, step, height))
    return _svg(width, height, parts)


def line_chart(
    series: Mapping[str, Sequence[float | None]], labels: Sequence[str], *, width: int = 560, height: int = 160
) -> str:
    """Lines over the windows, one per series (gaps where a window has no value)."""
    values = [v for s in series.values() for v in s if v is not None]
    if not values:
        return _empty(width, height)
    top = max(max(values), 1.0)
    pad_l, pad_b = 44, 20
    inner_w, inner_h = width - pad_l - 90, height - pad_b - 8
    n = max(len(labels), 1)
    step = inner_w / max(n - 1, 1)
    parts = [_axis(pad_l, 8, inner_w, inner_h, top)]
    for idx, (name, points) in enumerate(series.items()):
        color = COLORS[idx % len(COLORS)]
        path: list[str] = []
        for i, v in enumerate(points):
            if v is None:
                continue
            x, y = pad_l + i * step, 8 + inner_h - inner_h * v / top
            path.append(f"{'M' if not path else 'L'}{x:.1f},{y:.1f}")
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}">'
                f"<title>{escape(name)} {escape(labels[i])}: {_fmt(v)} ms</title></circle>"
            )
        if path:
            parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<rect x="{width - 82}" y="{12 + idx * 16}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{width - 68}" y="{21 + idx * 16}" class="l">{escape(name)}</text>')
    parts.extend(_x_labels(labels, pad_l, step, height, centered=False))
    return _svg(width, height, parts)


def hbar_chart(rows: dict[str, float], *, width: int = 560) -> str:
    """Horizontal bars, one per model or tenant, largest first."""
    if not rows:
        return _empty(width, 60)
    items = sorted(rows.items(), key=lambda kv: -kv[1])[:12]
    top = max(max(v for _, v in items), 1.0)
    row_h, pad_l = 22, 150
    height = row_h * len(items) + 8
    parts = []
    for i, (name, v) in enumerate(items):
        w = (width - pad_l - 70) * v / top
        y = 4 + i * row_h
        label = escape(name or "(none)")
        parts.append(f'<text x="{pad_l - 6}" y="{y + 15}" text-anchor="end" class="l">{label[:22]}</text>')
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


def _x_labels(labels: Sequence[str], x0: float, step: float, height: int, centered: bool = True) -> list[str]:
    every = max(1, len(labels) // 8)
    offset = step / 2 if centered else 0
    return [
        f'<text x="{x0 + i * step + offset:.1f}" y="{height - 4}" text-anchor="middle" class="l">{escape(lab)}</text>'
        for i, lab in enumerate(labels)
        if i % every == 0
    ]


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
    labels = [_clock(w["start_ms"]) for w in usage["windows"]]
    lat_labels = [_clock(w["start_ms"]) for w in windows]
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
            bar_chart([w["completion_tokens"] for w in usage["windows"]], labels),
        ),
    ]
    for kind, title in (("ttft", "Time to first token"), ("itl", "Inter-token latency"), ("e2e", "End to end")):
        series = {q: [w[kind][q] for w in windows] for q in ("p50", "p95", "p99")}
        charts.append((f"{title} (ms)", line_chart(series, lat_labels)))
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
<title>tokenrelay analytics</title>
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
