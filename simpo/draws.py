"""Seeded random draws for sampling: top-p / temperature, one uniform number per row and step.

Every draw is inverse-CDF sampling with a uniform number that is a pure function of
(sample key, step, attempt): a counter-based 32-bit integer hash, no generator state. A
sample's tokens therefore depend only on its key and its own logits: not on the batch it
lands in, the other samples, the number of ranks, or a resumed run. The hash is exact integer
arithmetic (products stay below 2**63), so it gives the same numbers on any device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: (x < 2**32) * _MIX < 2**59, so int64 products never overflow
_GOLDEN = 0x9E3779B9


def hash32(x: Any) -> Any:
    """A 32-bit mixing bijection on ints in [0, 2**32): Python ints or int64 tensors alike."""
    x = ((x >> 16) ^ x) * _MIX & M32
    x = ((x >> 16) ^ x) * _MIX & M32
    return (x >> 16) ^ x


def sample_key(seed: int, prompt: int, k: int) -> int:
    """The key of sample k of prompt number `prompt` under `seed` (32 bits)."""
    return hash32(hash32(hash32((seed + _GOLDEN) & M32) ^ (prompt & M32)) ^ k)


def uniform(keys: Tensor, step: int, attempt: int = 0) -> Tensor:
    """One uniform draw in [0, 1) per row (R,) float64, a pure function of (key, step, attempt)."""
    a = hash32(keys ^ hash32((step * 8 + attempt + _GOLDEN) & M32))  # (R,) 32 random bits
    b = hash32(a ^ 0x5BD1E995)  # 32 more
    return ((a >> 5) * 2**26 + (b >> 6)).double() * 2.0**-53  # 53 bits, as random.random()


def inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """The token (R,) where u (R,) falls in a cumulative distribution cdf (R, V) (unnormalised;
    float64, so that rounding is negligible for any vocabulary)."""
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # first cdf > u * mass
    return tok.squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def nucleus_mask(probs: Tensor, top_p: float) -> Tensor:
    """(R, V) bool: the smallest set of most likely tokens with mass >= top_p, plus the
    tokens tied with its least likely one; equivalently, the tokens whose strictly more likely
    tokens have mass < top_p (what `choose` tests a candidate against)."""
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    before = sorted_p.double().cumsum(-1) - sorted_p.double()  # mass sorted before each
    kept = (before < top_p).sum(-1, keepdim=True)  # (R, 1) >= 1
    return probs >= sorted_p.gather(-1, kept - 1)


NUCLEUS_ATTEMPTS = 4  # draws from the full distribution before sampling the nucleus directly


def choose(logits: Tensor, temperature: float, top_p: float, keys: Tensor, step: int) -> Tensor:
    """Next token (R,) from logits (R, V): greedy when temperature == 0, else a draw from the
    top-p nucleus of softmax(logits / temperature) with each row's own random numbers.

    Top-p without a sort: draw from the whole distribution and keep the draw if it lies in
    the nucleus (strictly more likely tokens have mass < top_p): rejection sampling, so a kept
    draw follows the renormalised nucleus exactly. A row still without a token after
    NUCLEUS_ATTEMPTS draws (probability (1 - top_p)^4 for a flat tail) samples its exact
    nucleus (`nucleus_mask`, one sort) instead.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    cdf = probs.double().cumsum(-1)
    if top_p >= 1.0:
        return inverse_cdf(cdf, uniform(keys, step))
    out = torch.full_like(keys, -1)
    for attempt in range(NUCLEUS_ATTEMPTS):
        cand = inverse_cdf(cdf, uniform(keys, step, attempt))  # (R,)
        p_cand = probs.gather(-1, cand[:, None])  # (R, 1)
        above = torch.where(probs > p_cand, probs, 0.0).sum(-1)  # (R,) mass more likely
        out = torch.where((out < 0) & (above < top_p), cand, out)
        if bool((out >= 0).all()):
            return out
    nucleus = (probs * nucleus_mask(probs, top_p)).double().cumsum(-1)
    direct = inverse_cdf(nucleus, uniform(keys, step, NUCLEUS_ATTEMPTS))
    return torch.where(out < 0, direct, out)
