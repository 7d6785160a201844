"""simpo.generate: KV-cache decoding equals transformers' greedy generate and our no-cache path;
the sampler's token frequencies match softmax(logits / T) restricted to the top-p nucleus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hf_tiny import cached_tiny_hf, load_hf, one_thread  # noqa: F401

from simpo.demo.tiny import tiny_args
from simpo.generate import _sample, generate
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


# Unsorted on purpose: the nucleus is built in sorted order and must map back to vocab ids.
LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.0, 1.6, -2.5, 0.8])  # (V,)
DRAWS = 200_000
# Per-token bound in binomial standard deviations. Two-sided P(|Z| > 6) ~ 2e-9, so the 72
# token checks below flake with probability ~1e-7 for ANY seed (the seed is fixed anyway);
# `logits * T` or a nucleus that is off by one token moves some frequency by > 30 sigma.
SIGMAS = 6.0


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """Independent float64 reference (V,): softmax(logits / T), then the smallest set of the
    most likely tokens whose mass reaches top_p, renormalised; 0 outside the set."""
    z = logits.double().numpy() / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]  # mass of the strictly more likely tokens
    # the comparison below must not sit on a float32 rounding edge of the code under test
    assert np.abs(before - top_p).min() > 1e-5, "pick logits away from the top_p boundary"
    keep = order[before < top_p]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.6])
@pytest.mark.parametrize("temperature", [0.5, 0.8, 1.7])
def test_sampler_frequencies_match_tempered_top_p_softmax(temperature: float, top_p: float):
    """Empirical frequencies of DRAWS seeded draws (one batch row per draw) agree with the
    reference within SIGMAS binomial standard deviations per token; tokens outside the nucleus
    never appear. Catches `logits * T` (at T != 1) and a nucleus one token too big or small."""
    want = nucleus_probs(LOGITS, temperature, top_p)
    gen = torch.Generator().manual_seed(1234)
    tokens = _sample(LOGITS.expand(DRAWS, -1), temperature, top_p, gen)  # (DRAWS,)
    counts = np.bincount(tokens.numpy(), minlength=len(LOGITS))
    for tok, (n, q) in enumerate(zip(counts, want, strict=True)):
        if q == 0:
            assert n == 0, f"token {tok} outside the top-{top_p} nucleus drawn {n} times"
            continue
        sd = math.sqrt(DRAWS * q * (1 - q))
        assert abs(n - DRAWS * q) <= SIGMAS * sd, (
            f"T={temperature} top_p={top_p} token {tok}: {n} draws, expected {DRAWS * q:.0f} "
            f"+- {SIGMAS * sd:.0f}; all counts {counts.tolist()}, want {np.round(want, 4)}"
        )
    assert (want > 0).sum() >= (2 if top_p < 1 else len(LOGITS))  # the nucleus is not greedy


def test_sampler_nucleus_sizes_differ_across_the_grid():
    """The grid above is not degenerate: top_p < 1 truncates, and T changes what survives."""
    sizes = {(t, p): int((nucleus_probs(LOGITS, t, p) > 0).sum())
             for t in (0.5, 0.8, 1.7) for p in (1.0, 0.9, 0.6)}  # fmt: skip
    assert all(sizes[t, 1.0] == len(LOGITS) for t in (0.5, 0.8, 1.7))
    assert sizes[0.5, 0.6] < sizes[1.7, 0.6] < len(LOGITS)
    assert sizes[0.5, 0.9] < sizes[1.7, 0.9] < len(LOGITS)
