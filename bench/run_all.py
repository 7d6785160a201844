"""`make bench`: the benchmarks in quick mode, one after another, then their headlines and goals.

Each script runs as its own process with its output streamed; its last line is its headline
ratio (or a skip line: bench/gpu.py needs CUDA). Exits non-zero if any script failed. The
full-size runs and their recorded results are in bench/RESULTS.md.

    python bench/run_all.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = (
    "kernel.py",
    "packing.py",
    "step.py",
    "vs_trl.py",
    "real_model.py",
    "sampling.py",
    "gpu.py",
)
GOALS = {  # what each headline is measured against (issues #16, #17; bench/RESULTS.md)
    "kernel.py": "fused loss <= 1.0x naive's time at vocab 256k; head memory <= 0.125x naive",
    "step.py": "DPO-live <= 1.3x SimPO's step time",
    "vs_trl.py": "vs TRL: >= 3x pairs/s and <= 0.25x peak memory at vocab 256k, >= 2x at 32k",
    "real_model.py": "vs TRL on SmolLM2-135M-Instruct (issue 15): recorded, no goal set",
    "sampling.py": ">= 2x transformers.generate new tokens/s (16 prompts x K=4, CPU)",
    "gpu.py": "MFU >= 40% (1B) / 35% (8B); Gemma-2-9B SimPO, 50k pairs: slides 16 H100-hours",
}


def run(script: str) -> tuple[int, str, float]:
    """(exit code, last output line, seconds) of `python bench/<script> --quick`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--quick"],
        cwd=BENCH.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = ""
    for line in proc.stdout:
        print(line, end="", flush=True)
        last = line.strip() or last
    return proc.wait(), last, time.perf_counter() - t0


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help, and no other flags
    results = {}
    for script in SCRIPTS:
        print(f"\n===== bench/{script} --quick", flush=True)
        results[script] = run(script)
    print("\n===== headlines (quick mode; full runs in bench/RESULTS.md)")
    for script, (code, last, seconds) in results.items():
        status = "" if code == 0 else f"FAILED (exit {code}): "
        print(f"{script:<11} {seconds:5.0f} s  {status}{last}")
        if script in GOALS:
            print(f"{'':<11} {'':>7}  goal: {GOALS[script]}")
    if any(code for code, _, _ in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
