"""Token for token: our data pipeline against the official SimPO pipeline and TRL,
reimplemented here with transformers, on the first pairs of the real AlpacaEval preference file
(../shared/data, skipped without it).

Tokenizers: the real Mistral-7B SentencePiece model converted by transformers to a fast
tokenizer.json, written both as the Hugging Face Hub ships Mistral's (a legacy "▁" prepend
normalizer: what the official runs, on transformers 4.x, tokenised with) and as transformers 5
converts it (a Metaspace pre-tokenizer); and byte-level BPE tokenizer.json files trained here
(Llama-3 style; SmolLM2-style chatml whose BOS is <|im_start|> and whose template adds a
default system prompt; Qwen2-style chatml without BOS; Gemma-2 with the official run's
template). The references read the same files with `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import copy
import json
import shutil
from functools import cache
from pathlib import Path

import pytest
from sp_helpers import MISTRAL_MODEL, SHARED

from simpo.config import DataConfig
from simpo.conventions import encode_prompt
from simpo.data import TokenizedPair, load_pairs, truncate_pair
from simpo.templates import CHATML, LLAMA3, MISTRAL, QWEN2, ZEPHYR
from simpo.tokenizer import Tokenizer

PREFS = SHARED / "alpaca_eval_prefs.jsonl"
pytestmark = pytest.mark.skipif(not PREFS.is_file(), reason=f"{SHARED} is absent")
ROOT = Path(__file__).resolve().parents[1]
MISTRAL_SIMPO = (ROOT / "configs" / "templates" / "mistral-simpo.jinja").read_text()
GEMMA2_SIMPO = (ROOT / "configs" / "templates" / "gemma2-simpo.jinja").read_text()
SMOLLM2 = (  # HuggingFaceTB/SmolLM2-135M-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\\n' }}{% endif %}"
)
LLAMA3_SPLIT = (  # Meta-Llama-3's pre-tokenizer regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_PAIRS = 200
# (tokenizer, template, bos, eos, added special tokens): the checkpoints the families stand for
MISTRAL_FAMILIES = {
    "mistral-simpo": (MISTRAL_SIMPO, "<s>", "</s>", []),  # Mistral-7B-Instruct, official override
    "zephyr": (ZEPHYR, "<s>", "</s>", []),  # zephyr-7b-sft-full (the Mistral-Base SFT)
    "chatml": (CHATML, "<s>", "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),  # OpenHermes-2.5
    "mistral-own": (MISTRAL, "<s>", "</s>", []),  # Mistral-7B-Instruct-v0.2's own: trl only
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with PREFS.open(encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(N_PAIRS)]


@pytest.fixture(scope="module")
def prefs(rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hf_dir(out: Path, backend, template: str, bos: str | None, eos: str, added: list[str]) -> Path:
    """A checkpoint's tokenizer files: tokenizer.json of `backend` plus tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(backend))
    tok.add_special_tokens({"additional_special_tokens": added} if added else {})
    tok.bos_token, tok.eos_token, tok.chat_template = bos, eos, template
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mistral_backends(tmp_path_factory) -> dict:
    """The Mistral SentencePiece model as fast tokenizers: "hub" (the Hub's legacy prepend
    normalizer) and "v5" (transformers 5's Metaspace "first" conversion)."""
    if not MISTRAL_MODEL.is_file():
        pytest.skip(f"{MISTRAL_MODEL} is absent")
    pytest.importorskip("google.protobuf", reason="converting a .model needs protobuf")
    transformers = pytest.importorskip("transformers")
    from tokenizers import normalizers

    src = tmp_path_factory.mktemp("mistral-spm")
    shutil.copyfile(MISTRAL_MODEL, src / "tokenizer.model")
    v5 = transformers.LlamaTokenizer.from_pretrained(src).backend_tokenizer
    hub = copy.deepcopy(v5)
    hub.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hub.pre_tokenizer = None
    return {"hub": hub, "v5": v5}


def byte_level_bpe(rows: list[dict], specials: list[str], split: str | None):
    """A byte-level BPE tokenizer trained on the pairs' text (Llama-3 style with `split`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    texts = [m["content"] for r in rows for m in r["chosen"] + r["rejected"][-1:]]
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def checkpoints(mistral_backends, rows, tmp_path_factory) -> dict[str, Path]:
    """Tokenizer dirs by name: mistral families under both tokenizer.json styles, llama3 and
    smollm2 on byte-level BPE."""
    out = {}
    for variant, backend in mistral_backends.items():
        for family, (template, bos, eos, added) in MISTRAL_FAMILIES.items():
            name = f"{family}/{variant}"
            out[name] = hf_dir(tmp_path_factory.mktemp("tok"), backend, template, bos, eos, added)
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    llama3 = byte_level_bpe(rows, [*llama3, "<|eot_id|>"], LLAMA3_SPLIT)
    out["llama3"] = hf_dir(
        tmp_path_factory.mktemp("tok"), llama3, LLAMA3, "<|begin_of_text|>", "<|eot_id|>", []
    )
    smol = byte_level_bpe(rows, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    out["smollm2"] = hf_dir(
        tmp_path_factory.mktemp("tok"), smol, SMOLLM2, "<|im_start|>", "<|im_end|>", []
    )
    # Qwen2: no BOS at all, a default system turn (TRL and generation; the official code
    # would prepend a None BOS)
    out["qwen2"] = hf_dir(tmp_path_factory.mktemp("tok"), smol, QWEN2, None, "<|im_end|>", [])
    gemma = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    gemma = byte_level_bpe(rows, gemma, None)  # the official gemma-2-9b-it-simpo.yaml template
    out["gemma2"] = hf_dir(
        tmp_path_factory.mktemp("tok"), gemma, GEMMA2_SIMPO, "<bos>", "<eos>", []
    )
    return out


@cache
def reference(path: Path):
    """transformers' fast tokenizer on the same files (the file as it is, as transformers 4.x
    loaded Mistral's and as `PreTrainedTokenizerFast` still does)."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(path)


