"""Data pipeline: readers, formats, validation (skip and count), truncation arithmetic, split,
cache, worker processes, and the real files in ../shared/data with the real Mistral tokenizer."""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sp_helpers import MISTRAL_MODEL, SHARED, train_tokenizer

from simpo.config import DataConfig
from simpo.conventions import with_empty_system
from simpo.data import (
    DataError,
    check_config,
    load_datasets,
    load_pairs,
    split_pairs,
    truncate_pair,
)
from simpo.readers import Skip
from simpo.templates import render
from simpo.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_SIMPO = ROOT / "configs" / "templates" / "mistral-simpo.jinja"


def cfg(**overrides) -> DataConfig:
    return replace(DataConfig(), **overrides)


def msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def uf_row(prompt: str, chosen: str, rejected: str) -> dict:
    """An UltraFeedback-binarized row."""
    return {
        "prompt": prompt,
        "chosen": msgs(("user", prompt), ("assistant", chosen)),
        "rejected": msgs(("user", prompt), ("assistant", rejected)),
    }


ROWS = [uf_row(f"Question {i}?", f"A good answer {i}.", f"Bad {i}.") for i in range(6)]
R = [7]  # a response token
HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour."


def write(path: Path, rows: list, lines: list[str] = ()) -> Path:
    """Rows as .jsonl / .json (list), gzipped when the name ends in .gz; extra raw lines."""
    text = "\n".join([*(json.dumps(r) for r in rows), *lines]) + "\n"
    if ".jsonl" not in path.name:
        text = json.dumps(rows)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(tmp_path_factory.mktemp("sp"))


def rendered(tok: Tokenizer, prompt: list[dict], response: str, source: str = "") -> str:
    """The text a pair's ids decode to under the official convention: the prompt (with an
    empty system turn), the response as a lone assistant turn without BOS, EOS when missing."""
    source = source or tok.chat_template
    text = render(source, with_empty_system(prompt, source), tok.special_tokens)
    alone = [{"role": "assistant", "content": response}]
    text += render(source, alone, tok.special_tokens).removeprefix(tok.bos_token)
    return text if text.endswith(tok.eos_token) else text + tok.eos_token


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.jsonl.gz", "d.json.gz"])
def test_readers(tok, tmp_path, name):
    pairs, report = load_pairs(write(tmp_path / name, ROWS), tok, cfg(), progress=False)
    assert (report.rows, report.pairs, report.num_skipped, report.format) == (6, 6, 0, "messages")
    p = pairs[4]
    assert p.index == 4
    assert tok.decode(p.prompt_ids + p.chosen_ids) == rendered(
        tok, msgs(("user", "Question 4?")), "A good answer 4."
    )


