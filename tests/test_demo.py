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
    for name in ("SFT", "SimPO", "DPO", "SimPO on-policy"):
        assert f"| {name} |" in report
    standard = ("loss", "margins", "accuracies", "logps", "lr", "grad_norm", "tokens_per_s")
    for chart in ("heldout_accuracy.svg", *(f"{s}.svg" for s in standard)):  # simpo.report's
        assert f"]({chart})" in report
        ET.parse(out / chart)  # well-formed SVG
    models = ("SFT", "SimPO", "DPO", "SimPO on-policy")
    shown = [a for n in models for a in results["answers"][n][:8]]
    assert len(shown) == 32  # 8 example prompts x 4 models, each marked right or wrong
    assert report.count("✅") == sum(a["correct"] for a in shown)
    assert report.count("❌") == len(shown) - report.count("✅")
    assert set(results["answers"]) == set(models)
    wall = results["wall_s"]  # per-stage laps, then the total that also covers the tail
    assert list(wall) == [
        "data + tokenizer + model", "SFT", "SimPO", "DPO", "on-policy samples", "SimPO on-policy",
        "eval", "total",
    ]  # fmt: skip
    stages = sum(v for k, v in wall.items() if k != "total")
    assert stages <= wall["total"] + 1e-6 and wall["total"] - stages < 0.1 * wall["total"]
    assert f"wall time {wall['total']:.0f} s" in report


def test_on_policy_round_samples_scores_and_trains(quick):
    """The SFT model's own answers, scored by the task's checker, became pairs whose chosen
    answer is right and rejected one wrong; SimPO trained on them; the report shows both runs
    and sampled answers with their rewards."""
    import json

    from simpo.demo.synthetic import final_answer, solve

    out, results = quick
    summary = results["onpolicy"]["summary"]
    assert summary["pairs"] >= 10 and results["onpolicy"]["trainable_pairs"] >= 1, summary
    assert summary["pairs"] + sum(summary["skipped"].values()) == summary["prompts"]
    for line in (out / "onpolicy" / "pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        truth = solve(pair["prompt"])
        assert final_answer(pair["chosen"][1]["content"]) == truth
        assert final_answer(pair["rejected"][1]["content"]) != truth
        assert (pair["score_chosen"], pair["score_rejected"]) == (1.0, 0.0)
    assert (out / "simpo_onpolicy" / "final" / "config.json").is_file()
    report = (out / "report.md").read_text()
    assert "## On-policy round" in report and "| its own sampled pairs (on-policy) |" in report
    assert report.count("(chosen)") == sum("chosen" in e for e in results["onpolicy"]["examples"])


def test_on_policy_section_without_usable_pairs():
    """A policy that is never right gives no pair: the report says SimPO on-policy did not run."""
    from simpo.demo.report import onpolicy_section

    summary = {"prompts": 3, "pairs": 0, "skipped": {"reward_tie": 3}}
    row = {"prompt": "What is 1 + 1?", "responses": ["3", ""], "rewards": [0.0, 0.0]}
    results = {
        "plan": {"onpolicy_samples": 2, "onpolicy_steps": 10},
        "metrics": {"SFT": {}, "SimPO": {}},
        "onpolicy": {"summary": summary, "examples": [row | {"skipped": "reward_tie"}],
                     "samples_right": 0.0, "trainable_pairs": 0},
    }  # fmt: skip
    text = onpolicy_section(results, correct=lambda name: 0.0)
    assert "SimPO on-policy did not run" in text and "0 pairs" in text.replace("\n", " ")
    assert "- reward 0: (empty)" in text and "- no pair: reward tie" in text
