"""The demo's report.md: its tables and answers, and the standard run charts of simpo.report.

The curves are the ones `python -m simpo.report` draws for any run (the same code), with
SimPO and DPO drawn after the SFT steps they continue from, plus the demo's own chart of
held-out accuracy, each model under its own reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simpo.report import curve, load_run, markdown_table, write_charts
from simpo.svg import line_chart

ONPOLICY = "SimPO on-policy"  # SimPO on the SFT model's own sampled, checker-scored pairs
COLORS = {"SFT": "#7f7f7f", "SimPO": "#1f77b4", "DPO": "#ff7f0e", ONPOLICY: "#2ca02c"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_demo_report(results: dict[str, Any], out: Path) -> Path:
    """`<out>/report.md` and its SVG charts, from simpo.demo's results."""
    plan, m, wall = results["plan"], results["metrics"], results["wall_s"]
    names = list(m)
    # SimPO, DPO (and SimPO on-policy) continue from the SFT checkpoint: after its steps
    start = {name: 0 if name == "SFT" else plan["sft_steps"] for name in names}
    runs = [load_run(out / run, name, start[name]) for name, run in results["runs"].items()]
    xlabel = "step (the preference runs start from the SFT checkpoint)"
    charts = write_charts(runs, out, smooth=0.6, colors=COLORS, xlabel=xlabel)
    # held-out accuracy, each under its own reward (SFT's is avg log-prob, SimPO's up to β):
    # SimPO's curve starts where SFT's ends
    accuracy = {r.name: curve(r.records, "eval/rewards/accuracies", offset=r.offset) for r in runs}
    if accuracy["SFT"]:
        for name in ("SimPO", ONPOLICY):
            if name in accuracy:
                accuracy[name].insert(0, accuracy["SFT"][-1])
    title = "held-out accuracy, each under its own reward"
    svg = line_chart(accuracy, title, xlabel, "accuracy", colors=COLORS)
    (out / "heldout_accuracy.svg").write_text(svg)
    charts.insert(0, ("heldout_accuracy.svg", title))

    def correct(name: str) -> float:
        a = results["answers"][name]
        return sum(x["correct"] for x in a) / max(len(a), 1)

    overview = markdown_table(
        ["model", "accuracy", "chosen longer", "rejected longer", "corr(reward, length)",
         "answers correct", "answer length (tokens)"],
        [[n, _pct(m[n]["accuracy"]), _pct(m[n]["accuracy_chosen_longer"]),
          _pct(m[n]["accuracy_rejected_longer"]), f"{m[n]['length_corr']:+.2f}",
          _pct(correct(n)), f"{m[n]['gen_mean_tokens']:.1f}"] for n in names],
    )  # fmt: skip
    dpo_view = markdown_table(
        ["model", "accuracy (DPO reward)", "chosen longer", "rejected longer",
         "corr(reward, length)"],
        [[n, _pct(m[n]["dpo_accuracy"]), _pct(m[n]["dpo_accuracy_chosen_longer"]),
          _pct(m[n]["dpo_accuracy_rejected_longer"]), f"{m[n]['dpo_length_corr']:+.2f}"]
         for n in names if "dpo_accuracy" in m[n]],
    )  # fmt: skip
    tasks = list(results["by_task"][names[0]])
    by_task = markdown_table(
        ["task", *names], [[t, *(_pct(results["by_task"][n][t]) for n in names)] for t in tasks]
    )
    examples = []
    for i, first in enumerate(results["answers"][names[0]][:8]):
        examples.append(f"**{first['prompt']}**\n")
        for n in names:
            a = results["answers"][n][i]
            mark = "✅" if a["correct"] else "❌"
            examples.append(f"- {n}: {mark} {a['output'] or '(empty)'}")
        examples.append("")
    gain = m["SimPO"]["accuracy"] - m["SFT"]["accuracy"]
    intro = (
        f"A tiny Llama ({plan['dim']}-dim, {plan['layers']} layers, {plan['vocab']}-piece BPE "
        f"tokenizer), built from nothing, learns a synthetic preference task: "
        f"{plan['train_pairs']} pairs of small questions ({', '.join(tasks)}) whose chosen "
        "answer is right and rejected answer subtly wrong. Either answer may be padded with "
        "chain-of-thought filler, the chosen one more often (as in real preference data), so a "
        "method that rewards length is tempted.\n\n"
        f"SFT on the chosen answers ({plan['sft_steps']} steps, lr {plan['sft_lr']:g}), then "
        f"SimPO (β={plan['simpo_beta']}, γ/β={plan['gamma_beta_ratio']}) and DPO "
        f"(β={plan['dpo_beta']}) from the same SFT checkpoint, {plan['steps']} steps each at "
        f"lr {plan['lr']:g}, {plan['batch_size']} pairs a step."
    )
    if ONPOLICY in m:
        intro += (
            f" A fourth model, {ONPOLICY}, trains the same way on pairs the SFT model sampled "
            "itself and the task's checker scored (the on-policy round below)."
        )
    if plan["sft_weight"]:
        intro += (
            f" Every preference run with `loss.sft_weight={plan['sft_weight']}`, the NLL of the "
            "chosen answer "
            "(the official SimPO trainer's `sft_weight`): at a learning rate 1000x the 7B "
            "recipes', a tiny model trained without it still gains preference accuracy, but "
            "its greedy answers degenerate into repeated fragments."
        )
    onpolicy = onpolicy_section(results, correct) if "onpolicy" in results else ""
    text = f"""# SimPO demo

{intro} Seed {results["seed"]}; wall time {wall["total"]:.0f} s.

**SimPO moves held-out preference accuracy from {_pct(m["SFT"]["accuracy"])} (SFT) to
{_pct(m["SimPO"]["accuracy"])} ({100 * gain:+.1f} points).**

## Held-out pairs ({plan["eval_pairs"]}), under SimPO's reward β·avg log π(y|x)

{overview}
*accuracy*: chosen reward > rejected reward; *chosen / rejected longer*: accuracy on the
pairs where that response has more tokens (a length-exploiting reward wins the first and loses
the second); *answers correct*: greedy answers to {len(results["answers"][names[0]])} held-out
questions whose final answer is right; *answer length*: their mean length in tokens.

Under DPO's reward β·(log π − log π_SFT), relative to the SFT checkpoint:

{dpo_view}{onpolicy}
## Accuracy by task

{by_task}
## Answers before (SFT) and after ({", ".join(names[1:])}), greedy

{chr(10).join(examples)}
## Training curves

The charts `python -m simpo.report` draws for any run (the preference runs after the SFT steps
they continue from; smoothed, measured values faint; held-out dashed):

{chr(10).join(f"![{t}]({f})" for f, t in charts)}

## Wall time

{markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in wall.items()])}
Reproduce: `python -m simpo.demo --out {out} --seed {results["seed"]}`; the runs are in
`sft/`, `simpo/`, `dpo/`, `simpo_onpolicy/` (metrics.jsonl, config.toml, final/), the
on-policy samples and pairs in `onpolicy/`, the evaluations in `eval/`.
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def onpolicy_section(results: dict[str, Any], correct: Any) -> str:
    """The on-policy round: off- and on-policy SimPO side by side, and sampled answers with the
    checker's rewards."""
    plan, m, op = results["plan"], results["metrics"], results["onpolicy"]
    summary, k = op["summary"], plan["onpolicy_samples"]
    skipped = ", ".join(f"{r.replace('_', ' ')}: {n}" for r, n in summary["skipped"].items())
    n_skipped, usable = sum(summary["skipped"].values()), op["trainable_pairs"]
    if ONPOLICY in m:
        side = markdown_table(
            ["SimPO trained on", "held-out accuracy", "answers correct", "answer length (tokens)"],
            [[label, _pct(m[n]["accuracy"]), _pct(correct(n)), f"{m[n]['gen_mean_tokens']:.1f}"]
             for label, n in (("the given pairs (off-policy)", "SimPO"),
                              ("its own sampled pairs (on-policy)", ONPOLICY))],
        )  # fmt: skip
        trained = (
            f"SimPO then trained from the SFT checkpoint on the {usable} pairs train.py can use "
            "(it skips a pair with an empty answer) with the same settings as on the given "
            f"pairs, for {plan['onpolicy_steps']} steps (more only overfit so few pairs):"
        )
    else:
        side, trained = "", "No pair was usable for training, so SimPO on-policy did not run."
    samples = []
    for row in op["examples"]:
        samples.append(f"**{row['prompt']}**\n")
        rewards = row.get("rewards") or [None] * len(row["responses"])
        for i, (text, reward) in enumerate(zip(row["responses"], rewards, strict=True)):
            role = {row.get("chosen"): " (chosen)", row.get("rejected"): " (rejected)"}.get(i, "")
            score = "-" if reward is None else f"{reward:g}"
            samples.append(f"- reward {score}{role}: {text or '(empty)'}")
        if row.get("skipped"):
            samples.append(f"- no pair: {row['skipped'].replace('_', ' ')}")
        samples.append("")
    return f"""
## On-policy round (`onpolicy.py`)

The SFT model answered {summary["prompts"]} distinct training questions {k} times each
(temperature 0.8, top-p 0.95, the official SimPO decoding settings); the task's checker
(`simpo.demo.synthetic:reward`, 1 if the final answer is right, else 0) scored every answer:
{100 * op["samples_right"]:.0f}% were right. The highest- and lowest-scored answers of a
question became a pair, which exists only where its answers disagree: {summary["pairs"]}
pairs; {n_skipped} questions gave none ({skipped or "-"}). {trained}

{side}
On-policy data is only as plentiful, and only as informative, as the policy is sometimes
right: a stronger SFT model, or more samples per question, gives more pairs.

Sampled answers and their rewards (the first questions):

{chr(10).join(samples)}"""
