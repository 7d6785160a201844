"""onpolicy.py end to end on a tiny random policy: samples, rewards (a function and a reward
model), pairs train.py reads; resuming after a kill loses nothing and changes nothing; data
parallel ranks give the same shards; bad input is named; the synthetic task's checker."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simpo.binarize import binarize
from simpo.config import DataConfig
from simpo.conventions import encode_prompt
from simpo.data import load_pairs
from simpo.demo.synthetic import final_answer, reward, solve, synthetic_rows, write_synthetic_prefs
from simpo.demo.tiny import build_tiny_model_dir, texts_from_file
from simpo.reward import (
    RewardError,
    encode_for_reward,
    encode_group,
    load_reward_model,
    score_groups,
)
from simpo.shards import ShardError
from simpo.templates import get_template
from simpo.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("onpolicy_script", ROOT / "onpolicy.py")
onpolicy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(onpolicy)


# Reward functions the tests name as `test_onpolicy:<name>` (pytest puts tests/ on sys.path).
def length_reward(prompt: str, response: str) -> float:
    return float(len(response))


def flaky_reward(prompt: str, response: str) -> float:
    if "+" in prompt:
        raise ZeroDivisionError("no sums today")
    if "larger" in prompt or "smaller" in prompt:
        return float("nan")
    if "plural" in prompt:
        return "1.0"  # a string is not a number
    return float(len(response) % 3)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random llama checkpoint with its tokenizer (chatml), and a prompt file."""
    root = tmp_path_factory.mktemp("onpolicy")
    data = write_synthetic_prefs(root / "prompts.jsonl", 30, seed=0)
    model = build_tiny_model_dir(root / "policy", texts_from_file(data), 384, 32, 1, seed=0)
    return model, data


def run(policy, out: Path, *extra: str, reward: str = "test_onpolicy:length_reward") -> dict:
    model, data = policy
    argv = ["--policy", str(model), "--prompts", str(data), "--out", str(out), "--reward", reward]
    argv += ["--samples", "3", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "1"]
    return onpolicy.main(argv + ["--shard-size", "7", "--quiet", *extra])


