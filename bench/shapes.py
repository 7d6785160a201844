"""The model shapes bench/gpu.py runs: HF config.json fields of real checkpoints (random
weights), built on `meta` and sharded exactly as train.py does.

Gemma-2-9B does not fit one GPU with its optimizer state, so it is measured at two reduced
depths (`TRUNCATED`, even layer counts: local and global layers alike) and projected to 42.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simpo.fsdp import parallelize  # noqa: E402
from simpo.hf import read_hf_config  # noqa: E402
from simpo.model import ModelArgs, Transformer  # noqa: E402
from simpo.world import World  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_attention_heads": 32,
          "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}  # fmt: skip
GEMMA2 = {"model_type": "gemma2", "vocab_size": 256000, "head_dim": 256, "rms_norm_eps": 1e-6,
          "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
          "query_pre_attn_scalar": 256, "sliding_window": 4096,
          "max_position_embeddings": 8192}  # fmt: skip
SHAPES = {  # HF config.json fields of the real checkpoints
    "llama-3.2-1b": LLAMA3 | {"hidden_size": 2048, "intermediate_size": 8192, "head_dim": 64,
                              "num_hidden_layers": 16, "tie_word_embeddings": True,
                              "max_position_embeddings": 131072, "rope_scaling": LLAMA3_ROPE},
    "llama-3-8b": LLAMA3 | {"hidden_size": 4096, "intermediate_size": 14336, "head_dim": 128,
                            "num_hidden_layers": 32, "tie_word_embeddings": False,
                            "max_position_embeddings": 8192},
    "gemma-2-9b": GEMMA2 | {"hidden_size": 3584, "intermediate_size": 14336,
                           "num_hidden_layers": 42, "num_attention_heads": 16,
                           "num_key_value_heads": 8},
    "tiny (dry run)": LLAMA3 | {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                                "head_dim": 16, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2,
                                "tie_word_embeddings": False},
    "tiny gemma-2 (dry run)": GEMMA2 | {"vocab_size": 1024, "hidden_size": 64,
                                        "intermediate_size": 128, "head_dim": 32,
                                        "num_attention_heads": 2, "num_key_value_heads": 1,
                                        "num_hidden_layers": 6, "sliding_window": 64},
}  # fmt: skip
# Shapes too large for one GPU: measured at these layer counts (even: local and global layers
# alike), projected to the full depth.
TRUNCATED = {"gemma-2-9b": (2, 6), "tiny gemma-2 (dry run)": (2, 4)}


def model_args(shape: str, layers: int | None = None) -> ModelArgs:
    """The shape's ModelArgs, optionally cut to its first `layers` layers."""
    margs = read_hf_config(SHAPES[shape])
    if layers is None:
        return margs
    return replace(margs, n_layers=layers, layer_types=margs.layer_types[:layers])


def build(
    world: World, margs: ModelArgs, ac: bool, backend: str, compile_blocks: bool
) -> Transformer:
    """Random model on `meta` -> FSDP2 (bf16-mixed) -> materialised on the device, N(0, 0.02)."""
    with torch.device("meta"):
        model = Transformer(margs, attn_backend=backend)
    parallelize(model, world.mesh, "bf16-mixed", ac, compile_blocks)
    model.to_empty(device=world.device)
    with torch.no_grad():  # on the device: no host-side random 8B tensor
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            norm = 0.0 if margs.norm_plus_one else 1.0
            local.fill_(norm) if name.endswith("norm.weight") else local.normal_(0.0, 0.02)
    return model


def config_label(shape: str, layers: int | None) -> str:
    depth = SHAPES[shape]["num_hidden_layers"]
    return shape if layers is None else f"{shape} ({layers}/{depth} layers)"
