"""simpo.reward: rewards equal transformers' *ForSequenceClassification (Llama, Mistral, Qwen2,
Gemma-2) and a reference ArmoRM written from its published modeling code, on tiny random
checkpoints; conversations are rendered in the reward model's template; bad models are named."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import one_thread  # noqa: F401
from safetensors.torch import save_file
from sp_helpers import train_tokenizer
from torch import nn

from simpo.demo.tiny import tiny_hf_config
from simpo.reward import (
    ARMORM,
    RewardError,
    encode_for_reward,
    encode_group,
    gate_index,
    load_reward_model,
    reward_tokenizer,
    score_groups,
)
from simpo.templates import get_template

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 512


def make_seq_cls(family: str, out: Path, **overrides) -> Path:
    """A tiny random transformers *ForSequenceClassification checkpoint (1 label, fp32)."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_hf_config(family, **{"vocab_size": VOCAB, **overrides})
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(
        model_type, initializer_range=0.1, num_labels=1, **cfg
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # make a wrong (1 + w) RMSNorm visible
                p.add_(torch.rand(p.shape, generator=gen) - 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return out


def groups_of_ids(seed: int, pad: int | None = None) -> list[list[tuple[list[int], int]]]:
    """Prompts (shared prefixes) with 1-3 continuations each, longer than the windows (8); with
    `pad`, some conversations end in pad tokens (transformers then reads an earlier token)."""
    rng = random.Random(seed)
    groups = []
    for k in (3, 1, 2, 3):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 12))]
        group = []
        for _ in range(k):
            ids = prompt + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 15))]
            group.append((ids + [pad] * rng.randint(0, 2) if pad is not None else ids, 0))
        groups.append(group)
    return groups


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
@torch.no_grad()
def test_rewards_equal_transformers_sequence_classification(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    path = make_seq_cls(family, tmp_path / family, pad_token_id=7)
    ref = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    ours = load_reward_model(path)
    groups = groups_of_ids(seed=len(family), pad=7)
    got = score_groups(ours, groups, max_tokens=64)  # several forwards, rows of unequal length
    for group, rewards in zip(groups, got, strict=True):
        for (ids, _), reward in zip(group, rewards, strict=True):
            want = float(ref(torch.tensor([ids])).logits[0, 0])
            assert abs(reward - want) < 1e-4, (family, reward, want)


# ----- ArmoRM: a reference from RLHFlow/ArmoRM-Llama3-8B-v0.1 modeling_custom.py -----


class RefGatingNetwork(nn.Module):
    def __init__(self, in_features, out_features, temperature, hidden_dim, n_hidden):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        layers = []
        for _ in range(n_hidden):
            layers.append(nn.Linear(in_features, hidden_dim))
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, out_features, bias=True))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        x = F.softmax(x / self.temperature, dim=1)
        return x * self.logit_scale[0]


class RefArmoRM(nn.Module):
    """LlamaForRewardModelWithGating.forward, batch of one sequence at a time."""

    def __init__(self, config, num_objectives, temperature, hidden_dim, n_hidden):
        super().__init__()
        from transformers import LlamaModel

        self.config = config
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, num_objectives, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(num_objectives))
        self.gating = RefGatingNetwork(
            config.hidden_size, num_objectives, temperature, hidden_dim, n_hidden
        )

    def forward(self, input_ids, token_pattern):
        tokens_hidden_states = self.model(input_ids).last_hidden_state
        batch_size = input_ids.shape[0]
        sequence_lengths = torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1
        sequence_lengths = sequence_lengths % input_ids.shape[-1]
        dummy_iterator = torch.arange(batch_size)
        hidden_states = tokens_hidden_states[dummy_iterator, sequence_lengths]
        rewards = self.regression_layer(hidden_states)

        def find_token_for_gating(lst):
            for j in range(len(lst) - len(token_pattern), -1, -1):
                if lst[j : j + len(token_pattern)] == token_pattern:
                    return j
            raise ValueError("Token pattern not found in the list.")

        gating_token_positions = [find_token_for_gating(ids.tolist()) for ids in input_ids]
        prompt_embedding = tokens_hidden_states[dummy_iterator, gating_token_positions, :]
        gating_output = self.gating(prompt_embedding)
        rewards_adjusted = rewards @ self.reward_transform_matrix
        return torch.sum(gating_output * rewards_adjusted, dim=1)


