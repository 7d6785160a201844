"""Small, dependency-free reporting: SVG line charts, markdown tables, metrics.jsonl reading.

The charts are plain SVG text written with the standard library, so `make demo` needs no
plotting package and its report.md renders anywhere markdown shows images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

Series = dict[str, list[tuple[float, float]]]  # name -> [(x, y), ...]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
ONPOLICY = "SimPO on-policy"  # the demo's SimPO on its own sampled, checker-scored pairs
COLORS = {"SFT": "#7f7f7f", "SimPO": "#1f77b4", "DPO": "#ff7f0e", ONPOLICY: "#2ca02c"}
FONT = 'font-family="Helvetica, Arial, sans-serif"'


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object of a .jsonl file (e.g. a run's metrics.jsonl)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def curve(
    records: Sequence[dict[str, Any]], key: str, x: str = "step"
) -> list[tuple[float, float]]:
    """(x, y) points of `key` over `x`, from records that have both."""
    return [(float(r[x]), float(r[key])) for r in records if key in r and x in r]


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), debiased at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else avg)
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0e}"


def line_chart(
    series: Series,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    smooth: float = 0.0,
    colors: dict[str, str] | None = None,
    width: int = 480,
    height: int = 300,
) -> str:
    """An SVG line chart of one or more series, with axes, grid, ticks and a legend.

    With `smooth` > 0 each series is drawn faintly as measured and boldly as its EMA. `colors`
    maps series names to colours (default: a fixed palette in series order).
    """
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"chart {title!r}: no data points")
    left, right, top, bottom = 56, 16, 34, 44
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt = _ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, n=6)
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.1 or 1.0
    yt = _ticks(lo - pad, hi + pad)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    def polyline(pts: list[tuple[float, float]], color: str, extra: str) -> str:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        return f'<polyline points="{coords}" fill="none" stroke="{color}" {extra}/>'

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {FONT} font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" '
        f'font-weight="bold">{escape(title)}</text>',
    ]
    for x in xt:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(y0):.1f}" '
                   f'y2="{sy(y1):.1f}" stroke="#eee"/>')  # fmt: skip
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 15}" '
                   f'text-anchor="middle">{_label(x)}</text>')  # fmt: skip
    for y in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   f'stroke="#eee"/>')  # fmt: skip
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" '
               f'height="{height - top - bottom}" fill="none" stroke="#888"/>')  # fmt: skip
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" '
               f'text-anchor="middle">{escape(xlabel)}</text>')  # fmt: skip
    if ylabel:
        out.append(f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')  # fmt: skip
    for i, (name, pts) in enumerate(series.items()):
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        if smooth > 0:
            out.append(polyline(pts, color, 'stroke-width="1" stroke-opacity="0.3"'))
            pts = list(zip([x for x, _ in pts], ema([y for _, y in pts], smooth), strict=True))
        out.append(polyline(pts, color, 'stroke-width="2"'))
        ly = top + 14 + 15 * i
        out.append(f'<line x1="{left + 10}" x2="{left + 28}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')  # fmt: skip
        out.append(f'<text x="{left + 33}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 significant decimals, `|` is escaped."""

    def cell(v: Any) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_demo_report(results: dict[str, Any], out: Path) -> Path:
    """`<out>/report.md` and its SVG charts, from simpo.demo's results."""
    plan, m, wall = results["plan"], results["metrics"], results["wall_s"]
    names = list(m)
    # SimPO and DPO continue from the SFT checkpoint: draw them after its steps
    start = {name: 0 if name == "SFT" else plan["sft_steps"] for name in names}
    runs = {name: read_jsonl(out / run / "metrics.jsonl") for name, run in results["runs"].items()}

    def series(key: str, names: Sequence[str] = names) -> Series:
        return {n: [(x + start[n], y) for x, y in curve(runs[n], key)] for n in names}

    xlabel = "step (SimPO and DPO start from the SFT checkpoint)"
    accuracy = series("eval/rewards/accuracies")
    if accuracy["SFT"]:  # SFT's reward is avg log-prob, SimPO's up to β: SimPO starts there
        for name in ("SimPO", ONPOLICY):
            if name in accuracy:
                accuracy[name].insert(0, accuracy["SFT"][-1])
    charts = {
        "loss.svg": line_chart(series("loss"), "training loss", xlabel, smooth=0.6, colors=COLORS),
        "heldout_accuracy.svg": line_chart(
            accuracy,
            "held-out accuracy, each under its own reward",
            xlabel,
            "accuracy",
            colors=COLORS,
        ),  # fmt: skip
        "margins.svg": line_chart(
            series("rewards/margins", [n for n in names if n != "SFT"]),
            "reward margin (training batches)",
            xlabel,
            "chosen - rejected",
            smooth=0.6,
            colors=COLORS,
        ),  # fmt: skip
    }
    for file, svg in charts.items():
        (out / file).write_text(svg)

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
## Answers before (SFT) and after (SimPO, DPO), greedy

{chr(10).join(examples)}
## Training curves

![training loss](loss.svg)
![held-out accuracy](heldout_accuracy.svg)
![reward margins](margins.svg)

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
    side = markdown_table(
        ["SimPO trained on", "held-out accuracy", "answers correct", "answer length (tokens)"],
        [[label, _pct(m[n]["accuracy"]), _pct(correct(n)), f"{m[n]['gen_mean_tokens']:.1f}"]
         for label, n in (("the given pairs (off-policy)", "SimPO"),
                          ("its own sampled pairs (on-policy)", ONPOLICY))],
    )  # fmt: skip
    skipped = ", ".join(f"{r.replace('_', ' ')}: {n}" for r, n in summary["skipped"].items())
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
    right = 100 * op["samples_right"]
    return f"""
## On-policy round (`onpolicy.py`)

The SFT model answered {summary["prompts"]} distinct training questions {k} times each
(temperature 0.8, top-p 0.95, the official SimPO decoding settings); the task's checker
(`simpo.demo.synthetic:reward`, 1 if the final answer is right, else 0) scored every answer:
{right:.0f}% were right. The highest- and lowest-scored answers of a question became a pair,
which exists only where its answers disagree: {summary["pairs"]} pairs ({skipped or "no"}
questions without one). SimPO then trained from the SFT checkpoint on those pairs with the same
settings as on the given pairs, for {plan["onpolicy_steps"]} steps (more only overfit so few
pairs). On-policy data is only as plentiful as the policy is sometimes right: a stronger SFT
model, or more samples per question, gives more pairs.

{side}
Sampled answers and their rewards (the first questions):

{chr(10).join(samples)}"""