def test_parquet(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    pairs, _ = load_pairs(tmp_path / "d.parquet", tok, cfg(), progress=False)
    jsonl, _ = load_pairs(write(tmp_path / "d.jsonl", ROWS), tok, cfg(), progress=False)
    assert pairs == jsonl


def test_parquet_without_pyarrow(tok, tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d.parquet: reading parquet needs pyarrow: pip install"):
        load_pairs(tmp_path / "d.parquet", tok, cfg(), progress=False)


def test_bad_files(tok, tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    (tmp_path / "bad.json").write_text('[{"a": 1},\n oops]')
    (tmp_path / "obj.json").write_text('{"data": []}')
    for name, match in [
        ("d.csv", "unsupported file type"),
        ("none.jsonl", "no such file"),
        ("bad.json", "bad.json: invalid JSON at line 2"),
        ("obj.json", "expected a JSON list of objects, got dict"),
    ]:
        with pytest.raises(DataError, match=match):
            load_pairs(tmp_path / name, tok, cfg(), progress=False)


def test_messages_multi_turn_system_and_prompt_list(tok, tmp_path):
    conversation = msgs(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Q")
    )
    yes, no = msgs(("assistant", "Yes")), msgs(("assistant", "No"))
    rows = [
        {"chosen": conversation + yes, "rejected": conversation + no},
        {"prompt": conversation, "chosen": yes, "rejected": no},  # the prompt as messages
    ]
    pairs, report = load_pairs(write(tmp_path / "m.jsonl", rows), tok, cfg(), progress=False)
    assert report.format == "messages" and pairs[0].prompt_ids == pairs[1].prompt_ids
    assert tok.decode(pairs[0].prompt_ids + pairs[0].chosen_ids) == rendered(
        tok, conversation, "Yes"
    )


def test_flat_with_custom_fields(tok, tmp_path):
    rows = [{"question": "Q?", "good": "Yes.", "bad": "No."}]
    fields = dict(prompt_field="question", chosen_field="good", rejected_field="bad")
    pairs, report = load_pairs(write(tmp_path / "f.json", rows), tok, cfg(**fields), progress=False)
    assert report.format == "flat"
    assert tok.decode(pairs[0].prompt_ids + pairs[0].rejected_ids) == rendered(
        tok, msgs(("user", "Q?")), "No."
    )


def test_hh_dialogues(tok, tmp_path):
    rows = [{"chosen": HH + "\n\nAssistant: Blue.", "rejected": HH + "\n\nAssistant:  Red "}]
    pairs, report = load_pairs(write(tmp_path / "hh.jsonl", rows), tok, cfg(), progress=False)
    assert report.format == "hh"
    prompt = msgs(
        ("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Name a colour.")
    )
    assert tok.decode(pairs[0].prompt_ids + pairs[0].chosen_ids) == rendered(tok, prompt, "Blue.")
    assert tok.decode(pairs[0].rejected_ids) == "<|im_start|>assistant\nRed<|im_end|>\n</s>"


def test_skip_reasons_are_counted(tok, tmp_path):
    good = uf_row("Q?", "Yes", "No")
    user, opener = msgs(("user", "Q?")), msgs(("assistant", "x"))
    rows = [
        good,
        [1, 2],  # not_an_object
        {"prompt": "Q?", "chosen": good["chosen"]},  # missing_field
        {**good, "chosen": [*user, {"role": "assistant", "content": ["part"]}]},  # non_string
        {**good, "chosen": "Yes"},  # bad_messages: a string in a messages file
        {**good, "rejected": [*msgs(("user", "Other?")), *good["rejected"][1:]]},  # mismatch
        uf_row(" ", "Yes", "No"),  # empty_prompt
        uf_row("Q?", "Yes", "\n"),  # empty_response
        uf_row("Q?", "Same", " Same "),  # identical_responses
        {"chosen": opener + good["chosen"], "rejected": opener + good["rejected"]},  # bad_roles
    ]
    path = write(tmp_path / "bad.jsonl", rows, ["{not json", "", json.dumps(good)])
    pairs, report = load_pairs(path, tok, cfg(), progress=False)
    assert report.skipped == {
        "not_an_object": 1,
        "missing_field": 1,
        "non_string_content": 1,
        "bad_messages": 1,
        "prompt_mismatch": 1,
        "empty_prompt": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "bad_roles": 1,
        "malformed_json": 1,
    }
    assert (report.rows, report.pairs) == (len(rows) + 2, 2)  # the blank line is not a row
    assert [p.index for p in pairs] == [0, len(rows) + 2]  # 0-based line numbers
    (example,) = report.examples["malformed_json"]
    assert example.startswith(f"{path}:{len(rows) + 1}: Expecting property name")
    summary = report.summary()
    assert "2 pairs from 12 rows" in summary and f"{path}:2: expected a JSON object" in summary
    print(summary)


def test_hh_bad_dialogues(tok, tmp_path):
    a, b = HH + "\n\nAssistant: A", HH + "\n\nAssistant: B"
    rows = [
        {"chosen": a, "rejected": "\n\nHuman: Hi there\n\nAssistant: B"},  # diverge early
        {"chosen": "Preface" + a, "rejected": "Preface" + b},
        {"chosen": "no markers", "rejected": "at all"},
        {"chosen": a, "rejected": 3},
        {"chosen": a, "rejected": b},
    ]
    _, report = load_pairs(write(tmp_path / "hh.jsonl", rows), tok, cfg(), progress=False)
    assert report.skipped == {"bad_dialogue": 3, "non_string_content": 1}
    assert report.examples["bad_dialogue"][0].endswith(
        "hh.jsonl:1: chosen and rejected differ before the last assistant turn"
    )


def test_nothing_usable_raises_naming_the_file(tok, tmp_path):
    path = write(tmp_path / "empty.jsonl", [uf_row("Q", "Same", "Same")] * 3)
    with pytest.raises(DataError, match=r"empty.jsonl: no usable preference pairs\n.*"):
        load_pairs(path, tok, cfg(), progress=False)


@pytest.mark.parametrize(
    "prompt, responses, max_len, max_prompt, mode, keep_first, expected",
    [
        # short prompt: a response gets max_length - len(prompt), not max_length - max_prompt
        ([1, 5], [R * 9, [8] * 3], 8, 6, "keep_end", 1, ([1, 5], [R * 6, [8] * 3], 0, [1, 0])),
        # keep_end keeps BOS and the last tokens
        ([1, 2, 3, 4, 5, 6], [R], 8, 4, "keep_end", 1, ([1, 4, 5, 6], [R], 1, [0])),
        ([1, 2, 3, 4, 5, 6], [R], 8, 4, "keep_end", 0, ([3, 4, 5, 6], [R], 1, [0])),
        ([1, 2, 3, 4, 5, 6], [R * 5], 8, 4, "keep_start", 1, ([1, 2, 3, 4], [R * 4], 1, [1])),
        ([1, 2, 3], [R * 5], 4, 3, "keep_end", 1, ([1, 2, 3], [R], 0, [1])),
        # the boundary: a response of exactly the budget (8 - 2 = 6) fits and is not cut; one
        # more token is cut (the "cut" flag feeds the truncated_* counters)
        ([1, 5], [R * 6, R * 7], 8, 6, "keep_end", 1, ([1, 5], [R * 6, R * 6], 0, [0, 1])),
        ([1, 2, 3, 4], [R * 4, R * 5], 7, 3, "keep_start", 1, ([1, 2, 3], [R * 4] * 2, 1, [0, 1])),
    ],
)
def test_truncate_pair(prompt, responses, max_len, max_prompt, mode, keep_first, expected):
    """expected: prompt, responses, prompt was cut, each response was cut."""
    assert truncate_pair(prompt, responses, max_len, max_prompt, mode, keep_first) == expected


def test_prompt_that_cannot_fit_is_skipped():
    with pytest.raises(Skip, match="prompt_too_long"):
        truncate_pair([1, 2, 3, 4], [[7]], 4, 4, "keep_end", 1)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_in_load(tok, tmp_path, mode):
    long = " ".join(["please write a short poem about cats"] * 30)
    rows = [uf_row(long, long, "Short."), uf_row("Q?", long, "Short."), uf_row("Q?", "Yes", "No")]
    c = cfg(max_length=96, max_prompt_length=48, truncation=mode)
    pairs, report = load_pairs(write(tmp_path / "t.jsonl", rows), tok, c, progress=False)
    cuts = report.truncated_prompts, report.truncated_chosen, report.truncated_rejected
    assert cuts == (1, 2, 0)
    cut, short, plain = pairs
    assert len(cut.prompt_ids) == 48 and cut.prompt_ids[0] == tok.bos_id
    for p in pairs:
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 96
        assert p.rejected_ids[-1] == tok.eos_id
    assert cut.chosen_ids[-1] != tok.eos_id and len(cut.chosen_ids) == 96 - 48
    assert len(short.prompt_ids) + len(short.chosen_ids) == 96  # more than 96 - 48
    assert plain.chosen_ids[-1] == tok.eos_id
    if mode == "keep_end":  # the end of the prompt (the question's last words) survives
        assert tok.decode(cut.prompt_ids).endswith("cats<|im_end|>\n")


def test_prompt_too_long_config(tok, tmp_path):
    rows = [uf_row("word " * 50, "Yes", "No"), uf_row("Q?", "Yes", "No")]
    c = cfg(max_length=32, max_prompt_length=32)
    _, report = load_pairs(write(tmp_path / "p.jsonl", rows), tok, c, progress=False)
    assert report.skipped == {"prompt_too_long": 1} and report.pairs == 1


def test_check_config():
    check_config(SimpleNamespace(**asdict(DataConfig())))  # any object with the attributes
    for key, value, match in [
        ("mask", "hf", "data.mask = 'hf'"),
        ("truncation", "middle", "data.truncation"),
        ("truncation_rule", "trl", "data.truncation_rule"),
        ("format", "csv", "data.format"),
        ("max_length", 0, "data.max_length = 0"),
        ("eval_fraction", 1.0, "data.eval_fraction"),
        ("num_workers", 0, "data.num_workers"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_config(cfg(**{key: value}))


def test_split_pairs(tok, tmp_path):
    pairs, _ = load_pairs(write(tmp_path / "d.jsonl", ROWS), tok, cfg(), progress=False)
    train, held = split_pairs(pairs, 0.34, seed=1)
    assert (len(train), len(held)) == (4, 2)
    assert sorted(p.index for p in train + held) == list(range(6))
    assert split_pairs(pairs, 0.34, seed=1) == (train, held)  # deterministic
    assert split_pairs(pairs, 0.0, seed=2)[0] != split_pairs(pairs, 0.0, seed=3)[0]
    assert len(split_pairs(pairs, 0.01, seed=1)[1]) == 1  # at least one held out
    with pytest.raises(DataError, match="leaves none to train on"):
        split_pairs(pairs[:1], 0.5, seed=0)
    with pytest.raises(ValueError):
        split_pairs(pairs, 1.0, seed=0)


def test_load_datasets(tok, tmp_path):
    train = str(write(tmp_path / "train.jsonl", ROWS))
    evalf = str(write(tmp_path / "eval.jsonl", ROWS[:2]))
    tr, ev, reports = load_datasets(cfg(train=train, eval=evalf), tok, seed=0, progress=False)
    assert (len(tr), len(ev), len(reports)) == (6, 2, 2)
    tr, ev, reports = load_datasets(cfg(train=train, eval_fraction=0.5), tok, 0, progress=False)
    assert (len(tr), len(ev), len(reports)) == (3, 3, 1)
    with pytest.raises(ValueError, match="not both"):
        load_datasets(cfg(train=train, eval=evalf, eval_fraction=0.1), tok, 0)


def test_cache(tok, tmp_path):
    path, cache = write(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"
    first, report = load_pairs(path, tok, cfg(cache_dir=str(cache)), progress=False)
    again, cached = load_pairs(path, tok, cfg(cache_dir=str(cache)), progress=False)
    assert again == first and cached.cached and not report.cached
    assert replace(cached, cached=False) == report
    (file,) = cache.glob("d.jsonl.*.npz")
    np.load(file, allow_pickle=False)["prompt_ids"]  # plain arrays, no pickle
    load_pairs(path, tok, cfg(cache_dir=str(cache), mask="trl"), progress=False)
    write(path, ROWS[:3])  # new content, same name
    changed, _ = load_pairs(path, tok, cfg(cache_dir=str(cache)), progress=False)
    assert len(changed) == 3 and len(list(cache.glob("*.npz"))) == 3


def test_worker_processes(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS * 20, ["{bad"])
    one = load_pairs(path, tok, cfg(), progress=False)
    two = load_pairs(path, tok, cfg(num_workers=2), progress=False)
    assert one == two


# The real files in ../shared/data (not part of a fresh clone: skipped there).
@pytest.fixture(scope="module")
def mistral() -> Tokenizer:
    if not MISTRAL_MODEL.is_file():
        pytest.skip(f"{SHARED} absent (it is not part of a fresh clone)")
    return Tokenizer.from_dir(MISTRAL_MODEL)


def check_boundaries(tok: Tokenizer, pairs: list, rows: list, fmt: str, count: int = 100) -> None:
    """The ids decode to the official rendering (BOS first; SentencePiece shows the dummy-prefix
    space that the fast tokenizer also puts before the prompt's first word)."""
    from simpo.readers import Fields, to_example

    source = MISTRAL_SIMPO.read_text()
    for pair in pairs[:count]:
        ex = to_example(rows[pair.index], fmt, Fields())
        text = rendered(tok, ex.prompt, ex.chosen, source)
        assert tok.decode(pair.prompt_ids + pair.chosen_ids) == "<s> " + text


def test_real_alpaca_eval_prefs(mistral):
    path = SHARED / "alpaca_eval_prefs.jsonl"
    c = cfg(chat_template=str(MISTRAL_SIMPO), num_workers=2)
    pairs, report = load_pairs(path, mistral, c, progress=False)
    print(report.summary())
    assert (report.rows, report.pairs, report.skipped) == (6246, 6246, {})
    assert report.truncated_prompts == 0
    assert 0 < report.truncated_chosen + report.truncated_rejected < 0.01 * 2 * 6246
    assert report.tokens["chosen_ids"] > 2 * report.tokens["rejected_ids"]  # length-biased set
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    check_boundaries(mistral, pairs, rows, "messages")


def test_real_hh_rlhf(mistral):
    path = SHARED / "hh_rlhf_harmless_test.jsonl.gz"
    c = cfg(chat_template=str(MISTRAL_SIMPO))
    pairs, report = load_pairs(path, mistral, c, progress=False)
    print(report.summary())
    assert (report.rows, report.format) == (2312, "hh")
    # 5 pairs diverge before the last turn, 4 have an empty answer, 4 repeat a speaker
    assert report.skipped == {"bad_dialogue": 5, "empty_response": 4, "bad_roles": 4}
    assert report.pairs == 2312 - 13
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    check_boundaries(mistral, pairs, rows, "hh")


def test_real_mistral_own_template_refuses_the_official_convention(mistral, tmp_path):
    """Mistral's own template raises on a lone assistant message, as the official pipeline
    renders each response: a clear error naming the fix (the official run's override)."""
    path = tmp_path / "few.jsonl"
    path.write_text("".join((SHARED / "alpaca_eval_prefs.jsonl").open().readlines()[:5]))
    with pytest.raises(DataError, match=r"(?s)template_refused.*mistral-simpo.jinja"):
        load_pairs(path, mistral, cfg(template="mistral"), progress=False)
    pairs, report = load_pairs(path, mistral, cfg(template="mistral", mask="trl"), progress=False)
    assert report.pairs == 5 and pairs[0].prompt_ids[0] == mistral.bos_id


# --- conventions and the official truncation rule (issue 13) ---


@pytest.mark.parametrize(
    "prompt, responses, max_len, max_prompt, mode, expected",
    [
        # fits: nothing is cut, however long the prompt is against max_prompt_length
        (
            [1, 2, 3, 4, 5],
            [R * 3, [8]],
            8,
            2,
            "keep_end",
            ([1, 2, 3, 4, 5], [R * 3, [8]], 0, [0, 0]),
        ),
        # prompt + longer response > max_length: the prompt keeps its last tokens, BOS included
        ([1, 2, 3, 4, 5], [R * 4, [8]], 8, 3, "keep_end", ([3, 4, 5], [R * 4, [8]], 1, [0, 0])),
        ([1, 2, 3, 4, 5], [R * 4, [8]], 8, 3, "keep_start", ([1, 2, 3], [R * 4, [8]], 1, [0, 0])),
        # still too long: both responses cut to max_length - max_prompt_length
        (
            [1, 2, 3, 4, 5],
            [R * 9, [8] * 6],
            8,
            3,
            "keep_end",
            ([3, 4, 5], [R * 5, [8] * 5], 1, [1, 1]),
        ),
        # a short prompt still leaves its responses max_length - max_prompt_length tokens
        ([1, 2], [R * 9, [8]], 8, 6, "keep_end", ([1, 2], [R * 2, [8]], 0, [1, 0])),
    ],
)
def test_truncate_pair_official_rule(prompt, responses, max_len, max_prompt, mode, expected):
    """scripts/simpo_trainer.py tokenize_row: (prompt, responses, prompt cut, responses cut)."""
    got = truncate_pair(prompt, responses, max_len, max_prompt, mode, 1, rule="official")
    assert got == expected


def test_official_rule_needs_room_for_responses():
    check_config(cfg(truncation_rule="official"))
    with pytest.raises(ValueError, match="max_prompt_length = 512 must be < data.max_length"):
        check_config(cfg(truncation_rule="official", max_length=512, max_prompt_length=512))


def test_official_convention_on_the_tiny_tokenizer(tok, tmp_path):
    """The official pipeline's rendering: an empty system turn (chatml mentions <|im_start|>),
    the assistant header in the response, BOS once (the template writes it), EOS appended
    after the turn's closing newline."""
    pairs, report = load_pairs(write(tmp_path / "d.jsonl", ROWS[:1]), tok, cfg(), progress=False)
    p = pairs[0]
    assert report.template == "own" and report.mask == "official"
    assert tok.decode(p.prompt_ids) == (
        "<s><|im_start|>system\n<|im_end|>\n<|im_start|>user\nQuestion 0?<|im_end|>\n"
    )
    assert tok.decode(p.chosen_ids) == "<|im_start|>assistant\nA good answer 0.<|im_end|>\n</s>"
    assert p.prompt_ids.count(tok.bos_id) == 1 and p.rejected_ids[-1] == tok.eos_id


def test_trl_convention_on_the_tiny_tokenizer(tok, tmp_path):
    """TRL: the prompt ends with the generation prompt, responses end as the template ends
    them (no EOS added), no system turn is inserted."""
    c = cfg(mask="trl")
    pairs, _ = load_pairs(write(tmp_path / "d.jsonl", ROWS[:1]), tok, c, progress=False)
    p = pairs[0]
    assert tok.decode(p.prompt_ids) == (
        "<s><|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(p.chosen_ids) == "A good answer 0.<|im_end|>\n"


def test_official_boundary_merge(tok, tmp_path):
    """Prompt and response tokenised together: when the prompt's last token merges with the
    response (" m" + "odel" -> " model"), the response starts one token earlier
    (build_tokenized_answer). When only one response merges, the pair's two prompts differ:
    skipped and counted."""
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no system, no specials
    prompt = "Please write about m"
    rows = [uf_row(prompt, "odel now", "odel."), uf_row(prompt, "odel now", " no")]
    c = cfg(chat_template=plain)
    pairs, report = load_pairs(write(tmp_path / "m.jsonl", rows), tok, c, progress=False)
    assert report.skipped == {"boundary_merge": 1} and len(pairs) == 1
    p = pairs[0]
    alone, joint = tok.encode_chat(prompt), tok.encode_chat(prompt + "odel now")
    assert p.prompt_ids == [tok.bos_id, *alone[:-1]]  # " m" left the prompt
    assert p.chosen_ids == [*joint[len(alone) - 1 :], tok.eos_id]
    assert tok.decode(p.chosen_ids[:1]) == " model"


def test_template_refusals_are_skipped_and_counted(tok, tmp_path):
    refusing = "{% if messages | length == 1 %}{{ raise_exception('no lone turns') }}{% endif %}x"
    rows = ROWS[:2]
    with pytest.raises(DataError, match=r"(?s)template_refused.*no lone turns"):
        load_pairs(write(tmp_path / "d.jsonl", rows), tok, cfg(chat_template=refusing))


def test_template_that_drops_the_response_is_skipped(tok, tmp_path):
    user_only = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    c = cfg(chat_template=user_only, mask="trl")
    with pytest.raises(DataError, match=r"(?s)skipped 2 \(empty_response\).*no tokens after"):
        load_pairs(write(tmp_path / "d.jsonl", ROWS[:2]), tok, c, progress=False)


def test_a_missing_chat_template_file_is_a_data_error(tok, tmp_path):
    """train.py and eval.py print DataErrors as one line, without a traceback."""
    c = cfg(chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(DataError, match=r"data.chat_template = '.*nope.jinja': no such file"):
        load_pairs(write(tmp_path / "d.jsonl", ROWS[:1]), tok, c, progress=False)
