"""A SimPO step on a real model (SmolLM2-135M-Instruct, fp32, CPU): ours vs TRL's CPOTrainer.

bench/vs_trl.py compares the two on a tiny random Llama where the vocabulary dominates; this
runs the same two children (`vs_trl.trl_child`, `vs_trl.ours_child`) on the real 135M model
(30 layers, vocab 49,152, tied embeddings), fetched and converted by `python -m simpo.fetch`,
with real AlpacaEval pairs in SmolLM2's chatml prompt, tokenised by TRL's own `tokenize_row`
with the converted tokenizer.json (our side gets TRL's token ids). Reports tokens/s (the
tokens of the timed pairs, prompt counted once per response as TRL sees them, over the step
time), pairs/s and each side's peak RSS; the first-batch losses must agree to 1e-4.

    pip install -e '.[bench,gguf]'     # transformers, trl, tokenizers, gguf
    python bench/real_model.py [--quick] [--pairs-per-step 2] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import vs_trl  # noqa: E402
from bench.common import PREFS, ChildResult, machine, median, run_child, spread, table  # noqa: E402

CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # the model's own turns
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 timed step, 1 round (make bench)")
    p.add_argument("--pairs-per-step", type=int, default=2, help="B, the same on both sides")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child, after 1 warmup")
    p.add_argument("--rounds", type=int, default=2, help="TRL, ours, TRL, ours, ... children")
    p.add_argument("--max-length", type=int, default=256, help="max tokens of prompt + answer")
    p.add_argument("--max-tokens", type=int, default=4096, help="our micro-batch row length")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--cap-gb", type=float, default=14.0, help="kill a child above this RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["trl", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 1, 1
    return args


def missing_requirements() -> str | None:
    for module in ("transformers", "trl", "gguf"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install -e '.[bench,gguf]'"
    if not PREFS.is_file():
        return f"{PREFS.parent} is absent (../shared/data beside the repository)"
    return None


def write_inputs(work: Path, model: Path, num_pairs: int, seed: int) -> None:
    """The sampled pairs as chatml text (work/text.json), the tokenizer files (work/tokenizer)."""
    lines = PREFS.read_text().splitlines()
    rows = []
    for i in sorted(random.Random(seed).sample(range(len(lines)), num_pairs)):
        row = json.loads(lines[i])
        rows.append(
            {
                "index": i,
                "prompt": CHATML.format(row["prompt"]),
                "chosen": row["chosen"][-1]["content"],  # TRL appends EOS = <|im_end|>
                "rejected": row["rejected"][-1]["content"],
            }
        )
    (work / "text.json").write_text(json.dumps(rows))
    (work / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(model / name, work / "tokenizer" / name)


def step_tokens(work: Path, args: argparse.Namespace) -> list[int]:
    """Tokens of each step's pairs as TRL sees them: (prompt + chosen) + (prompt + rejected)."""
    pairs = json.loads((work / f"pairs-{args.max_length}.json").read_text())
    B = args.pairs_per_step
    sizes = [2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    return [sum(sizes[s : s + B]) for s in range(0, len(sizes) - B + 1, B)]


def report(args: argparse.Namespace, sides: dict[str, list[ChildResult]], tokens: list[int]):
    timed = tokens[1 : args.steps + 1]  # the warmup batch is not timed
    rows, stats = [], {}
    for side, children in sides.items():
        done = [c.result for c in children if c.result]
        peak = max(c.peak_gb for c in children)
        if not done:
            rows.append(
                [side, "killed" if any(c.killed for c in children) else "failed"] + ["-"] * 5
            )
            continue
        wall = [sum(d["wall"]) for d in done]  # per child: all timed steps
        cpu = [sum(d["cpu"]) for d in done]
        tok_s, tok_cpu = sum(timed) / median(wall), sum(timed) / median(cpu)
        stats[side] = (tok_s, tok_cpu, peak, done[0]["loss0"])
        step_wall = [t for d in done for t in d["wall"]]
        above = peak - max(d["base_gb"] for d in done)  # RSS after imports, before the model
        rows.append([side, f"{tok_s:.0f}", f"{tok_cpu:.0f}", spread(step_wall),
                     f"{args.pairs_per_step / median(step_wall):.3f}", f"{peak:.2f}",
                     f"{above:.2f}", f"{done[0]['loss0']:.6f}"])  # fmt: skip
    headers = ["side", "tokens/s (wall)", "tokens/CPU-s", "step s median [min-max]"]
    headers += ["pairs/s", "peak RSS GB", "above baseline GB", "loss (1st batch)"]
    print("\n" + table(headers, rows))
    print(
        f"\nSmolLM2-135M-Instruct fp32, B = {args.pairs_per_step} pairs/step, max_length "
        f"{args.max_length}, {args.steps} timed steps ({sum(timed)} tokens) x {args.rounds} "
        f"rounds, {args.threads} threads"
    )
    if len(stats) < 2:
        print("real_model: a side failed; no ratio")
        return
    ours, trl = stats["ours"], stats["trl"]
    diff = abs(ours[3] - trl[3])
    if diff > vs_trl.LOSS_TOL:
        sys.exit(f"real_model: FAILED: first-batch losses differ by {diff:.2e}")
    print(
        f"real_model: {ours[0] / trl[0]:.2f}x TRL tokens/s (by CPU time {ours[1] / trl[1]:.2f}x), "
        f"{ours[2] / trl[2]:.2f}x its peak RSS; |loss ours - TRL| = {diff:.1e}"
    )


def main() -> None:
    args = parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        return vs_trl.trl_child(args) if args.child == "trl" else vs_trl.ours_child(args)
    why = missing_requirements()
    if why:
        print(f"real_model: SKIPPED: {why}")
        return
    from simpo.fetch import DownloadError, cache_dir, fetch

    try:
        model = fetch("smollm2", cache_dir() / "models" / "smollm2")
    except DownloadError as e:
        print(f"real_model: SKIPPED: {e}")
        return
    print(f"# real_model  ({machine()})", flush=True)
    sides: dict[str, list[ChildResult]] = {"trl": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_inputs(work, model, args.pairs_per_step * (args.steps + 2), args.seed)
        for r in range(args.rounds):
            for side in ("trl", "ours"):
                argv = [sys.executable, __file__, *sys.argv[1:], "--child", side]
                child = run_child(argv + ["--work", str(work), "--model", str(model)], args.cap_gb)
                state = "killed" if child.killed else "ok" if child.result else "FAILED"
                print(f"round {r} {side}: {state}, peak {child.peak_gb:.2f} GB", flush=True)
                if state == "FAILED":
                    print(child.log_tail)
                sides[side].append(child)
        tokens = step_tokens(work, args)
    report(args, sides, tokens)


if __name__ == "__main__":
    main()
