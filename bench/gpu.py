"""SimPO training step of Llama-3.2-1B- and Llama-3-8B-shaped models on one GPU: tokens/s, MFU.

Random weights (built on `meta`, sharded with `simpo.fsdp.parallelize` exactly as train.py
does: FSDP2 on one rank, bf16 compute, fp32 master weights and reductions), FlexAttention on
packed rows of 4,096 tokens (shared prompt) from the real length distribution (the shared
data and Mistral tokenizer when ../shared is there, else synthetic pairs around its median
lengths), activation checkpointing off and on. Each step is `--rows` micro-batches (one row
each), `compute_loss`, backward, clipping, fused AdamW, as in train.py.

MFU is torchtitan's: 6 x non-embedding parameters per token plus 12 x layers x heads x
head_dim x context for attention, counting real tokens only (`simpo.metrics.train_flops`,
the number train.py logs), over a dense bf16 peak of 989 TFLOP/s (H100/H200). The fused
log-prob kernel is timed alone: effective TFLOP/s = 6 N V D (the FLOPs of the naive forward
and backward) per second, and against the naive full-logits version.

One call runs everything (each configuration time-boxed; an out-of-memory configuration is
recorded and, with AdamW, retried without optimizer state) and writes the table to
$OUT/gpu_results.md (or --out) and stdout:

    python bench/gpu.py                     # CUDA only; prints a skip line elsewhere
    python bench/gpu.py --cpu-dry-run       # tiny shapes, sdpa, CPU: exercises the code path
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    PREFS,
    machine,
    median,
    peak_rss_gb,
    sample_pairs,
    synthetic_pairs,
    table,
)
from simpo.config import LossConfig  # noqa: E402
from simpo.fsdp import parallelize  # noqa: E402
from simpo.hf import read_hf_config
from simpo.logprobs import naive_response_logprobs, response_logprobs  # noqa: E402
from simpo.losses import compute_loss  # noqa: E402
from simpo.metrics import attention_context, matmul_params, peak_flops, train_flops  # noqa: E402
from simpo.model import Transformer  # noqa: E402
from simpo.packing import PackedBatch, pack_pairs  # noqa: E402
from simpo.world import World, init_world, shutdown  # noqa: E402

PEAK_BF16 = 989e12  # H100 / H200 dense bf16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_attention_heads": 32,
          "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}  # fmt: skip
SHAPES = {  # HF config.json fields of the real checkpoints
    "llama-3.2-1b": LLAMA3 | {"hidden_size": 2048, "intermediate_size": 8192, "head_dim": 64,
                              "num_hidden_layers": 16, "tie_word_embeddings": True,
                              "max_position_embeddings": 131072, "rope_scaling": LLAMA3_ROPE},
    "llama-3-8b": LLAMA3 | {"hidden_size": 4096, "intermediate_size": 14336, "head_dim": 128,
                            "num_hidden_layers": 32, "tie_word_embeddings": False,
                            "max_position_embeddings": 8192},
    "tiny (dry run)": LLAMA3 | {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                                "head_dim": 16, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2,
                                "tie_word_embeddings": False},
}  # fmt: skip


@dataclass
class Result:
    shape: str
    ac: bool
    status: str  # "ok", "fwd+bwd only" (AdamW state did not fit), "OOM", "timeout", "skipped"
    tokens_s: float = 0.0
    mfu: float = 0.0
    peak_gb: float = 0.0
    step_s: float = 0.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU, sdpa")
    p.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    p.add_argument("--row-tokens", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=4, help="micro-batches (rows) per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--config-budget-s", type=float, default=60, help="per config, after step 1")
    p.add_argument("--budget-s", type=float, default=400, help="start no config after this")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")))
    args = p.parse_args()
    if args.cpu_dry_run:
        args.shapes, args.row_tokens, args.rows, args.steps = ["tiny (dry run)"], 256, 2, 2
    return args


def step_rows(args: argparse.Namespace, vocab: int) -> list[PackedBatch]:
    """Packed rows of `row_tokens` tokens: warmup (2) + timed steps of `rows` rows each."""
    need = (args.steps + 2) * args.rows
    n = need * max(2, args.row_tokens // 300)  # a pair is ~700 tokens: spare pairs
    max_length = min(2048, args.row_tokens // 2)  # so that any pair fits one row
    if PREFS.is_file() and not args.cpu_dry_run:  # Mistral token ids: < 32000
        pairs = sample_pairs(n, seed=0, max_length=max_length)
    else:
        pairs = synthetic_pairs(n, seed=0, vocab=vocab, max_length=max_length)
    rows = pack_pairs(pairs, args.row_tokens)  # best-fit decreasing: full rows first
    if len(rows) < need:
        sys.exit(f"gpu: only {len(rows)} rows of {args.row_tokens} tokens, need {need}")
    return rows[:need]


def build(args: argparse.Namespace, world: World, shape: str, ac: bool) -> Transformer:
    """Random model on `meta` -> FSDP2 (bf16-mixed) -> materialised on the device, N(0, 0.02)."""
    margs = read_hf_config(SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(margs, attn_backend="sdpa" if args.cpu_dry_run else "flex")
    parallelize(model, world.mesh, "bf16-mixed", ac, args.compile)
    model.to_empty(device=world.device)
    with torch.no_grad():  # on the device: no host-side random 8B tensor
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if name.endswith("norm.weight") else local.normal_(0.0, 0.02)
    return model


def sync(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(world: World) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if world.device.type == "cuda" else peak_rss_gb()


def run_config(
    args: argparse.Namespace, world: World, shape: str, ac: bool, with_optimizer: bool
) -> Result:
    model = build(args, world, shape, ac)
    rows = [r.to(world.device) for r in step_rows(args, model.args.vocab_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=world.device.type == "cuda")
    cfg = LossConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5)
    n_matmul, times = matmul_params(model), []
    flops = tokens = 0.0
    for k in range(args.steps + 2):  # 2 warmup steps: compilation, allocator, optimizer state
        micro = rows[k * args.rows : (k + 1) * args.rows]
        pairs = sum(mb.num_pairs for mb in micro)
        sync(world)
        t0 = time.perf_counter()
        for mb in micro:
            sums, counts = model(mb.input_ids, mb.layout, mb.score)
            losses, _ = compute_loss(cfg, sums, counts)  # (P,)
            (losses.sum() / pairs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(world)
        if k >= 2:
            times.append(time.perf_counter() - t0)
            real = sum(mb.num_real_tokens for mb in micro)
            context = sum(attention_context(mb.layout) for mb in micro)
            tokens += real
            flops += train_flops(model.args, n_matmul, real, context)
        print(f"  step {k}: {time.perf_counter() - t0:.2f} s", flush=True)
        if k == 0:  # the first step compiles FlexAttention: the time box starts after it
            deadline = time.monotonic() + args.config_budget_s
        elif time.monotonic() > deadline:
            break
    status = "ok" if with_optimizer else "fwd+bwd only"
    if not times:
        return Result(shape, ac, "timeout")
    peak = peak_flops(world.device) or PEAK_BF16
    total = sum(times)
    return Result(
        shape, ac, status, tokens / total, flops / total / peak, peak_gb(world), median(times)
    )


def free(world: World) -> None:
    gc.collect()
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def run_all(args: argparse.Namespace, world: World) -> list[Result]:
    results, start = [], time.monotonic()
    for shape in args.shapes:
        for ac in (False, True):
            if time.monotonic() - start > args.budget_s:
                results.append(Result(shape, ac, "skipped"))
                continue
            for with_optimizer in (True, False):
                what = "" if with_optimizer else ", without AdamW state"
                print(
                    f"{shape}, activation checkpointing {'on' if ac else 'off'}{what}", flush=True
                )
                try:
                    result = run_config(args, world, shape, ac, with_optimizer)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_oom(e):
                        raise
                    result = Result(shape, ac, "OOM")
                free(world)
                print(f"  -> {result.status}: {result.tokens_s:,.0f} tokens/s, MFU "
                      f"{result.mfu:.1%}, peak {result.peak_gb:.1f} GB", flush=True)  # fmt: skip
                if result.status != "OOM":
                    break
            results.append(result)
    return results


def kernel_bench(world: World, dim: int, vocab: int, n: int) -> tuple[float, float]:
    """(effective TFLOP/s of the fused kernel's forward+backward, time naive / fused)."""
    dtype = torch.bfloat16
    gen = torch.Generator(device=world.device).manual_seed(0)
    hidden = torch.randn(
        n, dim, device=world.device, dtype=dtype, generator=gen, requires_grad=True
    )
    weight = torch.randn(vocab, dim, device=world.device, dtype=dtype, generator=gen) * 0.02
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), device=world.device, generator=gen)
    index = torch.arange(n, device=world.device)
    responses = index // 256  # 256-token responses

    def seconds(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> float:
        times = []
        for i in range(5):
            sync(world)
            t0 = time.perf_counter()
            fn(hidden, weight, index, targets, responses, n // 256)[0].sum().backward()
            sync(world)
            if i >= 2:
                times.append(time.perf_counter() - t0)
            hidden.grad = weight.grad = None
        return median(times)

    fused = seconds(response_logprobs)
    try:
        naive = seconds(naive_response_logprobs)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        naive = float("nan")
    return 6 * n * vocab * dim / fused / 1e12, naive / fused


def report(args: argparse.Namespace, results: list[Result], kernels: list[list]) -> str:
    real = PREFS.is_file() and not args.cpu_dry_run
    rows = [
        [r.shape, "on" if r.ac else "off", r.status, f"{r.tokens_s:,.0f}", f"{100 * r.mfu:.1f}%",
         f"{r.peak_gb:.1f}", f"{r.step_s:.2f}"]
        for r in results
    ]  # fmt: skip
    lines = [
        f"# bench/gpu.py  ({machine()}, {device_name()})",
        "",
        f"SimPO step, bf16-mixed FSDP2 on 1 rank, {args.rows} rows x {args.row_tokens} tokens "
        f"(shared-prompt packing, {'real' if real else 'synthetic'} lengths), "
        f"FlexAttention{' (sdpa: dry run)' if args.cpu_dry_run else ''}, compile "
        f"{'on' if args.compile else 'off'}; MFU over {PEAK_BF16 / 1e12:.0f} TFLOP/s",
        "",
        table(["shape", "act. ckpt", "status", "tokens/s", "MFU", "peak GB", "step s"], rows),
        "",
        table(["kernel D x V, N tokens", "effective TFLOP/s", "naive time / fused"], kernels),
    ]
    best = {}
    for r in results:
        if r.status in ("ok", "fwd+bwd only") and r.mfu > best.get(r.shape, (0.0, ""))[0]:
            best[r.shape] = (r.mfu, f"AC {'on' if r.ac else 'off'}")
    head = [f"{s} MFU {100 * m:.1f}% ({how})" for s, (m, how) in best.items()]
    head += [f"kernel {kernels[-1][1]} TFLOP/s"] if kernels else []
    lines += ["", "gpu: " + "; ".join(head)]
    return "\n".join(lines)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU dry run"


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu: SKIPPED: no CUDA device (try --cpu-dry-run to exercise the code path)")
        return
    world = init_world()
    results = run_all(args, world)
    sizes = [(64, 1024, 512)] if args.cpu_dry_run else [(2048, 128256, 4096), (4096, 128256, 4096)]
    kernels = []
    for dim, vocab, n in sizes:
        tflops, speed = kernel_bench(world, dim, vocab, n)
        kernels.append([f"{dim} x {vocab}, {n}", f"{tflops:.1f}", f"{speed:.2f}"])
        print(f"kernel {kernels[-1]}", flush=True)
    text = report(args, results, kernels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    shutdown()


if __name__ == "__main__":
    main()
