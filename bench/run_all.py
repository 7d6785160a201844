"""`make bench`: the CPU benchmarks in quick mode, one after another, then their headlines.

Each script runs as its own process with its output streamed; its last line is its headline
ratio (or a skip line). Exits non-zero if any script failed. The full-size runs and their
recorded results are in bench/RESULTS.md.

    python bench/run_all.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("kernel.py", "packing.py", "step.py", "vs_trl.py", "real_model.py")


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
    if any(code for code, _, _ in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
