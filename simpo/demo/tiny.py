"""A tiny random Llama-architecture checkpoint + tokenizer, built from nothing (tests, demo).

`train.py` with an empty `model.path` trains a SentencePiece tokenizer on the training texts
and writes a random model in Hugging Face format beside it, so everything downstream (loading,
FSDP, export) runs exactly as it would for a real checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from simpo.config import Config, ConfigError, DataConfig
from simpo.demo.synthetic import write_synthetic_prefs
from simpo.hf import read_hf_config, save_hf
from simpo.model import ModelArgs, Transformer
from simpo.tokenizer import train_sentencepiece

SYNTHETIC_PAIRS = 2000  # rows of the synthetic task when data.train is empty


def texts_from_file(path: str | Path) -> list[str]:
    """Every string value of every row of a .jsonl / .json file (tokenizer training text)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(rows)
    return out


def build_tiny_model_dir(
    out_dir: str | Path, texts: list[str], vocab_size: int, dim: int, n_layers: int, seed: int
) -> Path:
    """Train a tokenizer on `texts` and write a random tiny llama checkpoint into `out_dir`.

    The embedding gets more rows than the tokenizer has pieces (rounded up to a multiple of
    64), as Gemma and Qwen2 checkpoints do, so nothing downstream may assume they are equal.
    Deterministic for a given (texts, sizes, seed). Writes the HF files directly rather than
    through `save_hf`, which is a collective under torch.distributed while only rank 0 builds
    this; config.json is written last and marks the directory complete.
    """
    out = Path(out_dir)
    tok = train_sentencepiece(texts, out, vocab_size)
    head_dim = 16
    heads = max(2, dim // head_dim)
    hf = tiny_hf_config(
        "llama",
        vocab_size=-(-tok.vocab_size // 64) * 64,
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,  # GQA, as Llama-3 and Mistral
        head_dim=head_dim,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    model = Transformer(read_hf_config(hf))
    model.init_weights(seed)
    return save_hf(model, out)


def tiny_hf_config(family: str = "llama", vocab_size: int = 256, **overrides: Any) -> dict:
    """A tiny HF-style config with the family's distinguishing options switched on.

    family: llama, llama3 (llama + llama3 rope scaling), mistral, qwen2, gemma, gemma2.
    Windows (8) are shorter than test sequences and gemma2 soft-caps are small, so they bite.
    """
    cfg: dict[str, Any] = dict(
        model_type=family, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=family in ("gemma", "gemma2"),
    )  # fmt: skip
    if family == "llama3":
        cfg["model_type"] = "llama"
        cfg["rope_scaling"] = dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )  # fmt: skip
    elif family == "mistral":
        cfg["sliding_window"] = 8
    elif family == "qwen2":
        cfg.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    elif family == "gemma2":
        cfg.update(
            sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )  # fmt: skip
    return {**cfg, **overrides}


def tiny_args(family: str = "llama", vocab_size: int = 256, **overrides: Any) -> ModelArgs:
    """ModelArgs of a tiny model of `family` (see tiny_hf_config); for tests and the demo."""
    return read_hf_config(tiny_hf_config(family, vocab_size, **overrides))


def fill_in_defaults(cfg: Config, out: Path, is_main: bool) -> tuple[Path, DataConfig]:
    """(model dir, data config) of a run: the given ones, or for an empty `data.train` the
    synthetic task and for an empty `model.path` a tiny random model + tokenizer trained on the
    data, both written under `out`. Rank 0 builds them; every rank returns after a barrier."""
    model_dir = Path(cfg.model.path) if cfg.model.path else out / "tiny_model"
    if cfg.model.path and not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path = '{model_dir}' is not a Hugging Face checkpoint dir")
    data_cfg = dataclasses.replace(
        cfg.data,
        train=cfg.data.train or str(out / "data" / "train.jsonl"),
        cache_dir=cfg.data.cache_dir or str(out / "cache"),
    )
    if is_main and not cfg.data.train and not Path(data_cfg.train).exists():
        write_synthetic_prefs(data_cfg.train, SYNTHETIC_PAIRS, cfg.train.seed)
    if is_main and not cfg.model.path and not (model_dir / "config.json").exists():
        m = cfg.model
        texts = texts_from_file(data_cfg.train)
        build_tiny_model_dir(
            model_dir, texts, m.tiny_vocab, m.tiny_dim, m.tiny_layers, cfg.train.seed
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return model_dir, data_cfg
