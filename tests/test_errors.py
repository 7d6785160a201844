"""How train.py and eval.py fail: one `error:` line (no traceback), exit 2 for bad input found
before any work and 1 otherwise, quiet peers under torchrun, eval.py's argument checks and
outputs that never mix two runs. Most cases run the scripts' own exit path in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from train_helpers import ROOT, make_tiny, run_train, train_argv, train_script

from simpo import exits
from simpo.demo.synthetic import write_synthetic_prefs
from simpo.demo.tiny import build_tiny_model_dir, texts_from_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny"), num_pairs=24)


def train_exit(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of train.py's own exit path, run in-process."""
    t = train_script()
    capsys.readouterr()
    code = exits.run(lambda: run_train(argv), t.USAGE_ERRORS, t.RUN_ERRORS)
    return code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def broken_model(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif how == "bad_config":
        (dst / "config.json").write_text('{"model_type": "llama", ')
    elif how == "wrong_shape":
        state = load_file(weights)
        state["model.norm.weight"] = state["model.norm.weight"][:-1].clone()
        save_file(state, weights)
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"model\.safetensors: (not a readable|tensor .* is unreadable)"),
        ("bad_config", r"config\.json: not valid JSON"),
        ("wrong_shape", r"model\.safetensors: tensor model\.norm\.weight has shape \(31,\)"),
    ],
)
def test_broken_model_files_are_one_line(tiny, tmp_path, capsys, how, message):
    """These were tracebacks (the file named, or not, deep inside one)."""
    model, data = tiny
    bad = broken_model(model, tmp_path / how, how)
    code, err = train_exit(train_argv(tmp_path / "run", bad, data), capsys)
    assert code == 1
    line = one_error_line(err)
    assert str(bad) in line and re.search(message, line), line


def test_bad_data_paths_and_values_are_one_line(tiny, tmp_path, capsys):
    model, data = tiny
    (tmp_path / "folder.jsonl").mkdir()
    for path, message, code in [
        (tmp_path / "folder.jsonl", "is a directory; expected a data file", 1),
        (tmp_path / "none.jsonl", "none.jsonl: no such file", 1),
    ]:
        got, err = train_exit(train_argv(tmp_path / "run", model, path), capsys)
        assert got == code and message in one_error_line(err)
    for override, message in [
        ("--train.log_every=0", "train.log_every = 0: expected >= 1"),
        ("--train.lr=-1", "train.lr = -1.0: expected > 0"),
        ("--loss.beta=0", "loss.beta = 0.0: expected > 0"),
    ]:
        got, err = train_exit(train_argv(tmp_path / "run", model, data, override), capsys)
        assert got == 2 and message in one_error_line(err)


def test_torchrun_shows_the_failing_ranks_line_and_quiet_peers(tiny, tmp_path):
    """Rank 0 tokenises first while rank 1 waits at a barrier; a data error on rank 0 used to
    be buried in rank 1's connection-error traceback."""
    model, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "same", "rejected": "same"}\n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += ["train.py", *train_argv(tmp_path / "run", model, bad)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    workers = proc.stderr.split("torch/distributed/elastic")[0]  # before torchrun's summary
    line = one_error_line(workers)
    assert "bad.jsonl: no usable preference pairs" in line
    assert "Connection" not in proc.stderr and 'File "' + str(ROOT / "train.py") not in proc.stderr
    assert f"traceback : {line}" in proc.stderr  # torchrun's root cause repeats it


# --- eval.py -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    data = write_synthetic_prefs(root / "prefs.jsonl", 12, seed=0)
    return build_tiny_model_dir(root / "m", texts_from_file(data), 400, 32, 1, seed=0), data


def eval_exit(argv: list[str], capsys) -> tuple[int, str]:
    ev = sys.modules.get("eval_script") or _load_eval()
    capsys.readouterr()
    code = exits.run(lambda: ev.main(argv), ev.USAGE_ERRORS, ev.RUN_ERRORS)
    return code, capsys.readouterr().err


def _load_eval():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["eval_script"] = module
    return module


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--gen-batch", "0"], "--gen-batch 0: expected >= 1"),
        (["--max-length", "0"], "--max-length 0: expected >= 2"),
        (["--beta", "0"], "--beta 0.0: expected > 0"),
        (["--top-p", "0"], "--top-p 0.0: expected 0 < x <= 1"),
        (["--max-prompt-length", "4096"], "--max-prompt-length 4096: expected < --max-length"),
    ],
)
def test_eval_arguments_are_checked_at_start(tiny_eval, tmp_path, capsys, flag, message):
    """--gen-batch 0 and --max-length 0 were tracebacks; --beta 0 reported accuracy 0.000."""
    model, data = tiny_eval
    argv = ["--model", str(model), "--data", str(data), "--out", str(tmp_path), *flag]
    code, err = eval_exit(argv, capsys)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "metrics.json").exists()


def test_eval_rerun_leaves_no_stale_outputs(tiny_eval, tmp_path, capsys):
    """A rerun into the same --out used to leave the first run's scores.jsonl beside new
    metrics."""
    model, data = tiny_eval
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Say hi."}) + "\n")
    common = ["--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]
    assert eval_exit([*common, "--data", str(data)], capsys)[0] == 0
    assert (tmp_path / "out" / "scores.jsonl").is_file()
    gen = ["--prompts", str(prompts), "--max-new-tokens", "2"]
    assert eval_exit([*common, *gen], capsys)[0] == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert names == ["metrics.json", "model_outputs.json"]
    assert "accuracy" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


# --- simpo.exits: who prints what --------------------------------------------------------


class Usage(ValueError):
    pass


def _raise(e: BaseException):
    def main():
        raise e

    return main


def test_exit_codes_and_which_rank_prints(capsys, monkeypatch):
    run = lambda main: (exits.run(main, (Usage,), (OSError,)), capsys.readouterr().err)  # noqa: E731
    assert run(lambda: {"loss": 1.0}) == (0, "")
    assert run(lambda: {"interrupted": 1.0}) == (143, "")  # SIGTERM, checkpoint saved
    assert run(_raise(Usage("bad key"))) == (2, "error: bad key\n")
    assert run(_raise(FileNotFoundError("x.jsonl: gone"))) == (1, "error: x.jsonl: gone\n")
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert run(_raise(gone)) == (1, "")  # a peer died: it says why, not us
    code, err = run(_raise(KeyError("a bug")))
    assert code == 1 and "Traceback" in err and "KeyError: 'a bug'" in err
    monkeypatch.setenv("RANK", "3")
    assert run(_raise(Usage("bad key"))) == (2, "")  # every rank sees it: rank 0 says it
    local = RuntimeError("out of memory")
    local.rank_local = True
    assert exits.run(_raise(local), (), (RuntimeError,)) == 1
    assert capsys.readouterr().err == "error: rank 3: out of memory\n"
