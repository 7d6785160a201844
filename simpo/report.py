"""A report for any training run: SVG charts over steps and a report.md with the final numbers.

    python -m simpo.report runs/simpo [runs/dpo ...] --out report/     # simpo-report, installed

Reads what train.py leaves in its output_dir: metrics.jsonl (required), config.toml, and
eval.py's outputs when they were written under `<run>/eval/` (`eval.py --out <run>/eval/NAME`).
Draws loss, reward margins, reward accuracies, chosen/rejected log-probs, learning rate,
gradient norm, tokens/s and MFU over steps (held-out values dashed), several runs overlaid,
each smoothed (EMA, as TensorBoard) with the measured values faint behind; a chart is left out
when no run has its metric (MFU off CUDA). With eval.py results: the length diagnostics
(accuracy on chosen-longer vs rejected-longer pairs, corr(reward, length)). Standard library
only (simpo.svg draws), so it runs anywhere the runs are. The demo's report uses this code.
A metrics.jsonl line that is not JSON is an error naming file and line, except an incomplete
last line (a run killed while writing it), which is left out with a warning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpo.svg import PALETTE, Series, bar_chart, line_chart

# file stem, title, [(metric, label, dashed)]; eval/ metrics (sparse) are drawn unsmoothed
CHARTS: tuple[tuple[str, str, tuple[tuple[str, str, bool], ...]], ...] = (
    ("loss", "loss", (("loss", "train", False), ("eval/loss", "held-out", True))),
    ("margins", "reward margin (chosen - rejected)",
     (("rewards/margins", "train", False), ("eval/rewards/margins", "held-out", True))),
    ("accuracies", "reward accuracy (chosen > rejected)",
     (("rewards/accuracies", "train", False), ("eval/rewards/accuracies", "held-out", True))),
    ("logps", "log-prob of chosen (solid) and rejected (dashed)",
     (("logps/chosen", "chosen", False), ("logps/rejected", "rejected", True))),
    ("lr", "learning rate", (("lr", "", False),)),
    ("grad_norm", "gradient norm (before clipping)", (("grad_norm", "", False),)),
    ("tokens_per_s", "throughput (real tokens / s, all ranks)", (("tokens_per_s", "", False),)),
    ("mfu", "model FLOPs utilisation", (("mfu", "", False),)),
)  # fmt: skip
UNSMOOTHED = {"lr"}  # a schedule, not a measurement


class ReportError(ValueError):
    """A run directory without what the report needs; the message names the path."""


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict[str, Any]]  # metrics.jsonl
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # config.toml, if any
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval.py metrics by name
    offset: int = 0  # added to every step: a run that continues another (the demo's SimPO)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object of a .jsonl file (e.g. a run's metrics.jsonl)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def curve(
    records: Sequence[dict[str, Any]], key: str, x: str = "step", offset: float = 0
) -> list[tuple[float, float]]:
    """(x + offset, y) points of `key` over `x`, from records that have both."""
    return [(float(r[x]) + offset, float(r[key])) for r in records if key in r and x in r]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 significant decimals, `|` is escaped."""

    def cell(v: Any) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_run(path: str | Path, name: str | None = None, offset: int = 0) -> Run:
    """A train.py output_dir: metrics.jsonl, config.toml and eval.py outputs under eval/."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path}: no metrics.jsonl (expected a train.py train.output_dir)")
    file = path / "metrics.jsonl"
    lines = file.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a run killed while writing its last line: drop that line
                print(f"warning: {file}:{n}: incomplete last line left out", file=sys.stderr)
                break
            raise ReportError(f"{file}:{n}: not JSON ({e.msg})") from None
    config = {}
    if (path / "config.toml").is_file():
        config = tomllib.loads((path / "config.toml").read_text())
    evals = {}
    for file in sorted(path.glob("eval/**/metrics.json")):
        metrics = json.loads(file.read_text())
        if "accuracy" in metrics:  # a preference evaluation (not generation only)
            evals[file.parent.relative_to(path).as_posix()] = metrics
    return Run(name or path.resolve().name, path, records, config, evals, offset)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def write_charts(
    runs: Sequence[Run],
    out: Path,
    smooth: float = 0.6,
    colors: dict[str, str] | None = None,
    xlabel: str = "step",
) -> list[tuple[str, str]]:
    """The standard charts that have data, as `<out>/<stem>.svg`; [(file, title)]."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, metrics in CHARTS:
        series: Series = {}
        color: dict[str, str] = {}
        dashed, raw = set(), set()
        for i, run in enumerate(runs):
            for key, label, is_dashed in metrics:
                who = run.name if len(runs) > 1 else ""
                what = label if len(metrics) > 1 else ""
                name = " · ".join(p for p in (who, what) if p) or key
                series[name] = curve(run.records, key, offset=run.offset)
                color[name] = (colors or {}).get(run.name) or PALETTE[i % len(PALETTE)]
                if is_dashed:
                    dashed.add(name)
                if key.startswith("eval/") or key in UNSMOOTHED:  # sparse, or a schedule
                    raw.add(name)
        if any(series.values()):  # line_chart leaves the empty series out
            svg = line_chart(
                series, title, xlabel, smooth=smooth, colors=color, dashed=dashed, raw=raw
            )
            (out / f"{stem}.svg").write_text(svg)
            written.append((f"{stem}.svg", title))
    return written


