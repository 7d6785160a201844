"""Chat templates, hand-written: llama3, gemma, mistral, chatml, qwen2, zephyr.

A template renders a conversation as a list of segments: plain `str` is text, `Special` is one
special token, encoded by id and never by tokenising its text (SentencePiece does not parse
control pieces out of text, and text inside a message must never become a turn marker).
`"".join(segments)` is the string the official Jinja template renders.

A pair is rendered as prompt turns, then the assistant turn of each response. The assistant turn
is exactly what the official template writes for a final assistant message (header + content +
turn end), plus EOS when the turn ends in text: this is what the official SimPO trainer trains on
(it renders the response as a one-message conversation and appends EOS unless already last), e.g.
gemma `<end_of_turn>\\n<eos>`, zephyr `</s>\\n</s>`. Mask conventions: "official" puts the
assistant header in the response (it counts in |y|); "trl" puts it at the end of the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simpo.tokenizer import Tokenizer

MASKS = ("official", "trl")
# what train_sentencepiece writes into tokenizer_config.json, so HF renders the same prompts
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's template inserts this system turn when the conversation has none (Qwen2.5's differs)
QWEN2_SYSTEM = "You are a helpful assistant."


class Special(str):
    """A special token in a rendered conversation (its text is the token's piece)."""


class TemplateError(ValueError):
    """A conversation the template cannot render (bad roles), or an unknown template."""


Segments = list[str]  # str and Special items
# (role, content, eos) -> (header, body) of one turn
Turn = Callable[[str, str, str], tuple[Segments, Segments]]


def _llama3(role: str, content: str, eos: str) -> tuple[Segments, Segments]:
    head = [Special("<|start_header_id|>"), role, Special("<|end_header_id|>"), "\n\n"]
    return head, [content, Special("<|eot_id|>")]


def _gemma(role: str, content: str, eos: str) -> tuple[Segments, Segments]:
    head = [Special("<start_of_turn>"), ("model" if role == "assistant" else role) + "\n"]
    return head, [content, Special("<end_of_turn>"), "\n"]


def _mistral(role: str, content: str, eos: str) -> tuple[Segments, Segments]:
    if role == "user":
        return [" [INST] "], [content, " [/INST]"]
    return [], [" " + content, Special(eos)]  # the space is SentencePiece's "▁" of the reply


def _chatml(role: str, content: str, eos: str) -> tuple[Segments, Segments]:
    return [Special("<|im_start|>"), role + "\n"], [content, Special("<|im_end|>"), "\n"]


def _zephyr(role: str, content: str, eos: str) -> tuple[Segments, Segments]:
    return [f"<|{role}|>\n"], [content, Special(eos), "\n"]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    turn: Turn
    end_of_turn: str | None  # the token that ends an assistant turn; None: the tokenizer's EOS
    strip: bool = False  # the official template trims each message (Jinja `| trim`)
    fold_system: bool = False  # no system role: "system\n\n" opens the first user message
    default_system: str | None = None  # system turn used when the conversation has none


TEMPLATES = {
    t.name: t
    for t in (
        ChatTemplate("llama3", _llama3, "<|eot_id|>", strip=True),
        # Gemma's own template raises on a system message; like the official SimPO Gemma-2 run
        # (and Mistral's template) we fold it into the first user message instead.
        ChatTemplate("gemma", _gemma, "<end_of_turn>", strip=True, fold_system=True),
        ChatTemplate("mistral", _mistral, None, fold_system=True),
        ChatTemplate("chatml", _chatml, "<|im_end|>"),
        ChatTemplate("qwen2", _chatml, "<|im_end|>", default_system=QWEN2_SYSTEM),
        ChatTemplate("zephyr", _zephyr, None),
    )
}


def _markers(template: ChatTemplate) -> set[str]:
    """The special tokens a template needs from the tokenizer (besides EOS)."""
    turns = [template.turn(role, "", "") for role in ("system", "user", "assistant")]
    return {s for head, body in turns for s in head + body if isinstance(s, Special) and s}


TURN_MARKERS = tuple(sorted(set().union(*map(_markers, TEMPLATES.values()))))
_SOURCE_MARKERS = (  # substring of the checkpoint's Jinja template -> our template
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("<|im_start|>", "chatml"),
    ("<|assistant|>", "zephyr"),
    ("[INST]", "mistral"),
)
_MODEL_TYPES = {
    "llama": "llama3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "mistral": "mistral",
    "qwen2": "qwen2",
}


def detect_template(
    source: str | None, model_type: str | None, has_token: Callable[[str], bool]
) -> str | None:
    """Name of the template matching a checkpoint's Jinja `source`, else its `model_type`."""
    if source:
        if "<<SYS>>" in source:  # Llama-2-chat: a different [INST] dialect
            return None
        for marker, name in _SOURCE_MARKERS:
            if marker in source:
                qwen2 = name == "chatml" and f"system\\n{QWEN2_SYSTEM}" in source
                return "qwen2" if qwen2 else name
        return None
    name = _MODEL_TYPES.get(model_type or "")
    if name is not None and all(map(has_token, _markers(TEMPLATES[name]))):
        return name
    return None


def end_of_turn(name: str) -> str | None:
    """The special token that ends an assistant turn of template `name` (None: EOS)."""
    return TEMPLATES[name].end_of_turn


def get_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """Template `name`, or the tokenizer's own for "auto"."""
    if name == "auto":
        if tokenizer.chat_template is None:
            raise TemplateError(
                f"cannot detect the chat template of {tokenizer.path}; set data.template to one of "
                f"{sorted(TEMPLATES)}"
            )
        name = tokenizer.chat_template
    if name not in TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _check_roles(messages: list[dict[str, str]]) -> None:
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * len(turns)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "user":
        raise TemplateError(
            f"roles {roles}: expected an optional system message, then user/assistant "
            "alternating, ending with user"
        )


def render_prompt(template: ChatTemplate, messages: list[dict[str, str]], eos: str) -> Segments:
    """The prompt turns (no BOS, no assistant header); raises TemplateError on bad roles."""
    _check_roles(messages)

    def clean(text: str) -> str:
        return text.strip() if template.strip else text

    system = template.default_system
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if template.fold_system:
        if system:  # an empty system message is dropped (Mistral's template would add "\n\n")
            first = {"role": "user", "content": f"{clean(system)}\n\n{messages[0]['content']}"}
            messages = [first, *messages[1:]]
        system = None
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    segments: Segments = []
    for m in messages:
        head, body = template.turn(m["role"], clean(m["content"]), eos)
        segments += head + body
    return segments


def render_response(template: ChatTemplate, content: str, eos: str) -> tuple[Segments, Segments]:
    """(header, body) of a final assistant turn; body ends with EOS or the end-of-turn token."""
    head, body = template.turn("assistant", content.strip() if template.strip else content, eos)
    return head, body if isinstance(body[-1], Special) else [*body, Special(eos)]


def encode_segments(tokenizer: Tokenizer, segments: Segments) -> list[int]:
    """Ids of rendered segments: adjacent text is tokenised together, specials by id."""
    ids: list[int] = []
    text: list[str] = []
    for seg in [*segments, Special("")]:  # the empty Special flushes the last text run
        if not isinstance(seg, Special):
            text.append(seg)
            continue
        ids += tokenizer.encode("".join(text))
        text = []
        if seg:
            ids.append(tokenizer.token_id(seg))
    return ids


def encode_conversation(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: list[dict[str, str]],
    responses: list[str],
    mask: str,
) -> tuple[list[int], list[list[int]]]:
    """BOS + prompt ids, and the ids of each response, tokenised separately (see DESIGN/README).

    Tokenising prompt and response apart keeps every token on one side of the boundary: the
    response ids are exactly what the model emits after `encode_prompt`'s ids at generation.
    """
    if mask not in MASKS:
        raise TemplateError(f"unknown mask convention {mask!r}; expected one of {MASKS}")
    eos = tokenizer.eos_token
    prompt = render_prompt(template, messages, eos)
    out = []
    for content in responses:
        head, body = render_response(template, content, eos)
        out.append(encode_segments(tokenizer, head + body if mask == "official" else body))
    if mask == "trl":
        prompt += render_response(template, "", eos)[0]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + encode_segments(tokenizer, prompt), out


def encode_prompt(messages: list[dict[str, str]], tokenizer: Tokenizer, template: str) -> list[int]:
    """Prompt ids for generation: BOS, the turns, the assistant header (template name or "auto")."""
    return encode_conversation(tokenizer, get_template(template, tokenizer), messages, [], "trl")[0]
