"""simpo.generate: KV-cache decoding equals transformers' greedy generate and our no-cache path;
the sampler's token frequencies match softmax(logits / T) restricted to the top-p nucleus; K
samples from one prefill equal each sample decoded alone; a sample does not depend on its batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hf_tiny import cached_tiny_hf, load_hf, one_thread  # noqa: F401

from simpo.demo.tiny import tiny_args
from simpo.draws import choose, nucleus_mask, sample_key, uniform
from simpo.generate import generate, length_batches, sample, sample_no_cache
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
    keys = torch.tensor([sample_key(1234, i, 0) for i in range(DRAWS)])  # a sample per row
    tokens = choose(LOGITS.expand(DRAWS, -1), temperature, top_p, keys, step=0)  # (DRAWS,)
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


# ----- the sampler: seeded draws, shared-prompt prefill, batches, stops, compiled step -----


def _nucleus_reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The top-p distribution (V,) in float64, by a plain sort: the smallest set of most likely
    tokens with mass >= top_p, renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    mass, keep = 0.0, torch.zeros_like(p, dtype=torch.bool)
    for i in order.tolist():
        keep[i] = True
        mass += float(p[i])
        if mass >= top_p:
            break
    return torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum()


def test_draws_from_a_small_nucleus_follow_it() -> None:
    """top_p 0.3: a 2-token nucleus of mass 0.45, so most rows reject their first draws and
    many reach the direct nucleus draw after NUCLEUS_ATTEMPTS."""
    temperature, top_p = 1.0, 0.3
    probs = torch.tensor([0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.03, 0.015, 0.005])
    logits = probs.log() * temperature  # softmax(logits / temperature) == probs
    n = 40_000
    keys = torch.tensor([sample_key(7, i, 0) for i in range(n)])
    tokens = choose(logits.expand(n, -1), temperature, top_p, keys, step=3)
    freq = torch.bincount(tokens, minlength=10).double() / n
    want = _nucleus_reference(logits, temperature, top_p)
    assert (freq[want == 0] == 0).all(), freq  # nothing outside the nucleus, ever
    assert (freq - want).abs().max() < 0.012, (freq, want)  # 4.5 sigma at n = 40k


def test_nucleus_mask_equals_the_sorted_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 2
    for top_p in (0.01, 0.5, 0.9, 0.999):
        got = nucleus_mask(torch.softmax(logits, -1), top_p)
        want = torch.stack([_nucleus_reference(row, 1.0, top_p) > 0 for row in logits])
        assert torch.equal(got, want), top_p


def test_uniforms_are_a_pure_function_of_key_step_and_attempt() -> None:
    keys = torch.tensor([sample_key(0, i, k) for i in range(500) for k in range(4)])
    u = uniform(keys, step=5)
    assert torch.equal(u[100:110], uniform(keys[100:110], step=5))  # no state, no batch effect
    assert len(set(u.tolist())) == len(u)  # distinct keys: distinct draws
    assert not torch.equal(u, uniform(keys, step=6))
    assert not torch.equal(u, uniform(keys, step=5, attempt=1))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # uniform: the empirical CDF stays within a Kolmogorov-Smirnov bound (~2.4 sigma)
    grid = torch.sort(u.double()).values
    ks = (grid - torch.arange(1, len(u) + 1, dtype=torch.float64) / len(u)).abs().max()
    assert ks < 1.7 / len(u) ** 0.5, ks


def _keys(seed: int, prompts: list, k: int) -> list[list[int]]:
    return [[sample_key(seed, i, j) for j in range(k)] for i in range(len(prompts))]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_shared_prefill_equals_sampling_each_sequence_without_cache(family: str) -> None:
    """K samples from one prefill == each (prompt, key) decoded alone by recomputing the
    whole sequence every step (left padding, sliding windows and soft-caps included)."""
    model = Transformer(tiny_args(family))
    model.init_weights(seed=1, std=0.1)
    keys = _keys(3, PROMPTS, 3)
    got = sample(model, PROMPTS, NEW, num_samples=3, temperature=1.0, top_p=0.9, keys=keys)
    flat = [p for p in PROMPTS for _ in range(3)]
    ref = sample_no_cache(model, flat, torch.tensor(keys).flatten(), NEW, 1.0, 0.9, stop_ids=())
    assert [c for per in got for c in per] == ref
    texts = [tuple(c.tokens) for per in got for c in per]
    assert len(set(texts)) > len(PROMPTS)  # the samples of a prompt differ


def test_samples_do_not_depend_on_the_batch(model: Transformer) -> None:
    keys = _keys(5, PROMPTS, 4)
    kw = dict(num_samples=4, temperature=0.8, top_p=0.95)
    together = sample(model, PROMPTS, NEW, keys=keys, batch_prompts=3, **kw)
    alone = sample(model, PROMPTS, NEW, keys=keys, batch_prompts=1, **kw)
    reversed_ = sample(model, PROMPTS[::-1], NEW, keys=keys[::-1], batch_prompts=2, **kw)
    assert together == alone == reversed_[::-1]
    assert together != sample(model, PROMPTS, NEW, keys=_keys(6, PROMPTS, 4), **kw)


def test_each_sample_stops_at_its_own_stop_token(model: Transformer) -> None:
    keys = _keys(2, PROMPTS, 2)
    full = sample(model, PROMPTS, NEW, num_samples=2, temperature=1.0, keys=keys)
    stop = full[1][0].tokens[2]
    cut = sample(model, PROMPTS, NEW, num_samples=2, temperature=1.0, keys=keys, stop_ids=[stop])
    for whole, part in zip([c for p in full for c in p], [c for p in cut for c in p], strict=True):
        assert not whole.stopped and len(whole.tokens) == NEW
        if stop in whole.tokens:
            assert part.tokens == whole.tokens[: whole.tokens.index(stop)] and part.stopped
        else:
            assert part.tokens == whole.tokens and not part.stopped
    assert cut[1][0].stopped and len(cut[1][0].tokens) <= 2


def test_compiled_decode_step_traces_whole_and_matches_eager() -> None:
    """The CUDA path's step (static cache length, slot as a tensor, in-place cache writes)
    traced by torch.compile as one graph; the eager backend keeps this test fast on CPU."""
    model = Transformer(tiny_args("gemma2"))  # sliding windows and soft-caps
    model.init_weights(seed=2, std=0.1)
    keys = _keys(1, PROMPTS, 2)
    kw = dict(num_samples=2, temperature=1.0, top_p=0.9, keys=keys, batch_prompts=4)
    eager = sample(model, PROMPTS, NEW, **kw)
    torch._dynamo.reset()
    compiled = {"backend": "aot_eager"}
    assert sample(model, PROMPTS, NEW, compile=compiled, **kw) == eager
    # again on the pooled buffers, now holding the first run's keys: stale slots are masked
    one = sample(model, PROMPTS[1:2], NEW, compile=compiled, **kw | {"keys": keys[1:2]})
    assert one == eager[1:2]


def test_vocab_size_limits_the_sampled_ids(model: Transformer) -> None:
    out = sample(model, PROMPTS, NEW, num_samples=3, temperature=2.0, vocab_size=40)
    assert all(t < 40 for per in out for c in per for t in c.tokens)
    with pytest.raises(ValueError, match="expected 3 keys"):
        sample(model, PROMPTS, NEW, num_samples=3, keys=_keys(0, PROMPTS, 2))


def test_length_batches_go_longest_first_within_the_limits() -> None:
    lengths = [5, 50, 7, 30, 30, 2, 9]

    def capacity(longest: int) -> int:  # 2 copies x (longest + 10 new) slots, 200 in all
        return min(3, 200 // (2 * (longest + 10)))

    batches = length_batches(lengths, capacity)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)
    assert batches[0] == [1]  # 50 + 10 tokens x 2 copies: only one fits in 200 slots
    for b in batches:
        assert 1 <= len(b) <= max(1, capacity(lengths[b[0]]))
    assert [len(b) for b in batches] == [1, 2, 3, 1]


def test_compiled_step_is_compiled_once_for_every_batch_of_a_length_bucket(model) -> None:
    """Static shapes: batches padded to the same rows and cache length, on pooled buffers,
    reuse one graph (a CUDA graph recorded once is replayed for all of them)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    prompts = [[5, 6, 7, 8], [3, 4], [9, 9, 9], [1, 2, 3, 4, 5], [7, 7]]
    keys = _keys(4, prompts, 2)
    kw = dict(num_samples=2, temperature=1.0, batch_prompts=2)
    eager = sample(model, prompts, 6, keys=keys, **kw)
    kw["compile"] = {"backend": counting_backend}
    assert sample(model, prompts, 6, keys=keys, **kw) == eager  # 3 batches
    assert sample(model, prompts[::-1], 6, keys=keys[::-1], **kw) == eager[::-1]  # 3 more
    assert len(graphs) == 1


def test_prefill_in_chunks_of_prompts_equals_one_prefill(model, monkeypatch) -> None:
    import simpo.generate

    keys = _keys(8, PROMPTS, 3)
    kw = dict(num_samples=3, temperature=1.0, keys=keys, batch_prompts=3)
    whole = sample(model, PROMPTS, NEW, **kw)
    monkeypatch.setattr(simpo.generate, "PREFILL_TOKENS", 12)  # width 11: a prompt per chunk
    assert sample(model, PROMPTS, NEW, **kw) == whole
