"""The static KV cache of `simpo.generate` and its one-token decode step (compiled on CUDA).

`KVBuffers` holds the keys/values of every layer for R rows and S slots, allocated once per
batch. A prefill writes B prompts' keys into B x K rows (each prompt's K samples share one
prefill); each decode step writes one token per row into slot `slot`. The attention layers see
a `KVCache`, one forward's view of the buffers, whose masks follow `simpo.attention.allowed`.

Compiled (CUDA): `decode_step` under torch.compile mode "reduce-overhead" (CUDA graphs, as
gpt-fast does). Its shapes are static: attention runs over all S slots (unfilled ones masked),
the buffers are marked static addresses and the slot is a tensor, so one graph is replayed for
every step of every batch of the same shape. Eager (CPU): attention runs over the slots filled
so far only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simpo.attention import allowed


@dataclass
class KVBuffers:
    """Preallocated keys/values of every layer for R rows and S slots, and per slot its
    position and whether it holds a real token."""

    k: Tensor  # (layers, R, Hkv, S, D)
    v: Tensor  # (layers, R, Hkv, S, D)
    pos: Tensor  # (R, S) int64
    valid: Tensor  # (R, S) bool

    @classmethod
    def allocate(cls, model: nn.Module, rows: int, slots: int, static: bool = False) -> KVBuffers:
        """Zeroed buffers; `static`: views of one pooled allocation per tensor, so that every
        batch's buffers sit at the same addresses and a recorded CUDA graph replays on them
        (a larger request grows the pool once). Stale contents are harmless: a batch writes
        its prompts' slots first and masks every slot after the current one."""
        a, w = model.args, model.head_weight
        shape = (a.n_layers, rows, a.n_kv_heads, slots, a.head_dim)
        specs = ((shape, w.dtype), (shape, w.dtype), ((rows, slots), torch.long),
                 ((rows, slots), torch.bool))  # fmt: skip
        if not static:
            return cls(*(torch.zeros(s, dtype=d, device=w.device) for s, d in specs))
        views = []
        for name, (s, d) in zip(("k", "v", "pos", "valid"), specs, strict=True):
            numel, key = math.prod(s), (name, d, w.device)
            if key not in _POOL or _POOL[key].numel() < numel:
                _POOL.pop(key, None)  # free the smaller one first
                _POOL[key] = torch.zeros(numel, dtype=d, device=w.device)
            views.append(_POOL[key][:numel].view(s))
            torch._dynamo.mark_static_address(views[-1])  # cudagraphs: no copy of this input
        return cls(*views)


_POOL: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}  # static buffers' storage


