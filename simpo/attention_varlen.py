"""Per-document ("varlen") attention for packed rows: the plan behind `attend`'s SDPA path.

Each document of a packed row is one contiguous span. A shared-prompt pair
`[prompt | chosen | rejected]` is attended as two causal sequences, `[prompt | chosen]` and
`[prompt | rejected]` (the rejected sequence's keys are gathered: prompt keys + rejected keys);
the prompt queries' outputs are taken from the first one only. That is exactly the tree rule
of `simpo.attention.allowed`, and a plain document (branch 0 only) is one causal sequence.
Positions run on consecutively inside each sequence, so a sliding window (in POSITIONS) is a
band of that sequence's causal mask. Sequences of equal length share one batched SDPA call.

The plan is pure index bookkeeping, built once per Layout (cached there, like the masks).
Gathers use advanced indexing: its backward (index_put with accumulate) is several times
faster on CPU than index_select's (index_add).
A packed layout of any other shape is an error (`LayoutError`, naming the row and the reason),
never a silent switch to a dense (T, T) mask: the packer only makes plannable rows, so an
unplannable one is a bug to see. `attention = "dense"` asks for the dense mask explicitly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor


class LayoutError(ValueError):
    """A packed layout the per-document path cannot plan; the message names the row."""


@dataclass(frozen=True)
class DocPlan:
    """Every sequence of a layout; padding tokens are sequences of one token (they attend only
    to themselves). Sequences are sorted by length; equal lengths form one group."""

    index: Tensor  # (N,) flat (B*T) token indices of all sequences, one after the other
    groups: tuple[tuple[int, int], ...]  # (length L, count n) per group, in `index` order
    inverse: Tensor  # (B*T,) where in the N outputs token t's (single) used output is
    consecutive: bool  # positions run on by one inside every sequence (windows are bands)
    packed: bool  # some row holds more than one sequence (else the dense mask is as good)


@dataclass(frozen=True)
class DocMasks:
    """What `Layout.mask` returns for the per-document path: the plan, and per group the
    (L, L) bool mask to use (None: SDPA's `is_causal`)."""

    plan: DocPlan
    masks: tuple[Tensor | None, ...]


def band_mask(length: int, window: int | None, device: torch.device) -> Tensor:
    """(L, L) causal mask, limited to `pos[q] - pos[k] < window` for consecutive positions."""
    i = torch.arange(length, device=device)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok = ok & (i[:, None] - i[None, :] < window)
    return ok


def _doc_sequences(runs: list[tuple[int, int, int]]) -> list[tuple[list[range], int]] | None:
    """One document's runs (start, end, branch) -> its sequences (spans, outputs to skip).

    A document is an optional branch-0 prefix followed by runs of distinct nonzero branches;
    anything else is None."""
    prefix = [range(runs[0][0], runs[0][1])] if runs[0][2] == 0 else []
    rest = runs[len(prefix) :]
    branches = [b for _, _, b in rest]
    if 0 in branches or len(set(branches)) != len(branches):
        return None
    if not rest:
        return [(prefix, 0)]
    skip = [0] + [len(prefix[0]) if prefix else 0] * (len(rest) - 1)
    return [([*prefix, range(s, e)], n) for (s, e, _), n in zip(rest, skip, strict=True)]


def build_doc_plan(doc_ids: Tensor, branch_ids: Tensor, position_ids: Tensor) -> DocPlan | None:
    """The per-document plan of a layout (arrays (B, T)); None for an empty one (T = 0).

    Raises LayoutError if a row has another shape: a document split over several spans, a
    prefix after a response, a repeated branch."""
    device = doc_ids.device
    doc, branch, pos = (x.cpu() for x in (doc_ids, branch_ids, position_ids))
    B, T = doc.shape
    if T == 0:
        return None
    change = (doc[:, 1:] != doc[:, :-1]) | (branch[:, 1:] != branch[:, :-1])  # (B, T-1)
    # length L -> [(flat indices of k sequences (k * L,), outputs to skip in each)]
    by_length: dict[int, list[tuple[Tensor, int]]] = defaultdict(list)
    consecutive, packed = True, False
    for b in range(B):
        starts = [0, *(change[b].nonzero().flatten() + 1).tolist()]
        ends = [*starts[1:], T]
        run_docs, run_branches = doc[b, starts].tolist(), branch[b, starts].tolist()
        docs: dict[int, list[tuple[int, int, int]]] = {}
        last = None
        for s, e, d, br in zip(starts, ends, run_docs, run_branches, strict=True):
            if d == -1:
                continue
            if d in docs and d != last:
                raise LayoutError(f"row {b}: document {d} is split over two spans")
            docs.setdefault(d, []).append((s, e, br))
            last = d
        for d, runs in docs.items():
            seqs = _doc_sequences(runs)
            if seqs is None:
                raise LayoutError(
                    f"row {b}: document {d} is not [prefix | branch 1 | branch 2 ...] "
                    f"(branches in order: {[br for _, _, br in runs]})"
                )
            packed |= len(docs) > 1 or len(seqs) > 1
            for spans, skip in seqs:
                idx = torch.cat([torch.arange(r.start, r.stop) for r in spans])  # (L,)
                p = pos[b, idx]
                consecutive &= bool((p - p[0] == torch.arange(len(idx))).all())
                by_length[len(idx)].append((b * T + idx, skip))
    by_length[1].append(((doc.flatten() == -1).nonzero().flatten(), 0))  # padding: (P,) 1-token
    index, groups, kept = [], [], []
    offset = 0
    for length, seqs in sorted(by_length.items()):
        groups.append((length, sum(len(idx) // length for idx, _ in seqs)))
        for idx, skip in seqs:
            k = len(idx) // length
            used = torch.arange(k)[:, None] * length + torch.arange(skip, length)  # (k, L-skip)
            index.append(idx)
            kept.append(offset + used.flatten())
            offset += len(idx)
    if groups[0] == (1, 0):  # no padding and no 1-token sequence
        groups.pop(0)
    index_t, kept_t = torch.cat(index), torch.cat(kept)  # (N,), (B*T,)
    tokens = index_t[kept_t]  # the token of each used output
    if not torch.equal(tokens.sort().values, torch.arange(B * T)):
        raise LayoutError("some token would not be computed exactly once")
    inverse = torch.empty_like(kept_t)
    inverse[tokens] = kept_t
    return DocPlan(index_t.to(device), tuple(groups), inverse.to(device), consecutive, packed)
