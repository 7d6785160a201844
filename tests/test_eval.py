"""eval.py end to end: metrics against an independent full-logits computation, generation in
AlpacaEval's format, torchrun data parallelism, bad inputs, and the real data + Mistral tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simpo.config import DataConfig
from simpo.data import load_pairs
from simpo.demo.synthetic import write_synthetic_prefs
from simpo.demo.tiny import build_tiny_model_dir, texts_from_file, tiny_hf_config
from simpo.hf import load_model, read_hf_config, save_hf
from simpo.model import Transformer
from simpo.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """`src` with larger random weights, so log-probs differ clearly between responses."""
    model = load_model(src)
    model.init_weights(seed, std=0.3)
    return save_hf(model, dst, tokenizer_dir=src)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(policy dir, reference dir, data file): 40 synthetic pairs, a 1-layer dim-32 llama."""
    root = tmp_path_factory.mktemp("eval")
    data = write_synthetic_prefs(root / "prefs.jsonl", 40, seed=0)
    ref = build_tiny_model_dir(root / "ref", texts_from_file(data), 400, 32, 1, seed=0)
    return perturbed_copy(ref, root / "policy", seed=1), perturbed_copy(ref, root / "ref2", 2), data


def full_logits_logps(model_dir: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair log-prob sums and lengths (P, 2), from whole-sequence logits + log_softmax."""
    tokenizer = Tokenizer.from_dir(model_dir)
    pairs, _ = load_pairs(data, tokenizer, DataConfig(num_workers=1), progress=False)
    model = load_model(model_dir)
    sums, lengths = [], []
    with torch.no_grad():
        for p in pairs:
            row = []
            for response in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor([p.prompt_ids + response])
                logp = model(ids)[0, :-1].log_softmax(-1)  # (T-1, V): predicts ids[1:]
                targets = ids[0, 1:]
                picked = logp.gather(1, targets[:, None])[:, 0]
                row.append(picked[len(p.prompt_ids) - 1 :].sum())  # the response tokens
            sums.append(torch.stack(row))
            lengths.append(torch.tensor([len(p.chosen_ids), len(p.rejected_ids)]))
    return torch.stack(sums).double(), torch.stack(lengths).double()


def test_metrics_match_an_independent_computation(tiny, tmp_path):
    policy, ref, data = tiny
    out = tmp_path / "out"
    beta, dpo_beta = 2.5, 0.2
    argv = ["--model", str(policy), "--data", str(data), "--out", str(out), "--ref", str(ref)]
    m = ev.main([*argv, "--beta", str(beta), "--dpo-beta", str(dpo_beta), "--quiet"])
    assert m == json.loads((out / "metrics.json").read_text())

    sums, lengths = full_logits_logps(policy, data)
    ref_sums, _ = full_logits_logps(ref, data)
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scores] == list(range(40))
    got = torch.tensor([s["logp_sum"] for s in scores]).double()
    torch.testing.assert_close(got, sums, rtol=1e-5, atol=1e-3)  # fp32 sums of ~40 tokens
    assert torch.equal(torch.tensor([s["length"] for s in scores]).double(), lengths)

    for prefix, rewards in [
        ("", beta * sums / lengths),  # SimPO: β · avg log-prob
        ("dpo_", dpo_beta * (sums - ref_sums)),  # DPO: β · (log π − log π_ref)
    ]:
        correct = (rewards[:, 0] > rewards[:, 1]).double()
        assert 0 < correct.mean() < 1  # both outcomes occur: the comparison is not vacuous
        assert m[prefix + "accuracy"] == pytest.approx(correct.mean().item())
        margin = (rewards[:, 0] - rewards[:, 1]).mean().item()
        assert m[prefix + "margin"] == pytest.approx(margin, rel=1e-4, abs=1e-5)
        longer = lengths[:, 0] > lengths[:, 1]
        shorter = lengths[:, 0] < lengths[:, 1]
        assert m[prefix + "accuracy_chosen_longer"] == pytest.approx(correct[longer].mean().item())
        assert m[prefix + "accuracy_rejected_longer"] == pytest.approx(
            correct[shorter].mean().item()
        )
        r, n = rewards.flatten().numpy(), lengths.flatten().numpy()
        corr = float(((r - r.mean()) * (n - n.mean())).sum() / (r.std() * n.std() * len(r)))
        assert m[prefix + "length_corr"] == pytest.approx(corr, rel=1e-4)
    assert m["logp_chosen"] == pytest.approx((sums[:, 0] / lengths[:, 0]).mean().item(), rel=1e-4)
    assert m["length_rejected"] == pytest.approx(lengths[:, 1].mean().item())
    assert m["num_pairs"] == 40 and m["num_skipped"] == 0


def test_preference_metrics_count_a_tie_as_wrong():
    """Strict `>` (TRL, the official trainer): a tied pair is not a correct one."""
    rewards = torch.tensor([[1.0, 1.0], [2.0, 1.0], [0.5, 0.5], [0.0, 1.0]])  # (P, 2)
    lengths = torch.tensor([[3, 2], [3, 2], [2, 3], [2, 3]])  # chosen longer, then shorter
    m = ev.preference_metrics(rewards, lengths)
    assert (m["accuracy"], m["margin"]) == (0.25, 0.0)
    assert (m["accuracy_chosen_longer"], m["accuracy_rejected_longer"]) == (0.5, 0.0)


def test_generation_writes_alpaca_eval_model_outputs(tiny, tmp_path):
    policy, _, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": "What is 2 + 3?", "dataset": "mine"}, {"instruction": "Hi"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(policy), "--prompts", str(prompts), "--out", str(tmp_path / "g")]
    m = ev.main([*argv, "--max-new-tokens", "6", "--generator", "tiny-simpo", "--quiet"])
    outputs = json.loads((tmp_path / "g" / "model_outputs.json").read_text())
    assert [set(o) for o in outputs] == [
        {"instruction", "output", "generator", "dataset"},
        {"instruction", "output", "generator"},
    ]
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]
    assert all(o["generator"] == "tiny-simpo" and isinstance(o["output"], str) for o in outputs)
    assert m["gen_num"] == 2

    # greedy decoding by hand, from whole-sequence logits over the tokenizer's ids (the tiny
    # model's head is wider): the same texts and token counts
    tokenizer = Tokenizer.from_dir(policy)
    model = load_model(policy)
    lengths = []
    for row, got in zip(rows, outputs, strict=True):
        ids = ev.encode_prompt([{"role": "user", "content": row["instruction"]}], tokenizer, "auto")
        new: list[int] = []
        with torch.no_grad():
            while len(new) < 6:
                nxt = int(model(torch.tensor([ids + new]))[0, -1, : tokenizer.vocab_size].argmax())
                if nxt in tokenizer.stop_ids:
                    break
                new.append(nxt)
        assert got["output"] == tokenizer.decode(new, skip_special=True)
        lengths.append(len(new))
    assert m["gen_mean_tokens"] == sum(lengths) / len(lengths)


def test_prompts_from_the_preference_file(tiny, tmp_path):
    policy, _, data = tiny
    argv = ["--model", str(policy), "--data", str(data), "--out", str(tmp_path), "--quiet"]
    m = ev.main([*argv, "--num-prompts", "3", "--max-new-tokens", "2", "--limit", "5"])
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    first = [json.loads(line)["prompt"] for line in data.read_text().splitlines()[:3]]
    assert [o["instruction"] for o in outputs] == first
    assert m["num_pairs"] == 5 and m["gen_num"] == 3


def test_torchrun_two_ranks_match_one_process(tiny, tmp_path):
    policy, _, data = tiny
    common = ["--model", str(policy), "--data", str(data), "--quiet", "--num-prompts", "5"]
    common += ["--max-new-tokens", "4", "--gen-batch", "2"]
    one = ev.main([*common, "--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += ["eval.py", *common, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("accuracy", "margin", "length_corr", "num_pairs", "gen_mean_tokens"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for name in ("scores.jsonl", "model_outputs.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()


def test_missing_checkpoint_files_are_named(tiny, tmp_path):
    policy, _, data = tiny
    for name, expected in [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors"),
        ("tokenizer.model", "tokenizer.model or tokenizer.json"),
    ]:
        broken = tmp_path / f"no-{name}"
        shutil.copytree(policy, broken)
        (broken / name).unlink()
        with pytest.raises(ev.EvalError, match=f"{broken}.*missing.*{expected}"):
            ev.main(["--model", str(broken), "--data", str(data), "--out", str(tmp_path)])
    with pytest.raises(ev.EvalError, match="does not exist"):
        ev.main(["--model", str(tmp_path / "nowhere"), "--data", str(data)])
    with pytest.raises(ev.EvalError, match="nothing to do"):
        ev.main(["--model", str(policy)])


@pytest.mark.parametrize(
    "name, text, match",
    [
        (
            "p.jsonl",
            '{"instruction": "ok"}\n{"prompt": "x"}\n',
            r"p\.jsonl:2: .*'instruction'.*prompt",
        ),
        ("p.jsonl", '{"instruction": "ok"}\n\n{"instruction": \n', r"p\.jsonl:3: malformed json"),
        ("p.json", '{"instruction": "x"}', "expected a JSON list"),
        (
            "p.json",
            '[{"instruction": "x"}, {"instruction": 3}]',
            r"p\.json row 2: .*'instruction'; it is int",
        ),
        ("p.json", '[{"instruction": "x"}, ["a"]]', r"p\.json row 2: .*got list"),
    ],
)
def test_bad_prompt_files_name_file_line_and_field(tiny, tmp_path, name, text, match):
    policy, _, _ = tiny
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ev.EvalError, match=match):
        ev.main(["--model", str(policy), "--prompts", str(path), "--out", str(tmp_path)])


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (shared reference data) is absent")
def test_real_alpaca_eval_prefs_with_the_mistral_tokenizer(tmp_path):
    model_dir = tmp_path / "mistral-tiny"
    model_dir.mkdir()
    shutil.copyfile(SHARED / "tokenizers" / "mistral-7b-v0.1.model", model_dir / "tokenizer.model")
    hf = tiny_hf_config("mistral", vocab_size=32000, hidden_size=32, num_hidden_layers=1)
    model = Transformer(read_hf_config(hf))
    model.init_weights(seed=0)
    save_hf(model, model_dir)
    subset = tmp_path / "prefs.jsonl"  # the first rows of the real file: tokenising all is slow
    lines = (SHARED / "alpaca_eval_prefs.jsonl").read_text().splitlines()[:24]
    subset.write_text("\n".join(lines) + "\n")
    argv = ["--model", str(model_dir), "--data", str(subset), "--out", str(tmp_path / "out")]
    argv += ["--max-length", "512", "--max-prompt-length", "256", "--limit", "16", "--quiet"]
    argv += ["--chat-template", str(ROOT / "configs" / "templates" / "mistral-simpo.jinja")]
    m = ev.main([*argv, "--num-prompts", "2", "--max-new-tokens", "3"])
    assert m["num_pairs"] == 16 and m["num_skipped"] == 0
    assert m["length_chosen"] > m["length_rejected"]  # as the data
    # accuracy and margin re-derived from the per-pair scores eval.py wrote
    scores = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    avg = torch.tensor([s["logp_sum"] for s in scores]) / torch.tensor(
        [s["length"] for s in scores]
    )
    reward = m["beta"] * avg.double()  # (16, 2): chosen, rejected
    assert m["accuracy"] == pytest.approx((reward[:, 0] > reward[:, 1]).double().mean().item())
    assert m["margin"] == pytest.approx(
        (reward[:, 0] - reward[:, 1]).mean().item(), rel=1e-5, abs=1e-6
    )
    assert m["logp_chosen"] == pytest.approx(-torch.log(torch.tensor(32000.0)).item(), abs=0.05)
    outputs = json.loads((tmp_path / "out" / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [json.loads(x)["prompt"] for x in lines[:2]]
