"""Attention over packed rows: the mask rule, one Layout per batch, SDPA (CPU) and flex (CUDA).

A row of a packed batch holds several documents (preference pairs). Inside a pair the prompt is
a shared prefix (branch 0) followed by the chosen (branch 1) and rejected (branch 2) responses.
Query q may attend key k of the same row iff

    doc[q] == doc[k] != -1  and  k <= q (row order)
    and (branch[k] == 0 or branch[k] == branch[q])
    and (window is None or pos[q] - pos[k] < window)      # sliding window in POSITIONS

and every token attends to itself, so padding queries (doc == -1) get a defined output. The
rule is written once (`allowed`) and used by the dense SDPA mask, the flex `mask_mod` and the
KV-cache mask of `simpo.generate`. The "sdpa" backend runs packed rows document by document
(`simpo.attention_varlen`: exact, and it skips the blocks between documents that a dense (T, T)
mask pays for); a packed layout of another shape is a LayoutError, never a silent dense
fallback. "dense" is the explicit (T, T)-mask reference path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simpo.attention_varlen import DocMasks, LayoutError, band_mask, build_doc_plan

BACKENDS = ("auto", "sdpa", "flex", "dense")  # auto: flex on CUDA, sdpa elsewhere


def allowed(
    doc_q: Tensor,
    doc_k: Tensor,
    branch_q: Tensor,
    branch_k: Tensor,
    pos_q: Tensor,
    pos_k: Tensor,
    idx_q: Tensor,
    idx_k: Tensor,
    window: int | None,
) -> Tensor:
    """The attention rule on broadcastable index tensors; True where q may attend k."""
    ok = (doc_q == doc_k) & (doc_k != -1) & (idx_k <= idx_q)
    ok = ok & ((branch_k == 0) | (branch_k == branch_q))
    if window is not None:
        ok = ok & (pos_q - pos_k < window)
    return ok | (idx_q == idx_k)


@dataclass
class Layout:
    """The attention layout of a packed or padded batch; all arrays (B, T) int64.

    doc_ids: document (pair) id per token, unique within a row; -1 = padding.
    branch_ids: 0 = shared prefix (prompt), 1 = chosen, 2 = rejected.
    position_ids: RoPE positions (a rejected response restarts at len(prompt)).
    plain: one document of branch 0 per row with no padding, i.e. the plain causal mask; lets
        `attend` use SDPA's `is_causal` kernels when no window or soft-cap is involved.
    Masks are built on first use and cached on the object, so all layers of one forward (and
    the activation-checkpointing recompute) share them.
    """

    doc_ids: Tensor
    branch_ids: Tensor
    position_ids: Tensor
    plain: bool = False
    _masks: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def causal(cls, position_ids: Tensor) -> Layout:
        """Plain causal rows with the given positions (B, T)."""
        zeros = torch.zeros_like(position_ids)
        return cls(zeros, zeros, position_ids, plain=True)

    def to(self, device: torch.device | str) -> Layout:
        return Layout(
            self.doc_ids.to(device),
            self.branch_ids.to(device),
            self.position_ids.to(device),
            plain=self.plain,
        )

    def mask(self, window: int | None, softcap: float | None, backend: str) -> Any:
        """The mask `attend` uses: None for plain causal rows without window or soft-cap (SDPA's
        is_causal kernels); for backend "sdpa" the per-document plan (`DocMasks`), or the dense
        bool mask when every row is one sequence; for "dense" always the dense mask; for "flex"
        a BlockMask."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if self.plain and window is None and softcap is None:
            return None
        if backend == "auto":
            backend = "flex" if self.doc_ids.is_cuda else "sdpa"
        if backend == "flex":
            return self.block_mask(window)
        docs = None if backend == "dense" else self.doc_masks(window, softcap)
        return self.dense_mask(window) if docs is None else docs

    def doc_masks(self, window: int | None, softcap: float | None) -> DocMasks | None:
        """The per-document path's plan and per-length band masks; None if every row is one
        causal sequence (padded rows: the dense mask is the baseline there). A packed layout
        it cannot plan raises LayoutError rather than silently going dense."""
        key = ("docs", window, softcap is not None)
        if key not in self._masks:
            if ("plan",) not in self._masks:
                self._masks[("plan",)] = build_doc_plan(
                    self.doc_ids, self.branch_ids, self.position_ids
                )
            plan, docs = self._masks[("plan",)], None
            if plan is not None and plan.packed:
                if window is not None and not plan.consecutive:
                    raise LayoutError(
                        "a sliding window needs positions that run on by one inside each "
                        "packed sequence; use model.attention='dense' for other layouts"
                    )
                # the math path (soft-cap) always needs a mask; SDPA only for a window < L
                masks = tuple(
                    band_mask(length, window, self.doc_ids.device)
                    if softcap is not None or (window is not None and window < length)
                    else None
                    for length, _ in plan.groups
                )
                docs = DocMasks(plan, masks)
            self._masks[key] = docs
        return self._masks[key]

    def dense_mask(self, window: int | None) -> Tensor:
        """Boolean mask (B, 1, T, T) for SDPA; True = attend."""
        key = ("dense", window)
        if key not in self._masks:
            doc, branch, pos = self.doc_ids, self.branch_ids, self.position_ids
            idx = torch.arange(doc.shape[1], device=doc.device)
            ok = allowed(
                doc[:, :, None], doc[:, None, :],
                branch[:, :, None], branch[:, None, :],
                pos[:, :, None], pos[:, None, :],
                idx[:, None], idx[None, :],
                window,
            )  # fmt: skip
            self._masks[key] = ok[:, None]  # (B, 1, T, T)
        return self._masks[key]

    def block_mask(self, window: int | None) -> Any:
        """FlexAttention BlockMask built from the same arrays and rule."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = ("flex", window)
        if key not in self._masks:
            doc, branch, pos = self.doc_ids, self.branch_ids, self.position_ids

            def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return allowed(
                    doc[b, q], doc[b, k], branch[b, q], branch[b, k], pos[b, q], pos[b, k],
                    q, k, window,
                )  # fmt: skip

            B, T = doc.shape
            self._masks[key] = create_block_mask(mask_mod, B, None, T, T, device=doc.device)
        return self._masks[key]


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float | None
) -> Tensor:
    """Attention with an explicit bool mask (B, 1, Tq, Tk); q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D).

    Without a soft-cap this is SDPA; with one, the scores are formed explicitly (SDPA cannot
    cap them): scale, tanh cap, mask, softmax in fp32, as in the reference implementations.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v  # (B, Hq, Tq, D)


