"""A tiny random Llama-architecture checkpoint + tokenizer, built from nothing (tests, demo).

`train.py` with an empty `model.path` trains a SentencePiece tokenizer on the training texts
and writes a random model in Hugging Face format beside it, so everything downstream (loading,
FSDP, export) runs exactly as it would for a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from simpo.hf_config import ModelArgs, tiny_hf_config
from simpo.model import Transformer
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
    model = Transformer(ModelArgs.from_hf_config(hf))
    model.init_weights(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.args.to_hf_config("float32")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
