"""Where this process sits in the job: process group, rank-0 printing, collectives, shutdown.

`python train.py` and `torchrun train.py` take the same path: without torchrun's environment
we start a one-rank group (an in-memory store, no port), so the model is always FSDP2-sharded
and the numerics of 1 and N processes differ only in the order of the gradient sum.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclass(frozen=True)
class World:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # 1-D: FSDP shards over all ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or start a one-rank group."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        rank, size, local = 0, 1, 0
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank, size, local, device, init_device_mesh(device.type, (size,)))


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


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Copy a host tensor to `device` without making the host wait for the device.

    A plain `.to("cuda")` from pageable memory is a synchronous copy: the host waits until
    the GPU has drained its queue. Pinned memory plus `non_blocking` queues the copy behind
    the running kernels instead (the caching host allocator keeps the pinned buffer alive
    until the copy is done). A no-op for a tensor already on `device`.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def unwrap_norm(t: Tensor) -> float:
    """A scalar (possibly a DTensor, e.g. clip_grad_norm_'s result) as a Python float."""
    full = getattr(t, "full_tensor", None)
    return float((full() if full is not None else t).item())
