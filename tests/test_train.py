"""train.py in one process on CPU: exact resume, golden curve, DPO reference modes, learning,
activation checkpointing, safety stops, bad input. Tiny models; `train.main` runs in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import CONFIG, ROOT, make_tiny, metrics, run_train, train_argv, weights

from simpo.attention import Layout
from simpo.checkpoint import TrainingError, latest_checkpoint
from simpo.config import ConfigError, load_config
from simpo.data import DataError, load_pairs
from simpo.fsdp import build_model
from simpo.losses import compute_loss
from simpo.metrics import attention_context
from simpo.packing import pack_pairs
from simpo.sampler import global_batch, steps_for
from simpo.schedule import lr_at
from simpo.tokenizer import Tokenizer
from simpo.world import init_world, shutdown

GOLDEN = ROOT / "tests" / "golden" / "tiny_simpo.json"
GOLDEN_KEYS = ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_schedule_and_data_order():
    # 10 steps, warmup ceil(0.1 * 10) = 1: step 0 at peak, then cosine to min at the end
    assert lr_at(0, 10, 1.0, 0.1) == 1.0
    assert lr_at(1, 10, 1.0, 0.1) == pytest.approx(1.0)  # cos(0)
    assert lr_at(5, 10, 1.0, 0.1, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 0.173648), 1e-5)
    assert lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)  # warmup (0 + 1) / 10
    items = list(range(10))
    batches = [global_batch(items, s, 4, seed=3) for s in range(5)]  # 20 = two epochs
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == items and sorted(flat[10:]) == items  # each epoch: all, once
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    assert global_batch(items, 3, 4, seed=3) == batches[3]  # a pure function of the step
    assert steps_for(10, 4, epochs=2, max_steps=-1) == 5 and steps_for(10, 4, 2, 7) == 7


def test_incomplete_checkpoints_are_ignored_and_attention_flops(tmp_path):
    (tmp_path / "step_8").mkdir()
    (tmp_path / "step_8" / "meta.json").write_text("{}")
    (tmp_path / "step_12").mkdir()  # crashed before meta.json was written: incomplete
    (tmp_path / ".tmp_step_16").mkdir()  # crashed mid-save
    assert latest_checkpoint(tmp_path) == tmp_path / "step_8"
    doc = torch.tensor([[0, 0, 1, -1], [0, 0, 0, 0]])  # docs of 2 and 1 tokens, then one of 4
    assert attention_context(Layout(doc, torch.zeros_like(doc), torch.zeros_like(doc))) == 21


def test_resume_mid_run_is_exact(tiny, tmp_path):
    """6 steps straight == 3 steps, kill, resume, 3 steps: same losses and weights, bitwise."""
    model, data = tiny
    out = tmp_path / "run"
    argv = train_argv(out, model, data, "--train.max_steps=6", "--train.save_every=3")
    run_train(argv)
    straight, final = metrics(out), weights(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    # the run is killed after step 5: step 6's checkpoint and the export never happened
    shutil.rmtree(out / "checkpoints" / "step_6")
    shutil.rmtree(out / "final")
    run_train([*argv, "--train.resume=true"])
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 4-5 of the first try gone
    for a, b in zip(straight, resumed, strict=True):
        assert {k: a[k] for k in GOLDEN_KEYS} == {k: b[k] for k in GOLDEN_KEYS}
    for name, t in weights(out).items():
        assert torch.equal(t, final[name]), name
    # resuming a finished run is a no-op that re-exports
    run_train([*argv, "--train.resume=true"])
    assert len(metrics(out)) == 6


@pytest.mark.parametrize("fused_loss", ["true", "false"])
def test_golden_loss_curve(tmp_path, fused_loss):
    """configs/tiny-cpu.toml from nothing (synthetic data, tokenizer, random model): the first
    steps match the checked-in curve, with the loss fused into the head pass (the default)
    and without (log-probs, then the loss, then autograd). Regenerate with
    SIMPO_REGEN_GOLDEN=1 after an intended change of the data, tokenizer, model init or loss."""
    out = tmp_path / "golden"
    argv = ["--config", str(CONFIG), f"--train.output_dir={out}", "--train.max_steps=5"]
    argv += ["--train.eval_every=0", "--train.save_every=0", "--train.export=false"]
    run_train([*argv, f"--train.fused_loss={fused_loss}"])
    got = [{k: r[k] for k in ("step", *GOLDEN_KEYS)} for r in metrics(out)]
    if os.environ.get("SIMPO_REGEN_GOLDEN") and fused_loss == "true":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"argv": argv[4:], "steps": got}, indent=1) + "\n")
        pytest.skip(f"SIMPO_REGEN_GOLDEN set: wrote {GOLDEN}; nothing compared (review its diff)")
    want = json.loads(GOLDEN.read_text())["steps"]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for k in GOLDEN_KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["step"], k)


def test_dpo_precompute_equals_live(tiny, tmp_path):
    model, data = tiny
    dpo = ["--loss.name=dpo", "--loss.beta=0.1", "--data.eval_fraction=0.1", "--train.eval_every=3"]
    runs = {}
    for mode in ("precompute", "live"):
        out = tmp_path / mode
        run_train(
            train_argv(out, model, data, *dpo, f"--loss.reference={mode}", "--train.max_steps=3")
        )
        runs[mode] = metrics(out)
    cache = list((tmp_path / "precompute" / "cache").glob("reference-*.safetensors"))
    assert sorted(p.name.split("-")[1] for p in cache) == ["eval", "train"]
    # precompute scores each pair in other rows than the training step does, so the fp32
    # sums (~ -200) agree to ~1e-5 absolute, i.e. ~1e-6 after β = 0.1
    for a, b in zip(runs["precompute"], runs["live"], strict=True):
        for k in ("loss", "rewards/margins", "rewards/chosen", "grad_norm", "eval/loss"):
            if k in a:  # eval/loss: every 3 steps
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)
    first = runs["precompute"][0]
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference: log 2
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # live: the reference runs the policy's own forward on the same rows, so at step 1 every
    # reward is exactly 0, a tie, and the logged accuracy is 0.0 (strict >, as TRL and the
    # official trainer); precompute's ~1e-6 noise would make it a coin flip instead
    live = runs["live"][0]
    assert (live["rewards/chosen"], live["rewards/rejected"]) == (0.0, 0.0)
    assert live["rewards/accuracies"] == 0.0


def test_simpo_raises_training_accuracy(tmp_path):
    """The loss optimises: preference accuracy on the 32 training pairs (chance 0.5) reaches
    >= 0.9 within 30 steps of 8 pairs (0.97 when written)."""
    model, data = make_tiny(tmp_path, num_pairs=32)
    out = tmp_path / "run"
    extra = ("--train.max_steps=30", f"--data.eval={data}", "--train.eval_every=15")
    run_train(train_argv(out, model, data, *extra, "--train.export=false"))
    rows = metrics(out)
    assert rows[-1]["eval/num_pairs"] == 32
    assert rows[-1]["eval/rewards/accuracies"] >= 0.9, [
        r.get("eval/rewards/accuracies") for r in rows
    ]
    assert rows[-1]["eval/loss"] < 0.7 * rows[0]["loss"]


def test_sft_recipe_path(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "sft"
    run_train(train_argv(out, model, data, "--loss.name=sft", "--train.max_steps=3"))
    rows = metrics(out)
    assert all(r["loss"] == pytest.approx(r["nll_loss"]) for r in rows)  # -avg log p(y_w)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "final" / "config.json").is_file() and (
        out / "final" / "tokenizer.model"
    ).is_file()
    assert "[loss]" in (out / "config.toml").read_text()


def test_activation_checkpointing_gives_identical_grads(tiny):
    model_dir, data = tiny
    cfg = load_config(CONFIG, [f"--data.train={data}"])
    pairs, _ = load_pairs(data, Tokenizer.from_dir(model_dir), cfg.data, progress=False)
    batch = pack_pairs(pairs[:6], 512)[0]
    world = init_world()
    try:
        grads = []
        for ac in (False, True):
            model = build_model(model_dir, world, "fp32", activation_checkpointing=ac)
            s, c = model(batch.input_ids, batch.layout, batch.score)
            compute_loss(cfg.loss, s, c)[0].sum().backward()
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
            del model
        assert any("_checkpoint_wrapped_module" in n for n in grads[1])  # AC was applied
        strip = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in grads[1].items()}
        assert grads[0].keys() == strip.keys()
        for n, g in grads[0].items():
            assert torch.equal(g, strip[n]), n
    finally:
        shutdown()


def test_non_finite_loss_stops_naming_the_step(tiny, tmp_path):
    model, data = tiny
    bad = tmp_path / "nan_model"
    shutil.copytree(model, bad)
    state = load_file(bad / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(TrainingError) as err:
        run_train(train_argv(tmp_path / "run", bad, data))
    assert re.search(r"step 1: non-finite loss.*Last good checkpoint: none", str(err.value))
    assert "--train.resume_override=train.lr --train.lr=" in str(err.value)  # how to go on


def test_bad_input_errors(tiny, tmp_path):
    model, data = tiny
    # unwritable output dir (a path under a file: fails for root too)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="train.output_dir.*not writable"):
        run_train(train_argv(tmp_path / "file" / "out", model, data))
    # a data file with no usable pair
    empty = tmp_path / "bad.jsonl"
    empty.write_text('{"prompt": "hi", "chosen": "same", "rejected": "same"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match="no usable preference pairs"):
        run_train(train_argv(tmp_path / "run_bad", model, empty))
    # resume with a changed config; a fresh run over old checkpoints
    out = tmp_path / "run"
    run_train(train_argv(out, model, data, "--train.max_steps=2", "--train.export=false"))
    argv = train_argv(out, model, data, "--train.max_steps=2", "--train.resume=true")
    with pytest.raises(ConfigError, match=r"cannot resume.*loss.beta: 2.0 -> 3.0"):
        run_train([*argv, "--loss.beta=3.0"])
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        run_train(train_argv(out, model, data, "--train.max_steps=2"))
    with pytest.raises(ConfigError, match="train.batch_size = 500"):
        run_train(train_argv(tmp_path / "big", model, data, "--train.batch_size=500"))


def test_unknown_key_is_a_clean_error_with_exit_code_2(tmp_path):
    cmd = [sys.executable, "train.py", "--config", str(CONFIG), "--train.lrr=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.lrr'" in proc.stderr and "Did you mean 'lr'" in proc.stderr
    assert "Traceback" not in proc.stderr


# docs/design.md §1: (loss, β, γ/β, lr, max_length, max_prompt_length) of each recipe
RECIPES = {
    "mistral-7b-base-simpo": ("simpo", 2.0, 0.8, 3e-7, 1024, 512),
    "mistral-7b-instruct-simpo": ("simpo", 2.5, 0.1, 5e-7, 2048, 1800),
    "llama3-8b-base-simpo": ("simpo", 2.0, 0.5, 6e-7, 2048, 1800),
    "llama3-8b-instruct-simpo": ("simpo", 10.0, 0.3, 1e-6, 2048, 1800),
    "gemma2-9b-it-simpo": ("simpo", 10.0, 0.5, 8e-7, 2048, 1800),
    "llama3-8b-instruct-dpo": ("dpo", 0.01, None, 3e-7, 2048, 1800),
    "gemma2-9b-it-dpo": ("dpo", 0.01, None, 5e-7, 2048, 1800),
    "llama3-8b-base-sft": ("sft", None, None, 2e-5, 2048, 1800),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_configs_match_the_paper(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    loss, beta, ratio, lr, max_len, max_prompt = RECIPES[name]
    assert (cfg.loss.name, cfg.train.lr) == (loss, lr)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (max_len, max_prompt)
    assert beta is None or cfg.loss.beta == beta
    assert ratio is None or cfg.loss.gamma_beta_ratio == ratio
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_ratio) == (128, 1, 0.1)
    assert cfg.train.precision == "bf16-mixed" and cfg.loss.loss_type == "sigmoid"
