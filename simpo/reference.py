"""The DPO reference policy: precomputed per-pair log-probs (default) or a live frozen model.

`precompute` runs the starting weights once over every pair before training and stores each
pair's (sum, count) for both responses in a safetensors file whose name holds a key over
everything that changes the numbers (the tokenised pairs, the checkpoint, precision, packing).
A rerun or resume with the same key reads the file, so no second model is ever in memory
during training. `live` builds a frozen, sharded second model instead (see train.py).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from simpo.fsdp import build_model
from simpo.packing import PackedBatch
from simpo.scoring import score_pairs
from simpo.world import World, all_reduce, print0, to_device

if TYPE_CHECKING:
    from simpo.config import Config
    from simpo.data import TokenizedPair

MIN = dist.ReduceOp.MIN
REFERENCE_MODES = ("precompute", "live")  # loss.reference
# (micro-batch on the device) -> the reference policy's (sum, count), each (2P,) on the device
ReferenceFn = Callable[[PackedBatch], tuple[Tensor, Tensor]]


@dataclass
class ReferenceTable:
    """Reference log-probs per pair: index (P,), sums (P, 2), counts (P, 2); chosen first."""

    index: Tensor
    sums: Tensor
    counts: Tensor

    def __post_init__(self) -> None:
        self._row = {int(i): r for r, i in enumerate(self.index.tolist())}

    def lookup(
        self, pair_index: Tensor, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """(ref_sum, ref_count) on `device`, each (2P,) fp32 interleaved chosen/rejected, for
        pairs (P,) given on the host (a table lookup never waits for the device)."""
        try:
            rows = torch.tensor([self._row[int(i)] for i in pair_index.tolist()], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"pair {e} is not in the reference cache (stale cache file?)") from None
        sums = self.sums[rows].reshape(-1).float()  # (2P,)
        return to_device(sums, device), to_device(self.counts[rows].reshape(-1).float(), device)


def reference_key(pairs: Sequence[TokenizedPair], model_dir: Path, cfg: Config) -> str:
    """sha256 over the pairs' token ids, the checkpoint's files and the numeric settings."""
    h = hashlib.sha256()
    for p in sorted(pairs, key=lambda p: p.index):
        ids = [p.index, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]
        h.update(np.asarray(ids + p.prompt_ids + p.chosen_ids + p.rejected_ids, np.int64).data)
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):  # name, size, mtime: hashing 16 GB is slow
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    settings = [cfg.train.precision, cfg.data.packing, cfg.data.max_tokens, cfg.model.attention]
    h.update(json.dumps([str(model_dir.resolve()), *settings]).encode())
    return h.hexdigest()


def _load(path: Path, key: str) -> ReferenceTable | None:
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return ReferenceTable(f.get_tensor("index"), f.get_tensor("sums"), f.get_tensor("counts"))


def precompute_reference(
    model_dir: Path,
    splits: dict[str, Sequence[TokenizedPair]],
    cfg: Config,
    world: World,
    cache_dir: Path,
) -> dict[str, ReferenceTable]:
    """One ReferenceTable per split (e.g. train, eval), read from cache or computed now.

    Call before the policy model exists: the reference model built here is freed on return.
    """
    tables: dict[str, ReferenceTable] = {}
    todo: dict[str, tuple[str, Path]] = {}
    for split, pairs in splits.items():
        key = reference_key(pairs, model_dir, cfg)
        path = cache_dir / f"reference-{split}-{key[:16]}.safetensors"
        table = _load(path, key) if path.is_file() else None
        # every rank must take the same branch (the scoring pass is collective)
        everywhere = all_reduce(torch.tensor(float(table is not None), device=world.device), MIN)
        if everywhere.item():
            print0(f"reference: {split} log-probs read from {path}")
            tables[split] = table
        else:
            todo[split] = (key, path)
    if not todo:
        return tables
    model = build_model(
        model_dir, world, cfg.train.precision, attention=cfg.model.attention, trainable=False
    )
    model.logits_chunk_bytes = cfg.model.logits_chunk_mib * 2**20
    for split, (key, path) in todo.items():
        t0 = time.perf_counter()
        index, sums, counts = score_pairs(
            model, splits[split], cfg.data.max_tokens, cfg.data.packing, world
        )
        tables[split] = ReferenceTable(index, sums, counts)
        if world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tensors = {"index": index, "sums": sums, "counts": counts}
            save_file(tensors, tmp, metadata={"key": key, "split": split})
            os.replace(tmp, path)  # atomic: a crash leaves no half-written cache
        print0(f"reference: {len(index)} {split} pairs scored in {time.perf_counter() - t0:.1f}s")
    del model
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
    return tables


def reference_for(table: ReferenceTable | None, model: nn.Module | None) -> ReferenceFn | None:
    """The training step's reference: a live frozen model (scored without gradients, through
    the same fused log-prob kernel), else the precomputed table, else None (no reference)."""
    if model is not None:

        @torch.no_grad()
        def live(mb: PackedBatch) -> tuple[Tensor, Tensor]:
            return model(mb.input_ids, mb.layout, mb.score)

        return live
    if table is not None:
        return lambda mb: table.lookup(mb.pair_index, mb.input_ids.device)
    return None
