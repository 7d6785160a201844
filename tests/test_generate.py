"""simpo.generate: KV-cache decoding equals transformers' greedy generate and our no-cache path."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import cached_tiny_hf, load_hf, one_thread  # noqa: F401

from simpo.demo.tiny import tiny_args
from simpo.generate import generate
from simpo.hf import load_model
from simpo.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

# Different lengths (left padding); prompt + 10 new tokens > the sliding window (8).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
NEW = 10


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_greedy_equals_transformers_and_no_cache(family: str) -> None:
    pytest.importorskip("transformers")
    path = cached_tiny_hf(family)
    ours = load_model(path)
    cached = generate(ours, PROMPTS, NEW)
    assert cached == generate(ours, PROMPTS, NEW, use_cache=False)
    ref = load_hf(path)
    for prompt, got in zip(PROMPTS, cached, strict=True):
        ids = torch.tensor([prompt])
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        assert out[0, len(prompt) :].tolist() == got


@pytest.fixture(scope="module")
def model() -> Transformer:
    model = Transformer(tiny_args("gemma2"))
    model.init_weights(seed=0, std=0.1)
    return model


def test_stop_tokens_end_a_sequence_and_are_excluded(model: Transformer) -> None:
    full = generate(model, PROMPTS, NEW)
    stop = full[0][3]
    out = generate(model, PROMPTS, NEW, stop_ids=[stop])
    for seq, cut in zip(full, out, strict=True):
        want = seq[: seq.index(stop)] if stop in seq else seq
        assert cut == want
    assert len(out[0]) <= 3


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(model: Transformer) -> None:
    a = generate(model, PROMPTS, NEW, temperature=1.0, seed=1)
    assert a == generate(model, PROMPTS, NEW, temperature=1.0, seed=1)
    assert a == generate(model, PROMPTS, NEW, temperature=1.0, seed=1, use_cache=False)
    assert a != generate(model, PROMPTS, NEW, temperature=1.0, seed=2)
    greedy = generate(model, PROMPTS, NEW)
    assert generate(model, PROMPTS, NEW, temperature=0.7, top_p=1e-6, seed=3) == greedy
    assert all(len(x) == NEW for x in a)


def test_batched_equals_one_at_a_time(model: Transformer) -> None:
    batched = generate(model, PROMPTS, NEW)
    assert batched == [generate(model, [p], NEW)[0] for p in PROMPTS]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], NEW)