@pytest.fixture(scope="module")
def armorm(tmp_path_factory) -> tuple[Path, RefArmoRM]:
    """A tiny ArmoRM checkpoint (5 objectives, 2 hidden gating layers) with the tokenizer."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("armorm")
    tok = train_tokenizer(out)
    cfg = tiny_hf_config("llama3", vocab_size=VOCAB, pad_token_id=VOCAB - 1)
    cfg.pop("model_type")
    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(0)
    ref = RefArmoRM(config, num_objectives=5, temperature=2.0, hidden_dim=32, n_hidden=2).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "norm" not in name else 0.2) + (
                1.0 if "norm" in name else 0.0))  # fmt: skip
        ref.gating.logit_scale.fill_(1.7)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, out / "model.safetensors")
    hf = config.to_dict() | {
        "architectures": [ARMORM], "num_objectives": 5, "gating_temperature": 2.0,
        "gating_hidden_dim": 32, "gating_n_hidden": 2, "model_type": "llama",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(hf))
    assert tok.vocab_size <= VOCAB
    return out, ref


@torch.no_grad()
def test_armorm_equals_its_published_modeling_code(armorm) -> None:
    path, ref = armorm
    rm = load_reward_model(path)
    tok, chat = reward_tokenizer(path, "llama3")
    prompts = ["Write a short poem about cats.", "Why is rain good?", "Hello."]
    answers = [["The cat is good.", "Cats and dogs.", "A poem about rain, please"], ["Because."]]
    answers += [["Hello world", "Hello world"]]  # identical answers are scored alike
    groups = [
        encode_group(rm, tok, chat, [{"role": "user", "content": p}], a)
        for p, a in zip(prompts, answers, strict=True)
    ]
    pattern = [tok.token_id(t) for t in ("<|eot_id|>", "<|start_header_id|>")]
    pattern += tok.encode("assistant") + [tok.token_id("<|end_header_id|>")] + tok.encode("\n\n")
    got = score_groups(rm, groups)
    for group, rewards in zip(groups, got, strict=True):
        for (ids, gate), reward in zip(group, rewards, strict=True):
            assert ids[gate : gate + len(pattern)] == pattern  # the published pattern
            want = float(ref(torch.tensor([ids]), pattern)[0])
            assert abs(reward - want) < 1e-4, (reward, want)
    assert got[2][0] == got[2][1]
    assert len({round(r, 6) for r in got[0]}) == 3


@torch.no_grad()
def test_armorm_reads_before_the_first_pad_token(armorm, tmp_path) -> None:
    """ArmoRM's code reads the token before the FIRST pad token: with pad = <|eot_id|>, that is
    the end of the user's message. Reproduced as written."""
    path, ref = armorm
    tok, chat = reward_tokenizer(path, "llama3")
    eot = tok.token_id("<|eot_id|>")
    config = json.loads((path / "config.json").read_text()) | {"pad_token_id": eot}
    for f in ("model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    rm = load_reward_model(tmp_path)
    group = encode_group(rm, tok, chat, [{"role": "user", "content": "Hi."}], ["Yes."])
    ids = group[0][0]
    assert rm.read_index(ids) == ids.index(eot) - 1
    ref.config.pad_token_id = eot
    pattern = [eot, tok.token_id("<|start_header_id|>"), *tok.encode("assistant")]
    want = float(ref(torch.tensor([ids]), pattern)[0])
    ref.config.pad_token_id = VOCAB - 1
    assert abs(score_groups(rm, [group])[0][0] - want) < 1e-4


def test_conversation_is_rendered_in_the_reward_models_template(tmp_path) -> None:
    tok = train_tokenizer(tmp_path)
    prompt = [{"role": "user", "content": " Why is rain good? "}]
    ids, last = encode_for_reward(tok, get_template(tok, "llama3"), prompt, " Because. ")
    text = tok.decode(ids)
    assert text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nWhy is rain good?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBecause.<|eot_id|>"
    )  # the official Llama-3 Jinja output for [user, assistant], BOS first, nothing appended
    assert ids[last] == tok.token_id("<|eot_id|>") and gate_index(tok, ids) == last
    ids, _ = encode_for_reward(tok, get_template(tok), prompt, "Because.")  # its own: chatml
    assert tok.decode(ids) == (  # with the BOS its template writes
        "<s><|im_start|>user\n Why is rain good? <|im_end|>\n<|im_start|>assistant\nBecause."
        "<|im_end|>\n"
    )
    ids, _ = encode_for_reward(tok, get_template(tok, "chatml"), prompt, "Because.")
    assert tok.decode(ids).startswith("<|im_start|>user")  # the named chatml writes none


def test_unusable_reward_models_are_named(tmp_path) -> None:
    path = make_seq_cls("llama", tmp_path / "rm")
    with pytest.raises(RewardError, match="no tokenizer.model or tokenizer.json"):
        reward_tokenizer(path)
    train_tokenizer(path)
    assert "<|im_start|>" in reward_tokenizer(path)[1].source  # its tokenizer_config.json's
    bare = tmp_path / "bare"  # no chat template, no config.json to guess one from
    train_tokenizer(bare)
    (bare / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    with pytest.raises(RewardError, match="ships no chat template; name it with --reward-template"):
        reward_tokenizer(bare)
    assert reward_tokenizer(bare, "llama3")[1].name == "llama3"
    jinja = tmp_path / "rm.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert reward_tokenizer(bare, str(jinja))[1].name == "rm.jinja"
    with pytest.raises(RewardError, match="no such file"):
        reward_tokenizer(bare, "no-such-template")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(RewardError, match="PairRM"):
        load_reward_model(path)
    two = config | {"id2label": {"0": "a", "1": "b"}}
    (path / "config.json").write_text(json.dumps(two))
    with pytest.raises(RewardError, match="2 labels"):
        load_reward_model(path)
    with pytest.raises(RewardError, match="no config.json"):
        load_reward_model(tmp_path)


def test_bf16_backbone_stays_close_to_fp32(tmp_path) -> None:
    """bf16 weights (as on a GPU) with the heads in fp32: within a few % of the reward spread."""
    path = make_seq_cls("llama", tmp_path / "rm", pad_token_id=7)
    groups = groups_of_ids(seed=1)
    fp32 = torch.tensor([r for g in score_groups(load_reward_model(path), groups) for r in g])
    bf16 = score_groups(load_reward_model(path, torch.bfloat16), groups)
    bf16 = torch.tensor([r for g in bf16 for r in g])
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.std(), (bf16, fp32)
    assert not torch.equal(bf16, fp32)  # it did run in bf16
