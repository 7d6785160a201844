"""Shared pieces of the training tests: a tiny checkpoint + data, argv, metrics, weights."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file

from simpo.demo.synthetic import write_synthetic_prefs
from simpo.demo.tiny import build_tiny_model_dir, texts_from_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.toml"


@cache
def train_script() -> ModuleType:
    """train.py (a script at the repository root, not in the package), imported once."""
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train(argv: list[str]) -> dict[str, float]:
    """train.main in this process."""
    return train_script().main(argv)


def make_tiny(root: Path, num_pairs: int = 96, seed: int = 0) -> tuple[Path, Path]:
    """(model dir, data file): a 2-layer dim-32 llama and `num_pairs` synthetic pairs."""
    data = write_synthetic_prefs(root / "train.jsonl", num_pairs, seed)
    texts = texts_from_file(data)
    model = build_tiny_model_dir(root / "model", texts, vocab_size=384, dim=32, n_layers=2, seed=1)
    return model, data


def train_argv(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """A short deterministic fp32 SimPO run on the tiny checkpoint; `extra` overrides."""
    return [
        "--config", str(CONFIG),
        f"--model.path={model}", f"--data.train={data}", f"--train.output_dir={out}",
        "--data.eval_fraction=0", "--train.batch_size=8", "--train.max_steps=4",
        "--train.eval_every=0", "--train.save_every=0", "--train.lr=3e-3",
        *extra,
    ]  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")
