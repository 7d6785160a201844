"""Packaging: the console commands of pyproject.toml and `python -m simpo --version`."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import simpo
from simpo import cli
from simpo.__main__ import main as simpo_main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture
def isolated(monkeypatch):
    """run_script sets sys.argv and sys.path as `python script.py` would: undo it after."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_every_console_command_points_at_a_function():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"simpo-train", "simpo-eval", "simpo-onpolicy", "simpo-report"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_version_is_the_packages(capsys):
    assert PYPROJECT["project"]["version"] == simpo.__version__
    simpo_main(["--version"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"simpo {simpo.__version__} (torch {torch.__version__}, ")
    if not torch.cuda.is_available():
        assert line.endswith("CPU build, no CUDA)") or "no GPU visible" in line
    with pytest.raises(SystemExit) as e:
        simpo_main(["--bogus"])
    assert e.value.code == 2


def test_python_m_simpo_version_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "simpo", "--version"], env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert out.stdout.startswith(f"simpo {simpo.__version__} (torch {torch.__version__}")


def test_simpo_train_is_train_py(isolated, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_script("train", ["--help"])
    assert e.value.code == 0 and "train.report_to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.run_script("train", ["--train.lr=-1"])  # train.py's own error and exit code
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: command line: train.lr = -1.0: expected > 0"


def test_simpo_eval_is_eval_py(isolated, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_script("eval", ["--help"])
    assert e.value.code == 0 and "--no-card" in capsys.readouterr().out


def test_a_script_gets_its_arguments_and_its_exit_code(isolated, monkeypatch, tmp_path, capsys):
    (tmp_path / "onpolicy.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print(sys.argv[1:])\n    sys.exit(3)\n"
    )
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["simpo-onpolicy", "--config", "x.toml"])
    with pytest.raises(SystemExit) as e:
        cli.onpolicy()
    assert e.value.code == 3 and capsys.readouterr().out.strip() == "['--config', 'x.toml']"


def test_a_missing_script_is_a_clear_error(isolated, monkeypatch, tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.run_script("onpolicy", [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: simpo-onpolicy: onpolicy.py is not in this checkout ({tmp_path})\n"
    monkeypatch.setattr(cli, "ROOT", tmp_path / "site-packages")
    with pytest.raises(SystemExit):
        cli.run_script("train", [])
    assert "install a clone with `pip install -e <clone>`" in capsys.readouterr().err