def ids_of(encoded) -> list[int]:  # apply_chat_template returns a BatchEncoding or a list
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def official_reference(tok, row: dict) -> tuple[dict, dict, dict]:
    """The official pipeline on one UltraFeedback row, transcribed from princeton-nlp/SimPO:
    scripts/run_simpo.py `apply_chat_template(task="simpo")` with alignment/data.py
    `maybe_insert_system_message`, then scripts/simpo_trainer.py `tokenize_row` up to its
    truncation (`official_truncation`)."""
    prompt_messages = copy.deepcopy(row["chosen"][:-1])
    chosen_messages, rejected_messages = row["chosen"][-1:], row["rejected"][-1:]
    if prompt_messages[0]["role"] != "system" and (
        "system" in tok.chat_template or "<|im_start|>" in tok.chat_template
    ):
        prompt_messages.insert(0, {"role": "system", "content": ""})
    prompt = tok.apply_chat_template(prompt_messages, tokenize=False)
    chosen = tok.apply_chat_template(chosen_messages, tokenize=False)
    if chosen.startswith(tok.bos_token):
        chosen = chosen[len(tok.bos_token) :]
    rejected = tok.apply_chat_template(rejected_messages, tokenize=False)
    if rejected.startswith(tok.bos_token):
        rejected = rejected[len(tok.bos_token) :]

    def build_tokenized_answer(prompt: str, answer: str) -> dict:
        full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert len(prompt_ids) <= len(full), "the official code raises here"
        start = len(prompt_ids)
        if prompt_ids != full[:start]:
            start -= 1
        return {"prompt_input_ids": full[:start], "input_ids": full[start:]}

    prompt_tokens = {"prompt_input_ids": tok(prompt, add_special_tokens=False)["input_ids"]}
    chosen_tokens = build_tokenized_answer(prompt, chosen)
    rejected_tokens = build_tokenized_answer(prompt, rejected)
    n = min(len(chosen_tokens["prompt_input_ids"]), len(rejected_tokens["prompt_input_ids"]))
    prompt_tokens["prompt_input_ids"] = prompt_tokens["prompt_input_ids"][:n]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for t in (prompt_tokens, chosen_tokens, rejected_tokens):
        if not t["prompt_input_ids"] or t["prompt_input_ids"][0] != bos:
            t["prompt_input_ids"] = [bos, *t["prompt_input_ids"]]
    for t in (chosen_tokens, rejected_tokens):
        if not t["input_ids"] or t["input_ids"][-1] != eos:
            t["input_ids"].append(eos)
    return prompt_tokens, chosen_tokens, rejected_tokens


def official_truncation(tokens: tuple, max_length: int, max_prompt_length: int) -> dict:
    """The rest of `tokenize_row`: truncation (keep_end) and the labels."""
    prompt_tokens, chosen_tokens, rejected_tokens = copy.deepcopy(tokens)
    longer = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    for t in (chosen_tokens, rejected_tokens, prompt_tokens):
        if len(t["prompt_input_ids"]) + longer > max_length:
            t["prompt_input_ids"] = t["prompt_input_ids"][-max_prompt_length:]
    for t in (chosen_tokens, rejected_tokens):
        if len(t["prompt_input_ids"]) + longer > max_length:
            t["input_ids"] = t["input_ids"][: max_length - max_prompt_length]
    out = {}
    for name, t in (("chosen", chosen_tokens), ("rejected", rejected_tokens)):
        out[f"{name}_input_ids"] = t["prompt_input_ids"] + t["input_ids"]
        out[f"{name}_labels"] = [-100] * len(t["prompt_input_ids"]) + t["input_ids"]
    return out


