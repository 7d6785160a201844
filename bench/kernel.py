"""Benchmark: the head's three paths for a SimPO loss, forward + backward, fp32 CPU.

- naive: full (N, V) logits, `naive_response_logprobs`, `compute_loss`, autograd (3 GEMMs);
- kernel: the two-pass chunked `response_logprobs` + `compute_loss` (4 GEMMs: the backward
  recomputes the logits); the path scoring and the reference pass use;
- fused: `fused_preference_loss` (3 GEMMs: the loss gradient is formed in the forward).

Each (variant, size) runs in its own subprocess, so peak RSS (`ru_maxrss`) belongs to that
run alone. "extra" is the peak minus the RSS once the inputs exist. "work" is the memory the
computation needs beyond the gradients every variant returns (d hidden (N, D), d weight
(V, D), fp32, G bytes): the larger of the forward's peak (minus G for fused, which allocates
them there) and the whole run's peak minus G. For the chunked paths, whose peaks come with
the gradients alive, that is exact; for naive it is a lower bound: with a block B = 4NV
bytes, its forward holds two blocks (logits and log-probs) and its backward three (the
log-probs and their incoming and outgoing gradients) before d weight exists, so subtracting
G from its peak undercounts once G > B. The chunked paths hold one (chunk, V) buffer whose
rows follow from the byte budget and are capped at 1/6 of one block (`chunk_rows`), i.e.
<= 1/12 of naive's two; the fused loss grows its chunk to the longest pair within the budget
(`fused_chunk_rows`: no 4th GEMM), so with few long pairs per batch its buffer is one pair's
rows (e.g. 1/2 of a block for two pairs). Results are checked equal (loss, d hidden, sampled rows of
d weight). Workers run with `MALLOC_MMAP_THRESHOLD_=65536` (MALLOC_ENV), one thread each.

    python bench/kernel.py                  # time: V 256k, D 2048, N 1024 and 2048 (~40 min)
    python bench/kernel.py --quick          # V 32k, D 512, N 512 and 1024; curve at V 32k
    python bench/kernel.py --curve          # memory: N 1k..32k x V 32k..256k at D 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simpo.config import LossConfig  # noqa: E402
from simpo.fused_loss import fused_chunk_rows, fused_preference_loss, pair_loss  # noqa: E402
from simpo.logprobs import (  # noqa: E402
    DEFAULT_CHUNK_BYTES,
    ScoreIndex,
    chunk_rows,
    naive_response_logprobs,
    response_logprobs,
)
from simpo.losses import compute_loss  # noqa: E402

GIB, MIB = 2**30, 2**20
VARIANTS = ("naive", "kernel", "fused")
# One thread per worker: on this shared 2-core box two OpenMP threads spin-wait for each other
# whenever one is descheduled (a parallel index_add_ measured 300x slower), which charges the
# variants with the most small kernel calls; --threads changes it.
OPTIONS = {"threads": 1}
# glibc maps every allocation above 64 KiB on its own, so a freed tensor leaves the RSS at
# once. Its default (a threshold that grows to 32 MiB) keeps freed chunk-sized blocks resident
# in its heap: up to ~30 MiB more peak RSS, as much as a small chunk buffer itself.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forward(variant: str, hidden, weight, score: ScoreIndex, chunk_bytes: int) -> torch.Tensor:
    """The SimPO loss over the batch's pairs (mean over pairs), ready for its backward."""
    cfg, scale = LossConfig(), 2 / score.num_responses
    if variant == "fused":
        loss = fused_preference_loss(
            hidden, weight, score, pair_loss(cfg), scale, chunk_bytes=chunk_bytes
        ).loss
    else:
        fn = naive_response_logprobs if variant == "naive" else response_logprobs
        kw = {} if variant == "naive" else {"chunk_bytes": chunk_bytes}
        sums, counts = fn(hidden, weight, *score, **kw)
        loss = compute_loss(cfg, sums, counts)[0].sum() * scale
    return loss


