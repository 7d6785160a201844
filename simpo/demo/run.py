"""`make demo`: SimPO working end to end on a CPU in minutes, from nothing, with no download.

    python -m simpo.demo --out demo_out            # about 5 minutes on 2 CPU cores
    python -m simpo.demo --out /tmp/d --quick      # the shortened run the tests use

1. writes the synthetic task (simpo/demo/synthetic.py): training pairs and held-out pairs;
2. trains a SentencePiece tokenizer on it and builds a random tiny Llama (simpo/demo/tiny.py);
3. SFT on the chosen answers (train.py with loss.name=sft);
4. SimPO from the SFT checkpoint, and DPO from the same checkpoint for comparison;
5. an on-policy round (onpolicy.py): the SFT model answers each training question K times,
   the task's checker scores the answers, and SimPO trains from the SFT checkpoint on the
   binarized pairs (right answer chosen, wrong one rejected) instead of the given ones;
6. eval.py on the held-out pairs for all four: preference accuracy under SimPO's reward,
   the length diagnostics, greedy answers to held-out questions;
7. <out>/report.md (tables, answers before/after, sampled answers with their rewards, SVG
   training curves) and a summary.

Every number is deterministic for a given --seed (and machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from simpo.config import load_config
from simpo.data import load_pairs
from simpo.demo.report import write_demo_report
from simpo.demo.synthetic import final_answer, write_synthetic_prefs
from simpo.demo.tiny import build_tiny_model_dir, texts_from_file
from simpo.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py, eval.py, configs/
CONFIG = ROOT / "configs" / "tiny-cpu.toml"
# sub-directories the demo owns
STAGES = ("data", "base", "sft", "simpo", "dpo", "onpolicy", "simpo_onpolicy", "eval")
REWARD = "simpo.demo.synthetic:reward"  # the synthetic task's checker


@dataclass(frozen=True)
class Plan:
    """Sizes and hyperparameters of one demo run."""

    train_pairs: int = 4000
    eval_pairs: int = 400
    vocab: int = 1024
    dim: int = 64
    layers: int = 2
    batch_size: int = 32
    sft_steps: int = 100
    sft_lr: float = 1e-2
    steps: int = 500  # SimPO and DPO each
    lr: float = 3e-3  # SimPO and DPO each
    simpo_beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    dpo_beta: float = 0.1
    # NLL of the chosen answer (the official SimPO trainer's sft_weight), for SimPO and DPO
    # alike: at a learning rate 1000x the 7B recipes', a tiny model trained without it still
    # gains preference accuracy but its greedy answers degenerate into repeated fragments
    sft_weight: float = 1.0
    adam_beta2: float = 0.95  # a short run: the second moment must follow the gradients
    eval_every: int = 50
    gen_prompts: int = 48
    max_new_tokens: int = 40
    # on-policy round: K answers to each distinct training question, sampled at the official
    # decode.py settings (temperature 0.8, top-p 0.95), scored by the task's checker
    onpolicy_prompts: int = 2000  # at most; the training pairs repeat their ~1000 questions
    onpolicy_samples: int = 4
    onpolicy_new_tokens: int = 32
    # SimPO on the on-policy pairs: only questions whose K answers disagree give a pair (~150
    # from the SFT model), so fewer steps than on the given pairs (more only overfit them)
    onpolicy_steps: int = 150


FULL = Plan()
QUICK = dataclasses.replace(
    FULL, train_pairs=2000, sft_steps=50, steps=250, eval_every=125, gen_prompts=16,
    onpolicy_steps=100,
)  # fmt: skip
ONPOLICY = "SimPO on-policy"
RUNS = {"SFT": "sft", "SimPO": "simpo", "DPO": "dpo", ONPOLICY: "simpo_onpolicy"}


def slug(name: str) -> str:
    """A model's directory under eval/: 'SimPO on-policy' -> 'SimPO_on-policy'."""
    return name.replace(" ", "_")


@cache
def load_script(name: str) -> ModuleType:
    """train.py / eval.py from the repository root, imported as modules."""
    path = ROOT / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"demo: {path} not found; run the demo from a clone of the repository")
    spec = importlib.util.spec_from_file_location(f"simpo_{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_stage(
    out: Path, name: str, model: Path, plan: Plan, seed: int, overrides: list[str],
    train: Path | None = None,
) -> Path:  # fmt: skip
    """One train.py run from checkpoint `model` (on `train`, default the synthetic training
    pairs); returns its HF export."""
    argv = [
        "--config", str(CONFIG), f"--model.path={model}",
        f"--data.train={train or out / 'data' / 'train.jsonl'}",
        f"--data.eval={out / 'data' / 'heldout.jsonl'}",
        "--data.eval_fraction=0", f"--train.output_dir={out / name}", f"--train.seed={seed}",
        f"--train.batch_size={plan.batch_size}", f"--train.eval_every={plan.eval_every}",
        f"--train.adam_beta2={plan.adam_beta2}",
        "--train.save_every=0", *overrides,
    ]  # fmt: skip
    load_script("train").main(argv)
    return out / name / "final"