def release_pool() -> None:
    """Free the pooled static KV buffers (after a generation job)."""
    _POOL.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class KVCache:
    """One forward's view of `KVBuffers`: each attention layer calls `update` (store this
    forward's keys/values, get the ones to attend to) and `mask` (what the queries see).

    Prefill (`slot` None): B prompts' keys go into their B * copies rows, starting at row
    `row0` (a batch is prefilled in chunks of prompts); attention runs on the prompts' own
    keys. Decode: one token per row goes into slot `slot` (a (1,) tensor); attention runs
    over slots [0, end), or over all S slots when `end` is None (static shapes).
    """

    def __init__(
        self, buf: KVBuffers, masks: dict[int | None, Tensor], copies: int = 1, row0: int = 0,
        slot: Tensor | None = None, end: int | None = None,
    ) -> None:  # fmt: skip
        self.buf, self.masks, self.copies, self.row0 = buf, masks, copies, row0
        self.slot, self.end = slot, end

    @classmethod
    def prefill(
        cls, buf: KVBuffers, windows: set[int | None], pos: Tensor, valid: Tensor, copies: int,
        row0: int = 0,
    ) -> KVCache:  # fmt: skip
        """Positions and real-token mask (B, T) of B left-padded prompts (rows from row0)."""
        T, rows = pos.shape[1], slice(row0, row0 + len(pos) * copies)
        buf.pos[rows, :T] = pos.repeat_interleave(copies, 0)
        buf.valid[rows, :T] = valid.repeat_interleave(copies, 0)
        doc = torch.where(valid, 0, -1)
        idx = torch.arange(T, device=pos.device)
        zero = torch.zeros((), dtype=torch.long, device=pos.device)
        masks = {
            w: allowed(
                doc[:, :, None], doc[:, None, :], zero, zero, pos[:, :, None], pos[:, None, :],
                idx[:, None], idx[None, :], w,
            )[:, None]  # (B, 1, T, T)
            for w in windows
        }  # fmt: skip
        return cls(buf, masks, copies=copies, row0=row0)

    @classmethod
    def decode(
        cls, buf: KVBuffers, windows: set[int | None], pos: Tensor, slot: Tensor, end: int | None
    ) -> KVCache:
        """Positions (R, 1) of the rows' new tokens, which go into slot `slot` (1,)."""
        buf.pos.index_copy_(1, slot, pos)
        buf.valid.index_fill_(1, slot, True)
        S = buf.pos.shape[1] if end is None else end
        doc_k = torch.where(buf.valid[:, :S], 0, -1)  # (R, S)
        zero = torch.zeros((), dtype=torch.long, device=pos.device)
        idx = torch.arange(S, device=pos.device)
        masks = {
            w: allowed(zero, doc_k, zero, zero, pos, buf.pos[:, :S], slot, idx, w)[:, None, None]
            for w in windows
        }  # (R, 1, 1, S): filled slots up to this one, within the window
        return cls(buf, masks, slot=slot, end=end)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (rows, Hkv, T, D); return the keys/values to attend to."""
        if self.slot is None:
            B, H, T, D = k.shape
            S, rows = self.buf.k.shape[3], slice(self.row0, self.row0 + B * self.copies)
            self.buf.k[layer, rows].view(B, self.copies, H, S, D)[:, :, :, :T] = k[:, None]
            self.buf.v[layer, rows].view(B, self.copies, H, S, D)[:, :, :, :T] = v[:, None]
            return k, v
        self.buf.k[layer].index_copy_(2, self.slot, k)
        self.buf.v[layer].index_copy_(2, self.slot, v)
        return self.buf.k[layer, :, :, : self.end], self.buf.v[layer, :, :, : self.end]

    def mask(self, window: int | None) -> Tensor:
        return self.masks[window]


def head(model: nn.Module, hidden: Tensor) -> Tensor:
    """Logits (..., V) of final hidden states (..., dim), with the final soft-cap (Gemma-2)."""
    logits = F.linear(hidden, model.head_weight)
    cap = model.args.final_softcap
    return logits if cap is None else torch.tanh(logits / cap) * cap


def decode_step(model: nn.Module, buf: KVBuffers, ids: Tensor, pos: Tensor, slot: Tensor,
                end: int | None) -> Tensor:  # fmt: skip
    """Logits (R, V) of one new token per row: ids, pos (R, 1) going into slot (1,)."""
    cache = KVCache.decode(buf, set(model.args.windows), pos, slot, end)
    return head(model, model.hidden_states(ids, cache=cache, position_ids=pos)[:, -1])


_COMPILED: dict[str, Callable[..., Tensor]] = {}
_FAILED = False  # compiled decoding failed once: eager from then on


def step_function(compile: bool | dict[str, Any]) -> Callable[..., Tensor]:
    """`decode_step`, eager (False), compiled for CUDA graphs (True), or with the given
    torch.compile options (tests use {"backend": "eager"} to check it traces on CPU)."""
    if compile is False or _FAILED:
        return decode_step
    options = {"mode": "reduce-overhead"} if compile is True else dict(compile)
    key = repr(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, **options)
    return _COMPILED[key]


def compile_failed(error: Exception) -> Callable[..., Tensor]:
    """Say that compiled decoding failed and return the eager step, used from then on."""
    global _FAILED
    _FAILED = True
    _COMPILED.clear()
    print(f"sample: compiled decoding failed ({type(error).__name__}: {error}); decoding "
          "eagerly instead", file=sys.stderr, flush=True)  # fmt: skip
    return decode_step