def make_inputs(n: int, vocab: int, dim: int, response: int, seed: int = 0):
    """Hidden (N, D), weight (V, D), and N scored tokens in responses of `response` tokens
    (2 per pair), each predicted by its own hidden row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).mul_(0.02).requires_grad_()  # no temporary
    rows = torch.arange(n)
    score = ScoreIndex(rows, torch.randint(0, vocab, (n,), generator=g), rows // response,
                       n // response)  # fmt: skip
    return hidden, weight, score


def worker(variant: str, n: int, vocab: int, dim: int, response: int, budget: int, out: str):
    """One forward + backward of `variant`; prints a JSON line, saves results to `out`."""
    torch.set_num_threads(OPTIONS["threads"])
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # if memory runs out after all, this process is the one to go
    forward(variant, *make_inputs(2 * response, 64, dim, response), budget).backward()  # warm-up
    hidden, weight, score = make_inputs(n, vocab, dim, response)
    base, start, cpu = _rss_now(), time.perf_counter(), time.process_time()
    loss = forward(variant, hidden, weight, score, budget)
    forward_extra = _rss_peak() - base
    loss.backward()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = _rss_peak() - base
    grads = (hidden.numel() + weight.numel()) * 4  # d hidden, d weight: every variant's output
    work = max(forward_extra - (grads if variant == "fused" else 0), extra - grads)
    rows = torch.cat([score.targets[:256], torch.arange(256)])  # sampled rows of d weight
    data = {"loss": loss.detach(), "d_hidden": hidden.grad, "d_weight": weight.grad[rows]}
    torch.save(data, out)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "extra": extra, "work": work,
                      "forward_extra": forward_extra}))  # fmt: skip


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def run(variant: str, n: int, vocab: int, dim: int, response: int, budget: int, tmp: str):
    """`worker` in a fresh process: its JSON line plus the saved results under "data"."""
    out = os.path.join(tmp, f"{variant}.pt")
    cmd = [sys.executable, __file__, "--worker", variant, "--sizes", str(n), "--vocab",
           str(vocab), "--dim", str(dim), "--response", str(response), "--chunk-mib",
           str(budget / MIB), "--threads", str(OPTIONS["threads"]), "--out", out]  # fmt: skip
    env = os.environ | MALLOC_ENV
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return {**json.loads(stdout.strip().splitlines()[-1]), "data": torch.load(out)}


def naive_fits(n: int, vocab: int, dim: int, limit: float) -> bool:
    """Whether naive's three (N, V) blocks, weights and grads fit in `limit` bytes."""
    return 3 * n * vocab * 4 + 2 * vocab * dim * 4 + GIB <= min(limit, 0.8 * _available())


def naive_bound(n: int, vocab: int) -> int:
    """Naive's work memory, at least: the two fp32 (N, V) blocks its forward holds."""
    return 2 * 4 * n * vocab


