"""Training metrics: cross-rank reduction, throughput, MFU, peak memory, and the JSONL log.

MFU follows torchtitan: 6 x (non-embedding parameters) FLOPs per token for the matmuls
(forward + backward) plus 12 x layers x heads x head_dim x t for attention, where torchtitan's
t is the row length; we count only real tokens, so t is each token's own document length
(sum over documents of L^2). Not reported off CUDA or on GPUs without a known peak.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from simpo.attention import Layout
from simpo.model import ModelArgs
from simpo.runfiles import append_line, restart_jsonl
from simpo.world import all_reduce

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def reduce_scalars(values: dict[str, float | Tensor], op: str = "sum") -> dict[str, float]:
    """Each value summed (op="sum") or maximised (op="max") over all ranks, in one collective
    and one host synchronisation (values may be 0-dim tensors still on the device)."""
    if not values:
        return {}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values.values()])
    all_reduce(t, torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return dict(zip(values, t.tolist(), strict=True))


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the embedding, plus the
    (tied) head. DTensor parameters report their full size."""
    args: ModelArgs = model.args
    embedding = args.vocab_size * args.dim
    total = sum(p.numel() for p in model.parameters())
    return total - embedding + (embedding if args.tie_word_embeddings else 0)


def attention_context(layout: Layout) -> int:
    """Sum over real tokens of their document's length, i.e. sum over documents of L^2."""
    doc = layout.doc_ids  # (B, T), -1 = padding; ids are unique within a row only
    B, T = doc.shape
    real = doc >= 0
    key = (torch.arange(B, device=doc.device)[:, None] * (T + 1) + doc)[real]  # (n_real,)
    return int(torch.bincount(key).pow(2).sum()) if key.numel() else 0


def train_flops(args: ModelArgs, n_matmul: int, real_tokens: int, context: int) -> float:
    """FLOPs of forward + backward over `real_tokens` tokens with attention `context`."""
    attn = 12 * args.n_layers * args.n_heads * args.head_dim * context
    return 6.0 * n_matmul * real_tokens + attn


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None where unknown (CPU included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_mem_gb(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA allocator peak, else peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


class MetricsWriter:
    """Appends one JSON object per step to `<output_dir>/metrics.jsonl` (rank 0 only).

    On resume, records after the resumed step (written before the crash, then redone) are
    dropped so the file reads as one uninterrupted run, and so is a torn last line (see
    simpo.runfiles.restart_jsonl, which says so); the file is rewritten atomically.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        keep = None if resume_step is None else (lambda r: r.get("step", 0) <= resume_step)
        for note in restart_jsonl(path, keep):
            print(f"warning: {note}", flush=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record))
