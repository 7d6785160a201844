"""SimPO training step on one GPU: tokens/s, MFU, and the projected H100-hours of Gemma-2-9B-it.

Shapes (HF config.json fields of the real checkpoints, random weights): Llama-3.2-1B and
Llama-3-8B, and Gemma-2-9B (soft-caps on attention and logits, head_dim 256, alternating
local (4,096-position window) and global layers, tied 256k vocabulary). Each is built on
`meta`, sharded with `simpo.fsdp.parallelize` exactly as train.py does (FSDP2 on one rank,
bf16 compute, fp32 master weights and reductions) and trained with train.py's step,
`simpo.step.train_step` (whatever log-prob head and gradient sync the step uses), then
clipping and fused AdamW, on packed rows of 4,096 tokens (shared prompt) from the real length
distribution (the shared data and Mistral tokenizer when ../shared is there, else synthetic
pairs around its median lengths), FlexAttention, activation checkpointing off and on.

Gemma-2-9B (9.2B parameters, 148 GB of fp32 weights, gradients and AdamW state) does not fit
one GPU, so it runs with 2 and 6 of its 42 layers (AC on, train.py's CUDA default); the step
time is linear in the layer count, so the two give the fixed part (embedding, head, loss)
and the per-layer part, and with them the full model's tokens/s and MFU. From that,
`bench/projection.py` projects the GPU-hours of the official job (50k pairs, 1 epoch, 8
ranks), with the FSDP communication of 8 ranks estimated and stated.

MFU is torchtitan's: 6 x non-embedding parameters per token plus 12 x layers x heads x
head_dim x context for attention, counting real tokens only (`simpo.metrics.train_flops`,
the number train.py logs), over a dense bf16 peak of 989 TFLOP/s (H100/H200). Each run also
counts the host synchronisations inside `train_step` (CUDA's sync debug mode; goal 0). The
log-prob kernel is timed alone: effective TFLOP/s = 6 N V D per second, and against naive.
Decoding (`bench/decode.py`, the 1B and 8B shapes): tokens/s of simpo.generate.sample at 1
row and at 16 prompts x 4 samples, 128 prompt + 128 new tokens, the decode step compiled to
CUDA graphs, next to the memory-bandwidth bound (weight + KV bytes per step / HBM bandwidth).

One call runs everything (each configuration time-boxed; an out-of-memory configuration is
recorded and, with AdamW, retried without optimizer state) and writes the table to
$OUT/gpu_results.md (or --out) and stdout:

    python bench/gpu.py                     # CUDA only; prints a skip line elsewhere
    python bench/gpu.py --quick             # the Gemma-2-9B projection only (make bench)
    python bench/gpu.py --cpu-dry-run       # tiny shapes, sdpa, CPU: exercises the code path
    python bench/gpu.py --decode-only       # just the decoding table
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
import warnings
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
from bench.decode import DECODE_HEADER, DecodeResult, decode_bench, decode_table  # noqa: E402
from bench.projection import Job, Projection, describe, project  # noqa: E402
from bench.shapes import SHAPES, TRUNCATED, build, config_label, model_args  # noqa: E402
from simpo.config import LossConfig  # noqa: E402
from simpo.logprobs import naive_response_logprobs, response_logprobs  # noqa: E402
from simpo.metrics import matmul_params, peak_flops, train_flops  # noqa: E402
from simpo.model import Transformer  # noqa: E402
from simpo.packing import PackedBatch, pack_pairs  # noqa: E402
from simpo.step import train_step  # noqa: E402
from simpo.world import World, init_world, shutdown  # noqa: E402

PEAK_BF16 = 989e12  # H100 / H200 dense bf16


@dataclass
class Result:
    shape: str
    ac: bool
    status: str  # "ok", "fwd+bwd only" (AdamW state did not fit), "OOM", "timeout", "skipped"
    tokens_s: float = 0.0
    mfu: float = 0.0
    peak_gb: float = 0.0
    step_s: float = 0.0
    fwd_bwd_s: float = 0.0  # train_step alone (median)
    optimizer_s: float = 0.0  # clipping + AdamW (median)
    tokens_per_step: float = 0.0  # real tokens (mean over timed steps)
    context_per_step: float = 0.0  # attention context (mean over timed steps)
    host_syncs: int | None = None  # inside train_step, by CUDA's sync debug mode


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU, sdpa")
    p.add_argument("--quick", action="store_true", help="Gemma-2-9B projection only (make bench)")
    p.add_argument("--shapes", nargs="+", default=["gemma-2-9b", "llama-3.2-1b", "llama-3-8b"])
    p.add_argument("--row-tokens", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=4, help="micro-batches (rows) per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--config-budget-s", type=float, default=60, help="per config, after step 1")
    p.add_argument("--budget-s", type=float, default=400, help="start no config after this")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--busbw-gbs", type=float, default=Job.busbw_gbs, help="assumed NCCL GB/s")
    p.add_argument("--decode-only", action="store_true", help="only the decoding table")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding table")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")))
    args = p.parse_args()
    if args.quick:
        args.shapes, args.steps, args.no_decode = ["gemma-2-9b"], 3, True
    if args.cpu_dry_run:
        args.shapes = ["tiny (dry run)", "tiny gemma-2 (dry run)"]
        args.row_tokens, args.rows, args.steps = 256, 2, 2
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


def sync(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(world: World) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if world.device.type == "cuda" else peak_rss_gb()


def count_host_syncs(world: World, fn: Callable[[], object]) -> int | None:
    """Synchronising CUDA calls made by `fn` (torch.cuda.set_sync_debug_mode); None off CUDA."""
    if world.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_config(
    args: argparse.Namespace,
    world: World,
    shape: str,
    ac: bool,
    with_optimizer: bool,
    layers: int | None = None,
) -> Result:
    backend = "sdpa" if args.cpu_dry_run else "flex"
    model = build(world, model_args(shape, layers), ac, backend, args.compile)
    rows = step_rows(args, model.args.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    cfg = LossConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5)
    n_matmul, walls, fwd_bwd, opt = matmul_params(model), [], [], []
    flops = tokens = context = 0.0
    for k in range(args.steps + 2):  # 2 warmup steps: compilation, allocator, optimizer state
        micro = rows[k * args.rows : (k + 1) * args.rows]
        pairs = sum(mb.num_pairs for mb in micro)
        sync(world)
        t0 = time.perf_counter()
        train_step(model, micro, cfg, pairs, world)  # train.py's step
        sync(world)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(world)
        t2 = time.perf_counter()
        if k >= 2:
            walls.append(t2 - t0)
            fwd_bwd.append(t1 - t0)
            opt.append(t2 - t1)
            real = sum(mb.num_real_tokens for mb in micro)
            ctx = sum(mb.attention_context for mb in micro)
            tokens, context = tokens + real, context + ctx
            flops += train_flops(model.args, n_matmul, real, ctx)
        print(f"  step {k}: {t2 - t0:.2f} s", flush=True)
        if k == 0:  # the first step compiles FlexAttention: the time box starts after it
            deadline = time.monotonic() + args.config_budget_s
        elif time.monotonic() > deadline:
            break
    status = "ok" if with_optimizer else "fwd+bwd only"
    if not walls:
        return Result(shape, ac, "timeout")
    micro = rows[: args.rows]  # warm shapes: no compilation inside the check
    syncs = count_host_syncs(world, lambda: train_step(model, micro, cfg, 1, world))
    optimizer.zero_grad(set_to_none=True)
    peak = peak_flops(world.device) or PEAK_BF16
    total = sum(walls)
    return Result(
        shape, ac, status, tokens / total, flops / total / peak, peak_gb(world), median(walls),
        median(fwd_bwd), median(opt), tokens / len(walls), context / len(walls), syncs,
    )  # fmt: skip


def free(world: World) -> None:
    gc.collect()
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def configs(args: argparse.Namespace) -> list[tuple[str, bool, int | None]]:
    """(shape, activation checkpointing, layers or None for all) in the order they run."""
    out = []
    for shape in args.shapes:
        if shape in TRUNCATED:  # AC on: what train.py runs on CUDA
            out += [(shape, True, layers) for layers in TRUNCATED[shape]]
        else:
            out += [(shape, False, None), (shape, True, None)]
    return out


def run_all(args: argparse.Namespace, world: World) -> list[Result]:
    results, start = [], time.monotonic()
    for shape, ac, layers in configs(args):
        label = config_label(shape, layers)
        if time.monotonic() - start > args.budget_s:
            results.append(Result(label, ac, "skipped"))
            continue
        for with_optimizer in (True, False):
            what = "" if with_optimizer else ", without AdamW state"
            print(f"{label}, activation checkpointing {'on' if ac else 'off'}{what}", flush=True)
            try:
                result = run_config(args, world, shape, ac, with_optimizer, layers)
            except Exception as e:  # one device call runs everything: record it, go on
                if not is_oom(e):
                    traceback.print_exc()
                if args.cpu_dry_run and not is_oom(e):
                    raise  # the dry run is a test: a failure must fail it
                result = Result(shape, ac, "OOM" if is_oom(e) else f"error: {type(e).__name__}")
            result.shape = label
            free(world)
            print(f"  -> {result.status}: {result.tokens_s:,.0f} tokens/s, MFU "
                  f"{result.mfu:.1%}, peak {result.peak_gb:.1f} GB, host syncs in the step "
                  f"{result.host_syncs}", flush=True)  # fmt: skip
            if result.status != "OOM":
                break
        results.append(result)
    return results


def project_full(
    args: argparse.Namespace, peak: float, shape: str, results: list[Result]
) -> tuple[Result, Projection, Job] | None:
    """The full-depth step from the two truncated runs (fwd+bwd time = fixed part + per-layer
    part x layers), its MFU, and the job's projected GPU-hours; None if a run did not finish."""
    depth = SHAPES[shape]["num_hidden_layers"]
    (l1, l2), runs = TRUNCATED[shape], {}
    for r in results:
        for layers in (l1, l2):
            if r.shape == config_label(shape, layers) and r.status == "ok":
                runs[layers] = r
    if len(runs) < 2:
        return None
    per_layer = (runs[l2].fwd_bwd_s - runs[l1].fwd_bwd_s) / (l2 - l1)
    fwd_bwd = runs[l1].fwd_bwd_s + per_layer * (depth - l1)  # s per step, full depth
    tokens_s = runs[l1].tokens_per_step / fwd_bwd
    full = model_args(shape)
    with torch.device("meta"):  # parameter counts only
        model = Transformer(full)
        n_matmul, total = matmul_params(model), sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.model.layers.parameters())
        n_short = sum(p.numel() for p in Transformer(model_args(shape, l2)).parameters())
    flops = train_flops(full, n_matmul, runs[l1].tokens_per_step, runs[l1].context_per_step)
    mfu = flops / fwd_bwd / peak
    opt_per_param = runs[l2].optimizer_s / n_short  # AdamW + clipping, one GPU
    job = Job(busbw_gbs=args.busbw_gbs)
    proj = project(tokens_s, block, total - block, opt_per_param, job)
    row = Result(f"{shape} (all {depth} layers, fwd+bwd)", True, "projected")
    row.tokens_s, row.mfu, row.step_s = tokens_s, mfu, fwd_bwd
    return row, proj, job


