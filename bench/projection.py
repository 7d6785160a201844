"""From measured tokens/s on one GPU to the GPU-hours of a whole SimPO job on 8 FSDP ranks.

The job (the SimPO slides' Gemma-2-9B-it cost: 50k pairs in 16 H100-hours): 1 epoch over
`pairs` preference pairs, `batch_size` pairs per optimizer step dealt to `ranks` GPUs, packed
with the shared prompt into rows of `max_tokens` (configs/gemma2-9b-it-simpo.toml).

- Tokens: the real AlpacaEval length distribution (`LENGTHS`, measured on all 6,246 pairs of
  ../shared/data/alpaca_eval_prefs.jsonl with the Mistral tokenizer and template, truncated
  as the recipe does at 2,048 / 1,800 tokens; `python bench/projection.py --length-stats`
  recomputes it). The Gemma tokenizer is not available offline; its 256k vocabulary should
  give somewhat fewer tokens for the same English text, so this errs on the long side.
- Compute: tokens / (ranks x tokens/s per GPU). Data parallel: each GPU computes its own
  pairs at the one-GPU rate.
- FSDP communication per optimizer step and rank (ring collectives: a buffer of S bytes costs
  S x (R-1)/R / busbw): per micro-batch the blocks' bf16 parameters are all-gathered twice
  (forward, and again for the backward: blocks reshard after forward) and the root unit's
  (embedding/head) once (the root stays unsharded); the fp32 gradients are reduce-scattered
  once per step (train.grad_sync = "last"; "every": once per micro-batch).
  busbw is an assumption (`--busbw-gbs`, default 360 GB/s: NCCL all-gather / reduce-scatter
  bus bandwidth typical of 8 x H100 SXM on NVSwitch, NVLink 4 at 450 GB/s per direction),
  not a measurement. Two bounds are printed: communication fully overlapped with compute
  (FSDP2 prefetches the next unit's all-gather during the current unit's compute, and
  reduce-scatters while the backward goes on), and not overlapped at all.
- Optimizer: AdamW + clipping over 1/R of the parameters per rank, scaled from the measured
  one-GPU time per parameter.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Measured by `python bench/projection.py --length-stats` (2048 / 1800 truncation, Mistral
# tokenizer; 8 ranks x 16 pairs per step, max_tokens 4096, 40 shuffled steps).
LENGTHS = {
    "pairs": 6246,
    "prompt": 46.8,  # mean tokens (median 31)
    "chosen": 506.1,  # (median 536)
    "rejected": 196.8,  # (median 125)
    "micro_batches_per_rank": 3.43,  # per optimizer step, at 16 pairs per rank
}


@dataclass(frozen=True)
class Job:
    pairs: int = 50_000
    epochs: int = 1
    batch_size: int = 128
    ranks: int = 8
    busbw_gbs: float = 360.0  # assumed NCCL bus bandwidth, GB/s
    grad_sync: str = "last"

    @property
    def tokens_per_pair(self) -> float:  # shared-prompt packing: prompt + chosen + rejected
        return LENGTHS["prompt"] + LENGTHS["chosen"] + LENGTHS["rejected"]


@dataclass(frozen=True)
class Projection:
    tokens: float  # of the whole job
    steps: int
    compute_h: float  # wall hours of compute (all ranks in parallel)
    comm_gb_per_step: float  # bytes each rank sends per optimizer step
    comm_h: float  # wall hours of communication if none of it overlapped
    optimizer_h: float
    gpu_hours_overlapped: float  # ranks x wall hours, communication hidden
    gpu_hours_serial: float  # ranks x wall hours, communication not overlapped


def comm_bytes_per_step(
    block_params: float, root_params: float, micro_batches: float, job: Job
) -> float:
    """Bytes one rank moves per optimizer step through FSDP2's collectives (see module doc)."""
    ring = (job.ranks - 1) / job.ranks
    gather = 2 * (2 * block_params + root_params) * micro_batches  # bf16, fwd + bwd (blocks)
    reductions = 1 if job.grad_sync == "last" else micro_batches
    scatter = 4 * (block_params + root_params) * reductions  # fp32 gradients
    return ring * (gather + scatter)


