"""Hugging Face checkpoint I/O: load safetensors (single or sharded), export HF format.

Loading copies one tensor at a time into an already-materialised model (built on `meta`, then
`to_empty`), so a model never exists twice in memory. Works for plain and FSDP2 (DTensor)
parameters. safetensors only: no pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# Non-parameter tensors some older checkpoints store; safe to skip.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@torch.no_grad()
def copy_full_(param: Tensor, full: Tensor) -> None:
    """Copy a full (unsharded) tensor into `param`, converting dtype and device.

    A DTensor parameter (FSDP2) receives its own shard; every rank holds the same `full`, so
    no communication is needed (src_data_rank=None).
    """
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


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
            raise ValueError(
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
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


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
        raise ValueError(f"{path}: checkpoint is missing tensor(s): {', '.join(missing)}")
    if unexpected:
        where = ", ".join(f"{n} (in {files[n].name})" for n in unexpected)
        raise ValueError(f"{path}: checkpoint has unexpected tensor(s): {where}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(stored):
        by_file[files[name]].append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            keys = set(f.keys())
            for name in names:
                if name not in keys:
                    raise ValueError(f"{file}: the index maps tensor {name} here, but it is absent")
                shape = tuple(f.get_slice(name).get_shape())
                want = tuple(params[name].shape)
                if shape != want:
                    raise ValueError(f"{file}: tensor {name} has shape {shape}, expected {want}")
                copy_full_(params[name], f.get_tensor(name))


def save_hf(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json + safetensors shards (+ index when > 1) + tokenizer files.

    `model` is a `simpo.model.Transformer` (its `args.to_hf_config()` gives config.json).
    dtype: stored dtype (default: the parameters' own). Under torch.distributed every rank must
    call this (DTensor parameters are gathered with `full_tensor()`); rank 0 writes.
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
        config = model.args.to_hf_config(str(dtype).removeprefix("torch."))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    if dist.is_initialized():
        dist.barrier()
    return out
