"""Reward models on the project's Transformer: `*ForSequenceClassification` and ArmoRM.

    rm = load_reward_model("Skywork-Reward-Llama-3.1-8B", torch.bfloat16, "cuda")
    tok, chat = reward_tokenizer("Skywork-Reward-Llama-3.1-8B")
    group = encode_group(rm, tok, chat, [{"role": "user", "content": q}], responses)
    [scores] = score_groups(rm, [group])             # a reward per response

`*ForSequenceClassification` (Llama, Mistral, Qwen2, Gemma-2 backbones; e.g. Skywork-Reward,
FsfairX-LLaMA3-RM): the backbone's final hidden state at one token times `score.weight`
(1 x dim). The token is transformers' choice: the last one whose id is not the config's
`pad_token_id` (the last token if there is none); for a checkpoint whose pad token is its
end-of-turn token, that is the token before it.

ArmoRM (`LlamaForRewardModelWithGating`, RLHFlow/ArmoRM-Llama3-8B-v0.1): a Llama-3 backbone;
`regression_layer` (19 x dim) maps the hidden state at the last token (before the first pad
token, as its published code reads it) to 19 objective scores, which `reward_transform_matrix`
(19 x 19) transforms; a gating MLP over the hidden state at the prompt's last token (the
`<|eot_id|>` before the final assistant header) weighs them:
    score = sum_j gate_j * (rewards @ T)_j,   gate = softmax(MLP(h_gate) / temperature) * scale
The heads run in fp32 whatever the backbone's dtype.

The K responses of one prompt are scored in one row: their common token prefix (the prompt)
once, each response after it as its own branch (`simpo.attention.Layout`), exactly as K
separate sequences. PairRM (a DeBERTa pairwise ranker) is not supported.

Verifiable rewards: `load_reward_function("pkg.module:function")`, called through
`call_reward_function`, which turns an exception, a non-number or NaN into a RewardError.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simpo.attention import Layout
from simpo.hf import load_state_into, read_hf_config
from simpo.model import Backbone, ModelArgs, Transformer
from simpo.templates import TEMPLATES, ChatTemplate, TemplateError, get_template, render
from simpo.tokenizer import Tokenizer

ARMORM = "LlamaForRewardModelWithGating"


class RewardError(ValueError):
    """A reward model or reward function that cannot be used; the message says why."""


class Gating(nn.Module):
    """ArmoRM's gating network: ReLU MLP -> softmax(x / temperature) * logit_scale."""

    def __init__(self, dim: int, n_out: int, hidden: int, n_hidden: int, temperature: float):
        super().__init__()
        sizes = [dim] + [hidden] * n_hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.layers.append(nn.Linear(sizes[-1], n_out))
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        """Gate weights (N, n_out) for hidden states x (N, dim), computed in fp32."""
        x = x.float()
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight.float(), layer.bias.float())
            x = x if i == len(self.layers) - 1 else F.relu(x)
        return F.softmax(x / self.temperature, dim=-1) * self.logit_scale.float()[0]


class RewardModel(nn.Module):
    """Backbone (HF names `model.*`) and a reward head; `architecture` is config.json's."""

    hidden_states = Transformer.hidden_states  # the same backbone forward (args, model, backend)

    def __init__(self, args: ModelArgs, config: dict[str, Any], attn_backend: str = "auto") -> None:
        super().__init__()
        self.args, self.architecture = args, config["architectures"][0]
        self.attn_backend = attn_backend
        self.pad_token_id: int | None = config.get("pad_token_id")
        self.model = Backbone(args, attn_backend)
        if self.architecture == ARMORM:
            n = int(config.get("num_objectives", 19))
            self.regression_layer = nn.Linear(args.dim, n, bias=False)
            self.reward_transform_matrix = nn.Parameter(torch.eye(n))
            self.gating = Gating(
                args.dim, n, int(config.get("gating_hidden_dim", 1024)),
                int(config.get("gating_n_hidden", 3)),
                float(config.get("gating_temperature", 10)),
            )  # fmt: skip
        else:
            self.score = nn.Linear(args.dim, 1, bias=False)

    @property
    def head_weight(self) -> Tensor:  # where the model lives (as Transformer.head_weight)
        return self.model.embed_tokens.weight

    def read_index(self, ids: list[int]) -> int:
        """The token whose hidden state is scored (see the module docstring)."""
        pad = self.pad_token_id
        if self.architecture == ARMORM:  # (first pad - 1) mod T, as its modeling code
            return ((ids.index(pad) if pad in ids else 0) - 1) % len(ids)
        real = [i for i, t in enumerate(ids) if t != pad]
        return real[-1] if real else 0

    def rewards(self, h_read: Tensor, h_gate: Tensor | None) -> Tensor:
        """Rewards (N,) from hidden states (N, dim) at the read (and gate) tokens, in fp32."""
        h_read = h_read.float()
        if self.architecture != ARMORM:
            return F.linear(h_read, self.score.weight.float())[:, 0]
        objectives = F.linear(h_read, self.regression_layer.weight.float())  # (N, 19)
        adjusted = objectives @ self.reward_transform_matrix.float()
        gate = self.gating(h_gate)  # (N, 19)
        return (gate * adjusted).sum(-1)


