"""FSDP2 for the Transformer: activation checkpointing, sharding, loading, in torchtitan's order.

Build on `meta` -> checkpoint each block -> `fully_shard` each block (param bf16, reduce fp32)
-> `fully_shard` the root -> `to_empty` -> load the HF weights shard by shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from simpo.hf import load_state_into, read_hf_config
from simpo.model import Transformer
from simpo.world import World

PRECISIONS = ("bf16-mixed", "fp32", "bf16-pure")
# train.grad_sync: when FSDP reduce-scatters the gradients of an optimizer step's micro-batches
#   "last":  once, after the last micro-batch. Each rank holds its units' unsharded gradients
#            (in the reduce dtype, fp32) from the first micro-batch's backward to the last,
#            i.e. 4 bytes x parameters per rank (32 GB at 8B) instead of a 1/world shard.
#   "every": after every micro-batch (overlapped with the backward), ZeRO-3 memory.
GRAD_SYNCS = ("last", "every")


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters gradients (FSDP2's
    `set_requires_gradient_sync`, on the root and every block); a no-op for a model that
    FSDP did not shard. Without sync, gradients accumulate unsharded until a backward with it."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync, recurse=True)


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
    world: World,
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
    args = read_hf_config(Path(path) / "config.json")
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    with torch.device("meta"):
        model = Transformer(args, attn_backend=attention).to(dtype)
    model.requires_grad_(trainable)
    parallelize(
        model, world.mesh, precision, activation_checkpointing and trainable, compile_blocks
    )
    model.to_empty(device=world.device)
    load_state_into(model, path)
    return model.train(trainable)
