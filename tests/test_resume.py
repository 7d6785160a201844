"""Resuming a run: changes judged by meaning (train.resume_override), the data's content,
no pickle from a checkpoint folder, falling back past unreadable checkpoints, and the checks
that used to fail mid-run now failing at start. Tiny models; train.main runs in-process."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_tiny, metrics, run_train, train_argv, train_script, weights

from simpo.checkpoint import TrainingError
from simpo.config import ConfigError

KEYS = ("loss", "grad_norm", "rewards/margins", "logps/chosen")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


class Trap:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_lr_change_needs_an_override_and_max_tokens_is_free(tiny, tmp_path):
    """The NaN message said 'resume perhaps with a lower train.lr' and resume then refused the
    lower lr; max_tokens (micro-batch size only) was refused too."""
    model, data = tiny
    out = tmp_path / "run"
    argv = train_argv(out, model, data, "--train.max_steps=4", "--train.save_every=2")
    run_train([*argv, "--train.export=false"])
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if killed after step 3
    resume = [*argv, "--train.resume=true", "--data.max_tokens=300"]
    refused = r"train.lr: 0.003 -> 0.001.*--train.resume_override=train.lr"
    with pytest.raises(ConfigError, match=refused):
        run_train([*resume, "--train.lr=1e-3"])
    run_train([*resume, "--train.lr=1e-3", "--train.resume_override=train.lr"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4]
    assert rows[2] == {"step": 2, "event": "resume_override", "changed": {"train.lr": [3e-3, 1e-3]}}
    assert rows[3]["lr"] < 1e-3  # the new peak, decayed
    assert 'resume_override = "train.lr"' in (out / "config.toml").read_text()


def test_changed_data_contents_are_refused(tiny, tmp_path):
    """Resume used to accept a data file whose contents changed at the same path."""
    model, data = tiny
    mine = tmp_path / "train.jsonl"
    shutil.copy(data, mine)
    out = tmp_path / "run"
    argv = train_argv(out, model, mine, "--train.max_steps=2", "--train.export=false")
    run_train(argv)
    lines = mine.read_text().splitlines()
    mine.write_text("\n".join(lines[1:]) + "\n")  # one pair fewer
    with pytest.raises(ConfigError, match=r"data.train: 'data.train \w+' -> .*contents changed"):
        run_train([*argv, "--train.resume=true"])


def test_max_tokens_below_the_longest_pair_fails_at_start(tiny, tmp_path):
    """It used to be a traceback at the step that drew the pair."""
    model, data = tiny
    argv = train_argv(tmp_path / "run", model, data, "--data.max_tokens=90")
    too_small = rf"max_tokens = 90 is too small: the pair at {data}:\d+ needs \d+ tokens"
    with pytest.raises(ConfigError, match=too_small):
        run_train(argv)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any step


def test_out_of_memory_says_max_tokens_may_change_on_resume(tiny, tmp_path, monkeypatch):
    """A GPU out-of-memory was a traceback with no way on (max_tokens could not change)."""
    model, data = tiny
    real, calls = train_script().train_step, []

    def oom_on_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_script(), "train_step", oom_on_step_2)
    out = tmp_path / "run"
    argv = train_argv(out, model, data, "--train.save_every=1", "--train.export=false")
    with pytest.raises(
        TrainingError, match=r"step 2: out of GPU memory with data.max_tokens = 512"
    ) as e:
        run_train(argv)
    assert e.value.rank_local and "smaller --data.max_tokens" in str(e.value)
    monkeypatch.undo()
    run_train([*argv, "--train.resume=true", "--data.max_tokens=256"])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def _trap_metadata(step: Path, marker: Path) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(Trap(marker)))


def _trap_optimizer_entry(step: Path, marker: Path) -> None:
    """Point the optimizer's pickled `lr` entry (a non-tensor, read with torch.load) at a
    file holding a trap; the metadata itself stays made of DCP's own classes."""
    metadata = pickle.loads((step / ".metadata").read_bytes())
    index = next(k for k in metadata.storage_data if k.fqn == "optim.param_groups.0.lr")
    payload = pickle.dumps(Trap(marker), protocol=2)
    (step / "evil.distcp").write_bytes(payload)
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)("evil.distcp", 0, len(payload))
    buf = io.BytesIO()
    pickle.dump(metadata, buf)
    (step / ".metadata").write_bytes(buf.getvalue())


def test_crafted_and_broken_checkpoints_run_nothing_and_are_skipped(tiny, tmp_path, capsys):
    """Resume unpickled `.metadata` (a crafted one ran a shell command) and stopped at a
    truncated .distcp. Now: nothing runs, each bad checkpoint is named and skipped, and the
    run resumes from the newest good one, ending bitwise equal to the uninterrupted run."""
    model, data = tiny
    out = tmp_path / "run"
    argv = train_argv(out, model, data, "--train.max_steps=4", "--train.save_every=1")
    run_train([*argv, "--train.keep_checkpoints=0"])
    straight, final = metrics(out), weights(out)
    steps = out / "checkpoints"
    marker_a, marker_b = tmp_path / "ran_a", tmp_path / "ran_b"
    distcp = steps / "step_4" / "__0_0.distcp"
    distcp.write_bytes(distcp.read_bytes()[:1000])  # truncated
    _trap_metadata(steps / "step_3", marker_a)
    _trap_optimizer_entry(steps / "step_2", marker_b)
    capsys.readouterr()
    run_train([*argv, "--train.resume=true"])
    assert not marker_a.exists() and not marker_b.exists()
    said = capsys.readouterr().out
    assert f"skipping checkpoint {steps / 'step_4'}: {distcp}: truncated" in said
    assert "step_3/.metadata: it refers to posix.system, which DCP metadata never holds" in said
    assert "skipping checkpoint" in said and "step_2: UnpicklingError" in said
    assert f"resumed from {steps / 'step_1'} at step 1" in said
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}
    for name, t in weights(out).items():
        assert torch.equal(t, final[name]), name


def test_a_crafted_checkpoint_folder_runs_nothing(tiny, tmp_path):
    """A crafted step_N/.metadata ran a shell command on --train.resume=true (DCP reads it
    with pickle.load; its non-tensor entries with torch.load(weights_only=False))."""
    model, data = tiny
    out = tmp_path / "run"
    argv = train_argv(out, model, data, "--train.max_steps=2", "--train.save_every=1")
    run_train([*argv, "--train.export=false"])
    marker_a, marker_b = tmp_path / "ran_a", tmp_path / "ran_b"
    _trap_metadata(out / "checkpoints" / "step_2", marker_a)
    _trap_optimizer_entry(out / "checkpoints" / "step_1", marker_b)
    with pytest.raises(TrainingError, match=r"cannot resume: .*step_1: UnpicklingError.*no older"):
        run_train([*argv, "--train.resume=true"])
    assert not marker_a.exists() and not marker_b.exists()


def test_checkpoints_that_are_all_unreadable_stop_the_run(tmp_path):
    """Not a silent fresh start over them: the run stops and names what it skipped."""
    from simpo.checkpoint import choose_checkpoint

    for step in (1, 2):
        (tmp_path / f"step_{step}").mkdir()
        meta = {"step": step, "config": {}}  # no DCP files: unreadable
        (tmp_path / f"step_{step}" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=r"no checkpoint in .* is readable \(step_2, step_1"):
        choose_checkpoint(tmp_path)
    assert choose_checkpoint(tmp_path / "none") is None
