"""simpo.demo.real's data split (the run itself needs the real model: `make demo-real`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from simpo.demo.real import FULL, split_by_prompt


def pair(prompt: str, i: int) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt, "prompt_id": f"id-{prompt}",
        "chosen": [user, {"role": "assistant", "content": f"good {i}"}],
        "rejected": [user, {"role": "assistant", "content": f"bad {i}"}],
    }  # fmt: skip


def test_split_holds_out_whole_prompts(tmp_path):
    rows = [pair(f"q{p}", i) for p in range(10) for i in range(3)]  # 10 prompts x 3 pairs
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = dataclasses.replace(FULL, train_pairs=12, eval_pairs=4, gen_prompts=2)
    train, heldout, prompts = split_by_prompt(src, tmp_path / "out", plan, seed=0)
    train_rows = [json.loads(x) for x in train.read_text().splitlines()]
    held_rows = [json.loads(x) for x in heldout.read_text().splitlines()]
    held = [r["prompt_id"] for r in held_rows]
    assert len(train_rows) == 12 and len(held) == len(set(held)) == 4  # one pair per prompt
    assert not set(held) & {r["prompt_id"] for r in train_rows}
    assert [p["instruction"] for p in json.loads(prompts.read_text())] == [
        r["prompt"] for r in held_rows[:2]
    ]
    again = split_by_prompt(src, tmp_path / "again", plan, seed=0)
    assert again[0].read_text() == train.read_text()  # deterministic for a seed
    with pytest.raises(SystemExit, match="the plan needs 99"):
        split_by_prompt(src, tmp_path / "x", dataclasses.replace(plan, train_pairs=99), 0)