def kernel_bench(
    world: World, dim: int, vocab: int, n: int, softcap: float | None
) -> tuple[float, float]:
    """(effective TFLOP/s of the log-prob kernel's forward+backward, time naive / kernel)."""
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
            out = fn(hidden, weight, index, targets, responses, n // 256, softcap=softcap)
            out[0].sum().backward()
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


DECODE_SHAPES = ("llama-3.2-1b", "llama-3-8b", "tiny (dry run)", "tiny gemma-2 (dry run)")


def run_decode(args: argparse.Namespace, world: World) -> list[DecodeResult]:
    """Decode tokens/s per shape at 1 row and at 16 prompts x 4 samples (dry run: smaller)."""
    prompt, new = (16, 8) if args.cpu_dry_run else (128, 128)
    out = []
    for shape in (s for s in args.shapes if s in DECODE_SHAPES):
        for prompts, samples in ((1, 1), (2, 2) if args.cpu_dry_run else (16, 4)):
            r = decode_bench(shape, SHAPES[shape], world.device, prompts, samples, prompt, new)
            print(f"decode {shape}, {r.rows} rows: {r.tokens_s:,.0f} tokens/s", flush=True)
            out.append(r)
            free(world)
    return out


def report(
    args: argparse.Namespace, results: list[Result], kernels: list[list], peak: float,
    decode: list[DecodeResult],
) -> str:  # fmt: skip
    projections, notes, head = [], [], []
    for shape in (s for s in args.shapes if s in TRUNCATED):
        projected = project_full(args, peak, shape, results)
        if projected is None:
            head.append(f"{shape}: not projected (a truncated run did not finish)")
            continue
        row, proj, job = projected
        projections.append(row)
        notes.append(f"{shape}: {describe(proj, job, device_kind())}.")
        head.append(
            f"{shape} {proj.gpu_hours_overlapped:.1f}-{proj.gpu_hours_serial:.1f} "
            f"{device_kind()}-hours projected for {job.pairs // 1000}k pairs (slides: 16)"
        )
    best = {}
    for r in [*results, *projections]:
        if r.status in ("ok", "fwd+bwd only", "projected") and "layers)" not in r.shape:
            if r.mfu >= best.get(r.shape, (0.0, ""))[0]:
                best[r.shape] = (r.mfu, f"AC {'on' if r.ac else 'off'}")
    head = [f"{s} MFU {100 * m:.1f}% ({how})" for s, (m, how) in best.items()] + head
    head += [f"kernel {kernels[-1][1]} TFLOP/s"] if kernels else []
    head += [f"decode {r.shape} x{r.rows} {r.tokens_s:,.0f} tok/s" for r in decode]
    decoding = [
        "", "Decoding (simpo.generate.sample, temperature 0.8, top-p 0.95; bound = rows x HBM "
        "bandwidth / (weight + KV bytes per step)):", "",
        table(DECODE_HEADER, decode_table(decode)),
    ] if decode else []  # fmt: skip
    rows = [
        [r.shape, "on" if r.ac else "off", r.status, f"{r.tokens_s:,.0f}", f"{100 * r.mfu:.1f}%",
         f"{r.peak_gb:.1f}", f"{r.step_s:.2f}", "-" if r.host_syncs is None else r.host_syncs]
        for r in [*results, *projections]
    ]  # fmt: skip
    headers = ["shape", "act. ckpt", "status", "tokens/s", "MFU", "peak GB", "step s"]
    headers.append("host syncs in step")
    real = PREFS.is_file() and not args.cpu_dry_run
    return "\n".join([
        f"# bench/gpu.py  ({machine()}, {device_name()})",
        "",
        f"SimPO step (simpo.step.train_step + clip + fused AdamW), bf16-mixed FSDP2 on 1 rank, "
        f"{args.rows} rows x {args.row_tokens} tokens (shared-prompt packing, "
        f"{'real' if real else 'synthetic'} lengths), FlexAttention"
        f"{' (sdpa: dry run)' if args.cpu_dry_run else ''}, compile "
        f"{'on' if args.compile else 'off'}; MFU over {peak / 1e12:.0f} TFLOP/s",
        "",
        table(headers, rows),
        "",
        table(["kernel D x V (soft-cap), N tokens", "effective TFLOP/s", "naive time / kernel"],
              kernels),
        "",
        *decoding,
        "",
        *notes,
        "",
        "gpu: " + "; ".join(head),
    ])  # fmt: skip


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU dry run"


def device_kind() -> str:
    """H100, H200, ... from the device name (what the projected GPU-hours are hours of)."""
    name = device_name()
    return next((k for k in ("H100", "H200", "A100", "B200") if k in name), name)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu: SKIPPED: no CUDA device (try --cpu-dry-run to exercise the code path)")
        return
    world = init_world()
    results = [] if args.decode_only else run_all(args, world)
    if args.decode_only:
        sizes = []
    elif args.cpu_dry_run:
        sizes = [(64, 1024, 512, None), (64, 1024, 512, 30.0)]
    else:  # Llama-3 1B and 8B heads, Gemma-2-9B's (tied, soft-capped)
        sizes = [] if args.quick else [(2048, 128256, 4096, None), (4096, 128256, 4096, None)]
        sizes += [(3584, 256000, 4096, 30.0)]
    kernels = []
    for dim, vocab, n, softcap in sizes:
        cap = "" if softcap is None else f" (cap {softcap:g})"
        try:
            tflops, speed = kernel_bench(world, dim, vocab, n, softcap)
        except Exception as e:  # keep the configurations' results
            if args.cpu_dry_run:
                raise
            traceback.print_exc()
            kernels.append([f"{dim} x {vocab}{cap}, {n}", f"error: {type(e).__name__}", "-"])
            continue
        kernels.append([f"{dim} x {vocab}{cap}, {n}", f"{tflops:.1f}", f"{speed:.2f}"])
        print(f"kernel {kernels[-1]}", flush=True)
    decode = [] if args.no_decode else run_decode(args, world)
    text = report(args, results, kernels, peak_flops(world.device) or PEAK_BF16, decode)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    shutdown()


if __name__ == "__main__":
    main()
