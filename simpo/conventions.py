"""Rendered conversations -> prompt ids and response ids, by a named convention (data.mask).

"official"  the official SimPO pipeline, token for token (princeton-nlp/SimPO:
            scripts/run_simpo.py `apply_chat_template(task="simpo")`, alignment/data.py
            `maybe_insert_system_message`, scripts/simpo_trainer.py `build_tokenized_answer` and
            `tokenize_row`):
            1. an empty system message goes first when the template mentions "system" or
               "<|im_start|>" and the conversation has none;
            2. the prompt is rendered without the generation prompt; each response is rendered
               as a lone assistant message, a leading BOS string stripped (so the assistant
               header belongs to the response and counts in |y|);
            3. prompt + response are tokenised together and split at len(tokens(prompt)), one
               token earlier when the last prompt token merged across the boundary;
            4. BOS goes first and EOS last, each only when missing.
            The chosen and rejected prompts then differ only when exactly one response merged
            with the prompt; one prompt per pair cannot express that: `Skip("boundary_merge")`.
"trl"       current TRL's DPOTrainer on conversational data (trl 1.x `_prepare_dataset`):
            prompt = the conversation with the generation prompt, prompt + response = the whole
            conversation, both tokenised; the response starts where the two first differ (the
            shorter common prefix of chosen and rejected). Nothing is added: BOS and the turn
            end are whatever the template writes.
Truncation is simpo/data.py's. `encode_prompt` is the generation prompt: exactly
`apply_chat_template(messages, add_generation_prompt=True)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from simpo.readers import Skip
from simpo.templates import ChatTemplate, TemplateError, get_template, render

if TYPE_CHECKING:
    from simpo.tokenizer import Tokenizer

CONVENTIONS = ("official", "trl")
Messages = list[dict[str, str]]


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """`messages` with a system message first (unless it has one, or `system` is None)."""
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def with_empty_system(messages: Messages, source: str) -> Messages:
    """alignment-handbook's `maybe_insert_system_message`: an empty system message first when
    the template mentions a system role (zephyr gets `<|system|>\\n</s>\\n`)."""
    if messages[0]["role"] == "system" or ("system" not in source and "<|im_start|>" not in source):
        return messages
    return [{"role": "system", "content": ""}, *messages]


def _split_official(
    tok: Tokenizer, prompt: str, prompt_ids: list[int], answer: str
) -> tuple[list[int], list[int]]:
    """`build_tokenized_answer`: tokens(prompt + answer) split after the prompt's tokens, one
    token earlier when the prompt's last token merged with the answer."""
    full = tok.encode_chat(prompt + answer)
    start = len(prompt_ids)
    if start > len(full):
        raise Skip(  # the official code raises here ("...should have the same length")
            "boundary_merge", "prompt + response tokenise to fewer tokens than the prompt alone"
        )
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def encode_official(
    tok: Tokenizer, template: ChatTemplate, messages: Messages, responses: list[str]
) -> tuple[list[int], list[list[int]]]:
    special = tok.special_tokens
    prompt = render(template.source, with_empty_system(messages, template.source), special)
    texts = []
    for content in responses:
        text = render(template.source, [{"role": "assistant", "content": content}], special)
        if tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token) :]
        texts.append(text)
    prompt_ids = tok.encode_chat(prompt)
    splits = [_split_official(tok, prompt, prompt_ids, text) for text in texts]
    prompts = [p for p, _ in splits]
    if any(p != prompts[0] for p in prompts):
        raise Skip("boundary_merge", "one response merged with the prompt's last token")
    prompt_ids = prompts[0]
    if tok.bos_id is not None and prompt_ids[:1] != [tok.bos_id]:
        prompt_ids = [tok.bos_id, *prompt_ids]
    out = []
    for _, ids in splits:
        out.append(ids if ids[-1:] == [tok.eos_id] else [*ids, tok.eos_id])
    return prompt_ids, out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_trl(
    tok: Tokenizer, template: ChatTemplate, messages: Messages, responses: list[str]
) -> tuple[list[int], list[list[int]]]:
    special = tok.special_tokens
    prompt = tok.encode_chat(render(template.source, messages, special, add_generation_prompt=True))
    fulls = []
    for content in responses:
        conversation = [*messages, {"role": "assistant", "content": content}]
        fulls.append(tok.encode_chat(render(template.source, conversation, special)))
    n = min(_common_prefix(prompt, full) for full in fulls)
    return prompt[:n], [full[n:] for full in fulls]


def encode_pair(
    tok: Tokenizer,
    template: ChatTemplate,
    messages: Messages,
    responses: list[str],
    convention: str,
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, ids of each response) under `convention`; raises TemplateError when the
    template refuses the conversation, Skip when the convention cannot express the pair."""
    if convention == "official":
        return encode_official(tok, template, messages, responses)
    if convention == "trl":
        return encode_trl(tok, template, messages, responses)
    raise TemplateError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")


def encode_prompt(
    messages: Messages, tokenizer: Tokenizer, template: str = "auto", chat_template: str = ""
) -> list[int]:
    """Generation prompt ids: `apply_chat_template(messages, add_generation_prompt=True)`."""
    t = get_template(tokenizer, template, chat_template)
    text = render(t.source, messages, tokenizer.special_tokens, add_generation_prompt=True)
    return tokenizer.encode_chat(text)
