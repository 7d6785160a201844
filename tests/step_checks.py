"""Pieces of tests/test_step.py; also the worker that `torchrun` runs for its two-rank case.

    torchrun --nproc_per_node 2 tests/step_checks.py fp32 bf16-mixed   # prints RESULT {json}

A tiny random model, FSDP2-sharded as train.py does, and random pairs of known lengths, so
nothing here needs files.
"""

from __future__ import annotations

import json
import random
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the worker runs as a script
from simpo.config import LossConfig  # noqa: E402
from simpo.data import TokenizedPair  # noqa: E402
from simpo.demo.tiny import tiny_args  # noqa: E402
from simpo.fsdp import parallelize  # noqa: E402
from simpo.model import Transformer  # noqa: E402
from simpo.packing import PackedBatch, plan_micro_batches  # noqa: E402
from simpo.reference import ReferenceFn  # noqa: E402
from simpo.step import train_step  # noqa: E402
from simpo.world import World, init_world, shutdown  # noqa: E402

VOCAB = 256
MAX_TOKENS = 64  # one 50-token pair per micro-batch: 5 pairs -> 5 micro-batches on one rank


def tiny_model(
    world: World,
    precision: str = "fp32",
    family: str = "llama",
    attention: str = "dense",
    trainable: bool = True,
) -> Transformer:
    """A tiny random `family` model, sharded like `simpo.fsdp.build_model` (same init on
    every rank)."""
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    with torch.device("meta"):
        model = Transformer(tiny_args(family, VOCAB), attn_backend=attention).to(dtype)
    model.requires_grad_(trainable)
    parallelize(model, world.mesh, precision, activation_checkpointing=False)
    model.to_empty(device=world.device)
    model.init_weights(seed=0)
    return model.train(trainable)


def random_pairs(n: int = 5, seed: int = 0) -> list[TokenizedPair]:
    """`n` pairs of 10 + 20 + 20 = 50 random tokens (shared-prompt packing)."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    return [TokenizedPair(ids(10), ids(20), ids(20), i) for i in range(n)]


def micro_batches(world: World, pairs: list[TokenizedPair]) -> list[PackedBatch]:
    return plan_micro_batches(pairs, MAX_TOKENS, world.world_size, world.rank)


SIMPO = LossConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5)


def run_step(
    model: Transformer,
    micro: list[PackedBatch],
    world: World,
    batch_size: int,
    cfg: LossConfig = SIMPO,
    reference: ReferenceFn | None = None,
    grad_sync: str = "last",
    fused_loss: bool = True,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """train_step's full (unsharded) gradients and its sums as floats; the model's gradients
    are cleared after."""
    sums = train_step(model, micro, cfg, batch_size, world, reference, grad_sync, fused_loss)
    grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, {k: float(v) for k, v in sums.items()}


def step_grads(
    model: Transformer, micro: list[PackedBatch], world: World, grad_sync: str, batch_size: int
) -> dict[str, Tensor]:
    """run_step's gradients for SimPO with `grad_sync`."""
    return run_step(model, micro, world, batch_size, grad_sync=grad_sync)[0]


class GemmFlops(TorchDispatchMode):
    """2 M N K per matrix product (batched ones times their batch), in-place and out= forms
    included (FlopCounterMode skips `addmm_`); with `only_dim`, only products that have it as
    one of M, N, K (e.g. the vocabulary). Any other matrix-product op is an error, so nothing
    goes uncounted."""

    def __init__(self, only_dim: int | None = None) -> None:
        super().__init__()
        self.only_dim, self.flops = only_dim, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm):
            a, b = args[:2] if packet in (aten.mm, aten.bmm) else args[1:3]
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            if self.only_dim is None or self.only_dim in (m, k, n):
                self.flops += 2 * m * k * n * (a.shape[0] if a.dim() == 3 else 1)
        elif "mm" in packet.__name__ or "matmul" in packet.__name__:
            raise AssertionError(f"uncounted matrix product {func}")
        return func(*args, **(kwargs or {}))


def max_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max over parameters of |a - b| / |a| (Frobenius norms)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)


def count_reduce_scatters(fn: object) -> tuple[object, int]:
    """(fn(), how many reduce-scatter collectives it issued); FSDP2 issues one per unit."""
    original, calls = dist.reduce_scatter_single, [0]

    def counting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        return fn(), calls[0]
    finally:
        dist.reduce_scatter_single = original


def two_rank_worker(precisions: list[str]) -> None:
    """Both grad_sync modes on the same step, per precision; rank 0 prints what the test
    checks (one torchrun start for all: it costs more than the steps)."""
    world = init_world()
    results = {}
    for precision in precisions:
        model = tiny_model(world, precision)
        pairs = random_pairs()
        micro = micro_batches(world, pairs)
        empty = torch.tensor([sum(mb.num_pairs == 0 for mb in micro)])
        dist.all_reduce(empty)
        result = {"micro_batches": len(micro), "empty_micro_batches": int(empty)}
        grads = {}
        for mode in ("every", "last"):
            grads[mode], result[f"reduce_scatters_{mode}"] = count_reduce_scatters(
                partial(step_grads, model, micro, world, mode, len(pairs))
            )
        result["max_rel_diff"] = max_rel_diff(grads["every"], grads["last"])
        result["units"] = 1 + len(model.layers)  # FSDP units: each block and the root
        results[precision] = result
        del model
    if world.is_main:
        print("RESULT " + json.dumps(results), flush=True)
    shutdown()


if __name__ == "__main__":
    two_rank_worker(sys.argv[1:])
