"""Fault injection, in one bounded chain: what clusters do to a run, and it still ends bitwise
equal to an uninterrupted one.

  1. a run is frozen at a random moment after its 3rd step (maybe mid-save);
  2. a second launch into the same output_dir (a double-submitted job) must stop at once,
     naming the first run, and touch nothing;
  3. the frozen run is killed with SIGKILL (no cleanup runs) and a torn half line is added
     to metrics.jsonl, as a crash mid-append leaves it;
  4. a resume runs with a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full
     disk): its checkpoint write fails with one line naming the path and the free space,
     exit 1, and leaves no partial checkpoint;
  5. the newest checkpoint is truncated; the last resume skips it, saying so, resumes from
     the one before and finishes: every step logged once, losses and weights bitwise equal.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, make_tiny, metrics, run_train, train_argv, weights

from simpo.checkpoint import complete_checkpoints

KEYS = ("loss", "grad_norm", "rewards/margins", "logps/chosen")
STEPS = 10
ENV_KEYS = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def small_files() -> None:
    """In the child: no file may grow past 256 KiB (a checkpoint shard is ~800 KiB)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 300
    while not (path.exists() and path.read_text().count("\n") >= n):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_kill_concurrent_launch_torn_log_full_disk_corrupt_checkpoint(tmp_path):
    env = {**os.environ, **ENV_KEYS}
    model, data = make_tiny(tmp_path / "tiny", num_pairs=48)

    def argv(out: Path) -> list[str]:
        every = ("--train.save_every=1", "--train.keep_checkpoints=3")
        return train_argv(out, model, data, f"--train.max_steps={STEPS}", *every)

    run_train(argv(tmp_path / "straight"))
    straight, final = metrics(tmp_path / "straight"), weights(tmp_path / "straight")

    out, log = tmp_path / "run", tmp_path / "first.log"
    script = [sys.executable, "train.py"]
    rng = random.Random()
    delay = rng.uniform(0.0, 0.3)
    with log.open("w") as f:
        first = subprocess.Popen([*script, *argv(out)], cwd=ROOT, env=env, stdout=f, stderr=f)
    try:
        wait_for_lines(out / "metrics.jsonl", 3, first, log)
        time.sleep(delay)
        first.send_signal(signal.SIGSTOP)  # frozen, still holding its lock
        assert first.poll() is None, f"finished before it was frozen (delay {delay:.2f})"
        second = subprocess.run(
            [*script, *argv(out), "--train.resume=true"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"error: train.output_dir = '{out}' is in use by another run (pid {first.pid} on"
            )
        ), second.stderr[-3000:]
    finally:
        first.kill()  # SIGKILL works on a stopped process
        first.wait()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 0.69')  # torn: no newline

    limited = subprocess.run(
        [*script, *argv(out), "--train.resume=true"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )  # fmt: skip
    msg = f"delay {delay:.2f}\n{limited.stdout[-2000:]}\n{limited.stderr[-3000:]}"
    assert limited.returncode == 1, msg
    assert "dropped an incomplete last line" in limited.stdout, msg
    last = limited.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out / 'checkpoints' / '.tmp_step_'}"), msg
    assert f"the file-size limit (ulimit -f) is {256 * 1024} bytes" in last, msg
    assert "iB free on /" in last, msg
    assert "Traceback" not in limited.stderr, msg
    assert not list((out / "checkpoints").glob(".tmp_*")), msg

    newest = complete_checkpoints(out / "checkpoints")
    assert len(newest) >= 2, (msg, newest)
    shard = newest[0] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run_train([*argv(out), "--train.resume=true"])
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), msg
    for a, b in zip(straight, resumed, strict=True):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, (a["step"], msg)
    for name, t in weights(out).items():
        assert torch.equal(t, final[name]), name
