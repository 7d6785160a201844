"""Tiny random Hugging Face checkpoints per family, built with `transformers` (tests only).

    from hf_tiny import FAMILIES, cached_tiny_hf, load_hf, make_tiny_hf
    path = make_tiny_hf("gemma2", tmp_path / "g2", vocab_size=300)   # -> directory
    path = cached_tiny_hf("gemma2")        # built once per test process, removed at exit
    ref = load_hf(path)                    # eager-attention HF model

Families: llama, llama3 (llama3 rope scaling), mistral, qwen2, gemma, gemma2, each with its
distinguishing options switched on (see `simpo.hf_config.tiny_hf_config`). Weights use a larger
init than HF's so soft-caps bite, and every norm weight is perturbed so that a wrong
`(1 + w)` RMSNorm shows in the logits.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from simpo.demo.tiny import tiny_hf_config

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "gemma", "gemma2")


def make_tiny_hf(
    family: str, out_dir: str | Path, seed: int = 0, std: float = 0.1, **overrides: Any
) -> Path:
    """Save a tiny random HF model of `family` (fp32, safetensors) to out_dir; return out_dir.

    overrides are config.json fields (vocab_size, tie_word_embeddings, attention_bias, ...).
    """
    import transformers

    cfg = copy.deepcopy(tiny_hf_config(family, **overrides))  # transformers edits it in place
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, initializer_range=std, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF init leaves norms constant (1, or 0 for gemma's 1 + w)
                p.add_(torch.rand(p.shape, generator=gen) - 0.5)
            elif name.endswith(".bias"):  # HF inits biases to 0: make qkv/o/mlp bias matter
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers reference model, eager attention (needed for gemma2 soft-capping)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager"
    )
    return model.eval()


_CACHE_ROOT: Path | None = None
_CACHE: dict[str, Path] = {}


def cached_tiny_hf(family: str, **overrides: Any) -> Path:
    """make_tiny_hf into a per-process temporary directory, built once per arguments.

    Treat the directory as read-only: other tests share it.
    """
    global _CACHE_ROOT
    if _CACHE_ROOT is None:
        _CACHE_ROOT = Path(tempfile.mkdtemp(prefix="simpo_hf_tiny_"))
        atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
    key = json.dumps([family, overrides], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = make_tiny_hf(family, _CACHE_ROOT / str(len(_CACHE)), **overrides)
    return _CACHE[key]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module single-threaded: tiny ops on a busy 2-core machine go faster that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
