"""simpo/svg.py charts and simpo/report.py: the report of any run (standard library only)."""

import json
import xml.etree.ElementTree as ET

import pytest

from simpo.report import curve, load_run, main, markdown_table, read_jsonl, write_report
from simpo.svg import _label, _ticks, bar_chart, ema, line_chart

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


def test_dashed_raw_and_single_point_series():
    series = {"train": [(1, 0.5), (2, 0.7), (3, 0.6)], "held-out": [(3, 0.55)]}
    root = ET.fromstring(line_chart(series, "t", smooth=0.6, dashed={"held-out"}, raw={"held-out"}))
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 3  # train measured + smoothed, held-out as measured only
    assert [p.get("stroke-dasharray") for p in lines] == [None, None, "5 3"]
    assert len(list(root.iter(f"{SVG}circle"))) == 1  # the lone held-out point is marked


def test_bar_chart_heights_follow_the_values():
    svg = bar_chart({"SFT": {"chosen longer": 0.8, "rejected longer": 0.4}, "SimPO": {
        "chosen longer": 0.9, "rejected longer": 0.8}}, "accuracy")  # fmt: skip
    bars = [r for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("fill") != "white"]
    heights = [float(r.get("height")) for r in bars]
    assert len(bars) == 4
    assert heights[0] / heights[1] == pytest.approx(2.0, rel=0.01)  # 0.8 / 0.4
    assert heights[2] / heights[3] == pytest.approx(0.9 / 0.8, rel=0.01)
    with pytest.raises(ValueError, match="no bars"):
        bar_chart({}, "none")


def fake_run(path, loss_name="simpo", steps=20, eval_dir=True):
    """A train.py output_dir as the report reads it: metrics.jsonl, config.toml, eval/."""
    path.mkdir(parents=True)
    records = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 1.0 / s, "lr": 1e-6 * min(s, 5) / 5, "grad_norm": 2.0 / s,
             "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5 + s / (2 * steps),
             "logps/chosen": -1.0 - 0.01 * s, "logps/rejected": -1.0 - 0.05 * s,
             "tokens_per_s": 1000.0 + s, "peak_mem_gb": 3.0}  # fmt: skip
        if s % 10 == 0:
            r |= {"eval/loss": 0.9 / s, "eval/rewards/accuracies": 0.6}
        records.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.toml").write_text(
        f'[loss]\nname = "{loss_name}"\nbeta = 2.0\n[train]\nlr = 5e-7\nbatch_size = 128\n'
        '[model]\npath = "/ckpt/llama"\n'
    )
    if eval_dir:
        (path / "eval" / "heldout").mkdir(parents=True)
        metrics = {"num_pairs": 400, "accuracy": 0.7, "accuracy_chosen_longer": 0.8,
                   "accuracy_rejected_longer": 0.55, "length_corr": 0.12,
                   "margin": 0.3}  # fmt: skip
        (path / "eval" / "heldout" / "metrics.json").write_text(json.dumps(metrics))
    return records


def test_report_of_two_runs_overlays_them_with_final_numbers_and_length_diagnostics(tmp_path):
    fake_run(tmp_path / "simpo")
    fake_run(tmp_path / "dpo", "dpo", steps=10, eval_dir=False)
    out = tmp_path / "report"
    main([str(tmp_path / "simpo"), str(tmp_path / "dpo"), "--out", str(out)])
    text = (out / "report.md").read_text()
    charts = ["loss", "margins", "accuracies", "logps", "lr", "grad_norm", "tokens_per_s"]
    for stem in charts:
        assert f"]({stem}.svg)" in text
        root = ET.parse(out / f"{stem}.svg").getroot()
        legend = [t.text for t in root.iter(f"{SVG}text")]
        assert any("simpo" in (t or "") for t in legend) and any("dpo" in (t or "") for t in legend)
    assert not (out / "mfu.svg").exists() and "mfu.svg" not in text  # no run has MFU
    # final numbers: the last logged values, pairs seen = steps x batch, held-out accuracy
    row = next(line for line in text.splitlines() if line.startswith("| simpo | simpo | 20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "2560" and cells[4] == "0.050" and cells[5] == "2.000"
    assert cells[7] == "0.600" and cells[10] == "1010"  # median tokens/s of 1001..1020
    assert "| 5e-07 |" in text  # config values keep their precision
    # eval.py's length diagnostics, for the run that has them
    assert "| simpo | 400 | 0.700 | 0.800 | 0.550 | +0.12 |" in text
    assert "](length_accuracy.svg)" in text
    ET.parse(out / "length_accuracy.svg")


def test_a_lone_run_names_its_series_by_metric(tmp_path):
    fake_run(tmp_path / "run", eval_dir=False)
    write_report([load_run(tmp_path / "run")], tmp_path / "out")
    root = ET.parse(tmp_path / "out" / "logps.svg").getroot()
    assert {"chosen", "rejected"} <= {t.text for t in root.iter(f"{SVG}text")}
    assert "Held-out evaluation" not in (tmp_path / "out" / "report.md").read_text()


def test_report_errors_are_one_line_and_exit_2(tmp_path, capsys):
    for argv, message in [
        ([str(tmp_path / "missing")], "no metrics.jsonl (expected a train.py train.output_dir)"),
        ([str(tmp_path / "a"), "--names", "x,y"], "--names has 2 names for 1 runs"),
        ([str(tmp_path / "a"), str(tmp_path / "a")], "two runs have the same name"),
    ]:
        if not (tmp_path / "a").exists():
            fake_run(tmp_path / "a", eval_dir=False)
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "out")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--out", str(tmp_path / "out")])
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err


def test_an_incomplete_last_line_is_left_out_with_a_warning(tmp_path, capsys):
    records = fake_run(tmp_path / "run", eval_dir=False)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "lo')  # killed mid-write
    assert load_run(tmp_path / "run").records == records
    assert "metrics.jsonl:21: incomplete last line left out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, label",
    [(0.5, "0.5"), (5e-7, "5e-07"), (9999.0, "1e+04"), (15000.0, "15k"), (2.5e7, "25M"),
     (-20000.0, "-20k"), (1.2e10, "12G")],
)  # fmt: skip
def test_tick_labels_stay_distinct(value, label):
    assert _label(value) == label
