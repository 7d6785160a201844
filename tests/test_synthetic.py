"""The synthetic preference task: deterministic, well-formed, chosen right, rejected wrong."""

import calendar
import json
import re
import string

import pytest

from simpo.demo.synthetic import TASKS, final_answer, synthetic_rows, write_synthetic_prefs
from simpo.readers import Fields, detect_format, to_example

# written out here, independently of simpo.synthetic
OPPOSITE = dict(
    hot="cold", big="small", fast="slow", up="down", happy="sad", light="dark", old="new",
    open="closed", early="late", full="empty", hard="soft", high="low", wet="dry",
    strong="weak", rich="poor",
)  # fmt: skip
PLURAL = dict(
    cat="cats", dog="dogs", tree="trees", book="books", car="cars", box="boxes", bus="buses",
    dish="dishes", fox="foxes", glass="glasses", mouse="mice", child="children", man="men",
    foot="feet", tooth="teeth", goose="geese", person="people", woman="women",
)  # fmt: skip
DAYS = list(calendar.day_name)  # Monday .. Sunday
MONTHS = list(calendar.month_name)[1:]


def solve(prompt: str) -> str:
    """The right answer, computed from the prompt text alone."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Which is (larger|smaller), (\d+) or (\d+)\?", prompt):
        pick = max if m[1] == "larger" else min
        return str(pick(int(m[2]), int(m[3])))
    if m := re.fullmatch(r"What (letter|day|month) comes after (\w+)\?", prompt):
        seq = {"letter": list(string.ascii_lowercase), "day": DAYS, "month": MONTHS}[m[1]]
        return seq[(seq.index(m[2]) + 1) % len(seq)]
    if m := re.fullmatch(r"Is (\d+) even or odd\?", prompt):
        return "odd" if int(m[1]) % 2 else "even"
    if m := re.fullmatch(r"Sort these numbers from smallest to largest: (.+)\.", prompt):
        return ", ".join(sorted(m[1].split(", "), key=int))
    if m := re.fullmatch(r"What is the plural of (\w+)\?", prompt):
        return PLURAL[m[1]]
    if m := re.fullmatch(r"What is the opposite of (\w+)\?", prompt):
        return OPPOSITE[m[1]]
    raise AssertionError(f"unknown prompt {prompt!r}")


def test_deterministic_by_seed(tmp_path):
    a = write_synthetic_prefs(tmp_path / "a.jsonl", 200, seed=3).read_bytes()
    b = write_synthetic_prefs(tmp_path / "sub" / "b.jsonl", 200, seed=3).read_bytes()
    c = write_synthetic_prefs(tmp_path / "c.jsonl", 200, seed=4).read_bytes()
    assert a == b and a != c
    assert len(a.splitlines()) == 200


def test_schema_is_ultrafeedback_messages(tmp_path):
    path = write_synthetic_prefs(tmp_path / "p.jsonl", 50, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert detect_format(rows, Fields()) == "messages"
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "task"} and row["task"] in TASKS
        for side in ("chosen", "rejected"):
            user, assistant = row[side]
            assert user == {"role": "user", "content": row["prompt"]}
            assert assistant["role"] == "assistant" and assistant["content"]
        example = to_example(row, "messages", Fields())
        assert example.prompt == [{"role": "user", "content": row["prompt"]}]


def test_chosen_is_right_and_rejected_is_wrong():
    rows = synthetic_rows(2000, seed=1)
    assert {r["task"] for r in rows} == set(TASKS)
    for row in rows:
        right = solve(row["prompt"])
        assert final_answer(row["chosen"][1]["content"]) == right, row
        assert final_answer(row["rejected"][1]["content"]) != right, row


def test_lengths_tempt_a_length_exploiting_method():
    rows = synthetic_rows(2000, seed=2)
    chosen = [len(r["chosen"][1]["content"]) for r in rows]
    rejected = [len(r["rejected"][1]["content"]) for r in rows]
    chosen_longer = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    rejected_longer = sum(r > c for c, r in zip(chosen, rejected)) / len(rows)
    assert chosen_longer > rejected_longer + 0.1  # longer is usually better ...
    assert rejected_longer > 0.2  # ... but often enough it is not


@pytest.mark.parametrize("num_pairs", [0, 1])
def test_small_counts(tmp_path, num_pairs):
    path = write_synthetic_prefs(tmp_path / "p.jsonl", num_pairs, seed=0)
    assert len(path.read_text().splitlines()) == num_pairs
