"""Chat templates: rendered text equals the official Jinja templates (via transformers), roles,
template detection, mask conventions, BOS once, response endings, token boundaries."""

from __future__ import annotations

import pytest
from sp_helpers import train_tokenizer

from simpo.templates import (
    CHATML_JINJA,
    TEMPLATES,
    TURN_MARKERS,
    Special,
    TemplateError,
    detect_template,
    encode_conversation,
    encode_prompt,
    encode_segments,
    get_template,
    render_prompt,
    render_response,
)

# The official templates, copied verbatim from each model's tokenizer_config.json.
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
    "assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA2 = (  # google/gemma-2-9b-it: raises on a system message
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    "assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ "
    "'<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
SIMPO_GEMMA2 = (  # princeton-nlp/SimPO training_configs/gemma-2-9b-it-simpo.yaml: folds system
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]"
    "['content'] | trim + '\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set "
    "system_message = '' %}{% endif %}{% for message in messages %}{% if loop.index0 == 0 %}"
    "{% set content = system_message + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = "
    "'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role "
    "+ '\\n' + content | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (  # mistralai/Mistral-7B-Instruct-v0.2
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]"
    "['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set "
    "loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in "
    "loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if "
    "message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + "
    "message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user "
    "and assistant roles are supported, with the exception of an initial optional system "
    "message!') }}\n    {%- endif %}\n{%- endfor %}\n"
)
QWEN2 = (  # Qwen/Qwen2-7B-Instruct: a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR = (  # HuggingFaceH4/zephyr-7b-beta
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>"
    "\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
    "'<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
    "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# name, official template, bos text ("" when the Jinja has no bos_token), eos text, system ok
CASES = [
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    ("gemma", GEMMA2, "<bos>", "<eos>", False),
    ("gemma", SIMPO_GEMMA2, "<bos>", "<eos>", True),
    ("mistral", MISTRAL, "<s>", "</s>", True),
    ("qwen2", QWEN2, "", "<|im_end|>", True),
    ("chatml", CHATML_JINJA, "", "<|im_end|>", True),
    ("zephyr", ZEPHYR, "", "</s>", True),
]
U, A = "user", "assistant"
CONVERSATIONS = [
    [(U, "What is 2+2?"), (A, "4")],
    [(U, "  padded question \n"), (A, "\n padded answer  ")],
    [(U, "Hi"), (A, "Hello! How can I help?"), (U, "Write a haiku.\n\nOn rain."), (A, "Rain…")],
    [("system", "You are terse."), (U, "Name a colour."), (A, "Blue.")],
    [("system", "Be kind."), (U, "One"), (A, "Two"), (U, "Three"), (A, "Four")],
]
# the official SimPO trainer appends EOS after a turn that ends in text ("\n")
EOS_TAIL = {"gemma", "qwen2", "chatml", "zephyr"}


def hf_render(jinja: str, messages: list[dict], bos: str, eos: str, generation: bool) -> str:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tokens = {"bos_token": bos, "eos_token": eos}
    rendered, _ = utils.render_jinja_template(
        [messages], chat_template=jinja, add_generation_prompt=generation, **tokens
    )
    return rendered[0]


def text(segments: list[str]) -> str:
    return "".join(segments)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}")
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_matches_official_template(case, conversation):
    name, jinja, bos, eos, system_ok = case
    messages = [{"role": r, "content": c} for r, c in conversation]
    if conversation[0][0] == "system" and not system_ok:
        # Gemma's own template refuses a system turn (we fold it in, as SIMPO_GEMMA2 does)
        with pytest.raises(Exception, match="(?i)system"):
            hf_render(jinja, messages, bos, eos, generation=False)
        return
    t = TEMPLATES[name]
    prompt = bos + text(render_prompt(t, messages[:-1], eos))
    head, body = render_response(t, messages[-1]["content"], eos)
    full = hf_render(jinja, messages, bos, eos, generation=False)
    assert prompt + text(head + body) == full + (eos if name in EOS_TAIL else "")
    assert prompt + text(head) == hf_render(jinja, messages[:-1], bos, eos, generation=True)


def test_chatml_equals_qwen2_given_a_system_message():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    for name in ("chatml", "qwen2"):
        assert text(render_prompt(TEMPLATES[name], messages, "")) == hf_render(
            QWEN2, messages, "", "", generation=False
        )


@pytest.mark.parametrize(
    "roles",
    [[A], [U, U], [U, A], ["system"], [U, "system"], ["system", A, U], [U, A, A, U], ["tool", U]],
)
def test_bad_roles_raise(roles):
    messages = [{"role": r, "content": "x"} for r in roles]
    for t in TEMPLATES.values():
        with pytest.raises(TemplateError, match="roles"):
            render_prompt(t, messages, "</s>")


