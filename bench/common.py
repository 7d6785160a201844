"""Shared helpers for the benchmarks: child processes with peak RSS, interleaved timing, tables.

Peak memory is measured per variant in its own process: the parent starts the child, polls
its resident set (killing it above a cap, so a runaway peer cannot take the shared machine
down) and reaps it with `os.wait4`, whose rusage gives the child's peak RSS even if killed.
Times are measured side by side in one process where possible: variants interleaved, after
warmup, summarised by the median, as wall clock and as process CPU time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simpo.data import TokenizedPair

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PREFS = SHARED / "alpaca_eval_prefs.jsonl"
MISTRAL_SPM = SHARED / "tokenizers" / "mistral-7b-v0.1.model"
MISTRAL_SIMPO = ROOT / "configs" / "templates" / "mistral-simpo.jinja"  # the official override
RESULT_PREFIX = "RESULT "  # a child's last line: RESULT {json}


def rss_gb(pid: int | str = "self") -> float:
    """Current resident set of a process (default: this one), GB; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def peak_rss_gb() -> float:
    """Peak resident set of this process so far, GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def emit(result: dict) -> None:
    """A child's result, as its last stdout line, for `run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


@dataclass
class ChildResult:
    result: dict | None  # the child's RESULT json; None if it failed or was killed
    peak_gb: float  # peak RSS of the child process (from wait4)
    killed: bool  # killed by the memory cap
    log_tail: str  # last lines of its output, for error messages


def run_child(argv: list[str], cap_gb: float, timeout_s: float = 3600) -> ChildResult:
    """Run `argv` as a child process; return its RESULT line and its peak RSS.

    The child is killed if its RSS exceeds `cap_gb` (reported as killed, with the peak it
    reached) or it runs past `timeout_s`.
    """
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        killed, start = False, time.monotonic()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            too_long = time.monotonic() - start > timeout_s
            if not killed and (rss_gb(proc.pid) > cap_gb or too_long):
                killed = True
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        lines = out.read().splitlines()
    result = None
    if lines and lines[-1].startswith(RESULT_PREFIX) and proc.returncode == 0:
        result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return ChildResult(result, usage.ru_maxrss * 1024 / 1e9, killed, "\n".join(lines[-15:]))


@dataclass
class Timings:
    """Seconds per timed step: wall clock, and CPU time of this process (all its threads),
    which a busy shared machine disturbs less than the wall clock (but spinning OpenMP
    threads waiting for a descheduled peer still count)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)


def timed(fn: Callable[..., object], *args: object) -> tuple[object, float, float]:
    """(fn(*args), wall seconds, process CPU seconds)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def interleaved_times(
    steps: dict[str, Callable[[int], object]], warmup: int, repeats: int
) -> tuple[dict[str, Timings], dict[str, list[object]]]:
    """Run each step function (called with the round number) round-robin, so that machine
    noise (other processes on a shared box) falls on all variants alike.

    Returns the timings of the timed rounds (after `warmup` untimed ones) and the return
    values of all rounds, per variant.
    """
    times = {name: Timings() for name in steps}
    outputs: dict[str, list[object]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, fn in steps.items():
            out, wall, cpu = timed(fn, r)
            outputs[name].append(out)
            if r >= warmup:
                times[name].add(wall, cpu)
    return times, outputs


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """median [min-max] in seconds, for tables."""
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line: date, CPU, cores and their load, torch version (for RESULTS.md)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    day = datetime.date.today().isoformat()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{day}, {cpu}, {os.cpu_count()} cores (load average {load}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )


def sample_pairs(n: int, seed: int, max_length: int = 1024) -> list[TokenizedPair]:
    """`n` random rows (fixed seed) of the shared preference file, tokenised as training does:
    Mistral tokenizer and chat template, max_length / max_prompt_length = max_length / 2."""
    from simpo.config import DataConfig
    from simpo.data import load_pairs
    from simpo.tokenizer import Tokenizer

    lines = PREFS.read_text().splitlines()
    picked = random.Random(seed).sample(lines, n)
    cfg = DataConfig(
        chat_template=str(MISTRAL_SIMPO), max_length=max_length, max_prompt_length=max_length // 2
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.jsonl"
        path.write_text("\n".join(picked) + "\n")
        pairs, _ = load_pairs(path, Tokenizer.from_dir(MISTRAL_SPM), cfg, progress=False)
    return pairs


# Median lengths of alpaca_eval_prefs.jsonl in characters (shared/data/README.md), / 4 chars
# per token: what `synthetic_pairs` draws around when the shared data is absent.
MEDIAN_TOKENS = {"prompt": 99 / 4, "chosen": 2149 / 4, "rejected": 534 / 4}


def synthetic_pairs(n: int, seed: int, vocab: int, max_length: int = 2048) -> list[TokenizedPair]:
    """`n` pairs of random tokens with log-normal lengths around the real medians."""
    from simpo.data import TokenizedPair

    rng = random.Random(seed)

    def draw(kind: str, cap: int) -> list[int]:
        length = max(1, min(cap, round(rng.lognormvariate(0, 0.6) * MEDIAN_TOKENS[kind])))
        return [rng.randrange(3, vocab) for _ in range(length)]

    pairs = []
    for i in range(n):
        prompt = draw("prompt", max_length // 2)
        rest = max_length - len(prompt)
        pairs.append(TokenizedPair(prompt, draw("chosen", rest), draw("rejected", rest), i))
    return pairs