def load_reward_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> RewardModel:
    """A reward model from a HF checkpoint directory (config.json, safetensors)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RewardError(f"{path}: no config.json; expected a Hugging Face reward model")
    config = json.loads(config_file.read_text())
    arch = (config.get("architectures") or ["(none)"])[0]
    if arch != ARMORM and not arch.endswith("ForSequenceClassification"):
        raise RewardError(
            f"{config_file}: architectures = {arch!r}; expected a *ForSequenceClassification "
            f"reward model or ArmoRM ({ARMORM}). PairRM (a pairwise ranker) is not supported"
        )
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if arch != ARMORM and labels != 1:
        raise RewardError(f"{config_file}: {labels} labels; a reward model has 1 (num_labels)")
    args = read_hf_config(config_file)
    args.tie_word_embeddings = True  # no language-model head in a reward checkpoint
    with torch.device("meta"):
        model = RewardModel(args, config).to(dtype)
    model.to_empty(device=device)
    load_state_into(model, path)
    return model.eval()


def reward_tokenizer(path: str | Path, template: str = "auto") -> tuple[Tokenizer, ChatTemplate]:
    """The reward model's own tokenizer and chat template ("auto": the one it ships; else a
    named template or a Jinja file), or a RewardError saying what is missing."""
    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise RewardError(
            f"{path}: no tokenizer.model or tokenizer.json; a reward model scores responses in "
            "its own chat template, so its tokenizer files must be in its directory"
        )
    tokenizer = Tokenizer.from_dir(path)
    hint = f"name it with --reward-template (one of {sorted(TEMPLATES)}, or a Jinja file)"
    if template == "auto" and tokenizer.chat_template is None:
        raise RewardError(f"{path}: the reward model ships no chat template; {hint}")
    named = template == "auto" or template in TEMPLATES
    try:
        chat = get_template(tokenizer, template if named else "auto", "" if named else template)
    except TemplateError as e:
        raise RewardError(f"{path}: {e}; {hint}") from None
    return tokenizer, chat


def encode_for_reward(
    tokenizer: Tokenizer, chat: ChatTemplate, prompt: list[dict[str, str]], response: str
) -> tuple[list[int], int | None]:
    """Ids of the conversation prompt + response exactly as transformers'
    `apply_chat_template([*prompt, assistant], tokenize=True)` gives them for the reward model
    (what the official annotation script scores), and the index of the prompt's last token
    (None if the prompt's ids are not a prefix of the conversation's). The one place that knows
    how a conversation is rendered for a reward model."""
    special = tokenizer.special_tokens
    conversation = [*prompt, {"role": "assistant", "content": response}]
    ids = tokenizer.encode_chat(render(chat.source, conversation, special))
    prompt_ids = tokenizer.encode_chat(render(chat.source, prompt, special))
    prefix = ids[: len(prompt_ids)] == prompt_ids
    return ids, len(prompt_ids) - 1 if prefix else None


def gate_index(tokenizer: Tokenizer, ids: list[int]) -> int:
    """ArmoRM's gating token: the last `<|eot_id|>` followed by the assistant header, found as
    its published code finds it (last occurrence of the pattern; it also matches the "\n\n"
    token after the header, which the llama3 template always writes)."""
    pattern = tokenizer.encode_chat("<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
    for j in range(len(ids) - len(pattern), -1, -1):
        if ids[j : j + len(pattern)] == pattern:
            return j
    raise RewardError(
        "ArmoRM: the conversation has no '<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>'; ArmoRM scores conversations in the llama3 chat template"
    )


def encode_group(
    rm: RewardModel, tokenizer: Tokenizer, chat: ChatTemplate, prompt: list[dict[str, str]],
    responses: list[str],
) -> list[tuple[list[int], int]]:  # fmt: skip
    """(ids, gate index) of each response's conversation (gate 0 unless ArmoRM)."""
    seqs = [encode_for_reward(tokenizer, chat, prompt, r)[0] for r in responses]
    if rm.architecture != ARMORM:
        return [(ids, 0) for ids in seqs]
    return [(ids, gate_index(tokenizer, ids)) for ids in seqs]


