"""Mutation smoke check: plant one-line bugs, one at a time, in a scratch copy of the repository
and run the test files that should catch each; print which were caught and which SURVIVED.

Not a test (pytest does not collect this file: its name does not match test_*.py) and not run in
CI; run it before stopping, after changing the numerical core or its tests:

    make mutate                                    # every mutant
    python tests/mutation_smoke.py --only temperature accuracy_tie truncation_flag
    python tests/mutation_smoke.py --list          # the mutants, and whether each target exists

Each mutant is an exact (file, original text, replacement) triple. An original that is no longer
found exactly once (the code moved or was reworded) is reported as STALE rather than skipped
silently: update its strings. Results: caught (a test failed), SURVIVED (every test passed: a
blind spot of the suite), timeout (ran past --timeout: counts as caught, an endless loop is
noticed) and error (pytest could not run, e.g. a collection error: not a catch). Before the
mutants, the same test files run on the unmodified copy (the baseline); when that fails, nothing
is mutated. Exit code 0 when every mutant was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files, fastest catcher first (pytest runs with -x)
    why: str


MUTANTS = [
    Mutant(
        "temperature", "simpo/draws.py",
        "torch.softmax(logits.float() / temperature, dim=-1)",
        "torch.softmax(logits.float() * temperature, dim=-1)",
        ("tests/test_generate.py",), "sampling temperature multiplies the logits",
    ),
    Mutant(
        "top_p_boundary", "simpo/draws.py",
        "out = torch.where((out < 0) & (above < top_p), cand, out)",
        "out = torch.where((out < 0) & (above + p_cand[:, 0] < top_p), cand, out)",
        ("tests/test_generate.py",), "nucleus drops the token that crosses top_p",
    ),
    Mutant(
        "accuracy_tie", "simpo/losses.py",
        '"rewards/accuracies": (chosen_rewards > rejected_rewards)',
        '"rewards/accuracies": (chosen_rewards >= rejected_rewards)',
        ("tests/test_losses.py", "tests/test_train.py"), "a reward tie counts as accurate",
    ),
    Mutant(
        "eval_accuracy_tie", "eval.py",
        "correct = (rewards[:, 0] > rewards[:, 1])",
        "correct = (rewards[:, 0] >= rewards[:, 1])",
        ("tests/test_eval.py",), "eval.py counts a tie as correct",
    ),
    Mutant(
        "truncation_flag", "simpo/data.py",
        "[len(r) > budget for r in responses]",
        "[len(r) >= budget for r in responses]",
        ("tests/test_data.py",), "a response of exactly the budget is counted as cut",
    ),
    Mutant(
        "response_budget", "simpo/data.py",
        "budget = max_length - len(prompt)",
        "budget = max_length - len(prompt) - 1",
        ("tests/test_data.py",), "responses lose one token of room",
    ),
    Mutant(
        "simpo_gamma", "simpo/losses.py",
        "h = chosen_avg - rejected_avg - gamma_beta_ratio  # (P,)",
        "h = chosen_avg - rejected_avg - gamma_beta_ratio * beta  # (P,)",
        ("tests/test_losses.py",), "the margin term is γ instead of γ/β inside h",
    ),
    Mutant(
        "softcap_backward", "simpo/logprobs.py",
        "b.square_().neg_().add_(1).mul_(probs)",
        "b.neg_().add_(1).mul_(probs)",
        ("tests/test_logprobs.py",), "soft-cap backward uses 1 - tanh instead of 1 - tanh²",
    ),
    Mutant(
        "rejected_positions", "simpo/packing.py",
        "put(row, s + m + c, rejected, j, 2, m)",
        "put(row, s + m + c, rejected, j, 2, m + c)",
        ("tests/test_packing.py", "tests/test_exactness.py"),
        "rejected positions continue after the chosen answer instead of restarting",
    ),
    Mutant(
        "window_rule", "simpo/attention.py",
        "ok = ok & (pos_q - pos_k < window)",
        "ok = ok & (pos_q - pos_k <= window)",
        ("tests/test_attention.py", "tests/test_model.py"), "sliding window one token too wide",
    ),
    Mutant(
        "document_mask", "simpo/attention.py",
        "ok = (doc_q == doc_k) & (doc_k != -1) & (idx_k <= idx_q)",
        "ok = (doc_k != -1) & (idx_k <= idx_q)",
        ("tests/test_attention.py", "tests/test_packing.py"),
        "packed documents attend to each other",
    ),
    Mutant(
        "loss_normalisation", "simpo/step.py",
        "request = HeadLoss(loss_fn, scale, ref_sum, ref_count, lengths)",
        "request = HeadLoss(loss_fn, 1 / mb.num_pairs, ref_sum, ref_count, lengths)",
        ("tests/test_train.py", "tests/test_distributed.py"),
        "the loss is averaged per micro-batch instead of over the global batch",
    ),
    Mutant(
        "fused_head_recompute", "simpo/fused_loss.py",
        "for idx in heads if need_any else ():",
        "for idx in ():",
        ("tests/test_fused_loss.py",),
        "long pairs' first tokens get no gradient (their second scoring pass is skipped)",
    ),
]  # fmt: skip


def scratch_copy(root: Path, dest: Path) -> Path:
    """Copy the working tree (tracked and untracked-but-not-ignored files) to dest/repo; link
    dest/shared to root's ../shared, so tests that look for ../shared/data find it there too."""
    repo = dest / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.split("\0")):
            src = root / name
            if src.is_file():  # a tracked file deleted in the working tree is skipped
                (repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, repo / name)
    else:  # not a git checkout: everything but the usual build and run outputs
        skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "runs", "out")
        shutil.copytree(root, repo, ignore=skip)
    shared = root.parent / "shared"
    if shared.exists():
        (dest / "shared").symlink_to(shared.resolve())
    return repo