def files(out: Path) -> dict[str, bytes]:
    """Every output file's bytes (logs excluded: they grow with every run)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "logs" not in p.parts
    }


def mtimes(out: Path) -> dict[Path, int]:
    return {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "logs" not in p.parts
    }


@pytest.fixture(scope="module")
def finished(policy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "out"
    return out, run(policy, out)


def test_samples_rewards_and_pairs_train_py_reads(policy, finished) -> None:
    out, summary = finished
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    prompts = [json.loads(x)["prompt"] for x in policy[1].read_text().splitlines()]
    distinct = list(dict.fromkeys(prompts))  # a repeated prompt is sampled once
    assert summary["repeated_prompts"] == len(prompts) - len(distinct) > 0
    assert [s["prompt"] for s in samples] == distinct and summary["prompts"] == len(distinct)
    assert summary["pairs"] + sum(summary["skipped"].values()) == len(distinct)
    assert summary["pairs"] == len(pairs) > 20
    for s in samples:
        assert len(s["responses"]) == 3 and s["rewards"] == [float(len(r)) for r in s["responses"]]
    by_index = {s["index"]: s for s in samples}
    for p in pairs:
        s = by_index[p["index"]]
        assert p["chosen"] == [
            {"role": "user", "content": s["prompt"]},
            {"role": "assistant", "content": s["responses"][s["chosen"]]},
        ]
        assert p["score_chosen"] == max(s["rewards"]) > p["score_rejected"] == min(s["rewards"])
        assert p["rejected"][1]["content"] == s["responses"][s["rejected"]]
    tokenizer = Tokenizer.from_dir(policy[0])
    loaded, report = load_pairs(out / "pairs.jsonl", tokenizer, DataConfig(), progress=False)
    assert len(loaded) == len(pairs) and report.num_skipped == 0


def test_binarize_drops_ties_and_takes_the_first_best_and_worst() -> None:
    rows = [
        {"index": 1, "prompt": "b", "responses": ["x", "y", "z"], "rewards": [2.0, 5.0, 5.0],
         "stopped": [True] * 3, "num_tokens": [1, 1, 1]},
        {"index": 0, "prompt": "a", "responses": ["x", "y"], "rewards": [1.0, 1.0],
         "stopped": [True, False], "num_tokens": [1, 3]},
        {"index": 2, "prompt": "c", "skipped": "prompt_too_long"},
    ]  # fmt: skip
    samples, pairs, summary = binarize(rows)
    assert [s["index"] for s in samples] == [0, 1]
    assert samples[0]["skipped"] == "reward_tie" and samples[1]["chosen"] == 1
    assert len(pairs) == 1 and pairs[0]["chosen"][1]["content"] == "y"
    assert pairs[0]["rejected"][1]["content"] == "x"
    assert summary["skipped"] == {"prompt_too_long": 1, "reward_tie": 1}
    assert summary["responses_hit_max_new_tokens"] == 1


def test_rerunning_a_finished_command_changes_nothing(policy, finished) -> None:
    out, summary = finished
    before = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "logs" not in str(p)
    }
    content = files(out)
    assert run(policy, out) == summary
    after = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "logs" not in str(p)
    }
    assert after == before and files(out) == content


def test_lost_shards_are_redone_identically_and_temporary_files_ignored(policy, finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for stage, shard in (("generate", "00001"), ("score", "00001"), ("score", "00003")):
        (copy / stage / f"{shard}.jsonl").unlink()  # killed before these were renamed
    (copy / "generate" / ".00001.jsonl.tmp-999999").write_text('{"index": 7, "respo')  # half
    for name in ("samples.jsonl", "pairs.jsonl", "summary.json"):
        (copy / name).unlink()
    run(policy, copy)
    assert files(copy) == files(out)


def test_killed_run_resumes_to_the_same_output(policy, finished, tmp_path) -> None:
    """SIGKILL a real run as soon as its first shard lands, rerun: same bytes as a run that
    was never interrupted."""
    out, _ = finished
    model, data = policy
    copy = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "onpolicy.py"), "--policy", str(model), "--prompts",
            str(data), "--out", str(copy), "--reward", "test_onpolicy:length_reward",
            "--samples", "3", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "1",
            "--shard-size", "7", "--quiet"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list((copy / "generate").glob("*.jsonl")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stdout.read().decode()  # killed, not crashed
    assert not (copy / "pairs.jsonl").exists(), proc.stdout.read().decode()
    run(policy, copy)  # the rerun, in this process
    assert files(copy) == files(out)


def test_ranks_share_the_work_and_make_the_same_shards(policy, finished, tmp_path, monkeypatch):
    out, _ = finished
    copy = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # one after the other, as two processes would
        monkeypatch.setenv("RANK", rank)
        assert run(policy, copy, "--stage", "generate") is None
        mine = {int(p.stem) for p in (copy / "generate").glob("*.jsonl") if int(p.stem) % 2 == 0}
        assert mine == (set() if rank == "1" else {0, 2, 4})
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    run(policy, copy)
    assert files(copy) == files(out)


def test_other_settings_over_existing_shards_are_refused(policy, finished) -> None:
    out, _ = finished
    with pytest.raises(ShardError, match="seed: 1 then, 2 now"):
        run(policy, out, "--seed", "2")
    with pytest.raises(ShardError, match="reward"):
        run(policy, out, reward="test_onpolicy:flaky_reward")


def test_failing_reward_functions_skip_and_count_the_prompt(policy, tmp_path) -> None:
    summary = run(policy, tmp_path / "out", reward="test_onpolicy:flaky_reward")
    rows = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    details = {r["prompt"].split()[2]: r.get("detail", "") for r in rows if "detail" in r}
    assert any("raised ZeroDivisionError: no sums today" in d for d in details.values())
    assert any("returned nan" in d for d in details.values())
    assert any("returned '1.0', not a number" in d for d in details.values())
    errors = [r for r in rows if r.get("skipped") == "reward_error"]
    assert summary["skipped"]["reward_error"] == len(errors) > 0
    assert all("rewards" not in r for r in errors)  # never a reward of 0
    pairs = (tmp_path / "out" / "pairs.jsonl").read_text()
    assert all(r["prompt"] not in pairs for r in errors)


def test_prompts_longer_than_the_context_are_skipped_and_counted(policy, tmp_path) -> None:
    model, data = policy
    short = tmp_path / "short"
    shutil.copytree(model, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 26}))
    tokenizer = Tokenizer.from_dir(short)

    prompts = dict.fromkeys(json.loads(x)["prompt"] for x in data.read_text().splitlines())
    lengths = [
        len(encode_prompt([{"role": "user", "content": p}], tokenizer, "auto")) for p in prompts
    ]
    argv = ["--policy", str(short), "--prompts", str(data), "--out", str(tmp_path / "out")]
    argv += ["--reward", "test_onpolicy:length_reward", "--max-new-tokens", "6", "--quiet"]
    summary = onpolicy.main(argv + ["--samples", "2", "--temperature", "1.0"])
    too_long = sum(n + 6 > 26 for n in lengths)
    assert 0 < too_long < len(lengths)
    assert summary["skipped"]["prompt_too_long"] == too_long


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "no prompts"),
        ('{"prompt": "a"}\n{"question": "b"}\n', r"prompts.jsonl:2: expected a string field"),
        ('{"prompt": "a"}\n{"prompt": 3}\n', r"prompts.jsonl:2: .*got int"),
        ("not json\n", r"prompts.jsonl:1: malformed json"),
    ],
)
def test_bad_prompt_files_are_named(policy, tmp_path, text, match) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(text)
    argv = ["--policy", str(policy[0]), "--prompts", str(bad), "--out", str(tmp_path / "o")]
    with pytest.raises(onpolicy.OnPolicyError, match=match):
        onpolicy.main(argv + ["--reward", "test_onpolicy:length_reward"])


def test_unusable_rewards_are_named(policy, tmp_path) -> None:
    base = ["--policy", str(policy[0]), "--prompts", str(policy[1]), "--out", str(tmp_path)]
    with pytest.raises(RewardError, match="cannot import"):
        onpolicy.main([*base, "--reward", "no_such_module:f"])
    with pytest.raises(RewardError, match="has no function 'nope'"):
        onpolicy.main([*base, "--reward", "test_onpolicy:nope"])
    with pytest.raises(RewardError, match="expected a reward model directory or module:function"):
        onpolicy.main([*base, "--reward", str(tmp_path / "missing_dir")])
    rm = tmp_path / "rm"
    shutil.copytree(policy[0], rm, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(RewardError, match="no tokenizer.model or tokenizer.json"):
        onpolicy.main([*base, "--reward", str(rm)])
    with pytest.raises(onpolicy.OnPolicyError, match="needs --reward"):
        onpolicy.main(base)


def test_scoring_with_a_reward_model(policy, finished, tmp_path) -> None:
    """A tiny transformers Qwen2ForSequenceClassification with the policy's tokenizer: each
    reward equals scoring that conversation alone; one too long for its context is counted."""
    pytest.importorskip("transformers")
    from test_reward import make_seq_cls

    out, _ = finished
    tokenizer = Tokenizer.from_dir(policy[0])
    chat = get_template(tokenizer)  # its own, which the reward model gets with its tokenizer
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    lengths = sorted(
        len(encode_for_reward(tokenizer, chat, [{"role": "user", "content": s["prompt"]}], r)[0])
        for s in samples
        for r in s["responses"]
    )
    context = lengths[len(lengths) // 2]  # some conversations are longer
    rm_dir = make_seq_cls("qwen2", tmp_path / "rm", vocab_size=448, max_position_embeddings=context)
    for f in Path(policy[0]).glob("tokenizer*"):
        shutil.copy(f, rm_dir / f.name)
    copy = tmp_path / "out"
    shutil.copytree(out / "generate", copy / "generate")
    shutil.copy(out / "settings.json", copy / "settings.json")
    argv = ["--out", str(copy), "--stage", "score", "--reward", str(rm_dir), "--quiet"]
    onpolicy.main(argv)
    onpolicy.main(["--out", str(copy), "--stage", "binarize", "--quiet"])
    rm = load_reward_model(rm_dir)
    tokenizer = Tokenizer.from_dir(rm_dir)
    rows = [json.loads(x) for x in (copy / "samples.jsonl").read_text().splitlines()]
    assert {r.get("skipped") for r in rows} >= {None, "reward_context"}
    for row in rows:
        if "rewards" in row:
            messages = [{"role": "user", "content": row["prompt"]}]
            for response, got in zip(row["responses"], row["rewards"], strict=True):
                group = encode_group(rm, tokenizer, chat, messages, [response])
                assert abs(score_groups(rm, [group])[0][0] - got) < 1e-5


def test_the_synthetic_checker_solves_every_question() -> None:
    rows = synthetic_rows(3000, seed=5)
    assert {r["task"] for r in rows} == {
        "add", "compare", "next_letter", "next_day", "next_month", "parity", "sort", "plural",
        "opposite",
    }  # fmt: skip
    for r in rows:
        right, wrong = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        assert solve(r["prompt"]) == final_answer(right)
        assert reward(r["prompt"], right) == 1.0 and reward(r["prompt"], wrong) == 0.0
    with pytest.raises(ValueError, match="not a question of the synthetic task"):
        reward("What is the capital of France?", "Paris")
    with pytest.raises(ValueError, match="not a question"):
        solve("What is the plural of platypus?")
    assert math.isclose(reward("What is 2 + 3?", "Let me think. So the answer is 5."), 1.0)
