"""simpo.model against transformers: logits parity per family, config parsing, bf16, score path."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
from hf_tiny import FAMILIES, cached_tiny_hf, load_hf, one_thread  # noqa: F401

import simpo.model
from simpo.demo.tiny import tiny_args, tiny_hf_config
from simpo.hf import hf_config_dict, load_model, read_hf_config
from simpo.logprobs import DEFAULT_CHUNK_BYTES, ScoreIndex, response_logprobs
from simpo.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

T = 24  # longer than the sliding windows (8) of mistral, qwen2 and gemma2


def _inputs(family: str, vocab: int = 256, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2, T) and positions (2, T); long positions for rope scaling (llama3 family)."""
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    offset = 5000 if long or family == "llama3" else 0
    return ids, torch.arange(T).expand(2, T) + offset


def _hf_logits(path, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(path)(ids, position_ids=pos).logits


VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    ("llama", dict(num_key_value_heads=1, vocab_size=300)),  # MQA; rows beyond any tokenizer
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("gemma2", dict(tie_word_embeddings=True, num_hidden_layers=3)),
]


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=str)
def test_logits_match_transformers(family: str, overrides: dict) -> None:
    pytest.importorskip("transformers")
    path = cached_tiny_hf(family, **overrides)
    ids, pos = _inputs(family, overrides.get("vocab_size", 256), "rope_scaling" in overrides)
    ref = _hf_logits(path, ids, pos)
    with torch.no_grad():
        ours = load_model(path)(ids, position_ids=pos)
    diff = (ours - ref).abs().max().item()
    print(f"parity {family} {overrides}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


# Each family's distinguishing option switched off must change the logits: proves it bites.
SWITCHES = [
    ("llama3", dict(rope_scaling=None)),
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(sliding_window=None)),
    ("gemma", dict(norm_plus_one=False)),
    ("gemma", dict(scale_embeddings=False)),
    ("gemma", dict(mlp_act="silu")),
    ("gemma2", dict(sandwich_norm=False)),
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("gemma2", dict(sliding_window=None)),
    ("gemma2", dict(query_pre_attn_scalar=None)),
]


@pytest.mark.parametrize(("family", "change"), SWITCHES, ids=str)
def test_distinguishing_options_matter(family: str, change: dict) -> None:
    path = cached_tiny_hf(family)
    model = load_model(path)
    off = Transformer(dataclasses.replace(model.args, **change))
    off.load_state_dict(model.state_dict(), strict="sandwich_norm" not in change)
    ids, pos = _inputs(family)
    with torch.no_grad():
        assert (model(ids, position_ids=pos) - off(ids, position_ids=pos)).abs().max() > 1e-2


def test_the_model_reads_features_not_family_names() -> None:
    """model_type is metadata for writing config.json: the same features under another family
    name give bit-identical logits."""
    model = load_model(cached_tiny_hf("gemma2"))
    renamed = Transformer(dataclasses.replace(model.args, model_type="llama"))
    renamed.load_state_dict(model.state_dict())
    ids, pos = _inputs("gemma2")
    with torch.no_grad():
        assert torch.equal(model(ids, position_ids=pos), renamed(ids, position_ids=pos))