def doc_attention(
    q: Tensor, k: Tensor, v: Tensor, docs: DocMasks, scale: float, softcap: float | None
) -> Tensor:
    """Attention document by document (see `simpo.attention_varlen`); shapes as in `attend`."""
    B, Hq, T, _ = q.shape
    plan = docs.plan
    sizes = [length * n for length, n in plan.groups]
    gathered = (  # all sequences one after the other, (N, H, D), split by group
        x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3])[plan.index].split(sizes)
        for x in (q, k, v)
    )
    outs = []  # (n * L, Hq, D) per group
    for (L, n), mask, xs in zip(plan.groups, docs.masks, zip(*gathered), strict=True):
        qg, kg, vg = (x.view(n, L, *x.shape[1:]).transpose(1, 2) for x in xs)  # (n, H, L, D)
        if mask is None:
            out = F.scaled_dot_product_attention(
                qg, kg, vg, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            out = masked_attention(qg, kg, vg, mask, scale, softcap)
        outs.append(out.transpose(1, 2).reshape(n * L, Hq, -1))
    out = torch.cat(outs)[plan.inverse]  # (B*T, Hq, D): each token's used output, row order
    return out.view(B, T, Hq, -1).transpose(1, 2)


_compiled_flex: Callable[..., Tensor] | None = None


@functools.cache
def _softcap_mod(softcap: float) -> Callable[..., Tensor]:
    """Flex score_mod for tanh soft-capping; one function object per value (no recompiles)."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _flex_fn(device: torch.device) -> Callable[..., Tensor]:
    """Compiled flex_attention on CUDA; eager elsewhere (CPU: forward only, used in tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout | None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Masked attention; q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D).

    layout None means plain causal rows with positions 0..T-1. backend: "sdpa" (any device,
    supports backward), "flex" (FlexAttention; compiled on CUDA), "auto" = flex on CUDA else sdpa.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout is None:
        layout = Layout.causal(torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1))
    mask = layout.mask(window, softcap, backend)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if isinstance(mask, DocMasks):
        return doc_attention(q, k, v, mask, scale, softcap)
    if isinstance(mask, Tensor):
        return masked_attention(q, k, v, mask, scale, softcap)
    flex = _flex_fn(q.device)
    return flex(
        q, k, v,
        score_mod=None if softcap is None else _softcap_mod(softcap),
        block_mask=mask,
        scale=scale,
        enable_gqa=True,
    )  # fmt: skip