def final_table(runs: Sequence[Run]) -> str:
    """One row per run: steps, pairs seen, last logged training metrics, last held-out
    accuracy, and the median throughput, MFU and peak memory of the run."""
    rows = []
    for run in runs:
        last = run.records[-1] if run.records else {}
        held_out = [r for r in run.records if "eval/rewards/accuracies" in r]
        batch = run.config.get("train", {}).get("batch_size")

        def median(key: str) -> float | None:
            values = [r[key] for r in run.records if key in r]
            return statistics.median(values) if values else None

        steps = last.get("step")
        mfu = median("mfu")
        rows.append([
            run.name, run.config.get("loss", {}).get("name", "-"), steps if steps else "-",
            steps * batch if steps and batch else "-",
            _fmt(last.get("loss")), _fmt(last.get("rewards/margins")),
            _fmt(last.get("rewards/accuracies")),
            _fmt(held_out[-1]["eval/rewards/accuracies"] if held_out else None),
            _fmt(last.get("logps/chosen")), _fmt(last.get("logps/rejected")),
            _fmt(median("tokens_per_s"), ".0f"), "-" if mfu is None else f"{100 * mfu:.1f}%",
            _fmt(median("peak_mem_gb"), ".1f"),
        ])  # fmt: skip
    header = ["run", "loss", "steps", "pairs seen", "final loss", "margin", "accuracy",
              "held-out accuracy", "logp chosen", "logp rejected", "tokens/s (median)",
              "MFU (median)", "peak mem GiB"]  # fmt: skip
    return markdown_table(header, rows)


LENGTH_COLUMNS = (
    ("pairs", "num_pairs", "d"), ("accuracy", "accuracy", ".3f"),
    ("chosen longer", "accuracy_chosen_longer", ".3f"),
    ("rejected longer", "accuracy_rejected_longer", ".3f"),
    ("corr(reward, length)", "length_corr", "+.2f"), ("margin", "margin", ".3f"),
    ("length chosen", "length_chosen", ".1f"), ("length rejected", "length_rejected", ".1f"),
    ("generated length", "gen_mean_tokens", ".1f"),
)  # fmt: skip


def eval_section(runs: Sequence[Run], out: Path) -> str:
    """eval.py's length diagnostics of every run that has them: a table and a bar chart of
    accuracy on the pairs whose chosen / rejected response is longer ('' when none)."""
    rows, groups = [], {}
    for run in runs:
        for label, m in run.evals.items():
            who = f"{run.name} ({label})" if len(run.evals) > 1 else run.name
            rows.append([who, *(_fmt(m.get(key), spec) for _, key, spec in LENGTH_COLUMNS)])
            bars = {"chosen longer": m.get("accuracy_chosen_longer")}
            bars["rejected longer"] = m.get("accuracy_rejected_longer")
            groups[who] = {k: v for k, v in bars.items() if v is not None}
    if not rows:
        return ""
    title = "accuracy by which response is longer"
    if any(groups.values()):
        (out / "length_accuracy.svg").write_text(
            bar_chart(groups, title, "accuracy", include=(0, 1))
        )
    header = ["run", *(label for label, _, _ in LENGTH_COLUMNS)]
    return (
        "## Held-out evaluation (eval.py, SimPO reward β·avg log π)\n\n"
        + markdown_table(header, rows)
        + "\nA length-exploiting reward wins the chosen-longer pairs and loses the "
        "rejected-longer ones; a corr(reward, length) far from 0 says the same.\n\n"
        + (f"![{title}](length_accuracy.svg)\n" if any(groups.values()) else "")
    )


def write_report(runs: Sequence[Run], out: Path, smooth: float = 0.6, title: str = "") -> Path:
    """`<out>/report.md` with the charts, the final numbers and eval.py's diagnostics."""
    if not runs:
        raise ReportError("no runs to report")
    charts = write_charts(runs, out, smooth)

    def setting(run: Run, section: str, key: str) -> str:
        value = run.config.get(section, {}).get(key)
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    setup = [
        [r.name, str(r.path), setting(r, "loss", "name"), setting(r, "loss", "beta"),
         setting(r, "train", "lr"), setting(r, "train", "batch_size"),
         setting(r, "model", "path") or "(tiny random)"]
        for r in runs
    ]  # fmt: skip
    text = [
        f"# {title or 'Training report: ' + ', '.join(r.name for r in runs)}\n",
        markdown_table(["run", "dir", "loss", "β", "lr", "batch", "model"], setup),
        "## Final numbers\n",
        "Training metrics at the last logged step; held-out accuracy at the last evaluation; "
        "throughput, MFU and memory are medians over the run.\n",
        final_table(runs),
        "## Curves\n",
        f"Smoothed (EMA {smooth}) with the measured values faint behind; held-out dashed.\n",
        "\n".join(f"![{t}]({f})" for f, t in charts) + "\n",
        eval_section(runs, out),
    ]
    path = out / "report.md"
    path.write_text("\n".join(part for part in text if part))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m simpo.report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output directories")
    p.add_argument("--out", required=True, help="where report.md and the charts go")
    p.add_argument("--names", help="comma-separated run names (default: the directory names)")
    p.add_argument("--smooth", type=float, default=0.6, help="EMA weight in [0, 1); 0 = raw")
    p.add_argument("--title", default="", help="report title")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.names.split(",") if args.names else [None] * len(args.runs)
    try:
        if len(names) != len(args.runs):
            raise ReportError(f"--names has {len(names)} names for {len(args.runs)} runs")
        if not 0 <= args.smooth < 1:
            raise ReportError(f"--smooth {args.smooth}: expected 0 <= x < 1")
        runs = [load_run(path, name) for path, name in zip(args.runs, names, strict=True)]
        if len({r.name for r in runs}) < len(runs):
            raise ReportError("two runs have the same name: give --names")
        path = write_report(runs, Path(args.out), args.smooth, args.title)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
