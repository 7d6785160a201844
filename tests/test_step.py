"""simpo.step.train_step wastes nothing: one gradient reduce-scatter per optimizer step (and
the same gradients as one per micro-batch), no host synchronisation inside its loop, and a
live DPO reference scored without gradients through the chunked kernel (never full logits).

One process in-process (a one-rank group, as train.py starts it) and two ranks under torchrun
(gloo on CPU); tiny random models (tests/step_checks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from step_checks import (
    VOCAB,
    GemmFlops,
    count_reduce_scatters,
    micro_batches,
    random_pairs,
    run_step,
    step_grads,
    tiny_model,
)
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import ROOT

from simpo.config import LossConfig
from simpo.packing import plan_micro_batches
from simpo.reference import ReferenceTable, reference_for
from simpo.step import train_step
from simpo.world import init_world, shutdown

aten = torch.ops.aten


@pytest.fixture
def world():
    w = init_world()
    yield w
    shutdown()


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_grad_sync_last_equals_every_in_one_process(world, precision):
    """5 micro-batches; gradients reduced once (after the last) equal reduced after each, bit
    for bit on one rank: the same fp32 additions in the same order (bf16-mixed: FSDP
    accumulates the unsynced gradients in the fp32 reduce dtype, as the synced ones add up in
    the fp32 sharded .grad)."""
    model = tiny_model(world, precision)
    pairs = random_pairs()
    micro = micro_batches(world, pairs)
    assert len(micro) == 5
    every = step_grads(model, micro, world, "every", len(pairs))
    last = step_grads(model, micro, world, "last", len(pairs))
    assert every.keys() == last.keys()
    for name, g in every.items():
        assert torch.equal(g, last[name]), name


def test_grad_sync_last_defers_the_reduction(world):
    """What the switch does: with "last", no block has a sharded gradient before the last
    micro-batch's backward (they wait, unsharded, inside FSDP); with "every", they do. A
    reference function is the probe: train_step calls it before each micro-batch's forward,
    i.e. after the previous micro-batch's backward."""
    model = tiny_model(world)
    pairs = random_pairs(3)
    micro = micro_batches(world, pairs)
    cfg = LossConfig(name="dpo", beta=0.1)
    for mode, expect in (("every", [False, True, True]), ("last", [False, False, False])):
        has_grad = []

        def probe(mb):
            has_grad.append(all(p.grad is not None for p in model.layers.parameters()))
            zeros = torch.zeros(2 * mb.num_pairs)
            return zeros, zeros + 20

        train_step(model, micro, cfg, len(pairs), world, probe, grad_sync=mode)
        assert has_grad == expect, mode
        assert all(p.grad is not None for p in model.parameters())  # reduced at the end
        model.zero_grad(set_to_none=True)


