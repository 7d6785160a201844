"""torch.distributed plumbing: process group, rank-0 printing, FSDP2 model building, shutdown.

`python train.py` and `torchrun train.py` take the same path: without torchrun's environment
we start a one-rank group (an in-memory store, no port), so the model is always FSDP2-sharded
and the numerics of 1 and N processes differ only in the order of the gradient sum.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from simpo.checkpoint import load_state_into
from simpo.hf_config import ModelArgs
from simpo.model import Transformer

PRECISIONS = ("bf16-mixed", "fp32", "bf16-pure")


@dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # 1-D: FSDP shards over all ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or start a one-rank group."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        rank, world, local = 0, 1, 0
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world, local, device, init_device_mesh(device.type, (world,)))


def shutdown(clean: bool = True) -> None:
    """Leave the process group so the interpreter exits cleanly.

    On this torch (2.13, gloo) a worker that exits with the group alive aborts at interpreter
    exit in about 1 run in 4 (SIGABRT, pytorch/pytorch#190489). The caller drops its references
    to models and optimizers first; `clean=False` (after an error, when other ranks may not
    reach a barrier) skips the barrier.
    """
    gc.collect()
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def print0(*args: object, file: object = None) -> None:
    """print on rank 0 only (flushed, so torchrun's interleaved output stays readable)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, file=file or sys.stdout, flush=True)


def all_reduce(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over the world (a no-op outside a process group); returns `t`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's (n_r, ...) tensor along dim 0, in rank order; n_r may differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    precision: str,
    activation_checkpointing: bool,
    compile_blocks: bool = False,
) -> Transformer:
    """Activation checkpointing, then `fully_shard` per block, then the root (torchtitan order).

    Call on a model built on `meta`; `to_empty` and loading come after. bf16-mixed: FSDP casts
    the fp32 master parameters to bf16 for compute and reduces gradients in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # Inputs are ids and a Layout (int tensors) and bf16 activations from the previous unit:
    # nothing to cast (and FSDP's input cast would rebuild the Layout dataclass, dropping its
    # cached masks).
    mixed = precision == "bf16-mixed"
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed else None,
        reduce_dtype=torch.float32 if mixed else None,
        cast_forward_inputs=False,
    )
    for i, block in enumerate(model.layers):
        if activation_checkpointing:  # recompute the block in backward; keeps HF state_dict names
            block = checkpoint_wrapper(block)
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
        model.layers[i] = block
    fully_shard(model, mesh=mesh, mp_policy=mp)  # embedding, final norm, head: one unit
    return model


def build_model(
    path: str | Path,
    d: Dist,
    precision: str,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    attention: str = "auto",
    trainable: bool = True,
) -> Transformer:
    """An FSDP2-sharded Transformer with the HF checkpoint at `path` loaded shard by shard.

    Built on `meta`, so no rank ever holds the full model: every rank reads one tensor at a
    time from the (memory-mapped) safetensors files and keeps its own shard. Parameters are
    fp32 (master weights) except for bf16-pure. `trainable=False` gives a frozen copy in eval
    mode (the live DPO reference).
    """
    args = ModelArgs.from_hf_config(Path(path) / "config.json")
    args.attn_backend = attention
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.requires_grad_(trainable)
    parallelize(model, d.mesh, precision, activation_checkpointing and trainable, compile_blocks)
    model.to_empty(device=d.device)
    load_state_into(model, path)
    return model.train(trainable)


def unwrap_norm(t: Tensor) -> float:
    """A scalar (possibly a DTensor, e.g. clip_grad_norm_'s result) as a Python float."""
    full = getattr(t, "full_tensor", None)
    return float((full() if full is not None else t).item())
