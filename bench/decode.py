"""Decode throughput of `simpo.generate.sample` next to the memory-bandwidth bound (bench/gpu.py).

One decode step reads every weight once and each row's KV cache once, so it can go no faster
than (weight bytes + KV bytes) / HBM bandwidth; at batch 1 that bound is the whole story, at
64 rows the weights are shared and the bound rises 64-fold less the KV traffic. Measured: a
shape's random bf16 model, prompts of `prompt` tokens, `new` sampled tokens (temperature 0.8,
top-p 0.95, no stop), the decode step compiled to CUDA graphs as onpolicy.py runs it. A decode
step's time is (time of `new` tokens - time of 1 token) / (new - 1), so prefill and the first
sampling are left out; each after a warm-up call (compilation).

    from bench.decode import decode_bench, decode_table
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from simpo.generate import sample
from simpo.hf import read_hf_config
from simpo.model import Transformer

# HBM bandwidth, bytes/s, by device name (the data sheets' numbers)
BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))


@dataclass
class DecodeResult:
    shape: str
    rows: int  # prompts x samples decoded together
    step_ms: float
    tokens_s: float
    bound_tokens_s: float | None  # rows / ((weights + KV bytes) / bandwidth)


def bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH if key in name), None)


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def decode_bench(
    shape: str, config: dict[str, Any], device: torch.device, prompts: int, samples: int,
    prompt: int, new: int,
) -> DecodeResult:  # fmt: skip
    """Decode tokens/s of `prompts` x `samples` rows for the HF config `config`."""
    args = read_hf_config(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Transformer(args, attn_backend="sdpa").to(dtype)
    model.to_empty(device=device)
    for name, p in model.named_parameters():  # on the device: no host-side 8B tensor
        p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, args.vocab_size, (prompt,), generator=gen).tolist()] * prompts
    compile = device.type == "cuda"

    def run(n: int) -> None:
        sample(
            model, ids, n, num_samples=samples, temperature=0.8, top_p=0.95,
            batch_prompts=prompts, compile=compile,
        )  # fmt: skip

    run(new)  # warm-up: compiles the decode step for this shape
    one, full = _timed(lambda: run(1), device), _timed(lambda: run(new), device)
    step = (full - one) / (new - 1)
    rows = prompts * samples
    bw = bandwidth(device)
    bound = None
    if bw is not None:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2  # K and V, bf16
        kv = rows * (prompt + new / 2) * per_token  # the mean context over the decode
        bound = rows * bw / (weights + kv)
    return DecodeResult(shape, rows, 1e3 * step, rows / step, bound)


def decode_table(results: list[DecodeResult]) -> list[list[str]]:
    """Rows for bench.common.table: shape, rows, step ms, tokens/s, bound, fraction."""
    out = []
    for r in results:
        bound = "-" if r.bound_tokens_s is None else f"{r.bound_tokens_s:,.0f}"
        frac = "-" if r.bound_tokens_s is None else f"{r.tokens_s / r.bound_tokens_s:.0%}"
        out.append([r.shape, str(r.rows), f"{r.step_ms:.2f}", f"{r.tokens_s:,.0f}", bound, frac])
    return out


DECODE_HEADER = ["shape", "rows", "decode step ms", "tokens/s", "bandwidth bound", "of bound"]