def test_grad_sync_last_equals_every_on_two_ranks():
    """torchrun, 2 ranks, fp32 and bf16-mixed: 5 pairs of one micro-batch each, so rank 0
    runs 3 and rank 1 runs 2 plus an empty one; "last" reduce-scatters once per FSDP unit
    (after the empty one on rank 1), "every" once per unit and micro-batch, and the gradients
    agree to fp32 rounding of the different order of the cross-rank sum."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(ROOT / "tests" / "step_checks.py"), "fp32", "bf16-mixed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    assert results.keys() == {"fp32", "bf16-mixed"}
    for r in results.values():
        assert r["micro_batches"] == 3 and r["empty_micro_batches"] == 1
        assert r["reduce_scatters_every"] == 3 * r["units"]
        assert r["reduce_scatters_last"] == r["units"]
        assert r["max_rel_diff"] < 1e-6


def test_reduce_scatter_counter_counts_in_one_process(world):
    """The counter the two-rank test relies on sees nothing on one rank (FSDP2 copies there
    instead): so the one-process tests above check the result, the probe the mechanism."""
    model = tiny_model(world)
    micro = micro_batches(world, random_pairs(2))
    _, calls = count_reduce_scatters(lambda: step_grads(model, micro, world, "every", 2))
    assert calls == 0


# --------------------------------------------------------------------------- host syncs

# Ops whose result the host must wait for on a GPU: .item() / bool() / int() / float() all
# reach _local_scalar_dense; the others have data-dependent output shapes.
SYNCING = {
    aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten.is_nonzero,
    aten.equal, aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.masked_scatter,
}  # fmt: skip
HOST_READS = ("tolist", "numpy", "cpu", "item")  # Python-level reads of a tensor's values


class HostSyncs(TorchDispatchMode):
    """Records every op that would make the host wait for the device (as on CUDA with
    torch.cuda.set_sync_debug_mode("error"), which needs a GPU)."""

    supports_higher_order_operators = True  # flex_attention: run it, it is one kernel on CUDA

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func.overloadpacket in SYNCING or bool_index:
            self.seen.append(str(func))
        if func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None:
            self.seen.append(str(func))
        return func(*args, **kwargs)


def watch_host_reads(
    monkeypatch: pytest.MonkeyPatch, seen: list[str], on_host: tuple[torch.Tensor, ...] = ()
) -> None:
    """Record Python-level reads of tensor values, except of `on_host`: tensors that stay on
    the host on a GPU too (PackedBatch.pair_index), where reading them waits for nothing."""
    exempt = {id(t) for t in on_host}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            if id(self) not in exempt:
                seen.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("reference", ["none", "table", "live"])
def test_no_host_sync_inside_the_step(world, monkeypatch, reference):
    """train_step (SimPO; DPO with a table or a live model) reads no device value on the host.

    The models use the "dense" attention backend: the CUDA default, flex, cannot run a
    backward on CPU (its BlockMask is watched below), and the CPU default, "sdpa", plans its
    documents on the host (CPU only). A gemma2-shaped model: soft-caps, sliding windows and a
    tied head take part.
    """
    model = tiny_model(world, family="gemma2")
    pairs = random_pairs(4)
    micro = micro_batches(world, pairs)
    cfg = LossConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5)
    ref = None
    if reference == "table":
        index = torch.tensor([p.index for p in pairs])
        sums, counts = -torch.rand(4, 2, dtype=torch.float64) * 50, torch.full((4, 2), 20)
        table = ReferenceTable(index, sums, counts)  # (P, 2) each, as reference.py writes
        ref, cfg = reference_for(table, None), LossConfig(name="dpo", beta=0.1)
    elif reference == "live":
        ref_model = tiny_model(world, family="gemma2", trainable=False)
        ref, cfg = reference_for(None, ref_model), LossConfig(name="dpo", beta=0.1)
    train_step(model, micro, cfg, len(pairs), world, ref)  # warm: lazy inits, caches
    model.zero_grad(set_to_none=True)
    mode = HostSyncs()
    watch_host_reads(monkeypatch, mode.seen, on_host=tuple(mb.pair_index for mb in micro))
    with mode:
        sums = train_step(model, micro, cfg, len(pairs), world, ref)
    monkeypatch.undo()
    assert mode.seen == []
    assert torch.isfinite(sums["loss"]) and sums["tokens"] == 4 * 50  # the step did run


def test_flex_block_mask_needs_no_host_sync(monkeypatch):
    """The CUDA path's mask: create_block_mask over a packed layout (window and full) reads
    nothing back (checked on CPU; the BlockMask is built from the same device tensors)."""
    batch = plan_micro_batches(random_pairs(2), 128)[0]  # one row, two pairs
    mode = HostSyncs()
    watch_host_reads(monkeypatch, mode.seen, on_host=(batch.pair_index,))
    with mode:
        for window in (None, 8):
            batch.layout.mask(window, None, "flex")
    monkeypatch.undo()
    assert mode.seen == []
    assert len(batch.layout._masks) == 2  # both masks were built


def test_the_host_sync_watcher_catches_what_it_should(world, monkeypatch):
    """The watcher is not blind: compute_loss's count check (off in train_step) and a
    .tolist() are both seen."""
    from simpo.losses import compute_loss

    s, n = torch.tensor([-4.0, -9.0]), torch.tensor([2.0, 3.0])
    mode = HostSyncs()
    watch_host_reads(monkeypatch, mode.seen)
    with mode:
        compute_loss(LossConfig(), s, n)
        n.tolist()
    monkeypatch.undo()
    assert "aten._local_scalar_dense.default" in mode.seen and "Tensor.tolist" in mode.seen


# ------------------------------------------------------------------ live reference memory


class LogitRows(TorchDispatchMode):
    """The most rows of any (..., V)-shaped tensor an op produced: logits or a chunk of them
    (autograd's saved tensors and the kernel's buffers are op outputs too)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB:
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


def test_live_reference_scores_without_grad_and_without_full_logits(world):
    """The live reference runs under no_grad through the chunked kernel: no logits beyond
    the N scored tokens' (at most one (chunk <= N, V) block), where the plain forward makes
    (B, T, V) ones (checked too, so the measure can tell them apart), and nothing is kept
    for a backward."""
    ref_model = tiny_model(world, trainable=False)
    reference = reference_for(None, ref_model)
    batch = plan_micro_batches(random_pairs(2), 128)[0]  # one row: 2 x (10 + 20 + 20) tokens
    B, T = batch.input_ids.shape
    n_scored = batch.score.targets.numel()
    assert (B * T, n_scored) == (100, 80)
    with LogitRows() as ref_mode:
        ref_sum, ref_count = reference(batch)
    with torch.no_grad(), LogitRows() as logits_mode:
        ref_model(batch.input_ids, batch.layout)  # the full-logits path, for contrast
    assert logits_mode.rows == B * T
    assert 0 < ref_mode.rows <= n_scored
    assert ref_sum.grad_fn is None and not ref_sum.requires_grad
    assert ref_count.tolist() == [20.0] * 4


