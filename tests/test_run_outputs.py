"""What one tiny train.py run leaves for people and tools: a log file without carriage returns,
the same metrics in metrics.jsonl / TensorBoard / W&B (offline), a Hugging Face model card in
final/ that eval.py completes, and a report. One 4-step run on CPU serves every test here."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, make_tiny, metrics, run_train, train_argv
from wandb_reader import wandb_history

import simpo
from simpo.report import main as report_main
from simpo.trackers import tracker_names

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(output dir, data file, the run's log): stdout and stderr went to a file."""
    root = tmp_path_factory.mktemp("outputs")
    model, data = make_tiny(root)
    out = root / "run"
    trackers = ["jsonl"] + ["wandb"] * HAS_WANDB + ["tensorboard"] * HAS_TENSORBOARD
    argv = train_argv(
        out, model, data, "--data.eval_fraction=0.15", "--train.eval_every=2",
        f"--train.report_to={','.join(trackers)}",
    )  # fmt: skip
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_CONFIG_DIR": str(root / "wandb_config"), "WANDB_CACHE_DIR": str(root / "wc"),
           "WANDB_DATA_DIR": str(root / "wd"), "SIMPO_PROGRESS": "auto",
           "SIMPO_PROGRESS_STEPS": "2"}  # fmt: skip
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, open(root / "log", "w") as log:
        for key, value in env.items():
            mp.setenv(key, value)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run_train(argv)
    torch.set_num_threads(threads)
    if HAS_WANDB:
        sys.modules["wandb"].teardown()  # stop the W&B service process
    return out, data, (root / "log").read_text()


def test_log_file_has_plain_progress_lines_and_no_carriage_returns(run):
    _, _, log = run
    assert "\r" not in log and len(log) < 8_000, log
    lines = [line for line in log.splitlines() if line.startswith("simpo: ")]
    progress = [line for line in lines if re.match(r"simpo: +\d+% \d/4 ", line)]
    # SIMPO_PROGRESS_STEPS=2: a line at steps 2 and 4, with the bar's numbers
    assert [line.split()[2] for line in progress] == ["2/4", "4/4"], log
    assert all("loss=" in line and "tok_s=" in line for line in progress)
    assert "tokenising: 100% " in log


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_holds_the_metrics_of_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for record in metrics(out):
        for name, value in tracker_names(record).items():
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6), name
    assert "eval/rewards/accuracies" in events.Tags()["scalars"]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_offline_run_holds_the_metrics_and_the_resolved_config(run):
    out, _, _ = run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run_id, history, config = wandb_history(run_dir)
    assert run_id == json.loads((out / "trackers.json").read_text())["wandb_id"]
    assert history == {r["step"]: pytest.approx(tracker_names(r)) for r in metrics(out)}
    assert config == tomllib.loads((out / "config.toml").read_text())


def card_of(out: Path) -> tuple[dict, str]:
    """(front matter, body) of final/README.md, parsed by huggingface_hub when installed."""
    text = (out / "final" / "README.md").read_text()
    hub = pytest.importorskip("huggingface_hub")
    return hub.ModelCard(text).data.to_dict(), text


def test_model_card_explains_the_checkpoint(run):
    out, data, _ = run
    front, text = card_of(out)
    assert front["library_name"] == "transformers" and "simpo" in front["tags"]
    assert "base_model" not in front  # a local checkpoint, not a hub id
    assert hashlib.sha256(data.read_bytes()).hexdigest() in text
    assert "4 optimizer steps x 8 pairs = 32 pairs seen" in text
    assert "| loss | `simpo`, beta = 2, gamma_beta_ratio = 0.5, loss_type = sigmoid" in text
    last = metrics(out)[-1]
    assert f"| `loss` | {last['loss']:.4g} |" in text
    assert f"| `eval/rewards/accuracies` | {last['eval/rewards/accuracies']:.4g} |" in text
    toml = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    assert tomllib.loads(toml) == tomllib.loads((out / "config.toml").read_text())
    assert "python train.py --config config.toml" in text
    assert f"simpo {simpo.__version__}" in text and f"torch {torch.__version__}" in text


def test_eval_adds_its_results_to_the_card(run, capsys):
    spec = importlib.util.spec_from_file_location("eval_for_card", ROOT / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    out, data, _ = run
    argv = ["--model", str(out / "final"), "--data", str(data), "--quiet"]
    first = ev.main([*argv, "--out", str(out / "eval" / "a"), "--limit", "8"])
    second = ev.main([*argv, "--out", str(out / "eval" / "b"), "--limit", "16"])
    assert "added the results on train.jsonl" in capsys.readouterr().out
    front, text = card_of(out)  # still a valid card
    rows = [line for line in text.splitlines() if line.startswith("| `train.jsonl` |")]
    assert len(rows) == 1 and first["accuracy"] is not None  # the later run replaced the row
    assert rows[0].startswith(f"| `train.jsonl` | 16 | {second['accuracy']:.3f} |")
    ev.main([*argv, "--out", str(out / "eval" / "c"), "--limit", "4", "--no-card"])
    assert card_of(out)[1] == text


def test_report_of_the_run(run, tmp_path):
    out, _, _ = run
    report_main([str(out), "--out", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    for chart in ("loss", "margins", "accuracies", "logps", "lr", "grad_norm", "tokens_per_s"):
        assert f"]({chart}.svg)" in text
    if (out / "eval").is_dir():  # test_eval_adds_its_results_to_the_card ran first
        assert "Held-out evaluation" in text