def eval_stage(out: Path, name: str, model: Path, plan: Plan, ref: Path | None) -> dict:
    """eval.py on the held-out pairs (and greedy answers to their first prompts)."""
    argv = [
        "--model", str(model), "--data", str(out / "data" / "heldout.jsonl"),
        "--out", str(out / "eval" / slug(name)), "--beta", str(plan.simpo_beta),
        "--dpo-beta", str(plan.dpo_beta), "--num-prompts", str(plan.gen_prompts),
        "--max-new-tokens", str(plan.max_new_tokens), "--generator", name, "--quiet",
        "--system=",  # the training prompts (official convention) carry an empty system turn
    ]  # fmt: skip
    return load_script("eval").main(argv + (["--ref", str(ref)] if ref else []))


def per_task(out: Path, name: str, rows: list[dict]) -> dict[str, float]:
    """Held-out accuracy under SimPO's reward, per task, from eval.py's scores.jsonl."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for line in (out / "eval" / slug(name) / "scores.jsonl").read_text().splitlines():
        s = json.loads(line)
        (chosen, rejected), (n_chosen, n_rejected) = s["logp_sum"], s["length"]
        hits[rows[s["index"]]["task"]].append(chosen / n_chosen > rejected / n_rejected)
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def answers(out: Path, name: str, truth: dict[str, str]) -> list[dict]:
    """eval.py's greedy answers, each marked right or wrong against the held-out answer."""
    rows = json.loads((out / "eval" / slug(name) / "model_outputs.json").read_text())
    return [
        {"prompt": r["instruction"], "output": r["output"],
         "correct": final_answer(r["output"]) == truth[r["instruction"]]}
        for r in rows
    ]  # fmt: skip


def trainable_pairs(pairs: Path, tokenizer_dir: Path) -> int:
    """How many of `pairs` train.py will use with the demo's data settings (its loader skips,
    e.g., a pair whose rejected answer is empty)."""
    cfg = load_config(CONFIG).data
    loaded, _ = load_pairs(pairs, Tokenizer.from_dir(tokenizer_dir), cfg, progress=False)
    return len(loaded)


def onpolicy_stage(out: Path, policy: Path, plan: Plan, seed: int) -> dict[str, Any]:
    """onpolicy.py: `policy` answers the training questions, the checker scores the answers;
    its summary, plus the first sampled questions with their answers and rewards."""
    argv = [
        "--policy", str(policy), "--reward", REWARD,
        "--prompts", str(out / "data" / "train.jsonl"), "--out", str(out / "onpolicy"),
        "--limit", str(plan.onpolicy_prompts), "--samples", str(plan.onpolicy_samples),
        "--max-new-tokens", str(plan.onpolicy_new_tokens), "--seed", str(seed),
        "--batch-prompts", "64", "--quiet",
        "--system=",  # sample with the prompts SimPO trains on (official: empty system turn)
    ]  # fmt: skip
    summary = load_script("onpolicy").main(argv)
    rows = [json.loads(r) for r in (out / "onpolicy" / "samples.jsonl").read_text().splitlines()]
    rewards = [x for r in rows for x in r.get("rewards") or []]
    keep = ("prompt", "responses", "rewards", "chosen", "rejected", "skipped")
    examples = [{k: v for k, v in r.items() if k in keep} for r in rows[:6]]
    right = sum(rewards) / max(len(rewards), 1)  # the checker's reward is 1 for a right answer
    return {"summary": summary, "examples": examples, "samples_right": right}


