"""KV-cache sampling for evaluation and the demo: greedy, temperature, top-p, stop tokens.

Prompts of different lengths are left-padded into one batch; each sequence keeps its own
positions (0 at its first real token), and padded slots are masked out of attention, so a
batched prompt decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from simpo.attention import Layout, allowed


class KVCache:
    """Keys/values of every layer for a batch, preallocated to `max_len` slots.

    Call `step(position_ids, valid)` before each forward; each attention layer then calls
    `update` (store its new keys/values, get all so far) and `mask` (what the new queries see).
    """

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, S)
        self.doc = torch.full((batch, max_len), -1, dtype=torch.long, device=device)  # -1 = pad
        self.start = self.end = 0  # slots [start, end) hold the current step's tokens
        self._masks: dict[int | None, Tensor] = {}

    def step(self, position_ids: Tensor, valid: Tensor) -> None:
        """Register the next tokens: positions (B, T) and a real-token mask (B, T)."""
        self.start, self.end = self.end, self.end + position_ids.shape[1]
        self.pos[:, self.start : self.end] = position_ids
        self.doc[:, self.start : self.end] = torch.where(valid, 0, -1)
        self._masks.clear()

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) of this step; return all keys/values (B, Hkv, end, D)."""
        self.k[layer, :, :, self.start : self.end] = k
        self.v[layer, :, :, self.start : self.end] = v
        return self.k[layer, :, :, : self.end], self.v[layer, :, :, : self.end]

    def mask(self, window: int | None) -> Tensor:
        """Bool mask (B, 1, T, end) of the current queries over all cached keys."""
        if window not in self._masks:
            s, e = self.start, self.end
            idx = torch.arange(e, device=self.pos.device)
            zero = torch.zeros((), dtype=torch.long, device=self.pos.device)
            ok = allowed(
                self.doc[:, s:e, None], self.doc[:, None, :e], zero, zero,
                self.pos[:, s:e, None], self.pos[:, None, :e], idx[s:e, None], idx[None, :e],
                window,
            )  # fmt: skip
            self._masks[window] = ok[:, None]
        return self._masks[window]


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ids (B, P) and real-token mask (B, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p) > 0:
            ids[i, width - len(p) :] = torch.tensor(p)
            valid[i, width - len(p) :] = True
    return ids.to(device), valid.to(device)


def _sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator) -> Tensor:
    """Next token (B,) from logits (B, V): greedy when temperature == 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set with mass >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=gen)  # (B, 1), renormalised internally
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; return the new token ids per prompt (prompt not included).

    A sequence ends after `max_new_tokens` or at its first stop token, which is NOT included in
    the output. temperature 0 is greedy; otherwise sampling from the top-p nucleus with a
    `torch.Generator` seeded by `seed`. use_cache=False recomputes the whole sequence at each
    step (the reference the cache is tested against).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    args = model.args
    device = model.head_weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids, valid = _left_pad(prompts, device)  # (B, P)
    B, P = ids.shape
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, P): 0 at each first real token
    cache = None
    if use_cache:
        dtype = model.head_weight.dtype
        cache = KVCache(
            args.n_layers, B, args.n_kv_heads, args.head_dim, P + max_new_tokens, dtype, device
        )
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    step_ids, step_pos, step_valid = ids, pos, valid
    for _ in range(max_new_tokens):
        if cache is not None:
            cache.step(step_pos, step_valid)
            logits = model(step_ids, cache=cache, position_ids=step_pos)[:, -1]  # (B, V)
        else:
            layout = Layout(torch.where(valid, 0, -1), torch.zeros_like(ids), pos)
            logits = model(ids, layout)[:, -1]
        nxt = _sample(logits, temperature, top_p, gen)  # (B,)
        done |= torch.isin(nxt, stop)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        step_ids, step_pos = nxt[:, None], pos[:, -1:] + 1  # (B, 1)
        step_valid = torch.ones_like(step_ids, dtype=torch.bool)
        ids, pos = torch.cat([ids, step_ids], 1), torch.cat([pos, step_pos], 1)
        valid = torch.cat([valid, step_valid], 1)
    return out
