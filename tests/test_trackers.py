"""simpo/trackers.py: jsonl / W&B / TensorBoard behind one interface, lazy, resumable.

W&B and TensorBoard are exercised for real (offline) when installed (the `trackers` and `test`
extras install them) and read back with their own formats' readers; a stand-in `wandb` module
checks the wiring (ids, resume, names, config) everywhere."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from wandb_reader import wandb_history

from simpo.config import ConfigError, load_config, to_dict
from simpo.resume import config_differences
from simpo.trackers import RUN_FILE, check_trackers, open_trackers, tracker_names

RECORDS = [
    {"step": 1, "epoch": 0.1, "loss": 0.69, "rewards/margins": 0.01, "lr": 1e-4},
    {"step": 2, "epoch": 0.2, "loss": 0.61, "rewards/margins": 0.2, "lr": 2e-4},
    {"step": 3, "epoch": 0.3, "loss": 0.55, "rewards/margins": 0.3, "lr": 2e-4,
     "eval/loss": 0.6, "eval/rewards/accuracies": 0.75},
    {"step": 4, "epoch": 0.4, "loss": 0.5, "rewards/margins": 0.4, "lr": 1e-4},
]  # fmt: skip


def config(out: Path, *trackers: str):
    return load_config(
        None, [f"--train.output_dir={out}", f"--train.report_to={','.join(trackers)}"]
    )


def test_names_follow_trls_wandb_convention():
    names = tracker_names(RECORDS[2])
    assert names == {
        "train/epoch": 0.3, "train/loss": 0.55, "train/rewards/margins": 0.3, "train/lr": 2e-4,
        "eval/loss": 0.6, "eval/rewards/accuracies": 0.75,
    }  # fmt: skip


def test_jsonl_alone_imports_no_tracker_package(tmp_path, monkeypatch):
    for name in ("wandb", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it would raise ImportError
    trackers = open_trackers(config(tmp_path, "jsonl"), tmp_path, True, None)
    for r in RECORDS:
        trackers.write(r)
    trackers.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS
    other = tmp_path / "rank1"
    other.mkdir()
    open_trackers(config(other, "jsonl"), other, False, None).write(RECORDS[0])  # not rank 0
    assert list(other.iterdir()) == []


def test_missing_package_is_one_line_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError) as e:
        check_trackers(["jsonl", "wandb"])
    assert str(e.value) == (
        "train.report_to includes 'wandb' but wandb is not installed: pip install wandb  "
        "(or pip install -e '.[trackers]')"
    )
    check_trackers(["jsonl"])


def test_report_to_may_change_when_resuming(tmp_path):
    saved = to_dict(config(tmp_path, "jsonl"))
    assert config_differences(saved, config(tmp_path, "jsonl", "wandb")) == {}


class FakeRun:
    def __init__(self, **kwargs) -> None:
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_wiring_with_a_stand_in_module(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = config(tmp_path / "run", "wandb")
    (tmp_path / "run").mkdir()
    trackers = open_trackers(cfg, tmp_path / "run", True, None)
    for r in RECORDS[:3]:
        trackers.write(r)
    trackers.close()
    first = runs[0]
    stored = json.loads((tmp_path / "run" / RUN_FILE).read_text())["wandb_id"]
    assert first.kwargs["id"] == stored and first.kwargs["resume"] == "allow"
    assert first.kwargs["project"] == "simpo" and first.kwargs["name"] == "run"
    assert first.kwargs["config"] == to_dict(cfg) and first.kwargs["dir"] == str(tmp_path / "run")
    assert [s for s, _ in first.logged] == [1, 2, 3] and first.finished
    assert first.logged[2][1] == tracker_names(RECORDS[2])
    # resumed from the checkpoint at step 2: the same run id; a fresh run gets a new one
    open_trackers(cfg, tmp_path / "run", True, 2).close()
    assert runs[1].kwargs["id"] == stored
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    open_trackers(cfg, tmp_path / "run", True, None).close()
    assert runs[2].kwargs["id"] != stored and runs[2].kwargs["project"] == "mine"


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    yield wandb
    wandb.teardown()  # stop the W&B service process this test started


def test_wandb_offline_run_holds_the_metrics_and_resumes_under_its_id(tmp_path, offline_wandb):
    out = tmp_path / "run"
    out.mkdir()
    cfg = config(out, "jsonl", "wandb")
    trackers = open_trackers(cfg, out, True, None)
    for r in RECORDS:
        trackers.write(r)
    trackers.close()
    offline_wandb.teardown()  # W&B's service writes the run file asynchronously: wait for it
    (first,) = (out / "wandb").glob("offline-run-*")
    run_id, history, saved = wandb_history(first)
    assert run_id == json.loads((out / RUN_FILE).read_text())["wandb_id"]
    assert history == {r["step"]: tracker_names(r) for r in RECORDS}
    assert saved["loss"] == to_dict(cfg)["loss"] and saved["train"]["report_to"] == [
        "jsonl",
        "wandb",
    ]
    trackers = open_trackers(cfg, out, True, 2)  # resumed from the checkpoint at step 2
    trackers.write(RECORDS[2])
    trackers.close()
    offline_wandb.teardown()
    (second,) = set((out / "wandb").glob("offline-run-*")) - {first}
    assert wandb_history(second)[0] == run_id  # `wandb sync` adds it to the same run


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "tensorboard")
    trackers = open_trackers(cfg, tmp_path, True, None)
    for r in RECORDS:
        trackers.write(r)
    # a crash after step 4; the run resumes from its checkpoint at step 2 and logs 3, 4 again
    trackers.close()
    redone = [r | {"loss": r["loss"] + 1.0} for r in RECORDS[2:]]
    trackers = open_trackers(cfg, tmp_path, True, 2)
    for r in redone:
        trackers.write(r)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(1, 0.69), (2, 0.61), (3, 1.55), (4, 1.5)]  # the purged steps are the redone
    assert [s for s, _ in loss] == [s for s, _ in expected]
    assert [v for _, v in loss] == pytest.approx([v for _, v in expected])
    assert [e.step for e in events.Scalars("eval/rewards/accuracies")] == [3]
    assert "config" in "".join(events.Tags()["tensors"])  # the resolved config, as text


def test_a_fresh_run_hides_the_tensorboard_events_of_an_earlier_one(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "tensorboard")
    for offset in (0.0, 10.0):  # a run that died before its first checkpoint, then a new one
        trackers = open_trackers(cfg, tmp_path, True, None)
        for r in RECORDS[: 3 if offset else 4]:
            trackers.write(r | {"loss": r["loss"] + offset})
        trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2, 3]  # the first run's step 4 is gone too
    assert [v for _, v in loss] == pytest.approx([10.69, 10.61, 10.55])


def test_train_py_stops_before_any_work_when_a_tracker_is_missing(tmp_path, monkeypatch, capsys):
    from simpo import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as e:
        cli.run_script("train", [f"--train.output_dir={tmp_path}", "--train.report_to=wandb"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("pip install -e '.[trackers]')")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data, model or cache written
