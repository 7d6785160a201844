"""One optimizer step's forward and backward on this rank (train.py's inner loop, and bench/).

The step's loss is the sum of per-pair losses over ALL its micro-batches and ranks divided by
the pairs of the whole step (`batch_size`), so gradient accumulation is implicit and the result
does not depend on how many ranks or micro-batches the pairs were split into. Each micro-batch
is scaled by the world size because FSDP averages gradients over ranks where we want the sum.

No wasted work: FSDP reduce-scatters the gradients once, after the last micro-batch (unless
`grad_sync="every"`; every rank runs as many micro-batches, `plan_micro_batches` pads with
empty ones, so all ranks reach that collective together), and the loop never reads a device
value on the host: the micro-batches are copied to the device before it without blocking, and
everything the host needs (token counts, response lengths, attention context, pair ids) was
computed when they were packed. tests/test_step.py checks both.

The loss is fused into the head pass by default (`fused_loss`, train.fused_loss): the model's
forward returns the micro-batch's loss with the head's gradients already formed (3 vocabulary
GEMMs per scored token), so a live reference is scored before the policy's forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from simpo.config import LossConfig
from simpo.fsdp import GRAD_SYNCS, set_grad_sync
from simpo.fused_loss import HeadLoss, pair_loss
from simpo.losses import compute_loss
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
    grad_sync: str = "last",
    fused_loss: bool = True,
) -> dict[str, Tensor | int]:
    """Forward + backward of this rank's micro-batches; gradients accumulate in `.grad`.

    `grad_sync` (GRAD_SYNCS): reduce-scatter the gradients after the "last" micro-batch only,
    or after "every" one (less memory, more communication; the same sum up to rounding).
    `fused_loss`: compute the loss inside the head pass (`simpo.fused_loss`: 3 vocabulary
    GEMMs per scored token, not 4); False = per-response log-probs from the two-pass kernel,
    then `compute_loss` and autograd (the reference path; equal to rounding).

    Returns this rank's sums over its pairs, to be reduced over ranks and divided by
    `batch_size`: "loss" and every compute_loss metric (0-dim tensors, not yet synchronised
    with the host), plus "tokens" (real tokens), "ctx" (attention context, for MFU) and
    "logit_sum/*", "logit_count/*" (the official logits/chosen|rejected = sum / count).
    """
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNCS}, got {grad_sync!r}")
    on_device = [mb.to(world.device) for mb in micro_batches]  # queued, host not blocked
    scale = world.world_size / batch_size  # FSDP averages over ranks; we want the sum
    # the packer guarantees every response a scored token: no host sync to check it
    loss_fn = pair_loss(loss_cfg, check_counts=False)
    sums: dict[str, Tensor | int] = {"tokens": 0, "ctx": 0}
    try:
        for i, mb in enumerate(on_device):
            set_grad_sync(model, grad_sync == "every" or i == len(on_device) - 1)
            logit_sums = torch.zeros(mb.score.num_responses, device=world.device)  # (2P,)
            # the reference first: the fused loss needs it inside the policy's forward
            ref_sum, ref_count = reference(mb) if reference is not None else (None, None)
            if fused_loss:
                # host-side lengths from the packer (a hand-built batch may lack them: then
                # the fused loss reads the counts back once)
                lengths = mb.response_lengths
                lengths = lengths if len(lengths) == mb.score.num_responses else None
                request = HeadLoss(loss_fn, scale, ref_sum, ref_count, lengths)
                out = model(mb.input_ids, mb.layout, mb.score, logit_sums=logit_sums, loss=request)
                out.loss.backward()  # the head's grads were formed in the forward
                policy_sum, policy_count = out.sums, out.counts  # (2P,) each, detached
                with torch.no_grad():  # metrics only: the loss is already back-propagated
                    losses, metrics = compute_loss(
                        loss_cfg, policy_sum, policy_count, ref_sum, ref_count, check_counts=False
                    )
            else:
                policy_sum, policy_count = model(
                    mb.input_ids, mb.layout, mb.score, logit_sums=logit_sums
                )  # (2P,) each
                losses, metrics = compute_loss(
                    loss_cfg, policy_sum, policy_count, ref_sum, ref_count, check_counts=False
                )
                (losses.sum() * scale).backward()  # losses: (P,) per pair
            for key, value in {"loss": losses.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0) + value.sum()
            # the official trainer's logits/chosen|rejected: mean logit over response tokens
            for name, part in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
                sums[f"logit_sum/{name}"] = (
                    sums.get(f"logit_sum/{name}", 0) + logit_sums[part].sum()
                )
                n = policy_count[part].detach().sum()
                sums[f"logit_count/{name}"] = sums.get(f"logit_count/{name}", 0) + n
            sums["tokens"] += mb.num_real_tokens
            sums["ctx"] += mb.attention_context
    finally:
        set_grad_sync(model, True)  # leave the model as FSDP builds it (eval, a next caller)
    if "loss" not in sums:  # only empty micro-batches: nothing was scored on this rank
        sums["loss"] = torch.zeros((), device=world.device)
    return sums