def run(out: Path, plan: Plan, seed: int) -> dict[str, Any]:
    """Every stage; the numbers the report and the summary show."""
    for stage in STAGES:
        shutil.rmtree(out / stage, ignore_errors=True)
    wall: dict[str, float] = {}
    t0 = tick = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        wall[stage], tick = now - tick, now

    train_file = write_synthetic_prefs(out / "data" / "train.jsonl", plan.train_pairs, seed)
    heldout = write_synthetic_prefs(out / "data" / "heldout.jsonl", plan.eval_pairs, seed + 1)
    texts = texts_from_file(train_file)
    base = build_tiny_model_dir(out / "base", texts, plan.vocab, plan.dim, plan.layers, seed)
    lap("data + tokenizer + model")
    sft = train_stage(
        out, "sft", base, plan, seed,
        ["--loss.name=sft", f"--train.max_steps={plan.sft_steps}", f"--train.lr={plan.sft_lr}"],
    )  # fmt: skip
    lap("SFT")
    common = [
        f"--train.max_steps={plan.steps}", f"--train.lr={plan.lr}",
        f"--loss.sft_weight={plan.sft_weight}",
    ]  # fmt: skip
    simpo = train_stage(
        out, "simpo", sft, plan, seed,
        [*common, "--loss.name=simpo", f"--loss.beta={plan.simpo_beta}",
         f"--loss.gamma_beta_ratio={plan.gamma_beta_ratio}"],
    )  # fmt: skip
    lap("SimPO")
    dpo = train_stage(
        out, "dpo", sft, plan, seed, [*common, "--loss.name=dpo", f"--loss.beta={plan.dpo_beta}"]
    )
    lap("DPO")
    onpolicy = onpolicy_stage(out, sft, plan, seed)
    lap("on-policy samples")
    pairs = out / "onpolicy" / "pairs.jsonl"
    onpolicy["trainable_pairs"] = usable = trainable_pairs(pairs, sft)
    if usable:  # a weak SFT model may be right too rarely to give any
        simpo_op = train_stage(
            out, "simpo_onpolicy", sft, plan, seed,
            [*common, "--loss.name=simpo", f"--loss.beta={plan.simpo_beta}",
             f"--loss.gamma_beta_ratio={plan.gamma_beta_ratio}",
             f"--train.max_steps={plan.onpolicy_steps}",  # later overrides win
             f"--train.eval_every={plan.onpolicy_steps // 3}",
             f"--train.batch_size={min(plan.batch_size, usable)}"],
            train=pairs,
        )  # fmt: skip
        lap("SimPO on-policy")
    metrics = {
        "SFT": eval_stage(out, "SFT", sft, plan, None),
        "SimPO": eval_stage(out, "SimPO", simpo, plan, sft),
        "DPO": eval_stage(out, "DPO", dpo, plan, sft),
    }
    if usable:
        metrics[ONPOLICY] = eval_stage(out, ONPOLICY, simpo_op, plan, sft)
    lap("eval")
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    truth = {r["prompt"]: final_answer(r["chosen"][-1]["content"]) for r in rows}
    wall["total"] = time.perf_counter() - t0
    return {
        "seed": seed,
        "plan": dataclasses.asdict(plan),
        "wall_s": wall,
        "metrics": metrics,
        "by_task": {m: per_task(out, m, rows) for m in metrics},
        "answers": {m: answers(out, m, truth) for m in metrics},
        "runs": {m: RUNS[m] for m in metrics},
        "onpolicy": onpolicy,
    }


def summary(results: dict[str, Any], out: Path) -> str:
    """The one-screen summary printed at the end."""
    m, ans = results["metrics"], results["answers"]
    lines = [
        "",
        "=" * 72,
        "SimPO demo: held-out pairs of the synthetic task "
        f"({results['plan']['eval_pairs']} pairs, seed {results['seed']})",
        "",
        f"{'':16}{'accuracy':>10}{'chosen-':>10}{'rejected-':>11}{'answers':>10}{'answer':>9}",
        f"{'':16}{'(SimPO rw)':>10}{'longer':>10}{'longer':>11}{'correct':>10}{'tokens':>9}",
    ]
    for name in m:
        r, a = m[name], ans[name]
        correct = sum(x["correct"] for x in a) / max(len(a), 1)
        lines.append(
            f"{name:16}{r['accuracy']:>10.3f}{r['accuracy_chosen_longer']:>10.3f}"
            f"{r['accuracy_rejected_longer']:>11.3f}{correct:>10.2f}{r['gen_mean_tokens']:>9.1f}"
        )
    gain = m["SimPO"]["accuracy"] - m["SFT"]["accuracy"]
    op = results["onpolicy"]["summary"]
    lines += [
        "",
        f"SimPO: {gain * 100:+.1f} points of held-out preference accuracy over its SFT start.",
        f"On-policy round: {op['pairs']} pairs from {op['prompts']} questions answered "
        f"{results['plan']['onpolicy_samples']} times each by the SFT model "
        f"({100 * results['onpolicy']['samples_right']:.0f}% of its answers right; "
        f"{sum(op['skipped'].values())} questions gave no pair).",
        "Wall time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in results["wall_s"].items() if k != "total")
        + f"; total {results['wall_s']['total']:.0f}s",
        f"Report: {out / 'report.md'}",
        "=" * 72,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m simpo.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--quick", action="store_true", help="a shortened run (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is best)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = run(out, QUICK if args.quick else FULL, args.seed)
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    write_demo_report(results, out)
    print(summary(results, out), flush=True)
    return results
