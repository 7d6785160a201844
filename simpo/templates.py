"""Chat templates: Jinja sources rendered exactly as transformers renders them.

A template is a Jinja source: the checkpoint's own (`chat_template` in tokenizer_config.json,
chat_template.jinja or chat_template.json), a file or string given as `data.chat_template`
(e.g. the official SimPO run's Mistral override, configs/templates/mistral-simpo.jinja), or one
of the named sources below, copied verbatim from each model family's tokenizer_config.json (the
fallback for checkpoints that ship none). `render` runs it in transformers' sandbox:
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`, `raise_exception`,
`strftime_now`, transformers' `tojson`, the `{% generation %}` block and loop controls, with the
tokenizer's special-token strings (`bos_token`, `eos_token`, ...) as variables. Whether a BOS
appears is the template's business: it is never added here. How rendered text becomes prompt
and response ids is simpo/conventions.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simpo.tokenizer import Tokenizer

_JINJA_HINT = "pip install 'jinja2>=3.1' (a core dependency of simpo: pip install -e .)"

# The named templates (data.template), verbatim from each model's tokenizer_config.json.
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
    "assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (  # princeton-nlp/SimPO training_configs/gemma-2-9b-it-simpo.yaml: gemma-2-9b-it's own
    # template raises on a system message; this one folds it into the first user turn
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
CHATML = (  # teknium/OpenHermes-2.5-Mistral-7B
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2 = (  # Qwen/Qwen2-7B-Instruct: a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR = (  # HuggingFaceH4/zephyr-7b-beta (alignment-handbook's DEFAULT_CHAT_TEMPLATE)
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>"
    "\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
    "'<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
    "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
TEMPLATES = {
    "llama3": LLAMA3,
    "gemma": GEMMA,
    "mistral": MISTRAL,
    "chatml": CHATML,
    "qwen2": QWEN2,
    "zephyr": ZEPHYR,
}
# what train_sentencepiece writes for the tiny model: chatml that starts with BOS
CHATML_BOS_JINJA = "{{ bos_token }}" + CHATML
# control pieces of the tiny SentencePiece model: the turn markers of the named templates
TURN_MARKERS = (
    "<end_of_turn>",
    "<start_of_turn>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|im_start|>",
    "<|start_header_id|>",
)
# tokens that end an assistant turn: a generation stop when the template writes one
END_OF_TURN_MARKERS = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>")
_MODEL_TYPES = {  # config.json model_type -> named template, for checkpoints without a template
    "llama": "llama3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "mistral": "mistral",
    "qwen2": "qwen2",
}
_NEEDS = {"llama3": "<|start_header_id|>", "gemma": "<start_of_turn>", "qwen2": "<|im_start|>"}


class TemplateError(ValueError):
    """A conversation the template refuses (raise_exception), or an unknown / bad template."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "llama3", ..., "own" (the checkpoint's), or the data.chat_template file name
    source: str  # Jinja


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    """transformers' tojson: json.dumps without Jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The sandbox transformers renders chat templates in (utils/chat_template_utils.py)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise TemplateError(f"rendering a chat template needs jinja2: {_JINJA_HINT}") from e

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` without underscore attributes (no way to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}")

    class Dict:
        """`dict(...)` and `dict.fromkeys(...)`, nothing else of the type."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    env.globals.update(dict=Dict(), namespace=Namespace)
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: line {e.lineno}: {e.message}") from e


def render(
    source: str,
    messages: list[dict[str, str]],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = False,
) -> str:
    """The text transformers' `apply_chat_template(messages, tokenize=False)` gives for this
    template source and special-token strings ({"bos_token": "<s>", ...})."""
    import jinja2

    template = _compile(source)
    try:
        return template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the chat template refused the conversation: {e}") from None


def chat_template_source(directory: Path | None, tokenizer_config: dict[str, Any]) -> str | None:
    """A checkpoint's own template, where transformers looks: chat_template.jinja (>= 4.50),
    chat_template.json, then tokenizer_config.json (a string, or a list: the "default" one)."""
    if directory is not None and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if directory is not None and (directory / "chat_template.json").is_file():
        path = directory / "chat_template.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TemplateError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise TemplateError(f'{path}: expected {{"chat_template": "<Jinja>"}}')
        return data["chat_template"]
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": ..., ...}]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source


def fallback_template(model_type: str | None, has_token: Callable[[str], bool]) -> str | None:
    """The named template of a checkpoint without one, by config.json's `model_type` (Llama-2
    has model_type "llama" but no Llama-3 turn markers: None)."""
    name = _MODEL_TYPES.get(model_type or "")
    if name is None or (name in _NEEDS and not has_token(_NEEDS[name])):
        return None
    return name


def get_template(
    tokenizer: Tokenizer, template: str = "auto", chat_template: str = ""
) -> ChatTemplate:
    """The template data.template / data.chat_template select.

    `chat_template` (a Jinja string, or the path of a Jinja file) wins; then a named template;
    "auto" is the checkpoint's own, else the named template of its model_type.
    """
    if chat_template:
        if "{{" in chat_template or "{%" in chat_template:
            return ChatTemplate("data.chat_template", chat_template)
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise TemplateError(
                f"data.chat_template = {chat_template!r}: no such file (relative paths start at "
                f"{Path.cwd()}) and not a Jinja template"
            )
        return ChatTemplate(path.name, path.read_text(encoding="utf-8"))
    if template == "auto":
        if tokenizer.chat_template:
            return ChatTemplate("own", tokenizer.chat_template)
        name = fallback_template(tokenizer.model_type, lambda t: _has(tokenizer, t))
        if name is None:
            raise TemplateError(
                f"{tokenizer.path} has no chat template and its model_type "
                f"({tokenizer.model_type}) names none; set data.template to one of "
                f"{sorted(TEMPLATES)} or data.chat_template to a Jinja file"
            )
        template = name
    if template not in TEMPLATES:
        raise TemplateError(
            f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}"
        )
    return ChatTemplate(template, TEMPLATES[template])


def _has(tokenizer: Tokenizer, token: str) -> bool:
    try:
        tokenizer.token_id(token)
    except ValueError:
        return False
    return True