def time_table(sizes, vocab, dim, response, budget, quick) -> str:
    print(f"naive vs kernel vs fused, SimPO loss, forward + backward: V={vocab:,} D={dim:,} "
          f"{response}-token responses, chunk budget {budget / MIB:.0f} MiB, fp32 CPU, "
          f"torch {torch.__version__}, {OPTIONS['threads']} thread(s) per worker\n")  # fmt: skip
    print(
        "| N | rows/chunk | variant | time s | CPU s | extra GiB | work GiB | work / naive "
        "| max rel diff vs naive: loss, d hidden, d weight |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            if not naive_fits(n, vocab, dim, 22 * GIB):
                print(f"| {n:,} | skipped: naive needs more memory than is free | | | | | | | |")
                continue
            rows = {
                "naive": n,  # one (N, V) block
                "kernel": chunk_rows(n, vocab, dim, chunk_bytes=budget),
                "fused": fused_chunk_rows(n, vocab, dim, 2 * response, chunk_bytes=budget),
            }
            r = {v: run(v, n, vocab, dim, response, budget, tmp) for v in VARIANTS}
            for v in VARIANTS:
                diff = ", ".join(f"{_rel(r[v]['data'][k], r['naive']['data'][k]):.1e}"
                                 for k in ("loss", "d_hidden", "d_weight"))  # fmt: skip
                print(f"| {n:,} | {rows[v]} | {v} | {r[v]['seconds']:.1f} | {r[v]['cpu']:.1f} | "
                      f"{r[v]['extra'] / GIB:.2f} | {r[v]['work'] / GIB:.3f} | "
                      f"{r[v]['work'] / r['naive']['work']:.3f} | "
                      f"{'reference' if v == 'naive' else diff} |")  # fmt: skip
            ratios.append({v: {k: r[v][k] / r["naive"][k] for k in ("seconds", "cpu", "work")}
                           for v in ("kernel", "fused")})  # fmt: skip
    if not ratios:
        return "time: not measured (not enough memory for naive)"
    worst = {v: {k: max(x[v][k] for x in ratios) for k in ("seconds", "cpu", "work")}
             for v in ("kernel", "fused")}  # fmt: skip
    note = "quick sizes; " if quick else ""
    fused, kernel = worst["fused"], worst["kernel"]
    return (f"time: fused {fused['seconds']:.2f}x naive (CPU {fused['cpu']:.2f}x), "
            f"kernel {kernel['seconds']:.2f}x (CPU {kernel['cpu']:.2f}x); work memory fused "
            f"{worst['fused']['work']:.3f}x, kernel {worst['kernel']['work']:.3f}x naive "
            f"({note}worst over N; goals <= 1.0x time, <= 0.125x memory)")  # fmt: skip


def curve_table(sizes, vocabs, dim, response, budget, quick) -> str:
    """Work memory of kernel and fused over N x V, against naive's two-block bound; naive
    measured too where it fits, to show that it holds at least those two blocks."""
    print(f"\nmemory curve: D={dim}, {response}-token responses, chunk budget "
          f"{budget / MIB:.0f} MiB, fp32 CPU; naive = two (N, V) fp32 blocks (its forward's "
          "logits and log-probs), measured where it fits in 6 GiB\n")  # fmt: skip
    print(
        "| N | V | rows/chunk: kernel, fused | naive: 2 blocks GiB | naive measured: forward, "
        "work GiB | kernel work MiB | fused work MiB | kernel / naive | fused / naive |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = {"kernel": 0.0, "fused": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            for n in sizes:
                r = {v: run(v, n, vocab, dim, response, budget, tmp) for v in ("kernel", "fused")}
                bound, measured = naive_bound(n, vocab), "not run (too large)"
                if naive_fits(n, vocab, dim, 6 * GIB):
                    m = run("naive", n, vocab, dim, response, budget, tmp)
                    measured = f"{m['forward_extra'] / GIB:.3f}, {m['work'] / GIB:.3f}"
                ratios = {v: r[v]["work"] / bound for v in r}
                for k, x in ratios.items():
                    worst[k] = max(worst[k], x)
                fused_rows = fused_chunk_rows(n, vocab, dim, 2 * response, chunk_bytes=budget)
                print(f"| {n:,} | {vocab:,} | {chunk_rows(n, vocab, dim, chunk_bytes=budget)}, "
                      f"{fused_rows} | "
                      f"{bound / GIB:.3f} | {measured} | {r['kernel']['work'] / MIB:.1f} | "
                      f"{r['fused']['work'] / MIB:.1f} | {ratios['kernel']:.4f} | "
                      f"{ratios['fused']:.4f} |", flush=True)  # fmt: skip
    note = "quick grid; " if quick else ""
    return (
        f"curve: work memory <= {worst['kernel']:.3f}x naive (kernel), "
        f"{worst['fused']:.3f}x (fused) ({note}worst over the grid; goal <= 0.125x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for `make bench`")
    parser.add_argument("--curve", action="store_true", help="the memory curve over N x V")
    parser.add_argument("--sizes", default=None, help="comma-separated N (scored tokens)")
    parser.add_argument("--vocab", default=None, help="V (comma-separated for --curve)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--response", type=int, default=None, help="tokens per response")
    parser.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / MIB)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = int(args.chunk_mib * MIB)
    OPTIONS["threads"] = args.threads
    if args.worker:
        n, vocab = int(args.sizes), int(args.vocab)
        return worker(args.worker, n, vocab, args.dim, args.response, budget, args.out)

    headlines = []
    if not args.curve:
        sizes = args.sizes or ("512,1024" if args.quick else "1024,2048")
        vocab = int(args.vocab or (32_000 if args.quick else 256_000))
        dim = args.dim or (512 if args.quick else 2048)
        response = args.response or (32 if args.quick else 128)
        sizes = [int(s) for s in sizes.split(",")]
        headlines.append(time_table(sizes, vocab, dim, response, budget, args.quick))
    if args.curve or args.quick:
        full = "1024,2048,4096,8192,16384,32768"
        sizes = [int(s) for s in (args.sizes if args.curve and args.sizes else
                                  ("1024,2048" if args.quick else full)).split(",")]  # fmt: skip
        vocab_list = args.vocab if args.curve and args.vocab else "32000,256000"
        vocab_list = "32000" if args.quick and not args.vocab else vocab_list
        vocabs = [int(v) for v in vocab_list.split(",")]
        dim = args.dim if args.curve and args.dim else 64
        response = args.response if args.curve and args.response else 256
        headlines.append(curve_table(sizes, vocabs, dim, response, budget, args.quick))
    print()
    for line in headlines[:-1]:
        print(line)
    print("headline: " + " | ".join(headlines))


if __name__ == "__main__":
    main()
