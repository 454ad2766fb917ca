"""The analytics page's drawing: distinct labels, gaps in time, readable percentile lines, no empty rows."""

from __future__ import annotations

import re

from services.analytics.page import TimeAxis, bar_chart, hbar_chart, line_chart, render, short_labels

MIN = 60_000


def test_labels_are_short_and_distinct() -> None:
    names = ["/models/custom-a/checkpoint-final", "/models/custom-b/checkpoint-final", "default"]
    labels = short_labels(names)
    assert len(set(labels.values())) == 3
    assert labels["default"] == "default"
    assert all(len(label) <= 22 for label in labels.values())
    long_twins = ["x/" + "a" * 40 + "-end", "y/" + "a" * 40 + "-end"]
    assert len(set(short_labels(long_twins).values())) == 2


def test_rows_of_zero_and_the_unknown_model_are_left_out_unless_they_count() -> None:
    chart = hbar_chart({"default": 120, "unknown": 0, "other": 0})
    assert "default" in chart and "unknown" not in chart and "other" not in chart
    assert "failed before start" in hbar_chart({"default": 1, "unknown": 3})


def test_time_axis_is_even_in_time_so_gaps_show() -> None:
    axis = TimeAxis.over([0, MIN, 10 * MIN], MIN, x0=0, width=110)
    assert axis.x(MIN) == 10 and axis.x(10 * MIN) == 100
    bars = bar_chart([(0, 5), (MIN, 5), (10 * MIN, 5)], MIN)
    xs = [float(x) for x in re.findall(r'<rect x="([\d.]+)"', bars)]
    assert xs[2] - xs[1] > 5 * (xs[1] - xs[0])


def test_percentile_lines_break_at_gaps_and_differ_in_dash() -> None:
    series: dict[str, list[tuple[int, float | None]]] = {
        "p50": [(0, 10.0), (MIN, 11.0), (5 * MIN, 12.0), (6 * MIN, 13.0)],
        "p95": [(0, 20.0), (MIN, 21.0), (5 * MIN, 22.0), (6 * MIN, 23.0)],
        "p99": [(0, 20.0), (MIN, 2000.0), (5 * MIN, 22.0), (6 * MIN, None)],
    }
    svg = line_chart(series, MIN)
    paths = re.findall(r'<path d="([^"]+)"[^>]*>', svg)
    assert len(paths) == 3
    assert paths[0].count("M") == 2  # the four-minute gap breaks the line
    assert 'stroke-dasharray="6 3"' in svg and 'stroke-dasharray="2 3"' in svg
    # Log scale: the p99 spike does not squash p50 and p95 into one line.
    y = {name: float(re.match(r"M[\d.]+,([\d.]+)", d).group(1)) for name, d in zip(series, paths, strict=True)}  # type: ignore[union-attr]
    assert y["p50"] - y["p95"] > 10  # on a linear scale to 2,000 ms they would be 1 px apart


def test_page_has_a_favicon_and_no_unknown_row() -> None:
    usage = {
        "window_s": 60,
        "totals": {"requests": 2, "completion_tokens": 30, "prompt_tokens": 8, "failed": 0},
        "by_model": {"default": {"completion_tokens": 30}, "unknown": {"completion_tokens": 0}},
        "by_tenant": {"": {"completion_tokens": 30}},
        "windows": [{"start_ms": 0, "completion_tokens": 30}],
    }
    empty = {"p50": None, "p95": None, "p99": None}
    latency = {
        "recent": {"windows": 1, "ttft": {"p50": 5.0, "p95": 9.0}, "itl": {"p50": 1.0}},
        "windows": [{"start_ms": 0, "ttft": empty, "itl": empty, "e2e": empty}],
    }
    html = render(usage, latency)
    assert '<link rel="icon" href="data:image/svg+xml' in html
    assert "unknown" not in html
