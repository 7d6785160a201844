"""Hugging Face formats: config.json <-> ModelArgs, safetensors in and out, `save_hf`.

Families are described in one table (`FAMILIES`): each entry says which features of
`simpo.model.ModelArgs` the family switches on and which optional config.json keys it reads and
writes, so adding a family is one entry. `read_hf_config` reads both config.json generations:
transformers 4.x (top-level `rope_theta`, `rope_scaling`, `torch_dtype`, layer pattern implied by
the family) and 5.x (nested `rope_parameters`, `dtype`, explicit `layer_types`); an option this
code does not implement is a ValueError naming the file and the field.

Loading copies one tensor at a time into an already-materialised model (built on `meta`, then
`to_empty`), so a model never exists twice in memory; plain and FSDP2 (DTensor) parameters
alike. safetensors only: no pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from simpo.model import FULL, SLIDING, ModelArgs, Transformer
from simpo.world import copy_full_


class ModelFileError(ValueError):
    """A checkpoint's config.json or weights that cannot be used; the message names the file."""


SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Non-parameter tensors some older checkpoints store; safe to skip.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Supported RoPE types -> required fields (llama3 also reads original_max_position_embeddings)
ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class Family:
    """What a config.json `model_type` means in terms of ModelArgs features."""

    architecture: str  # config.json "architectures" entry
    # Sliding windows: "none" (ignored), "all" (every layer slides; layer_types ignored),
    # "from_layer" (layers >= max_window_layers slide, qwen2), "even" (even layers slide, gemma2).
    windows: str = "none"
    window_switch: str | None = None  # a config key that must be true for windows (qwen2)
    qkv_bias: bool = False  # q/k/v always carry a bias (qwen2); else `attention_bias` decides
    o_bias: bool = True  # `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False  # reads `mlp_bias`
    gemma: bool = False  # (1 + w) RMSNorm, sqrt(dim) embedding scale, tanh GeGLU, tied head
    sandwich_norm: bool = False  # norms after attention and MLP too
    softcaps: bool = False  # attn/final logit soft-caps and query_pre_attn_scalar
    act_key: str = "hidden_act"  # the key config.json writes the activation under
    writes: tuple[str, ...] = ()  # optional keys `hf_config_dict` writes for this family


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", mlp_bias=True, writes=("attention_bias", "mlp_bias")),
    "mistral": Family("MistralForCausalLM", windows="all", writes=("sliding_window",)),
    "qwen2": Family(
        "Qwen2ForCausalLM", windows="from_layer", window_switch="use_sliding_window",
        qkv_bias=True, o_bias=False,
        writes=("use_sliding_window", "max_window_layers", "sliding_window", "layer_types"),
    ),
    "gemma": Family("GemmaForCausalLM", gemma=True, writes=("attention_bias",)),
    "gemma2": Family(
        "Gemma2ForCausalLM", windows="even", gemma=True, sandwich_norm=True, softcaps=True,
        act_key="hidden_activation",
        writes=("attention_bias", "sliding_window", "layer_types", "softcaps"),
    ),
}  # fmt: skip


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None, int]:
    """(theta, scaling or None, max_position_embeddings) from either config.json generation."""
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = dict(cfg.get(rope_key) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelFileError(f"{where}: field 'partial_rotary_factor' != 1 is not supported")
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    if rope_type not in ROPE_FIELDS:
        raise ModelFileError(
            f"{where}: field '{rope_key}.rope_type' = {rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_FIELDS)})"
        )
    for key in ROPE_FIELDS[rope_type]:
        if key not in rope:
            raise ModelFileError(f"{where}: field '{rope_key}.{key}' is missing")
    scaling = {"rope_type": rope_type, **{k: float(rope[k]) for k in ROPE_FIELDS[rope_type]}}
    if rope_type == "llama3":
        scaling["original_max_position_embeddings"] = int(
            rope.get("original_max_position_embeddings", max_pos)
        )
    return theta, None if rope_type == "default" else scaling, max_pos


def _layer_types(fam: Family, cfg: dict[str, Any], n_layers: int, where: str) -> tuple:
    """(window or None, layer types) after the family's sliding-window rule."""
    window = cfg.get("sliding_window")
    if fam.window_switch and not cfg.get(fam.window_switch, False):
        window = None
    types = cfg.get("layer_types")
    if fam.windows == "all" or types is None:  # transformers 4.x: implied by the family
        first = int(cfg.get("max_window_layers", 0))
        slides = {
            "all": lambda i: True,
            "from_layer": lambda i: i >= first,
            "even": lambda i: i % 2 == 0,
            "none": lambda i: False,
        }[fam.windows]
        types = [SLIDING if slides(i) else FULL for i in range(n_layers)]
    if len(types) != n_layers or any(t not in (SLIDING, FULL) for t in types):
        raise ModelFileError(f"{where}: field 'layer_types' = {types!r} is not supported")
    if window is None or fam.windows == "none":
        return None, (FULL,) * n_layers
    return int(window), tuple(types)


def read_hf_config(src: str | Path | dict[str, Any]) -> ModelArgs:
    """ModelArgs from a HF config.json (path, its directory, or the dict); errors name the field."""
    if isinstance(src, dict):
        cfg, where = src, "config"
    else:
        path = Path(src) / "config.json" if Path(src).is_dir() else Path(src)
        try:
            cfg, where = json.loads(path.read_text()), str(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: no such file (a checkpoint needs config.json)") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise ModelFileError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ModelFileError(f"{where}: required field '{key}' is missing")
        return cfg[key]

    name = cfg.get("model_type")
    if name not in FAMILIES:
        raise ModelFileError(
            f"{where}: field 'model_type' is {name!r}; supported: {', '.join(FAMILIES)}"
        )
    fam = FAMILIES[name]
    act_key = "hidden_activation" if cfg.get("hidden_activation") else "hidden_act"
    act = cfg.get(act_key) or ("gelu_pytorch_tanh" if fam.gemma else "silu")
    if act not in (("gelu_pytorch_tanh", "gelu") if fam.gemma else ("silu",)):
        raise ModelFileError(f"{where}: field '{act_key}' = {act!r} is not supported for {name}")
    if cfg.get("use_bidirectional_attention"):
        raise ModelFileError(f"{where}: field 'use_bidirectional_attention' is not supported")
    theta, scaling, max_pos = _rope(cfg, where)
    n_layers = int(need("num_hidden_layers"))
    window, types = _layer_types(fam, cfg, n_layers, where)
    heads, bias = int(need("num_attention_heads")), bool(cfg.get("attention_bias", False))
    return ModelArgs(
        vocab_size=int(need("vocab_size")),
        dim=int(need("hidden_size")),
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or need("hidden_size") // heads),
        intermediate_size=int(need("intermediate_size")),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", fam.gemma)),
        qkv_bias=bias or fam.qkv_bias,
        o_bias=bias and fam.o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) and fam.mlp_bias,
        mlp_act="gelu_tanh" if fam.gemma else "silu",
        norm_plus_one=fam.gemma,
        scale_embeddings=fam.gemma,
        sandwich_norm=fam.sandwich_norm,
        sliding_window=window,
        layer_types=types,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if fam.softcaps else None,
        attn_softcap=cfg.get("attn_logit_softcapping", 50.0) if fam.softcaps else None,
        final_softcap=cfg.get("final_logit_softcapping", 30.0) if fam.softcaps else None,
        model_type=name,
        dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def hf_config_dict(args: ModelArgs, dtype: str | None = None) -> dict[str, Any]:
    """A config.json dict that transformers (4.x and 5.x) loads for `args.model_type`."""
    fam = FAMILIES[args.model_type]
    dtype = dtype or args.dtype
    sliding = [i for i, t in enumerate(args.layer_types) if t == SLIDING]
    cfg: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        fam.act_key: "gelu_pytorch_tanh" if args.mlp_act == "gelu_tanh" else "silu",
    }
    optional = {
        "attention_bias": args.qkv_bias,
        "mlp_bias": args.mlp_bias,
        "sliding_window": args.sliding_window,
        "use_sliding_window": bool(sliding),
        "max_window_layers": sliding[0] if sliding else args.n_layers,
        "layer_types": list(args.layer_types),
    }
    for key in fam.writes:
        if key == "softcaps":
            cfg["query_pre_attn_scalar"] = args.query_pre_attn_scalar
            cfg["attn_logit_softcapping"] = args.attn_softcap
            cfg["final_logit_softcapping"] = args.final_softcap
        else:
            cfg[key] = optional[key]
    return cfg


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file for a HF checkpoint directory."""
    path = Path(path)
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("'weight_map' is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(
                f"{index}: corrupt index ({e!r}); expected JSON with a 'weight_map' object"
            ) from e
        files = {name: path / str(file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index}: names shard {file.name}, which does not exist")
        return files
    single = path / SINGLE
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither {SINGLE} nor {INDEX} exists")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(file: Path) -> safe_open:
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{file}: not a readable safetensors file ({e})") from e


def load_state_into(model: nn.Module, path: str | Path) -> None:
    """Load a HF checkpoint directory into a materialised model (plain or FSDP2-sharded).

    Every parameter must be present with the right shape and no unknown tensor may exist;
    errors name the tensor and the file. A tied model ignores a stored `lm_head.weight`.
    """
    files = checkpoint_files(path)
    params = model.state_dict(keep_vars=True)  # HF names -> Parameter (or DTensor)
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    skip = {"lm_head.weight"} if tied else set()
    stored = {n for n in files if not n.endswith(IGNORED_SUFFIXES) and n not in skip}
    missing, unexpected = sorted(params.keys() - stored), sorted(stored - params.keys())
    if missing:
        raise ModelFileError(f"{path}: checkpoint is missing tensor(s): {', '.join(missing)}")
    if unexpected:
        where = ", ".join(f"{n} (in {files[n].name})" for n in unexpected)
        raise ModelFileError(f"{path}: checkpoint has unexpected tensor(s): {where}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(stored):
        by_file[files[name]].append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            keys = set(f.keys())
            for name in names:
                if name not in keys:
                    raise ModelFileError(
                        f"{file}: the index maps tensor {name} here, but it is absent"
                    )
                shape = tuple(f.get_slice(name).get_shape())
                want = tuple(params[name].shape)
                if shape != want:
                    raise ModelFileError(
                        f"{file}: tensor {name} has shape {shape}, expected {want}"
                    )
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:  # a truncated file fails here
                    raise ModelFileError(f"{file}: tensor {name} is unreadable ({e})") from e
                copy_full_(params[name], tensor)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_backend: str = "auto",
) -> Transformer:
    """A plain (unsharded) Transformer with the HF checkpoint at `path`, built on meta first."""
    args = read_hf_config(Path(path) / "config.json")
    with torch.device("meta"):
        model = Transformer(args, attn_backend=attn_backend).to(dtype)
    model.to_empty(device=device)
    load_state_into(model, path)
    return model


def save_hf(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json + safetensors shards (+ index when > 1) + tokenizer files.

    `model` is a `simpo.model.Transformer` (its `args` give config.json). dtype: stored dtype
    (default: the parameters' own). Under torch.distributed every rank must call this (DTensor
    parameters are gathered with `full_tensor()`); rank 0 writes.
    """
    out = Path(out_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state = model.state_dict()  # HF names; tied models hold no lm_head.weight
    dtype = dtype or next(iter(state.values())).dtype
    plan: list[list[str]] = [[]]  # tensor names per shard, filled up to max_shard_bytes
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * dtype.itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    n = len(plan)
    shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_names = [SINGLE] if n == 1 else shard_names
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for old in [*out.glob("model*.safetensors"), out / INDEX]:
            old.unlink(missing_ok=True)  # stale shards of an earlier export
    weight_map: dict[str, str] = {}
    for names, shard in zip(plan, shard_names, strict=True):
        tensors = {}
        for name in names:
            t = state[name]
            t = t.full_tensor() if isinstance(t, DTensor) else t  # collective on all ranks
            if rank0:
                tensors[name] = t.detach().to("cpu", dtype).contiguous()
            weight_map[name] = shard
        if rank0:
            save_file(tensors, out / shard, metadata={"format": "pt"})
    if rank0:
        if n > 1:
            total = sum(t.numel() * dtype.itemsize for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(model.args, str(dtype).removeprefix("torch."))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    if dist.is_initialized():
        dist.barrier()
    return out
