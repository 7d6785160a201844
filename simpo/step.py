"""One optimizer step's forward and backward on this rank (train.py's inner loop, and bench/).

The step's loss is the sum of per-pair losses over ALL its micro-batches and ranks divided by
the pairs of the whole step (`batch_size`), so gradient accumulation is implicit and the result
does not depend on how many ranks or micro-batches the pairs were split into. Each micro-batch
is scaled by the world size because FSDP averages gradients over ranks where we want the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from simpo.config import LossConfig
from simpo.losses import compute_loss
from simpo.metrics import attention_context
from simpo.packing import PackedBatch
from simpo.reference import ReferenceFn
from simpo.world import World


def train_step(
    model: nn.Module,
    micro_batches: Sequence[PackedBatch],
    loss_cfg: LossConfig,
    batch_size: int,
    world: World,
    reference: ReferenceFn | None = None,
) -> dict[str, Tensor | int]:
    """Forward + backward of this rank's micro-batches; gradients accumulate in `.grad`.

    Returns this rank's sums over its pairs, to be reduced over ranks and divided by
    `batch_size`: "loss" and every compute_loss metric (0-dim tensors, not yet synchronised
    with the host), plus "tokens" (real tokens) and "ctx" (attention context, for MFU).
    """
    sums: dict[str, Tensor | int] = {"tokens": 0, "ctx": 0}
    for mb in micro_batches:
        mb = mb.to(world.device)
        policy_sum, policy_count = model(mb.input_ids, mb.layout, mb.score)  # (2P,) each
        ref_sum, ref_count = reference(mb) if reference is not None else (None, None)
        losses, metrics = compute_loss(loss_cfg, policy_sum, policy_count, ref_sum, ref_count)
        (losses.sum() * world.world_size / batch_size).backward()  # losses: (P,) per pair
        for key, value in {"loss": losses.detach(), **metrics}.items():
            sums[key] = sums.get(key, 0) + value.sum()
        sums["tokens"] += mb.num_real_tokens
        sums["ctx"] += attention_context(mb.layout)
    if "loss" not in sums:  # only empty micro-batches: nothing was scored on this rank
        sums["loss"] = torch.zeros((), device=world.device)
    return sums
