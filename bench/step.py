"""One full training step: SimPO vs DPO with a precomputed reference vs DPO with a live one.

Each variant runs train.py's step on the same small Llama-shaped model (random weights, built
with `simpo.fsdp.build_model` like train.py: FSDP2 on one rank, fp32 on CPU) and the same
pairs (real lengths from ../shared/data/alpaca_eval_prefs.jsonl, Mistral tokenizer, packed
with the shared prompt into micro-batches of `--max-tokens`): forward with the loss fused
into the head pass, backward, gradient clipping, AdamW. DPO-precompute reads
the reference sums from a `ReferenceTable` (scored once before training by
`simpo.reference.precompute_reference`); DPO-live runs a second, frozen model under no_grad
through the chunked kernel. The step is `simpo.step.train_step` (the loss fused into the head
pass, one gradient sync per step), then clipping and fused AdamW, as in train.py;
`simpo-two-pass` is SimPO with `train.fused_loss = false` (log-probs from the two-pass
kernel, then the loss, then autograd: 4 vocabulary GEMMs per token instead of 3).

DPO-live's floor: the reference adds one forward to the policy's forward + backward (~3
forwards), so ~1.33x without activation checkpointing and ~1.25x with it (the policy then
recomputes each block: 4 forwards), which is train.py's default on CUDA
(`--activation-checkpointing`).

Times: the three variants interleaved step by step in one process (medians of wall clock
and of process CPU time; on a busy shared machine the CPU time is the steadier one). Peak
memory: each variant alone in its own process (peak RSS, and "step memory": the peak above
the RSS after imports and data). Both DPO variants start with reference == policy, so their
first losses must be log 2.

    python bench/step.py [--quick] [--activation-checkpointing]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    PREFS,
    Timings,
    emit,
    interleaved_times,
    machine,
    median,
    rss_gb,
    run_child,
    sample_pairs,
    spread,
    synthetic_pairs,
    table,
)
from simpo.config import Config  # noqa: E402
from simpo.fsdp import build_model  # noqa: E402
from simpo.hf import save_hf  # noqa: E402
from simpo.model import ModelArgs, Transformer  # noqa: E402
from simpo.packing import plan_micro_batches  # noqa: E402
from simpo.reference import precompute_reference, reference_for  # noqa: E402
from simpo.step import train_step  # noqa: E402
from simpo.world import World, init_world, shutdown  # noqa: E402

VARIANTS = ("simpo", "simpo-two-pass", "dpo-precompute", "dpo-live")
VOCAB = 32000  # the Mistral tokenizer's


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, 5 timed steps (make bench)")
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4, help="timed steps per variant")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per micro-batch row")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads (1: on a shared 2-core box two OpenMP threads spin-wait on each "
        "other at random, which swings both wall and CPU time)",
    )  # fmt: skip
    p.add_argument(
        "--activation-checkpointing", action="store_true",
        help="recompute each block in backward (train.py's default on CUDA; off on CPU)",
    )  # fmt: skip
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.pairs_per_step, args.repeats, args.dim, args.layers = 2, 5, 128, 2
    return args


def write_model(path: Path, dim: int, layers: int, seed: int) -> None:
    """A random Llama-shaped HF-format checkpoint that build_model loads like a real one."""
    args = ModelArgs(
        model_type="llama", vocab_size=VOCAB, dim=dim, n_layers=layers, n_heads=dim // 64,
        n_kv_heads=dim // 64, head_dim=64, intermediate_size=dim * 8 // 3,
        layer_types=("full_attention",) * layers,
    )  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed)
    save_hf(model, path)


def step_data(args: argparse.Namespace) -> list[list]:
    """The pairs of each step (1 warmup + repeats), the same in every process."""
    n = args.pairs_per_step * (1 + args.repeats)
    pairs = sample_pairs(n, args.seed) if PREFS.is_file() else synthetic_pairs(n, args.seed, VOCAB)
    B = args.pairs_per_step
    return [pairs[i : i + B] for i in range(0, n, B)]


def make_step(
    variant: str, model_dir: Path, world: World, steps: list[list], args: argparse.Namespace
) -> tuple[Callable[[int], float], float]:
    """Build what `variant` needs; return (step(k) -> loss of step k, reference precompute s)."""
    cfg = Config()
    max_tokens = args.max_tokens
    cfg.train.precision, cfg.data.max_tokens = "fp32", max_tokens
    simpo = variant.startswith("simpo")
    cfg.loss.name, cfg.loss.beta = ("simpo", 2.0) if simpo else ("dpo", 0.1)
    fused = variant != "simpo-two-pass"  # the step's default: the loss fused into the head
    t0 = time.perf_counter()
    table = ref_model = None
    if variant == "dpo-precompute":  # (pairs, 2) sums scored once, before the policy exists
        cache = Path(tempfile.mkdtemp(dir=model_dir.parent))  # fresh: no cache hit
        every_pair = {"train": [p for s in steps for p in s]}
        table = precompute_reference(model_dir, every_pair, cfg, world, cache)["train"]
    elif variant == "dpo-live":  # a frozen second model, as train.py builds it
        ref_model = build_model(model_dir, world, "fp32", trainable=False)
    precompute_s = time.perf_counter() - t0
    model = build_model(model_dir, world, "fp32", args.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    micro = [plan_micro_batches(s, max_tokens) for s in steps]

    reference = reference_for(table, ref_model)

    def step(k: int) -> float:  # train.py's step, without logging
        sums = train_step(
            model, micro[k], cfg.loss, len(steps[k]), world, reference, fused_loss=fused
        )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(sums["loss"]) / len(steps[k])

    return step, precompute_s


def child(args: argparse.Namespace) -> None:
    """One variant alone, for its peak RSS: a warmup step and one more."""
    world = init_world()
    steps = step_data(args)[:2]
    base = rss_gb()
    step, _ = make_step(args.child, args.work / "model", world, steps, args)
    emit({"base_gb": base, "loss": [step(k) for k in range(len(steps))]})
    del step
    shutdown()


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    print(f"# step  ({machine()})", flush=True)
    if not PREFS.is_file():
        print(f"{PREFS} is absent: synthetic pairs around the real median lengths")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(work / "model", args.dim, args.layers, args.seed)
        memory = {}
        for variant in VARIANTS:  # each alone in a fresh process, for its peak RSS
            argv = [sys.executable, __file__, *sys.argv[1:], "--child", variant, "--work", tmp]
            result = run_child(argv, cap_gb=12)
            if result.result is None:
                sys.exit(f"step: {variant} failed:\n{result.log_tail}")
            memory[variant] = (result.peak_gb, result.peak_gb - result.result["base_gb"])
            print(f"{variant}: peak RSS {result.peak_gb:.2f} GB", flush=True)
        world = init_world()
        steps = step_data(args)
        built = {v: make_step(v, work / "model", world, steps, args) for v in VARIANTS}
        fns = {v: fn for v, (fn, _) in built.items()}
        times, losses = interleaved_times(fns, warmup=1, repeats=args.repeats)
        precompute_s = built["dpo-precompute"][1]
        del built, fns
        shutdown()
    report(args, steps, times, losses, memory, precompute_s)


def report(
    args: argparse.Namespace,
    steps: list[list],
    times: dict[str, Timings],
    losses: dict[str, list],
    memory: dict[str, tuple[float, float]],
    precompute_s: float,
) -> None:
    for v in ("dpo-precompute", "dpo-live"):  # reference == policy at step 0: h = 0
        if abs(losses[v][0] - math.log(2)) > 1e-4:
            sys.exit(f"step: {v} first loss {losses[v][0]:.6f}, expected log 2")
    wall = {v: median(t.wall) / median(times["simpo"].wall) for v, t in times.items()}
    cpu = {v: median(t.cpu) / median(times["simpo"].cpu) for v, t in times.items()}
    mem = {v: memory[v][1] / memory["simpo"][1] for v in VARIANTS}
    rows = [
        [v, spread(times[v].wall), f"{wall[v]:.2f}", f"{median(times[v].cpu):.2f}",
         f"{cpu[v]:.2f}", f"{memory[v][0]:.2f}", f"{memory[v][1]:.2f}", f"{mem[v]:.2f}"]
        for v in VARIANTS
    ]  # fmt: skip
    headers = ["variant", "wall s median [min-max]", "wall vs SimPO", "CPU s", "CPU vs SimPO"]
    headers += ["peak RSS GB", "above baseline GB", "memory vs SimPO"]
    print("\n" + table(headers, rows))
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in steps[0])
    print(
        f"\nmodel dim {args.dim} x {args.layers} layers, vocab {VOCAB}, fp32, {args.threads} "
        f"thread(s), activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
        f"{args.pairs_per_step} pairs (~{tokens} tokens) per step, {args.repeats} timed steps; "
        f"DPO-precompute scored {sum(map(len, steps))} pairs in {precompute_s:.1f} s before "
        f"training; first losses {', '.join(f'{v} {losses[v][0]:.4f}' for v in VARIANTS)}"
    )
    live, pre, two = "dpo-live", "dpo-precompute", "simpo-two-pass"
    print(
        f"step: DPO-live {cpu[live]:.2f}x SimPO's step time (CPU; wall {wall[live]:.2f}x) and "
        f"{mem[live]:.2f}x its step memory; DPO-precompute {cpu[pre]:.2f}x time (wall "
        f"{wall[pre]:.2f}x), {mem[pre]:.2f}x memory; SimPO without the fused loss "
        f"{cpu[two]:.2f}x time (wall {wall[two]:.2f}x), {mem[two]:.2f}x memory"
    )


if __name__ == "__main__":
    main()
