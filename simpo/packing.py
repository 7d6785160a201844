"""Pack tokenised preference pairs into batches for one forward pass each.

Layouts (docs/design.md §5); `T` is the row length, `j` the pair's number in its batch:
- `shared_prompt` (default): `[prompt | chosen | rejected]` per pair, many pairs per row. The
  prompt is stored once: branch 0/1/2, chosen positions continue from the prompt and rejected
  positions restart at len(prompt), so attention (a small tree per pair, see `Layout`) sees
  exactly what two separate sequences would see.
- `plain`: `[prompt | chosen]` and `[prompt | rejected]` as two documents, many pairs per row.
- `padded`: the classic unpacked batch, rows 2j = prompt+chosen and 2j+1 = prompt+rejected,
  right-padded; the baseline that tests and benchmarks compare against.

Every batch carries, per token, an input id and its Layout (doc, branch, position; each
document is one contiguous span of its row, padding only at the row's end) and, per scored
token, a (hidden index into the flattened (B*T) hidden states, target id, response id) triple.
Response 2j is pair j's chosen answer, 2j+1 its rejected one. A response's first token
is predicted by the prompt's last hidden state, later tokens by their predecessor in the row;
for the rejected answer of `shared_prompt` that first hidden index is not "the previous column".
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from simpo.attention import Layout
from simpo.logprobs import ScoreIndex
from simpo.metrics import attention_context
from simpo.world import to_device

if TYPE_CHECKING:
    from simpo.data import TokenizedPair

Packing = Literal["shared_prompt", "plain", "padded"]
PACKINGS: tuple[str, ...] = ("shared_prompt", "plain", "padded")
PAD_ID = 0  # input id of padding; its doc id is -1 so nothing attends to it

# (pair number in the input list, first row, first column) of one pair in its batch
Placement = tuple[int, int, int]


@dataclass
class PackedBatch:
    """One micro-batch: `model(input_ids, layout, score)` scores it.

    Everything the training step needs on the host (counts, pair ids) is computed here, at
    packing time, so the step never reads a device tensor back (a host synchronisation).
    Every response has at least one scored token (`_plan` rejects empty parts), which is
    what lets `compute_loss` skip its count check in the step.
    """

    input_ids: torch.Tensor  # (B, T) long
    layout: Layout  # doc_ids, branch_ids, position_ids: each (B, T) long
    score: ScoreIndex  # hidden_index, targets, response_ids: each (N,); num_responses = 2P
    pair_index: torch.Tensor  # (P,) long, on the host: TokenizedPair.index of pair j
    num_real_tokens: int  # non-padding tokens in input_ids (what the model computes on)
    attention_context: int  # sum over documents of their length squared (for MFU)
    # (2P,) scored tokens of each response, on the host: the fused loss plans its chunks
    # over pair boundaries from these without reading the device
    response_lengths: tuple[int, ...] = ()

    @property
    def num_pairs(self) -> int:
        return self.pair_index.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy on `device`, copied without blocking the host (`simpo.world.to_device`).

        `pair_index` stays on the host: it only names pairs (reference-table lookups, result
        rows), and reading it from the device would wait for the device."""
        lay, score = self.layout, self.score
        arrays = (lay.doc_ids, lay.branch_ids, lay.position_ids)
        return PackedBatch(
            input_ids=to_device(self.input_ids, device),
            layout=Layout(*(to_device(t, device) for t in arrays), plain=lay.plain),
            score=ScoreIndex(*(to_device(t, device) for t in score[:3]), score.num_responses),
            pair_index=self.pair_index,
            num_real_tokens=self.num_real_tokens,
            attention_context=self.attention_context,
            response_lengths=self.response_lengths,
        )


@dataclass(frozen=True)
class PackStats:
    """How well batches use their token budget (`rows_per_batch * max_tokens` slots each)."""

    num_pairs: int
    num_batches: int
    num_rows: int
    real_tokens: int  # non-padding tokens
    slots: int  # B * T summed: what the model computes on, padding included
    budget: int  # num_batches * rows_per_batch * max_tokens

    @property
    def fill(self) -> float:
        """real tokens / budget: 1.0 means no micro-batch could have held more."""
        return self.real_tokens / max(self.budget, 1)


