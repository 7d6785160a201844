"""Tokenizer: SentencePiece (trained here, and the real Mistral model when ../shared has it),
tokenizer.json through `tokenizers`, special tokens from config files, loud failures.
(Token-for-token equality with transformers: tests/test_official_pipeline.py.)"""

from __future__ import annotations

import json
import pickle
import sys

import pytest
from sp_helpers import MISTRAL_MODEL, corpus, train_tokenizer

from simpo.templates import CHATML_BOS_JINJA, QWEN2
from simpo.tokenizer import Tokenizer, TokenizerError

TEXTS = ["Hello world", "  leading and  double  spaces\n\n", "東京 🙂 café", "x**2 [INST]", ""]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("sp"))


def test_trained_tokenizer(tok):
    assert {f.name for f in tok.files} == {"tokenizer.model", "tokenizer_config.json"}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 400)
    assert tok.chat_template == CHATML_BOS_JINJA
    assert tok.stop_ids == [tok.eos_id, tok.token_id("<|im_end|>")]
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert tok.special_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }


@pytest.mark.parametrize("text", TEXTS)
def test_exact_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_is_exact_and_concatenates(tok):
    assert tok.decode(tok.encode("hello")) == "hello"  # no dummy-prefix space
    ids = [i for t in TEXTS for i in tok.encode(t)]
    assert tok.decode(ids) == "".join(TEXTS)


def test_boundary_merge_is_kept_apart(tok):
    """A merge across the prompt/response boundary: joint tokenisation puts " model" in neither
    side; tokenised apart, each side decodes to itself and the ids to the whole text."""
    prompt, response = "Write about the mod", "el"
    joint, p, r = tok.encode(prompt + response), tok.encode(prompt), tok.encode(response)
    assert joint[: len(p)] != p  # splitting joint ids at len(prompt ids) would be wrong
    assert tok.decode(p) == prompt and tok.decode(r) == response
    assert tok.decode(p + r) == prompt + response


def test_special_tokens(tok):
    im_end = tok.token_id("<|im_end|>")
    assert im_end not in tok.encode("<|im_end|>")  # control pieces are never parsed from text
    assert tok.decode([im_end, *tok.encode("x"), tok.eos_id]) == "<|im_end|>x</s>"
    assert tok.decode([im_end, *tok.encode("x"), tok.eos_id], skip_special=True) == "x"
    with pytest.raises(TokenizerError, match="no token '<nope>'"):
        tok.token_id("<nope>")


def test_encode_chat_parses_special_tokens(tok):
    """A rendered template: special-token text becomes the token, the text between is encoded
    as `encode` does, except that text at the very start gets the model's dummy-prefix space
    (transformers' "first" prepend scheme; "legacy": true puts it before every piece)."""
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    text = "<s><|im_start|>user\nhi <unk>there<|im_end|>\n</s>"
    want = [tok.bos_id, im_start, *tok.encode("user\nhi "), 0, *tok.encode("there"), im_end]
    assert tok.encode_chat(text) == [*want, *tok.encode("\n"), tok.eos_id]
    assert tok.encode_chat("plain text") == tok.encode(" plain text")
    assert tok.encode_chat(" spaced") == tok.encode(" spaced")  # no second space
    assert tok.encode_chat("a</s>b") == [*tok.encode(" a"), tok.eos_id, *tok.encode("b")]
    assert tok.decode(tok.encode_chat(text)) == text.replace("<unk>", " \u2047 ")


def test_legacy_prefix_before_every_piece(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "legacy": True})
    )
    legacy = Tokenizer.from_dir(tmp_path)
    assert legacy.encode_chat("a</s>b") == [*tok.encode(" a"), tok.eos_id, *tok.encode(" b")]


def test_encoding_to_nothing_raises(tok, monkeypatch):
    monkeypatch.setattr(tok._backend, "encode", lambda text: [])
    with pytest.raises(TokenizerError, match="encoded 'Hello' to no tokens"):
        tok.encode("Hello")
    assert tok.encode("") == []


