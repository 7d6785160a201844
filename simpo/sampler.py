"""Deterministic data order: which pairs form the global batch of optimizer step s.

The pairs are read as one endless stream of per-epoch permutations (epoch e shuffled with a
generator seeded by (seed, e)); step s takes stream positions [s*B, (s+1)*B). The batch of a
step is therefore a pure function of (seed, step), the same on every rank and for any world
size, and a resumed run continues mid-epoch with exactly the pairs it would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TypeVar

import torch

T = TypeVar("T")


@lru_cache(maxsize=4)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of epoch `epoch`: a permutation of range(num_items)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_items, generator=gen).tolist())


def steps_for(num_items: int, batch_size: int, epochs: int, max_steps: int) -> int:
    """Optimizer steps of a run: max_steps when > 0, else whole batches in `epochs` epochs."""
    if max_steps > 0:
        return max_steps
    return max(1, epochs * num_items // batch_size)


def global_batch(items: Sequence[T], step: int, batch_size: int, seed: int) -> list[T]:
    """The `batch_size` items of optimizer step `step` (0-based); may straddle two epochs."""
    n = len(items)
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        out.append(items[epoch_permutation(n, seed, k // n)[k % n]])
    return out


def epoch_of(step: int, batch_size: int, num_items: int) -> float:
    """Epochs completed after step `step` (0-based), as a float."""
    return (step + 1) * batch_size / num_items