def pair_tokens(pair: TokenizedPair, packing: Packing = "shared_prompt") -> int:
    """Token slots one pair takes under `packing` (`padded`: both rows, padded to the longer)."""
    m, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    if packing == "shared_prompt":
        return m + c + r
    if packing == "plain":
        return 2 * m + c + r
    if packing == "padded":
        return 2 * (m + max(c, r))
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def pack_pairs(
    pairs: Sequence[TokenizedPair],
    max_tokens: int,
    packing: Packing = "shared_prompt",
    rows_per_batch: int = 1,
) -> list[PackedBatch]:
    """Pack `pairs` into batches of at most `rows_per_batch * max_tokens` token slots.

    `shared_prompt` / `plain`: best-fit decreasing by pair length into rows of at most
    `max_tokens` tokens, `rows_per_batch` rows per batch, each batch trimmed to its longest
    row. `padded`: pairs in input order, as many per batch as fit (2P * T slots, T the longest
    sequence). Deterministic. `pack_stats` reports how full the batches are. A pair that does
    not fit in `max_tokens` (see `pair_tokens`) or has an empty part is a ValueError.
    """
    return [_build(pairs, p, packing) for p in _plan(pairs, max_tokens, packing, rows_per_batch)]


def pack_stats(
    batches: Sequence[PackedBatch], max_tokens: int, rows_per_batch: int = 1
) -> PackStats:
    """Fill of `batches` made by `pack_pairs(..., max_tokens, rows_per_batch=...)`."""
    return PackStats(
        num_pairs=sum(b.num_pairs for b in batches),
        num_batches=len(batches),
        num_rows=sum(b.input_ids.shape[0] for b in batches),
        real_tokens=sum(b.num_real_tokens for b in batches),
        slots=sum(b.input_ids.numel() for b in batches),
        budget=len(batches) * rows_per_batch * max_tokens,
    )


def empty_batch() -> PackedBatch:
    """A batch with no pairs: one padding token, so a rank with no pairs left still runs a
    forward and backward (FSDP collectives) and adds nothing to the loss."""
    one = torch.zeros((1, 1), dtype=torch.long)  # (1, 1)
    none = torch.zeros(0, dtype=torch.long)  # (0,)
    layout = Layout(torch.full((1, 1), -1), one.clone(), one.clone())
    return PackedBatch(
        one, layout, ScoreIndex(none, none.clone(), none.clone(), 0), none.clone(), 0, 0
    )