def test_save_reload_and_pickle(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_bare_model_file_reads_no_configs(tok, tmp_path):
    bare = Tokenizer.from_dir(tok.files[0])
    assert bare.files == [tok.files[0]] and bare.chat_template is None and bare.model_type is None
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (1, 2, 3)  # from the model itself
    bare.save(tmp_path)  # writes a minimal tokenizer_config.json
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_config_files_decide_special_tokens(tok, tmp_path):
    tok.save(tmp_path)
    config = {
        "bos_token": {"content": "<s>", "special": True},  # the older dict form
        "eos_token": "<|im_end|>",
        "pad_token": None,
        "added_tokens_decoder": {"500": {"content": "<tool>", "special": True}},
        "chat_template": [
            {"name": "tool_use", "template": "{{ tools }}"},
            {"name": "default", "template": "{{ '<start_of_turn>' }}x<end_of_turn>"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.eos_token) == (1, tok.token_id("<|im_end|>"), "<|im_end|>")
    assert t.pad_id == t.eos_id  # an explicit null pad falls back to EOS
    assert t.chat_template == "{{ '<start_of_turn>' }}x<end_of_turn>"
    assert t.stop_ids == [t.eos_id, 2, 7, t.token_id("<end_of_turn>")]  # the template's turn end
    assert t.token_id("<tool>") == 500 and t.vocab_size == 501
    assert t.decode([500, *t.encode("a")]) == "<tool>a"
    assert t.encode_chat("a<tool>") == [*t.encode(" a"), 500]  # added tokens split the text
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'json' }}"}))
    assert Tokenizer.from_dir(tmp_path).chat_template == "{{ 'json' }}"  # beats the config
    (tmp_path / "chat_template.jinja").write_text("{{ '<|start_header_id|>' }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    t = Tokenizer.from_dir(tmp_path)
    # BOS stays known without add_bos_token: templates and conventions place it
    assert t.bos_id == 1 and t.chat_template == "{{ '<|start_header_id|>' }}"
    assert t.model_type == "llama"


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="expected a directory"):
        Tokenizer.from_dir(tmp_path / "vocab.txt")


def _hf_tokenizer(prepend: bool):
    """A small tokenizer.json model: byte-level BPE (Llama-3 / Qwen2 style), or a Metaspace one
    that adds "▁" before every call's text (which `encode` cannot make exact)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    if prepend:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        hf.decoder = decoders.Metaspace(prepend_scheme="always")
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet() if not prepend else []
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    hf.train_from_iterator(corpus(), trainer)
    return hf


def test_tokenizer_json(tmp_path):
    hf = _hf_tokenizer(prepend=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": QWEN2}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.stop_ids, t.chat_template) == (None, 2, [2, 0], QWEN2)
    assert t.vocab_size == hf.get_vocab_size()
    for text in TEXTS:
        assert t.decode(t.encode(text)) == text
        assert t.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert 2 not in t.encode("a <|im_end|> b")  # special text inside a message stays text
    assert t.encode_chat("a <|im_end|> b").count(2) == 1  # ... and is the token when rendered
    assert t.decode([1, *t.encode("hi"), 2], skip_special=True) == "hi"


def test_tokenizer_json_is_preferred_over_tokenizer_model(tok, tmp_path):
    """transformers' AutoTokenizer reads tokenizer.json when a checkpoint ships both."""
    tok.save(tmp_path)
    _hf_tokenizer(prepend=False).save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_dir(tmp_path)
    assert t.files[0].name == "tokenizer.json" and t.eos_id == 2 and t.bos_id is None
    assert t.encode("the model") != tok.encode("the model")


def test_tokenizer_json_with_prefix_space(tmp_path):
    """A Metaspace tokenizer.json (Llama-2 / Mistral style) adds "▁" before a call's text, as
    the fast tokenizer does; both encodings keep it."""
    hf = _hf_tokenizer(prepend=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    t = Tokenizer.from_dir(tmp_path)
    for text in ("Hello world", "the model"):
        want = hf.encode(text, add_special_tokens=False).ids
        assert t.encode(text) == t.encode_chat(text) == want
        assert hf.id_to_token(want[0]).startswith("\u2581")


def test_tokenizers_package_missing(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerError, match=r"needs the tokenizers package: pip install"):
        Tokenizer.from_dir(tmp_path)


@pytest.fixture(scope="module")
def mistral():
    if not MISTRAL_MODEL.is_file():
        pytest.skip(f"{MISTRAL_MODEL} absent (../shared/data is not part of a fresh clone)")
    return Tokenizer.from_dir(MISTRAL_MODEL)


def test_real_mistral_tokenizer(mistral):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL_MODEL))
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id) == (32000, 1, 2)
    assert mistral.stop_ids == [2] and mistral.eos_token == "</s>"
    for text in ["Hello world", "Zürich\n\n  indented", "🙂 – [INST] hi [/INST]"]:
        # SentencePiece's own encode adds a dummy-prefix space; ours is exact
        assert mistral.encode(" " + text) == sp.encode(text)
        assert mistral.decode(mistral.encode(text)) == text == sp.decode(sp.encode(text))


def test_real_mistral_boundary(mistral):
    """With Mistral's older template ("[/INST]" + reply, no space) a reply starting with "."
    merges into "]." when prompt + reply are tokenised together."""
    prompt, reply = "[INST] Finish: 1, 2, 3 [/INST]", ". 4"
    p, r = mistral.encode(prompt), mistral.encode(reply)
    joint = mistral.encode(prompt + reply)
    assert joint[: len(p)] != p and mistral.decode(joint[len(p) - 1 : len(p)]) == "]."
    assert mistral.decode(p + r) == prompt + reply
