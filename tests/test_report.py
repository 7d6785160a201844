"""SVG charts and markdown helpers of simpo/report.py (standard library only)."""

import json
import xml.etree.ElementTree as ET

import pytest

from simpo.report import _ticks, curve, ema, line_chart, markdown_table, read_jsonl

SVG = "{http://www.w3.org/2000/svg}"


def test_line_chart_is_valid_svg_with_every_series():
    series = {"simpo": [(1, 0.7), (2, 0.5), (3, 0.4)], "dpo <& β": [(1, 0.69), (3, 0.6)]}
    svg = line_chart(series, title="loss & margins", ylabel="loss")
    root = ET.fromstring(svg)  # well-formed, special characters escaped
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "loss & margins" in texts and "dpo <& β" in texts and "simpo" in texts
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    smoothed = ET.fromstring(line_chart(series, title="t", smooth=0.6))
    assert len(list(smoothed.iter(f"{SVG}polyline"))) == 4  # measured (faint) + smoothed


def test_points_stay_inside_the_plot_area():
    svg = ET.fromstring(line_chart({"a": [(0, -3.0), (10, 5.0)]}, "t", width=400, height=200))
    (line,) = svg.iter(f"{SVG}polyline")
    for xy in line.get("points").split():
        x, y = map(float, xy.split(","))
        assert 0 < x < 400 and 0 < y < 200


def test_constant_and_single_point_series():
    ET.fromstring(line_chart({"flat": [(1, 2.0), (2, 2.0)]}, "flat"))
    ET.fromstring(line_chart({"one": [(5, 0.0)]}, "one"))
    with pytest.raises(ValueError, match="no data"):
        line_chart({"empty": []}, "empty")


@pytest.mark.parametrize("lo, hi", [(0, 1), (-0.37, 2.2), (3, 3000), (0.001, 0.004)])
def test_ticks_are_round_and_cover_the_range(lo, hi):
    ticks = _ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 8
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_curve_and_read_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 0.7}, {"step": 2, "eval/loss": 0.6}, {"step": 3, "loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    assert curve(read_jsonl(path), "loss") == [(1.0, 0.7), (3.0, 0.5)]


def test_markdown_table():
    table = markdown_table(["model", "acc"], [["a|b", 0.51234], ["c", 3]])
    assert table.splitlines() == [
        "| model | acc |",
        "| --- | --- |",
        "| a\\|b | 0.512 |",
        "| c | 3 |",
    ]