def test_logits_metric_is_the_mean_logit_over_response_tokens(world):
    """logits/chosen|rejected (the official trainer's metric, over response positions): the
    step's logit_sum / logit_count equal the full logits' vocabulary mean at every scored
    token, computed naively, and the counts equal the response lengths."""
    model = tiny_model(world, "fp32")
    pairs = random_pairs()
    micro = micro_batches(world, pairs)
    sums = train_step(model, micro, LossConfig(), len(pairs), world)
    want_sum = {"chosen": 0.0, "rejected": 0.0}
    with torch.no_grad():
        for mb in micro:
            logits = model(mb.input_ids, mb.layout).flatten(0, 1).double()  # (B*T, V)
            means = logits.mean(dim=1)[mb.score.hidden_index]  # (N,) per scored token
            for name, parity in (("chosen", 0), ("rejected", 1)):
                want_sum[name] += float(means[mb.score.response_ids % 2 == parity].sum())
    for name, key in (("chosen", "chosen_ids"), ("rejected", "rejected_ids")):
        assert float(sums[f"logit_count/{name}"]) == sum(len(getattr(p, key)) for p in pairs)
        got = float(sums[f"logit_sum/{name}"])
        assert abs(got - want_sum[name]) <= 1e-4 * max(1.0, abs(want_sum[name])), name


# ------------------------------------------------------------------------ the fused loss


@pytest.mark.parametrize(
    ("family", "precision", "loss"),
    [
        ("llama", "fp32", "simpo"),
        ("gemma2", "fp32", "simpo"),  # final soft-cap, tied head
        ("llama", "fp32", "dpo"),  # live reference
        ("gemma2", "fp32", "orpo"),
        ("llama", "bf16-mixed", "simpo"),
    ],
)
def test_fused_step_equals_the_two_pass_step(world, family, precision, loss):
    """The training step's default (the loss fused into the head pass, the head's gradients
    formed in the forward) against the reference path (per-response log-probs from the
    two-pass kernel, compute_loss, autograd): the same gradients for every parameter and the
    same logged sums, over 5 micro-batches and FSDP2 on one rank. fp32: to 1e-5 relative;
    bf16-mixed: the two paths round the bf16 head GEMMs' inputs the same way but accumulate in
    another order, so to 1e-2."""
    model = tiny_model(world, precision, family=family)
    pairs = random_pairs()
    micro = micro_batches(world, pairs)
    cfg = {
        "simpo": LossConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3),
        "dpo": LossConfig(name="dpo", beta=0.1),
        "orpo": LossConfig(name="orpo", beta=0.1),
    }[loss]
    reference = None
    if loss == "dpo":  # another random init: a reference that differs from the policy
        ref_model = tiny_model(world, precision, family=family, trainable=False)
        ref_model.init_weights(seed=1)
        reference = reference_for(None, ref_model)
    fused_grads, fused_sums = run_step(model, micro, world, 5, cfg, reference, fused_loss=True)
    plain_grads, plain_sums = run_step(model, micro, world, 5, cfg, reference, fused_loss=False)
    tol = 1e-5 if precision == "fp32" else 1e-2
    for name, g in plain_grads.items():
        assert g.norm() > 0, name  # every parameter takes part
        assert float((fused_grads[name] - g).norm() / g.norm()) < tol, name
    assert fused_sums.keys() == plain_sums.keys()
    for key, value in plain_sums.items():
        assert fused_sums[key] == pytest.approx(value, rel=tol, abs=tol), key


@pytest.mark.parametrize(("fused_loss", "gemms"), [(True, 3), (False, 4)])
@pytest.mark.parametrize("num_pairs", [12, 2])
def test_the_step_does_three_vocabulary_gemms(world, fused_loss, gemms, num_pairs):
    """What the fused step saves, counted: one micro-batch of 12 pairs (the kernel's chunks,
    1/6 of the scored tokens, hold whole pairs) or of 2 (they would not: the fused loss
    grows its chunks to whole pairs within the byte budget). The fused step does 3 vocabulary
    GEMMs per scored token (logits, d hidden, d weight), the two-pass kernel 4 (logits again
    in its backward). The embedding is a lookup, not a GEMM; llama's head is untied."""
    model = tiny_model(world)
    pairs = random_pairs(num_pairs)
    micro = plan_micro_batches(pairs, num_pairs * 50)
    assert len(micro) == 1
    n_scored, dim = micro[0].score.targets.numel(), model.args.dim
    with GemmFlops(only_dim=VOCAB) as mode:
        train_step(model, micro, LossConfig(), len(pairs), world, fused_loss=fused_loss)
    assert mode.flops == gemms * 2 * n_scored * VOCAB * dim


def test_a_batch_without_host_lengths_still_trains(world):
    """A hand-built PackedBatch without `response_lengths` (the packer always sets them): the
    fused loss reads the counts back from the device instead; the same gradients."""
    import dataclasses

    model = tiny_model(world)
    pairs = random_pairs(3)
    micro = micro_batches(world, pairs)
    assert all(len(mb.response_lengths) == 2 for mb in micro)
    bare = [dataclasses.replace(mb, response_lengths=()) for mb in micro]
    with_lengths, _ = run_step(model, micro, world, 3)
    without, _ = run_step(model, bare, world, 3)
    for name, g in with_lengths.items():
        assert torch.equal(g, without[name]), name