def _group_row(rm: RewardModel, group: list[tuple[list[int], int]]) -> tuple[list[int], ...]:
    """One row for a prompt's K conversations: their common prefix once, then each one's rest
    as branch k + 1 with positions continuing from the prefix. Returns ids, branch, positions,
    and per conversation the row index of its read token and of its gate token."""
    seqs = [ids for ids, _ in group]
    shortest = min(len(s) for s in seqs)
    common = 0
    while common < shortest - 1 and all(s[common] == seqs[0][common] for s in seqs):
        common += 1  # every conversation keeps >= 1 token of its own
    ids, branch, pos = seqs[0][:common], [0] * common, list(range(common))
    read, gate = [], []
    for k, (s, g) in enumerate(group):
        start = len(ids) - common  # row index of s[i] for i >= common: start + i
        ids += s[common:]
        branch += [k + 1] * (len(s) - common)
        pos += range(common, len(s))
        read.append(r if (r := rm.read_index(s)) < common else start + r)
        gate.append(g if g < common else start + g)
    return ids, branch, pos, read, gate


@torch.no_grad()
def score_groups(
    rm: RewardModel, groups: list[list[tuple[list[int], int]]], max_tokens: int = 16384
) -> list[list[float]]:
    """Rewards of each group's conversations (`encode_group`), a row per group, rows batched
    up to `max_tokens` padded tokens per forward."""
    device = rm.head_weight.device
    rows = [_group_row(rm, g) for g in groups]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[list[float]] = [[] for _ in groups]
    i = 0
    while i < len(order):
        width = len(rows[order[i]][0])  # longest first: the batch's width
        batch = order[i : i + max(1, max_tokens // width)]
        i += len(batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        doc = torch.full((len(batch), width), -1, dtype=torch.long)
        branch, pos = torch.zeros_like(ids), torch.zeros_like(ids)
        read, gate = [], []
        for b, j in enumerate(batch):
            r_ids, r_branch, r_pos, r_read, r_gate = rows[j]
            n = len(r_ids)
            ids[b, :n], branch[b, :n], pos[b, :n] = (
                torch.tensor(x) for x in (r_ids, r_branch, r_pos)
            )
            doc[b, :n] = 0
            read += [b * width + x for x in r_read]
            gate += [b * width + x for x in r_gate]
        layout = Layout(doc, branch, pos).to(device)
        hidden = rm.hidden_states(ids.to(device), layout).flatten(0, 1)
        rewards = rm.rewards(hidden[torch.tensor(read, device=device)],
                             hidden[torch.tensor(gate, device=device)]).tolist()  # fmt: skip
        for j in batch:
            k = len(groups[j])
            out[j], rewards = rewards[:k], rewards[k:]
    return out


def load_reward_function(spec: str) -> Callable[[str, str], Any]:
    """The function named by `pkg.module:function`: function(prompt, response) -> float."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise RewardError(f"reward {spec!r}: expected a reward model directory or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import {module_name} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {module_name} has no function {name!r}")
    return fn


def call_reward_function(fn: Callable[[str, str], Any], prompt: str, response: str) -> float:
    """fn(prompt, response) as a finite float; RewardError if it raises, returns something that
    is not a number, or NaN / inf (never read as a reward of 0)."""
    try:
        value = fn(prompt, response)
    except Exception as e:
        raise RewardError(f"raised {type(e).__name__}: {e}") from e
    if isinstance(value, str | bytes) or value is None:
        raise RewardError(f"returned {value!r}, not a number")
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise RewardError(f"returned {value!r}, not a number") from e
    if not math.isfinite(value):
        raise RewardError(f"returned {value}")
    return value
