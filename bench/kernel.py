"""Benchmark: the chunked log-prob kernel against naive full logits, forward + backward, fp32 CPU.

Each (variant, N) runs in its own subprocess, so peak RSS (`ru_maxrss`) belongs to that run
alone. "extra" is the peak minus the RSS once the inputs exist; "work" is extra minus the
gradients both variants must return (d hidden (N, D) and d weight (V, D)), i.e. the memory the
computation itself needs: O(N x V) for naive, O(chunk x V) for the kernel. Results are checked
equal (sums, d hidden, sampled rows of d weight). The last line printed is the headline.

    python bench/kernel.py             # V = 256,000, D = 2,048, N = 2,048 and 4,096 (minutes)
    python bench/kernel.py --quick     # V = 32,000, D = 512, N = 256 and 512, chunk 128
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
from simpo.logprobs import naive_response_logprobs, response_logprobs  # noqa: E402

GIB = 2**30
RESPONSE_TOKENS = 256  # scored tokens per response


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(variant: str, n: int, vocab: int, dim: int, chunk: int, out: str) -> None:
    """One forward + backward of `variant`; prints a JSON line, saves results to `out`."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # if memory runs out after all, this process is the one to go
    fn = response_logprobs if variant == "kernel" else naive_response_logprobs
    kw = {"chunk_size": chunk} if variant == "kernel" else {}

    def step(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(targets))  # hidden row t scores token t
        ids = rows // RESPONSE_TOKENS  # responses straddle chunk borders
        sums, _ = fn(hidden, weight, rows, targets, ids, int(ids[-1]) + 1, **kw)
        upstream = torch.linspace(-1, 1, len(sums))  # d loss / d sum per response
        (sums * upstream).sum().backward()
        return sums.detach()

    # warm-up on tiny inputs: libraries load and first-call costs are paid before measuring
    step(
        torch.randn(8, dim, requires_grad=True),
        torch.randn(64, dim, requires_grad=True),
        torch.arange(8),
    )
    torch.manual_seed(0)
    hidden = torch.randn(n, dim).requires_grad_()  # (N, D)
    weight = torch.randn(vocab, dim).mul_(0.02).requires_grad_()  # (V, D), no temporary
    targets = torch.randint(0, vocab, (n,))
    base, start = _rss_now(), time.perf_counter()
    sums = step(hidden, weight, targets)
    seconds, extra = time.perf_counter() - start, _rss_peak() - base
    grads = (hidden.numel() + weight.numel()) * 4  # d hidden, d weight: both variants return them
    rows = torch.cat([targets[:256], torch.arange(256)])  # sampled rows of d weight (V, D)
    torch.save({"sums": sums, "d_hidden": hidden.grad, "d_weight": weight.grad[rows]}, out)
    print(json.dumps({"seconds": seconds, "extra": extra, "work": extra - grads}))


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _run(variant: str, n: int, vocab: int, dim: int, chunk: int, tmp: str) -> dict:
    """`worker` in a fresh process: its JSON line plus the saved results under "data"."""
    out = os.path.join(tmp, f"{variant}.pt")
    cmd = [sys.executable, __file__, "--worker", variant, "--sizes", str(n), "--vocab", str(vocab),
           "--dim", str(dim), "--chunk", str(chunk), "--out", out]  # fmt: skip
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {**json.loads(stdout.strip().splitlines()[-1]), "data": torch.load(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for `make bench`")
    parser.add_argument("--sizes", default=None, help="comma-separated N (scored tokens)")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None, help="kernel chunk_size")
    parser.add_argument("--worker", choices=["kernel", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    vocab = args.vocab or (32_000 if args.quick else 256_000)
    dim = args.dim or (512 if args.quick else 2048)
    chunk = args.chunk or (128 if args.quick else 1024)  # same N / chunk ratios in both modes
    sizes = [int(s) for s in (args.sizes or ("256,512" if args.quick else "2048,4096")).split(",")]
    if args.worker:
        return worker(args.worker, sizes[0], vocab, dim, chunk, args.out)

    print(f"kernel vs naive, forward + backward: V={vocab:,} D={dim:,} chunk={chunk} fp32 CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")  # fmt: skip
    print("| N | variant | time s | extra GiB | work GiB | max rel diff: sum, d hidden, d weight |")
    print("| --- | --- | --- | --- | --- | --- |")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            # naive peaks with 3 fp32 (N, V) blocks alive (saved log-softmax, its incoming and
            # outgoing grads) next to weight and its grad; never run it into the OOM killer
            need = 3 * n * vocab * 4 + 2 * vocab * dim * 4 + GIB
            if need > 0.9 * _available():
                print(f"| {n:,} | skipped: naive needs ~{need / GIB:.1f} GiB | | | | |")
                continue
            naive = _run("naive", n, vocab, dim, chunk, tmp)
            kernel = _run("kernel", n, vocab, dim, chunk, tmp)
            keys = ("sums", "d_hidden", "d_weight")
            diff = ", ".join(f"{_rel(kernel['data'][k], naive['data'][k]):.1e}" for k in keys)
            for name, r, note in (("naive", naive, "reference"), ("kernel", kernel, diff)):
                print(f"| {n:,} | {name} | {r['seconds']:.1f} | {r['extra'] / GIB:.2f} | "
                      f"{r['work'] / GIB:.2f} | {note} |")  # fmt: skip
            ratios.append([kernel[k] / naive[k] for k in ("work", "extra", "seconds")])
    if not ratios:
        print("headline: not measured (not enough memory for naive)")
        return
    work, extra, speed = (max(r[i] for r in ratios) for i in range(3))
    note = "quick sizes, fixed costs dominate; " if args.quick else ""
    print(
        f"headline: kernel work memory = {work:.3f}x naive (extra incl. grads {extra:.2f}x), "
        f"time = {speed:.2f}x naive ({note}worst over N; targets <= 0.125x, <= 1.3x)"
    )


if __name__ == "__main__":
    main()
