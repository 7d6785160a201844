"""The shortened demo, end to end: SimPO must clearly beat its SFT start on held-out pairs."""

import xml.etree.ElementTree as ET

import pytest
import torch

from simpo.demo import run as demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo")
    try:
        results = demo.main(["--out", str(out), "--quick"])
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_simpo_improves_held_out_accuracy_over_sft(quick):
    _, results = quick
    m = results["metrics"]
    assert m["SimPO"]["accuracy"] >= m["SFT"]["accuracy"] + 0.10, {
        k: v["accuracy"] for k, v in m.items()
    }
    assert m["SimPO"]["margin"] > m["SFT"]["margin"]


def test_report_shows_tables_answers_and_charts(quick, capsys):
    out, results = quick
    report = (out / "report.md").read_text()
    for name in ("SFT", "SimPO", "DPO"):
        assert f"| {name} |" in report
    standard = ("loss", "margins", "accuracies", "logps", "lr", "grad_norm", "tokens_per_s")
    for chart in ("heldout_accuracy.svg", *(f"{s}.svg" for s in standard)):  # simpo.report's
        assert f"]({chart})" in report
        ET.parse(out / chart)  # well-formed SVG
    shown = [a for n in ("SFT", "SimPO", "DPO") for a in results["answers"][n][:8]]
    assert len(shown) == 24  # 8 example prompts x 3 models, each marked right or wrong
    assert report.count("✅") == sum(a["correct"] for a in shown)
    assert report.count("❌") == len(shown) - report.count("✅")
    assert set(results["answers"]) == {"SFT", "SimPO", "DPO"}
    wall = results["wall_s"]  # per-stage laps, then the total that also covers the tail
    assert list(wall) == ["data + tokenizer + model", "SFT", "SimPO", "DPO", "eval", "total"]
    stages = sum(v for k, v in wall.items() if k != "total")
    assert stages <= wall["total"] + 1e-6 and wall["total"] - stages < 0.1 * wall["total"]
    assert f"wall time {wall['total']:.0f} s" in report
