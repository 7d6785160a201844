"""Chat templates: `render` equals transformers' Jinja rendering (named templates, sandbox
features, errors), where templates come from (checkpoint, data.chat_template, model_type)."""

from __future__ import annotations

import json

import pytest
from sp_helpers import train_tokenizer

from simpo.conventions import encode_prompt
from simpo.templates import (
    CHATML_BOS_JINJA,
    TEMPLATES,
    TURN_MARKERS,
    TemplateError,
    fallback_template,
    get_template,
    render,
)
from simpo.tokenizer import Tokenizer

GEMMA2_OWN = (  # google/gemma-2-9b-it: raises on a system message
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    "assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ "
    "'<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
FEATURES = (  # what transformers' sandbox offers beyond plain Jinja
    "{%- set ns = namespace(n=0, seen=dict(a=1)) -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' %}{% continue %}{% endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "{% generation %}[{{ m.role }}|{{ m.content | tojson }}]{% endgeneration %}"
    "{%- if ns.n == 2 %}{% break %}{% endif -%}"
    "{%- endfor %}\n  {{ ns.n }} {{ tools }} {{ documents }} {{ bos_token }}{{ eos_token }}\n"
    "{% if add_generation_prompt %}GEN{% endif %}"
    "{% if messages | length > 3 %}{{ raise_exception('too long: ' ~ messages | length) }}"
    "{% endif %}"
)
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
U, A = "user", "assistant"
CONVERSATIONS = [
    [(U, "What is 2+2?"), (A, "4")],
    [(U, "  padded question \n"), (A, "\n padded answer  ")],
    [(U, "Hi"), (A, "Hello! How can I help?"), (U, "Write a haiku.\n\nOn rain."), (A, "Rain…")],
    [("system", "You are terse."), (U, "Name a colour."), (A, "Blue.")],
    [("system", ""), (U, 'Say <s> and </s> and "<|im_end|>" 東京'), (A, "<tag> & 'x'")],
    [(A, "I speak first.")],  # the official pipeline renders each response alone like this
]


def hf_render(source: str, messages: list[dict], generation: bool) -> str:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = utils.render_jinja_template(
        [messages], chat_template=source, add_generation_prompt=generation, **SPECIAL
    )
    return rendered[0]


def outcome(fn):  # the rendered text, or the error's message
    try:
        return fn()
    except Exception as e:  # transformers raises jinja2's TemplateError, we our own
        return f"error: {str(e).removeprefix('the chat template refused the conversation: ')}"


SOURCES = {**TEMPLATES, "gemma2-own": GEMMA2_OWN, "chatml-bos": CHATML_BOS_JINJA}


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation", [False, True])
def test_render_equals_transformers(name, conversation, generation):
    messages = [{"role": r, "content": c} for r, c in conversation]
    source = SOURCES[name]
    ours = outcome(lambda: render(source, messages, SPECIAL, generation))
    assert ours == outcome(lambda: hf_render(source, messages, generation))


def test_template_refusals_are_template_errors():
    system = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    with pytest.raises(TemplateError, match="refused the conversation: System role not supported"):
        render(GEMMA2_OWN, system, SPECIAL)
    alone = [{"role": "assistant", "content": "A"}]
    with pytest.raises(TemplateError, match="roles must alternate"):
        render(TEMPLATES["mistral"], alone, SPECIAL)  # why the official run replaced it


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sandbox_features_equal_transformers(n):
    turns = [("system", "sys"), (U, 'a "quote" <b> 東京'), (A, "reply"), (U, "again")]
    messages = [{"role": r, "content": c} for r, c in turns[:n]]
    for generation in (False, True):
        ours = outcome(lambda: render(FEATURES, messages, SPECIAL, generation))  # noqa: B023
        assert ours == outcome(lambda: hf_render(FEATURES, messages, generation))  # noqa: B023
    if n == 4:
        assert ours == "error: too long: 4"


def test_strftime_now_and_unsafe_templates():
    year = render("{{ strftime_now('%Y') }}", [], {})
    assert year == hf_render("{{ strftime_now('%Y') }}", [], False) and len(year) == 4
    for unsafe in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}"):
        with pytest.raises(TemplateError):
            render(unsafe, [], {})
    with pytest.raises(TemplateError, match="does not parse: line 1"):
        render("{% for m in messages %}", [], {})


@pytest.mark.parametrize(
    "model_type, has, expected",
    [
        ("llama", True, "llama3"),
        ("llama", False, None),  # Llama-2: model_type llama without Llama-3's turn markers
        ("gemma2", True, "gemma"),
        ("gemma", True, "gemma"),
        ("mistral", False, "mistral"),
        ("qwen2", True, "qwen2"),
        ("gpt2", True, None),
        (None, True, None),
    ],
)
def test_fallback_template(model_type, has, expected):
    assert fallback_template(model_type, lambda token: has) == expected


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("sp"))


def test_get_template(tok, tmp_path, monkeypatch):
    assert get_template(tok).source == CHATML_BOS_JINJA  # the checkpoint's own
    assert get_template(tok).name == "own"
    assert get_template(tok, "gemma").source == TEMPLATES["gemma"]
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna'"):
        get_template(tok, "vicuna")
    bare = Tokenizer.from_dir(tok.files[0])  # bare .model: no config, no template
    with pytest.raises(TemplateError, match="has no chat template .* set data.template"):
        get_template(bare)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert get_template(Tokenizer.from_dir(tmp_path)).source == TEMPLATES["mistral"]
    # data.chat_template: a Jinja string, or a file (relative to the working directory)
    assert get_template(tok, "llama3", "{{ 'x' }}").source == "{{ 'x' }}"
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    monkeypatch.chdir(tmp_path)
    absolute = get_template(tok, "auto", str(tmp_path / "t.jinja"))
    assert get_template(tok, "auto", "t.jinja") == absolute
    assert get_template(tok, "auto", "t.jinja").source == "{{ messages[0].content }}"
    with pytest.raises(TemplateError, match="data.chat_template = 'nope.jinja': no such file"):
        get_template(tok, "auto", "nope.jinja")


def test_markers_are_control_pieces(tok):
    for marker in TURN_MARKERS:
        assert tok.decode([tok.token_id(marker)]) == marker
        assert tok.token_id(marker) not in tok.encode(f"a {marker} b")  # text stays text
        assert tok.token_id(marker) in tok.encode_chat(f"a {marker} b")  # rendered: the token


def test_encode_prompt_for_generation(tok):
    messages = [{"role": "user", "content": "Say hello"}]
    ids = encode_prompt(messages, tok)
    assert tok.decode(ids) == "<s><|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(tok.bos_id) == 1
    zephyr = encode_prompt(messages, tok, "zephyr")  # no BOS: the template writes none
    assert zephyr == tok.encode_chat("<|user|>\nSay hello</s>\n<|assistant|>\n")
    assert tok.bos_id not in zephyr