def target_problem(repo: Path, m: Mutant) -> str | None:
    """None when the mutant's original text occurs exactly once in its file."""
    path = repo / m.path
    if not path.is_file():
        return f"STALE: {m.path} does not exist"
    n = path.read_text().count(m.old)
    if n == 1:
        return None
    where = "not found" if n == 0 else f"found {n} times"
    return f"STALE: {m.old!r} {where} in {m.path}"


def run_pytest(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(status, seconds, detail): status passed / failed / timeout / error."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {k: v for k, v in os.environ.items() if k != "SIMPO_REGEN_GOLDEN"}
    env["PYTHONPATH"] = str(repo)
    t0 = time.perf_counter()
    # own process group: on a timeout, torchrun workers started by the tests go too
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.perf_counter() - t0, f"> {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return "passed", seconds, ""
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
    if proc.returncode == 1 and failed:
        return "failed", seconds, failed.group(1)
    last = (out.strip().splitlines() or ["no output"])[-1]
    return "error", seconds, f"pytest exit {proc.returncode}: {last}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    p.add_argument("--list", action="store_true", help="list mutants and target status; run none")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (path printed)")
    args = p.parse_args(argv)
    names = [m.name for m in MUTANTS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"unknown mutant(s) {', '.join(unknown)}; known: {', '.join(names)}")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]

    if args.list:
        problems = [target_problem(ROOT, m) for m in mutants]
        for m, problem in zip(mutants, problems, strict=True):
            print(f"{m.name:20} {m.path:20} {problem or 'ok'}")
            print(f"{'':20} {m.why}; {' '.join(m.tests)}")
        return 1 if any(problems) else 0

    scratch = Path(tempfile.mkdtemp(prefix="simpo-mutants-"))
    try:
        repo = scratch_copy(ROOT, scratch)
        print(f"scratch copy: {repo}", flush=True)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"baseline: {' '.join(tests)} ...", flush=True)
            status, seconds, detail = run_pytest(repo, tests, args.timeout * len(tests))
            print(f"baseline: {status} in {seconds:.0f} s {detail}", flush=True)
            if status != "passed":
                print("the unmutated tests do not pass: fix them first; no mutant was run")
                return 1
        rows = []
        for i, m in enumerate(mutants, 1):
            problem = target_problem(repo, m)
            if problem:
                rows.append((m, "STALE", 0.0, problem))
                print(f"[{i}/{len(mutants)}] {m.name}: {problem}", flush=True)
                continue
            path = repo / m.path
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                status, seconds, detail = run_pytest(repo, m.tests, args.timeout)
            finally:
                path.write_text(original)
            result = {"failed": "caught", "passed": "SURVIVED"}.get(status, status)
            rows.append((m, result, seconds, detail))
            print(
                f"[{i}/{len(mutants)}] {m.name}: {result} in {seconds:.0f} s {detail}", flush=True
            )
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{'mutant':20} {'file':19} {'result':9} {'s':>5}  caught by / why not")
    for m, result, seconds, detail in rows:
        note = detail if result != "SURVIVED" else f"no test noticed: {m.why}"
        print(f"{m.name:20} {m.path:19} {result:9} {seconds:5.0f}  {note}")
    bad = [m.name for m, result, _, _ in rows if result not in ("caught", "timeout")]
    caught = len(rows) - len(bad)
    print(f"\n{caught}/{len(rows)} caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
