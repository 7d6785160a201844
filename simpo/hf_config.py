"""ModelArgs: the model families' few distinguishing fields, read from HF config.json.

`ModelArgs.from_hf_config` reads both config.json generations: transformers 4.x (top-level
`rope_theta`, `rope_scaling`, `torch_dtype`, layer pattern implied by the family) and 5.x
(nested `rope_parameters`, `dtype`, explicit `layer_types`). Any other model_type, or an option
this code does not implement, is a ValueError that names the field. `to_hf_config` writes a
config.json that transformers 4.x and 5.x both load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
SLIDING, FULL = "sliding_attention", "full_attention"
# Supported RoPE types -> required fields (llama3 also reads original_max_position_embeddings)
ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclass
class ModelArgs:
    """Everything `simpo.model.Transformer` needs to know about a checkpoint's architecture."""

    model_type: str  # one of FAMILIES
    vocab_size: int  # embedding rows; may exceed the tokenizer's size
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # llama/gemma attention_bias; always on for qwen2
    o_bias: bool = False  # llama/gemma attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer
    query_pre_attn_scalar: float | None = None  # gemma2: scores scaled by this ** -0.5
    attn_softcap: float | None = None  # gemma2 attn_logit_softcapping
    final_softcap: float | None = None  # gemma2 final_logit_softcapping
    dtype: str = "float32"  # the checkpoint's dtype field
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    attn_backend: str = "auto"  # runtime only: "auto" | "sdpa" | "flex"

    @property
    def gemma(self) -> bool:
        """(1 + w) RMSNorm, embedding scaled by sqrt(dim), GeGLU (tanh GELU)."""
        return self.model_type in ("gemma", "gemma2")

    @property
    def windows(self) -> list[int | None]:
        return [self.sliding_window if t == SLIDING else None for t in self.layer_types]

    @classmethod
    def from_hf_config(cls, src: str | Path | dict[str, Any]) -> ModelArgs:
        """Parse a HF config.json (path, its directory, or the dict); errors name the field."""
        if isinstance(src, dict):
            cfg, where = src, "config"
        else:
            path = Path(src) / "config.json" if Path(src).is_dir() else Path(src)
            cfg, where = json.loads(path.read_text()), str(path)

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(f"{where}: required field '{key}' is missing")
            return cfg[key]

        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(
                f"{where}: field 'model_type' is {family!r}; supported: {', '.join(FAMILIES)}"
            )
        gemma = family in ("gemma", "gemma2")
        act_key = "hidden_activation" if cfg.get("hidden_activation") else "hidden_act"
        act = cfg.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in (("gelu_pytorch_tanh", "gelu") if gemma else ("silu",)):
            raise ValueError(f"{where}: field '{act_key}' = {act!r} is not supported for {family}")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: field 'use_bidirectional_attention' is not supported")

        # RoPE: 5.x nests everything in rope_parameters; 4.x has rope_theta + rope_scaling.
        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        rope = dict(cfg.get(rope_key) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{where}: field 'partial_rotary_factor' != 1 is not supported")
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        if rope_type not in ROPE_FIELDS:
            raise ValueError(
                f"{where}: field '{rope_key}.rope_type' = {rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_FIELDS)})"
            )
        for key in ROPE_FIELDS[rope_type]:
            if key not in rope:
                raise ValueError(f"{where}: field '{rope_key}.{key}' is missing")
        scaling = {"rope_type": rope_type, **{k: float(rope[k]) for k in ROPE_FIELDS[rope_type]}}
        if rope_type == "llama3":
            scaling["original_max_position_embeddings"] = int(
                rope.get("original_max_position_embeddings", max_pos)
            )

        n_layers = int(need("num_hidden_layers"))
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        types = cfg.get("layer_types")
        if family == "mistral" or types is None:
            types = [_default_layer_type(family, cfg, i, window) for i in range(n_layers)]
        if len(types) != n_layers or any(t not in (SLIDING, FULL) for t in types):
            raise ValueError(f"{where}: field 'layer_types' = {types!r} is not supported")
        if window is None or family in ("llama", "gemma"):
            window, types = None, [FULL] * n_layers

        heads, g2 = int(need("num_attention_heads")), family == "gemma2"
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=family,
            vocab_size=int(need("vocab_size")),
            dim=int(need("hidden_size")),
            n_layers=n_layers,
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or need("hidden_size") // heads),
            intermediate_size=int(need("intermediate_size")),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            qkv_bias=bias or family == "qwen2",
            o_bias=bias and family != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)) and family == "llama",
            sliding_window=None if window is None else int(window),
            layer_types=tuple(types),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if g2 else None,
            attn_softcap=cfg.get("attn_logit_softcapping", 50.0) if g2 else None,
            final_softcap=cfg.get("final_logit_softcapping", 30.0) if g2 else None,
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
        )

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) loads for this family."""
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma"}
        dtype = dtype or self.dtype
        sliding = [i for i, t in enumerate(self.layer_types) if t == SLIDING]
        cfg: dict[str, Any] = {
            "architectures": [arch.get(self.model_type, "Gemma2") + "ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "torch_dtype": dtype,
            "hidden_act": "gelu_pytorch_tanh" if self.gemma else "silu",
        }
        if self.model_type in ("llama", "gemma", "gemma2"):
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            cfg["use_sliding_window"] = bool(sliding)
            cfg["max_window_layers"] = sliding[0] if sliding else self.n_layers
        if self.model_type in ("qwen2", "gemma2"):
            cfg["sliding_window"] = self.sliding_window
            cfg["layer_types"] = list(self.layer_types)
        if self.model_type == "gemma2":
            cfg["hidden_activation"] = cfg.pop("hidden_act")
            cfg["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            cfg["attn_logit_softcapping"] = self.attn_softcap
            cfg["final_logit_softcapping"] = self.final_softcap
        return cfg


def _default_layer_type(family: str, cfg: dict[str, Any], i: int, window: int | None) -> str:
    """Layer i's attention type when config.json has no layer_types (transformers 4.x)."""
    if family == "gemma2":
        return SLIDING if i % 2 == 0 else FULL  # even layers slide
    if family == "qwen2":
        return SLIDING if window is not None and i >= cfg.get("max_window_layers", 0) else FULL
    return SLIDING if family == "mistral" and window is not None else FULL


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
    return ModelArgs.from_hf_config(tiny_hf_config(family, vocab_size, **overrides))
