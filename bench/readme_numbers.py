"""Regenerate the figures the README quotes from `make demo`, from the code on main.

    python bench/readme_numbers.py                 # run the demo (minutes), patch README.md
    python bench/readme_numbers.py --from demo_out # patch from an existing run's summary.json
    python bench/readme_numbers.py --check         # exit 1 if README.md differs from the run

The README's demo block sits between the markers `<!-- demo-numbers -->` and
`<!-- /demo-numbers -->`; everything between them is written here, with the date, the machine
and its load, so no figure there is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-numbers -->", "<!-- /demo-numbers -->"
MODELS = ("SFT", "SimPO", "DPO", "SimPO on-policy")  # those in the run's summary


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def demo_block(results: dict, when: str) -> str:
    """The README's demo paragraph and table, from the demo's summary.json."""
    m, ans, wall = results["metrics"], results["answers"], results["wall_s"]
    n_answers = len(ans["SFT"])
    models = [k for k in MODELS if k in m]
    correct = {k: sum(a["correct"] for a in ans[k]) / max(len(ans[k]), 1) for k in models}
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in wall.items() if k != "total")
    rows = []
    for name in models:
        r = m[name]
        acc = pct(r["accuracy"])
        if name != "SFT":
            gain = 100 * (r["accuracy"] - m["SFT"]["accuracy"])
            acc = f"**{acc}** ({gain:+.1f})" if name == "SimPO" else f"{acc} ({gain:+.1f})"
        label = "SFT (start)" if name == "SFT" else name
        rows.append(
            f"| {label} | {acc} | {pct(r['accuracy_chosen_longer'])} | "
            f"{pct(r['accuracy_rejected_longer'])} | {pct(correct[name])} | "
            f"{r['gen_mean_tokens']:.1f} |"
        )
    return "\n".join(
        [
            f"Measured {when} (seed {results['seed']}; regenerate with "
            "`python bench/readme_numbers.py`): "
            f"{wall['total']:.0f} s in total ({stages}).",
            "",
            f"| held-out ({m['SFT']['num_pairs']} pairs) | accuracy, SimPO reward | chosen longer "
            f"| rejected longer | greedy answers right ({n_answers}) | answer length (tokens) |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}, load {load:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="src", type=Path, help="an existing demo output dir")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = p.parse_args(argv)
    out = args.src or ROOT / "demo_out"
    if args.src is None:
        cmd = [sys.executable, "-m", "simpo.demo", "--out", str(out)]
        subprocess.run(cmd, cwd=ROOT, check=True)
    results = json.loads((out / "summary.json").read_text())
    when = f"{datetime.date.today().isoformat()} on a {machine()}"
    readme = (ROOT / "README.md").read_text()
    if START not in readme or END not in readme:
        sys.exit(f"README.md: markers {START} ... {END} not found")
    head, rest = readme.split(START, 1)
    old, tail = rest.split(END, 1)
    block = demo_block(results, when)
    if args.check:

        def rows(text: str) -> list[str]:  # the table; the first line holds date, load, times
            return [line for line in text.splitlines() if line.startswith("|")]

        same = rows(old) == rows(block)
        print("README demo numbers are current" if same else "README demo numbers differ")
        return 0 if same else 1
    (ROOT / "README.md").write_text(f"{head}{START}\n{block}\n{END}{tail}")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