def _as_v4(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json the way transformers 4.x wrote it."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_both_config_generations_parse_alike(family: str) -> None:
    pytest.importorskip("transformers")
    v5 = json.loads((cached_tiny_hf(family) / "config.json").read_text())
    assert "rope_parameters" in v5
    assert read_hf_config(_as_v4(v5)) == read_hf_config(v5)


def test_config_details() -> None:
    g2 = tiny_args("gemma2", num_hidden_layers=4)
    assert g2.windows == [8, None, 8, None]  # even layers slide
    assert g2.tie_word_embeddings and g2.norm_plus_one and g2.scale_embeddings and g2.sandwich_norm
    assert g2.mlp_act == "gelu_tanh" and tiny_args("gemma").sandwich_norm is False
    qwen = tiny_args("qwen2", num_hidden_layers=3, max_window_layers=2)
    assert qwen.windows == [None, None, 8] and qwen.qkv_bias and not qwen.o_bias
    assert tiny_args("qwen2", use_sliding_window=False).windows == [None, None]
    v5 = tiny_args("llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert v5.rope_theta == 5e5 and v5.rope_scaling is None
    args = tiny_args("llama3", torch_dtype="bfloat16")
    assert args.dtype == "bfloat16" and args.rope_scaling["rope_type"] == "llama3"
    assert read_hf_config(hf_config_dict(args)) == args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_parameters"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ],
    ids=str,
)
def test_bad_config_is_a_clear_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_hf_config(tiny_hf_config("llama", **change))


def test_config_file_error_names_the_file(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(model_type="bert")))
    with pytest.raises(ValueError, match=r"config\.json.*'model_type' is 'bert'"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_close_to_fp32(family: str) -> None:
    """bf16 weights and activations: logits within 0.1 abs (|logits| ~ 3) of fp32."""
    path = cached_tiny_hf(family)
    ids, pos = _inputs(family)
    with torch.no_grad():
        ref = load_model(path)(ids, position_ids=pos)
        low = load_model(path, dtype=torch.bfloat16)(ids, position_ids=pos)
    assert low.dtype == torch.bfloat16
    diff = (low.float() - ref).abs().max().item()
    print(f"bf16 {family}: max |logit diff| = {diff:.3f} (max |logit| {ref.abs().max():.2f})")
    assert diff < 0.1


def test_init_weights_is_deterministic() -> None:
    a, b = Transformer(tiny_args("gemma")), Transformer(tiny_args("gemma"))
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert torch.equal(a.model.norm.weight, torch.zeros(64))  # gemma stores w of (1 + w)
    assert a.lm_head is None and a.head_weight is a.model.embed_tokens.weight
    names = dict(a.named_parameters())
    assert "model.layers.1.self_attn.q_proj.weight" in names and len(a.layers) == 2


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_score_path_equals_logits(family: str) -> None:
    """forward(score=...) gives per-response sums of the log-probs read off the logits."""
    model = Transformer(tiny_args(family))
    model.init_weights(seed=0, std=0.1)
    ids, pos = _inputs(family)
    # response 0: row 0 tokens 5..9 (predicted by hidden 4..8); response 1: row 1 tokens 3..20
    hidden_index = torch.cat([torch.arange(4, 9), T + torch.arange(2, 20)])
    targets = ids.flatten()[hidden_index + 1]
    response_ids = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(18, dtype=torch.long)])
    score = ScoreIndex(hidden_index, targets, response_ids, 2)
    total, count = model(ids, score=score, position_ids=pos)
    lp = torch.log_softmax(model(ids, position_ids=pos).flatten(0, 1).double(), -1)[
        hidden_index, targets
    ]
    want = torch.zeros(2, dtype=torch.float64).index_add_(0, response_ids, lp)
    torch.testing.assert_close(total.double(), want, atol=1e-4, rtol=1e-5)
    assert count.tolist() == [5, 18]
    # the fused head runs inside forward: its backward (tied weight included) equals autograd
    # through the full logits, for every parameter
    params = list(model.parameters())
    got = torch.autograd.grad(total.sum(), params)
    ref = torch.autograd.grad(want.sum(), params)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r.float(), atol=1e-5, rtol=1e-4)
    head = next(g for p, g in zip(params, got, strict=True) if p is model.head_weight)
    assert head.abs().max() > 0.1  # not a vacuous zeros == zeros


def test_logits_chunk_bytes_reaches_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.logits_chunk_bytes` (train.py sets it from model.logits_chunk_mib) is the
    head's chunk budget; the sums do not depend on it."""
    seen: dict[str, Any] = {}

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return response_logprobs(*args, **kwargs)

    monkeypatch.setattr(simpo.model, "response_logprobs", spy)
    model = Transformer(tiny_args("llama"))
    model.init_weights(seed=0, std=0.1)
    ids, pos = _inputs("llama")
    score = ScoreIndex(torch.arange(4, 20), ids.flatten()[5:21], torch.arange(16) // 9, 2)
    default, _ = model(ids, score=score, position_ids=pos)
    assert seen["chunk_bytes"] == DEFAULT_CHUNK_BYTES
    model.logits_chunk_bytes = 1  # one row per chunk
    small, _ = model(ids, score=score, position_ids=pos)
    assert seen["chunk_bytes"] == 1
    torch.testing.assert_close(small, default)
