"""Score pairs without gradients (reference precompute, held-out eval), across ranks.

All pairs are packed once, in index order, and the micro-batches are dealt round-robin to the
ranks, so every pair is scored in the same row whatever the world size (the values do not
depend on how many processes computed them). Every rank then holds every pair's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from simpo.losses import compute_loss, get_loss
from simpo.packing import empty_batch, pack_pairs
from simpo.world import World, all_gather_rows

if TYPE_CHECKING:
    from simpo.config import Config
    from simpo.data import TokenizedPair
    from simpo.reference import ReferenceTable


@torch.no_grad()
def score_pairs(
    model: nn.Module, pairs: Sequence[TokenizedPair], max_tokens: int, packing: str, world: World
) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair, sorted by `TokenizedPair.index`: index (P,), log-prob sums (P, 2) and token
    counts (P, 2), column 0 the chosen response, column 1 the rejected; fp64 on CPU."""
    batches = pack_pairs(sorted(pairs, key=lambda p: p.index), max_tokens, packing)
    mine = batches[world.rank :: world.world_size]
    rounds = -(-len(batches) // world.world_size)  # every rank runs as many forwards (FSDP)
    rows = [torch.zeros((0, 5), dtype=torch.float64, device=world.device)]
    for i in range(rounds):
        batch = (mine[i] if i < len(mine) else empty_batch()).to(world.device)
        sums, counts = model(batch.input_ids, batch.layout, batch.score)
        index = batch.pair_index.to(sums.device)  # (P,): PackedBatch keeps it on the host
        cols = [index, sums[0::2], sums[1::2], counts[0::2], counts[1::2]]
        rows.append(torch.stack([c.double() for c in cols], dim=1))  # (P_i, 5)
    table = all_gather_rows(torch.cat(rows)).cpu()  # (P, 5) from all ranks
    table = table[table[:, 0].argsort()]
    return table[:, 0].long(), table[:, 1:3].contiguous(), table[:, 3:5].contiguous()


def heldout_metrics(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    cfg: Config,
    world: World,
    ref_table: ReferenceTable | None = None,
    ref_model: nn.Module | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over `pairs` (held-out), named `eval/<metric>`."""
    was_training = model.training
    model.eval()
    index, sums, counts = score_pairs(model, pairs, cfg.data.max_tokens, cfg.data.packing, world)
    model.train(was_training)
    ref_sum = ref_count = None
    if get_loss(cfg.loss.name).needs_reference:
        if ref_model is not None:
            _, ref_sums, ref_counts = score_pairs(
                ref_model, pairs, cfg.data.max_tokens, cfg.data.packing, world
            )
            ref_sum, ref_count = ref_sums.reshape(-1), ref_counts.reshape(-1)
        else:
            assert ref_table is not None, "a reference loss needs a table or a model"
            ref_sum, ref_count = ref_table.lookup(index)
    # (P, 2) -> (2P,): responses interleaved chosen, rejected as compute_loss expects
    losses, metrics = compute_loss(
        cfg.loss, sums.reshape(-1), counts.reshape(-1), ref_sum, ref_count
    )
    out = {"eval/loss": losses.mean().item(), "eval/num_pairs": float(len(index))}
    out |= {f"eval/{k}": v.mean().item() for k, v in metrics.items()}
    return out
