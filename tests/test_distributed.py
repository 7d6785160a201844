"""train.py under `torchrun --nproc_per_node 2` (FSDP2 over gloo on CPU) and as a subprocess.

Two ranks must give the same losses and weights as one process on the same global batch:
the batch is dealt to the ranks, the loss is normalised by the pairs of the whole step, and
FSDP's gradient reduction turns the per-rank sums into the global one. Each torchrun run
must also exit 0 (see simpo.world.shutdown for the abort it would otherwise hit 1 in 4 times).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import CONFIG, ROOT, make_tiny, metrics, run_train, train_argv, weights

from simpo.config import load_config
from simpo.data import load_datasets
from simpo.packing import plan_micro_batches
from simpo.sampler import global_batch
from simpo.tokenizer import Tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LR, STEPS = 3e-3, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--standalone", "train.py", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def has_empty_micro_batch(data: Path, model: Path, batch_size: int, max_tokens: int) -> bool:
    """Whether some step of the test run gives a rank an empty (padding) micro-batch, so the
    test covers a rank running a forward and backward that adds nothing."""
    cfg = load_config(CONFIG, [f"--data.train={data}", "--data.eval_fraction=0"])
    seed = cfg.train.seed
    pairs, _, _ = load_datasets(cfg.data, Tokenizer.from_dir(model), seed, progress=False)
    for step in range(STEPS):
        batch = global_batch(pairs, step, batch_size, seed)
        for rank in range(2):
            if any(b.num_pairs == 0 for b in plan_micro_batches(batch, max_tokens, 2, rank)):
                return True
    return False


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_two_ranks_match_one_process(tiny, tmp_path, precision):
    model, data = tiny
    extra = (f"--train.precision={precision}", "--train.batch_size=5", "--data.max_tokens=192")
    extra += (f"--train.max_steps={STEPS}", f"--train.lr={LR}")
    assert has_empty_micro_batch(data, model, batch_size=5, max_tokens=192)
    run_train(train_argv(tmp_path / "one", model, data, *extra))
    proc = torchrun(train_argv(tmp_path / "two", model, data, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # fp32 differs only in the order of the gradient sum. In bf16-mixed each rank also packs
    # other rows, so activations round differently (measured: losses 2e-5 and gradient
    # norms 1.3e-4 relative apart).
    rel = 1e-5 if precision == "fp32" else 1e-3
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=rel), (a["step"], k)
    # Weights: compare the updates, |w_two - w_one| / |w_one - w_start|. Adam divides by the
    # gradient's own scale, so an element whose gradient is ~0 (rare tokens' head rows) moves
    # by ~lr whatever its sign: tiny differences in the sum show up there. Measured: fp32
    # 2.5e-5 apart; bf16-mixed 2.2e-2 (each rank's bf16 gradient rounds other partial sums).
    start = load_file(model / "model.safetensors")
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    apart = sum(((w2[k] - w1[k]) ** 2).sum() for k in w1) ** 0.5
    update = sum(((w1[k] - start[k]) ** 2).sum() for k in w1) ** 0.5
    assert apart / update < (1e-4 if precision == "fp32" else 5e-2)


def test_sigterm_checkpoints_and_resumes_on_another_world_size(tiny, tmp_path):
    """Preemption under torchrun: SIGTERM to torchrun reaches both workers, which finish the
    step and save a checkpoint; one process then resumes it (DCP reshards) and finishes."""
    model, data = tiny
    out = tmp_path / "run"
    argv = train_argv(out, model, data, "--train.max_steps=16", "--train.export=false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    log = tmp_path / "log.txt"
    with log.open("w") as f:  # a file, not a pipe: a full pipe would block the workers
        proc = subprocess.Popen([*cmd, "train.py", *argv], cwd=ROOT, env=ENV, stdout=f, stderr=f)
        try:
            deadline, jsonl = time.time() + 300, out / "metrics.jsonl"
            while not (jsonl.exists() and jsonl.read_text().count("\n") >= 2):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            proc.kill()
    saved = metrics(out)[-1]["step"]
    assert saved < 16, "the run ended before SIGTERM arrived"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{saved}"]
    assert f"SIGTERM: saved {out}/checkpoints/step_{saved}" in log.read_text()
    run_train([*argv, "--train.resume=true"])
    assert [r["step"] for r in metrics(out)] == list(range(1, 17))