def test_system_folding():
    messages = [{"role": "system", "content": " Sys "}, {"role": "user", "content": "Q"}]
    gemma = text(render_prompt(TEMPLATES["gemma"], messages, "<eos>"))
    assert gemma == "<start_of_turn>user\nSys\n\nQ<end_of_turn>\n"  # no system turn in Gemma
    mistral = text(render_prompt(TEMPLATES["mistral"], messages, "</s>"))
    assert mistral == " [INST]  Sys \n\nQ [/INST]"
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "Q"}]
    assert text(render_prompt(TEMPLATES["mistral"], empty, "</s>")) == " [INST] Q [/INST]"


@pytest.mark.parametrize(
    "source, model_type, expected",
    [
        (LLAMA3, None, "llama3"),
        (GEMMA2, None, "gemma"),
        (SIMPO_GEMMA2, "llama", "gemma"),  # the template string wins over model_type
        (MISTRAL, None, "mistral"),
        (QWEN2, None, "qwen2"),
        (CHATML_JINJA, None, "chatml"),
        (ZEPHYR, "mistral", "zephyr"),
        ("{% if x %}<<SYS>>[INST]{% endif %}", None, None),  # Llama-2-chat: unsupported
        ("{{ messages }}", "llama", None),
        (None, "gemma2", "gemma"),
        (None, "qwen2", "qwen2"),
        (None, "mistral", "mistral"),
        (None, "llama", "llama3"),
        (None, "gpt2", None),
    ],
)
def test_detect_template(source, model_type, expected):
    assert detect_template(source, model_type, lambda token: True) == expected


def test_detect_from_model_type_needs_the_markers():
    assert detect_template(None, "llama", lambda token: token != "<|eot_id|>") is None  # Llama-2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("sp"))


def test_get_template(tok):
    assert get_template("auto", tok).name == "chatml"  # written by train_sentencepiece
    assert get_template("gemma", tok).name == "gemma"
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna'"):
        get_template("vicuna", tok)
    tok_without = type(tok).from_dir(tok.files[0])  # bare .model: no config, no template
    with pytest.raises(TemplateError, match="set data.template"):
        get_template("auto", tok_without)


def test_markers_are_control_pieces(tok):
    for marker in TURN_MARKERS:
        assert tok.decode([tok.token_id(marker)]) == marker
        assert tok.token_id(marker) not in tok.encode(f"a {marker} b")  # text stays text


def test_encode_segments(tok):
    segments = [Special("<|im_start|>"), "user", "\nhello", Special("<|im_end|>"), "\n"]
    ids = encode_segments(tok, segments)
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert ids == [im_start, *tok.encode("user\nhello"), im_end, *tok.encode("\n")]
    assert tok.decode(ids) == text(segments)


MESSAGES = [
    {"role": "system", "content": "Be <s> brief </s> <|im_end|>"},  # special text stays text
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "the mod"},
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("mask", ["official", "trl"])
def test_encode_conversation(tok, name, mask):
    t = TEMPLATES[name]
    prompt, (chosen, rejected) = encode_conversation(tok, t, MESSAGES, ["el. Bye", "no"], mask)
    assert prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1  # BOS exactly once
    end = tok.token_id("<|eot_id|>") if name == "llama3" else tok.eos_id
    assert chosen[-1] == rejected[-1] == end
    head, body = render_response(t, "el. Bye", tok.eos_token)
    rendered_prompt = "<s>" + text(render_prompt(t, MESSAGES, tok.eos_token))
    if mask == "trl":
        rendered_prompt += text(head)
        head = []
    # tokenised apart, the ids decode to exactly the rendered text on both sides
    assert tok.decode(prompt) == rendered_prompt
    assert tok.decode(chosen) == text(head + body)
    assert tok.decode(prompt + chosen) == rendered_prompt + text(head + body)


def test_masks_move_only_the_header(tok):
    t = TEMPLATES["llama3"]
    official = encode_conversation(tok, t, MESSAGES, ["A reply"], "official")
    trl = encode_conversation(tok, t, MESSAGES, ["A reply"], "trl")
    header = encode_segments(tok, render_response(t, "", tok.eos_token)[0])
    assert trl[0] == official[0] + header
    assert official[1][0][: len(header) - 1] == header[:-1]  # "\n\n" merges with the reply
    assert tok.decode(official[1][0]) == tok.decode(header) + tok.decode(trl[1][0])
    assert len(official[1][0]) > len(trl[1][0])  # the header counts in |y| only for "official"


def test_gemma_response_ends_like_official_simpo(tok):
    _, (ids,) = encode_conversation(tok, TEMPLATES["gemma"], MESSAGES[1:2], ["Hi"], "official")
    assert tok.decode(ids).endswith("Hi<end_of_turn>\n</s>")  # template "\n", then EOS


def test_encode_prompt_for_generation(tok):
    ids = encode_prompt(MESSAGES[1:2], tok, "auto")
    assert tok.decode(ids) == "<s><|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"