def trl_reference(tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.16 DPOTrainer on a conversational row (trl/trainer/dpo_trainer.py
    `_prepare_dataset`: `extract_prompt`, then `tokenize_fn` with `_tokenize` and
    `common_prefix_length`)."""
    i = 0  # extract_prompt: the longest common message prefix of chosen and rejected
    while row["chosen"][i] == row["rejected"][i]:
        i += 1
    prompt, chosen, rejected = row["chosen"][:i], row["chosen"][i:], row["rejected"][i:]
    prompt_ids = ids_of(tok.apply_chat_template(prompt, add_generation_prompt=True))
    chosen_ids = ids_of(tok.apply_chat_template(prompt + chosen))
    rejected_ids = ids_of(tok.apply_chat_template(prompt + rejected))

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n

    n = min(common(prompt_ids, chosen_ids), common(prompt_ids, rejected_ids))
    return prompt_ids[:n], chosen_ids[n:], rejected_ids[n:]


def ours(path: Path, prefs: Path, **data) -> dict[int, TokenizedPair]:
    """Our pairs by row index (template "auto": the checkpoint's own)."""
    cfg = DataConfig(**data)
    pairs, report = load_pairs(prefs, mine(path), cfg, progress=False)
    assert report.pairs + report.num_skipped == N_PAIRS
    return {p.index: p for p in pairs}


@cache
def mine(path: Path) -> Tokenizer:
    return Tokenizer.from_dir(path)


def cut(p: TokenizedPair, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """Our official truncation rule applied to an uncut pair."""
    responses = [p.chosen_ids, p.rejected_ids]
    prompt, (c, r), _, _ = truncate_pair(
        p.prompt_ids, responses, max_length, max_prompt_length, "keep_end", rule="official"
    )
    return TokenizedPair(prompt, c, r, p.index)


OFFICIAL_CASES = [
    *(f"{f}/hub" for f in ("mistral-simpo", "zephyr", "chatml")),
    "mistral-simpo/v5",
    "llama3",
    "smollm2",
    "gemma2",
]
# max_length / max_prompt_length: the Mistral-Instruct and Mistral-Base recipes, and a short
# budget that cuts most pairs (both truncation branches of tokenize_row)
LENGTHS = [(2048, 1800), (1024, 512), (160, 96)]


@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_official_convention_equals_the_official_pipeline(checkpoints, prefs, rows, name):
    """load_pairs at the first lengths; the uncut pairs cut by `truncate_pair` at the others."""
    path = checkpoints[name]
    tok = reference(path)
    tokens = [official_reference(tok, row) for row in rows]
    first = ours(path, prefs, mask="official", truncation_rule="official")  # 2048 / 1800
    uncut = ours(path, prefs, mask="official", max_length=10**6, max_prompt_length=10**6)
    for k, (max_length, max_prompt_length) in enumerate(LENGTHS):
        equal = 0
        for i in range(len(rows)):
            want = official_truncation(tokens[i], max_length, max_prompt_length)
            p = first[i] if k == 0 else cut(uncut[i], max_length, max_prompt_length)
            equal += (
                p.prompt_ids + p.chosen_ids == want["chosen_input_ids"]
                and p.prompt_ids + p.rejected_ids == want["rejected_input_ids"]
                and [-100] * len(p.prompt_ids) + p.chosen_ids == want["chosen_labels"]
                and [-100] * len(p.prompt_ids) + p.rejected_ids == want["rejected_labels"]
            )
        print(f"official {name} {max_length}/{max_prompt_length}: {equal}/{len(rows)} equal")
        assert equal == len(rows)


TRL_CASES = [
    *(f"{f}/hub" for f in MISTRAL_FAMILIES),
    *("mistral-simpo/v5", "llama3", "smollm2", "qwen2", "gemma2"),
]


@pytest.mark.parametrize("name", TRL_CASES)
def test_trl_convention_equals_trl(checkpoints, prefs, rows, name):
    path = checkpoints[name]
    tok = reference(path)
    got = ours(path, prefs, mask="trl", max_length=10**6, max_prompt_length=10**6)
    equal = 0
    for i, row in enumerate(rows):
        p = got[i]
        equal += (p.prompt_ids, p.chosen_ids, p.rejected_ids) == trl_reference(tok, row)
    print(f"trl {name}: {equal}/{len(rows)} equal")
    assert equal == len(rows)


GENERATION_CASES = [
    *(f"{f}/{v}" for f in MISTRAL_FAMILIES for v in ("hub", "v5")),
    *("llama3", "smollm2", "qwen2", "gemma2"),
]


@pytest.mark.parametrize("name", GENERATION_CASES)
def test_generation_prompts_equal_apply_chat_template(checkpoints, rows, name):
    path = checkpoints[name]
    tok, ours_ = reference(path), mine(path)
    conversations = [r["chosen"][:-1] for r in rows[:50]]
    conversations.append(  # a system turn and several turns
        [
            {"role": "system", "content": "  Be brief. "},
            {"role": "user", "content": "Hi <s> there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "  Name a colour.\n"},
        ]
    )
    for messages in conversations:
        want = ids_of(tok.apply_chat_template(messages, add_generation_prompt=True))
        assert encode_prompt(messages, ours_) == want
        if ours_.bos_id is not None:
            assert want[:2].count(ours_.bos_id) <= 1  # never a doubled BOS


def test_smollm2_generation_prompt_has_its_default_system_turn_once(checkpoints):
    tok = mine(checkpoints["smollm2"])
    ids = encode_prompt([{"role": "user", "content": "Hi"}], tok)
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.count(tok.bos_id) == 3 and ids[:2] != [tok.bos_id] * 2  # BOS is <|im_start|>
