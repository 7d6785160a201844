"""bench/gpu.py without a GPU: its shapes are the real checkpoints', its projection arithmetic
is right, and its CPU dry run exercises every code path (tiny Llama and tiny Gemma-2 with
soft-caps and local/global layers, the truncated runs and the projection from them)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from train_helpers import ROOT

sys.path.insert(0, str(ROOT))
from bench.projection import LENGTHS, Job, comm_bytes_per_step, project  # noqa: E402
from bench.shapes import SHAPES, TRUNCATED, model_args  # noqa: E402
from simpo.model import FULL, SLIDING, Transformer  # noqa: E402


def n_params(shape: str, layers: int | None = None) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(model_args(shape, layers)).parameters())


@pytest.mark.parametrize(
    "shape, count",  # the checkpoints' parameter counts (safetensors total_size / 2 bytes)
    [("gemma-2-9b", 9_241_705_984), ("llama-3-8b", 8_030_261_248),
     ("llama-3.2-1b", 1_235_814_400)],
)  # fmt: skip
def test_shapes_are_the_real_checkpoints(shape, count):
    assert n_params(shape) == count


def test_gemma_2_9b_shape_has_its_features():
    a = model_args("gemma-2-9b")
    assert (a.head_dim, a.vocab_size, a.n_layers, a.dim) == (256, 256000, 42, 3584)
    assert (a.attn_softcap, a.final_softcap, a.sliding_window) == (50.0, 30.0, 4096)
    assert a.tie_word_embeddings and a.sandwich_norm and a.norm_plus_one
    assert a.layer_types == (SLIDING, FULL) * 21  # local first, then global, alternating
    for layers in TRUNCATED["gemma-2-9b"]:
        cut = model_args("gemma-2-9b", layers)
        assert cut.layer_types == (SLIDING, FULL) * (layers // 2) and cut.n_layers == layers
    # the fixed part (embedding/head, final norm) plus the per-layer part, linear in layers
    l1, l2 = TRUNCATED["gemma-2-9b"]
    per_layer = (n_params("gemma-2-9b", l2) - n_params("gemma-2-9b", l1)) / (l2 - l1)
    assert n_params("gemma-2-9b", l1) + per_layer * (42 - l1) == n_params("gemma-2-9b")


def test_fsdp_traffic_by_hand():
    """8 ranks, 1e9 block and 1e8 root parameters, 3 micro-batches: bf16 all-gathers of the
    blocks twice and of the root once per micro-batch, one fp32 reduce-scatter per step."""
    job = Job(ranks=8)
    gather = 3 * 2 * (2 * 1e9 + 1e8)
    assert comm_bytes_per_step(1e9, 1e8, 3, job) == pytest.approx(7 / 8 * (gather + 4 * 1.1e9))
    every = Job(ranks=8, grad_sync="every")
    assert comm_bytes_per_step(1e9, 1e8, 3, every) == pytest.approx(
        7 / 8 * (gather + 3 * 4 * 1.1e9)
    )


def test_projection_by_hand():
    job = Job(pairs=1280, batch_size=128, ranks=8, busbw_gbs=100.0)
    tokens = 1280 * job.tokens_per_pair
    p = project(1000.0, 1e9, 1e8, optimizer_s_per_param=1e-9, job=job)
    assert p.steps == 10 and p.tokens == pytest.approx(tokens)
    compute_s = tokens / (8 * 1000.0)
    comm_s = 10 * comm_bytes_per_step(1e9, 1e8, LENGTHS["micro_batches_per_rank"], job) / 1e11
    opt_s = 10 * 1e-9 * 1.1e9 / 8
    assert p.compute_h * 3600 == pytest.approx(compute_s)
    assert p.gpu_hours_serial == pytest.approx(8 * (compute_s + comm_s + opt_s) / 3600)
    assert p.gpu_hours_overlapped == pytest.approx(8 * (max(compute_s, comm_s) + opt_s) / 3600)
    assert math.isclose(job.tokens_per_pair, 749.7, abs_tol=0.1)  # AlpacaEval, 2048 / 1800


def test_cpu_dry_run_covers_the_gemma_shape(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu-dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (tmp_path / "gpu_results.md").read_text()
    depth = SHAPES["tiny gemma-2 (dry run)"]["num_hidden_layers"]
    for layers in TRUNCATED["tiny gemma-2 (dry run)"]:
        assert f"| tiny gemma-2 (dry run) ({layers}/{depth} layers) | on | ok |" in text
    assert f"| tiny gemma-2 (dry run) (all {depth} layers, fwd+bwd) | on | projected |" in text
    assert "| tiny (dry run) | off | ok |" in text and "| tiny (dry run) | on | ok |" in text
    assert "| 64 x 1024 (cap 30), 512 |" in text  # the soft-capped head kernel
    assert "50,000 pairs x 1 epoch" in text and "assumed 360 GB/s" in text
    assert "projected for 50k pairs (slides: 16)" in text.splitlines()[-1]
    for shape in ("tiny (dry run)", "tiny gemma-2 (dry run)"):  # decoding (bench/decode.py)
        assert f"| {shape} | 1 |" in text and f"| {shape} | 4 |" in text