def project(
    tokens_per_s: float,
    block_params: float,
    root_params: float,
    optimizer_s_per_param: float,
    job: Job,
) -> Projection:
    """GPU-hours of `job` from one GPU's training tokens/s (forward + backward, AC as run)."""
    tokens = job.pairs * job.epochs * job.tokens_per_pair
    steps = math.ceil(job.pairs * job.epochs / job.batch_size)
    compute_s = tokens / (job.ranks * tokens_per_s)
    micro = LENGTHS["micro_batches_per_rank"]
    comm = comm_bytes_per_step(block_params, root_params, micro, job)
    comm_s = steps * comm / (job.busbw_gbs * 1e9)
    optimizer_s = steps * optimizer_s_per_param * (block_params + root_params) / job.ranks
    hours = job.ranks / 3600
    return Projection(
        tokens=tokens,
        steps=steps,
        compute_h=compute_s / 3600,
        comm_gb_per_step=comm / 1e9,
        comm_h=comm_s / 3600,
        optimizer_h=optimizer_s / 3600,
        gpu_hours_overlapped=hours * (max(compute_s, comm_s) + optimizer_s),
        gpu_hours_serial=hours * (compute_s + comm_s + optimizer_s),
    )


def describe(p: Projection, job: Job, device: str) -> str:
    """The projection as one paragraph, every assumption named."""
    return (
        f"{job.pairs:,} pairs x {job.epochs} epoch = {p.tokens / 1e6:.1f}M tokens "
        f"({job.tokens_per_pair:.0f}/pair, AlpacaEval lengths), {p.steps} steps of "
        f"{job.batch_size} pairs on {job.ranks} GPUs: compute {p.compute_h:.2f} h wall; FSDP "
        f"{p.comm_gb_per_step:.0f} GB/rank/step ({LENGTHS['micro_batches_per_rank']} "
        f"micro-batches/rank/step, grad_sync={job.grad_sync}) at an assumed "
        f"{job.busbw_gbs:.0f} GB/s bus bandwidth = {p.comm_h:.2f} h if not overlapped; "
        f"optimizer {p.optimizer_h:.3f} h. Projected {device}-hours: "
        f"{p.gpu_hours_overlapped:.1f} (communication overlapped) to "
        f"{p.gpu_hours_serial:.1f} (not overlapped); the slides: 16 H100-hours"
    )


def length_stats() -> dict[str, float]:
    """Recompute LENGTHS from the shared data (needs ../shared/data)."""
    import random

    from bench.common import MISTRAL_SPM, PREFS
    from simpo.config import DataConfig
    from simpo.data import load_pairs
    from simpo.packing import plan_micro_batches
    from simpo.tokenizer import Tokenizer

    cfg = DataConfig(template="mistral", max_length=2048, max_prompt_length=1800)
    pairs, _ = load_pairs(PREFS, Tokenizer.from_dir(MISTRAL_SPM), cfg, progress=False)
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    micro = []
    for s in range(40):  # 40 steps of 128 pairs, 8 ranks
        batch = [pairs[i] for i in order[s * 128 : (s + 1) * 128]]
        micro += [len(plan_micro_batches(batch, 4096, 8, rank)) for rank in range(8)]
    mean = statistics.mean
    return {
        "pairs": len(pairs),
        "prompt": round(mean(len(p.prompt_ids) for p in pairs), 1),
        "chosen": round(mean(len(p.chosen_ids) for p in pairs), 1),
        "rejected": round(mean(len(p.rejected_ids) for p in pairs), 1),
        "micro_batches_per_rank": round(mean(micro), 2),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--length-stats", action="store_true", help="recompute LENGTHS")
    if p.parse_args().length_stats:
        print(length_stats())
    else:
        p.print_help()