def plan_micro_batches(
    pairs: Sequence[TokenizedPair],
    max_tokens: int,
    world_size: int = 1,
    rank: int = 0,
    packing: Packing = "shared_prompt",
    rows_per_batch: int = 1,
) -> list[PackedBatch]:
    """This rank's micro-batches for one optimizer step.

    `pairs` is the step's global batch, the same list on every rank. Pairs are dealt to ranks
    by tokens (largest first, to the rank with the fewest tokens so far; each share keeps input
    order), each rank packs its share, and the shorter lists are padded with `empty_batch()` so
    that every rank runs the same number of micro-steps without any communication.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    sizes = [pair_tokens(p, packing) for p in pairs]
    for i in sorted(range(len(pairs)), key=lambda i: -sizes[i]):  # stable: ties in input order
        r = min(range(world_size), key=lambda r: load[r])
        load[r] += sizes[i]
        shares[r].append(i)
    share_pairs = [[pairs[i] for i in sorted(share)] for share in shares]
    plans = [_plan(share, max_tokens, packing, rows_per_batch) for share in share_pairs]
    mine = [_build(share_pairs[rank], p, packing) for p in plans[rank]]
    return mine + [empty_batch() for _ in range(max(map(len, plans)) - len(mine))]


def _best_fit_rows(sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: largest item first, into the open row with the least room that
    still fits it (a new row if none does). Returns item numbers per row, in placement order."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row number) of rows with room
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # stable: deterministic
        k = bisect.bisect_left(free, (sizes[i], -1))
        if k == len(free):
            rows.append([i])
            room, row = max_tokens - sizes[i], len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= sizes[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def _plan(
    pairs: Sequence[TokenizedPair], max_tokens: int, packing: Packing, rows_per_batch: int
) -> list[list[Placement]]:
    """Validate and place every pair: a list of batches, each a list of placements."""
    if max_tokens < 1 or rows_per_batch < 1:
        raise ValueError(
            f"need max_tokens >= 1 and rows_per_batch >= 1, got {max_tokens}, {rows_per_batch}"
        )
    sizes = [pair_tokens(p, packing) for p in pairs]
    for p, size in zip(pairs, sizes, strict=True):
        if not (p.prompt_ids and p.chosen_ids and p.rejected_ids):
            raise ValueError(
                f"pair {p.index}: prompt, chosen and rejected must each have at least one "
                f"token (got {len(p.prompt_ids)}, {len(p.chosen_ids)}, {len(p.rejected_ids)})"
            )
        if size > max_tokens:
            raise ValueError(
                f"pair {p.index} needs {size} tokens with packing {packing!r} but max_tokens "
                f"is {max_tokens}: max_tokens is smaller than the data's max_length allows "
                f"(max_tokens >= 2 x data.max_length fits every pair under every packing)"
            )
    budget = rows_per_batch * max_tokens
    if packing == "padded":  # input order; a batch is (2P, T) with T its longest sequence
        batches: list[list[Placement]] = []
        longest = 0  # longest sequence in the open batch
        for i, size in enumerate(sizes):
            seq = size // 2
            if batches and 2 * (len(batches[-1]) + 1) * max(longest, seq) <= budget:
                longest = max(longest, seq)
            else:
                batches.append([])
                longest = seq
            batches[-1].append((i, 2 * len(batches[-1]), 0))
        return batches
    rows = _best_fit_rows(sizes, max_tokens)
    batches = []
    for b in range(0, len(rows), rows_per_batch):
        placements: list[Placement] = []
        for row, items in enumerate(rows[b : b + rows_per_batch]):
            start = 0
            for i in items:
                placements.append((i, row, start))
                start += sizes[i]
        batches.append(placements)
    return batches


def _build(
    pairs: Sequence[TokenizedPair], placements: Sequence[Placement], packing: Packing
) -> PackedBatch:
    """Write the placed pairs into (B, T) arrays and collect their score triples."""
    rows_used = 2 if packing == "padded" else 1
    cols = [pair_tokens(pairs[i], packing) // rows_used for i, _, _ in placements]
    B = max(row for _, row, _ in placements) + rows_used
    T = max(start + n for (_, _, start), n in zip(placements, cols, strict=True))
    ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    branch = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    hidden: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    response: list[torch.Tensor] = []

    def put(row: int, start: int, tokens: list[int], d: int, b: int, first_pos: int) -> None:
        end = start + len(tokens)
        ids[row, start:end] = torch.tensor(tokens, dtype=torch.long)
        doc[row, start:end] = d
        branch[row, start:end] = b
        pos[row, start:end] = torch.arange(first_pos, first_pos + len(tokens))

    def score(r: int, row: int, parent: int, start: int, tokens: list[int]) -> None:
        # token 0 is predicted by the hidden state at `parent` (the prompt's last token),
        # token t > 0 by its predecessor at start + t - 1; indices into the (B*T) hidden
        n = len(tokens)
        at = torch.cat([torch.tensor([parent]), torch.arange(start, start + n - 1)])  # (n,)
        hidden.append(row * T + at)
        targets.append(torch.tensor(tokens, dtype=torch.long))
        response.append(torch.full((n,), r, dtype=torch.long))

    for j, (i, row, s) in enumerate(placements):
        prompt, chosen, rejected = pairs[i].prompt_ids, pairs[i].chosen_ids, pairs[i].rejected_ids
        m, c = len(prompt), len(chosen)
        if packing == "shared_prompt":  # [prompt | chosen | rejected], one doc, branches 0/1/2
            put(row, s, prompt, j, 0, 0)
            put(row, s + m, chosen, j, 1, m)
            put(row, s + m + c, rejected, j, 2, m)
            score(2 * j, row, s + m - 1, s + m, chosen)
            score(2 * j + 1, row, s + m - 1, s + m + c, rejected)
        elif packing == "plain":  # [prompt | chosen][prompt | rejected], docs 2j and 2j+1
            put(row, s, prompt + chosen, 2 * j, 0, 0)
            put(row, s + m + c, prompt + rejected, 2 * j + 1, 0, 0)
            score(2 * j, row, s + m - 1, s + m, chosen)
            score(2 * j + 1, row, s + 2 * m + c - 1, s + 2 * m + c, rejected)
        else:  # padded: row = prompt+chosen, row + 1 = prompt+rejected, from column 0
            put(row, 0, prompt + chosen, 2 * j, 0, 0)
            put(row + 1, 0, prompt + rejected, 2 * j + 1, 0, 0)
            score(2 * j, row, m - 1, m, chosen)
            score(2 * j + 1, row + 1, m - 1, m, rejected)

    layout = Layout(doc, branch, pos)
    return PackedBatch(
        input_ids=ids,
        layout=layout,
        score=ScoreIndex(
            torch.cat(hidden), torch.cat(targets), torch.cat(response), 2 * len(placements)
        ),
        pair_index=torch.tensor([pairs[i].index for i, _, _ in placements], dtype=torch.long),
        num_real_tokens=int((doc >= 0).sum()),
        attention_context=attention_context(layout),
        response_lengths=tuple(
            len(part)
            for i, _, _ in placements
            for part in (pairs[i].chosen_ids, pairs[i].rejected_ids)
        ),
    )
