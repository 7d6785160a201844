"""The training loss with the lm_head fused in: 3 vocabulary GEMMs per token, not 4.

A preference loss is a sum of per-pair terms, each a function of its two responses' log-prob
sums and counts. So as soon as a chunk of scored tokens completes some pairs, their losses and
d loss / d sum_r are known, and each token's logits gradient
`g_r * (onehot(y_t) - softmax(c_t)) * dc/dz` can be formed while the chunk's softmax is still
in memory. The forward therefore runs the head's backward too (d hidden, d weight: two GEMMs)
and keeps the gradients; the autograd backward only scales them by the incoming gradient.
This is the approach of Liger-Kernel's fused linear preference losses, here over the packed
ScoreIndex (shared-prompt rows included), with the byte-sized chunks of `simpo.logprobs`.

Chunks follow pair boundaries: a chunk holds whole pairs while they fit. Its rows are the
scoring kernel's (the byte budget, at most 1/6 of the N scored tokens: `chunk_rows`), grown to
the longest pair when the byte budget holds that many rows, so a micro-batch of few long pairs
pays no 4th GEMM (its chunk is then up to one pair's (tokens, V) buffer: more than 1/12 of the
naive path's logits when a micro-batch holds fewer than ~6 pairs, never more than the budget).
A pair with more scored tokens than the budget's rows has its first `size - rows` tokens
scored ahead (in chunks shared with other long pairs) and scored again once its loss is known:
the 4th GEMM, for those tokens only (`plan_chunks`).

Called by `Transformer.forward(..., loss=HeadLoss(...))` inside the training step
(`simpo.step.train_step`, `train.fused_loss`), where FSDP2 has the head unsharded.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from simpo.logprobs import (
    DEFAULT_CHUNK_BYTES,
    ScoreIndex,
    accumulate_head_grads,
    check_inputs,
    chunk_rows,
    grad_logits_chunk_,
    logits_chunk_,
    lse_chunk_,
    response_counts,
    rows_per_chunk,
)

# (sums (2k,), counts (2k,), ref_sums (2k,) | None, ref_counts (2k,) | None) -> losses (k,)
# for k consecutive pairs, responses interleaved: 2j chosen, 2j + 1 rejected
PairLoss = Callable[[Tensor, Tensor, Tensor | None, Tensor | None], Tensor]


class HeadLoss(NamedTuple):
    """Asks `Transformer.forward` for the training loss instead of log-probs: the arguments
    of `fused_preference_loss` that the model does not own (it adds hidden, weight, softcap,
    chunk budget)."""

    loss_fn: PairLoss
    scale: float = 1.0  # the step's normalisation, e.g. world_size / pairs in the step
    ref_sums: Tensor | None = None  # (R,) reference log-prob sums (DPO family)
    ref_counts: Tensor | None = None  # (R,)
    response_lengths: Sequence[int] | None = None  # (R,) host-side, from the packer


class FusedLoss(NamedTuple):
    loss: Tensor  # () scale * sum of the per-pair losses; differentiable
    pair_losses: Tensor  # (P,) per-pair losses, unscaled, detached
    sums: Tensor  # (R,) per-response log-prob sums, detached (for metrics)
    counts: Tensor  # (R,) scored tokens per response


def pair_loss(cfg: Any, check_counts: bool = True) -> PairLoss:
    """`simpo.losses.compute_loss` for `cfg` (a LossConfig) as a PairLoss: per-pair losses,
    `sft_weight` term included (the metrics come from `FusedLoss.sums` afterwards).
    `check_counts=False` skips compute_loss's empty-response check, a host sync per chunk on
    a GPU (the training step's packer already guarantees every response a token)."""
    from simpo.losses import compute_loss

    return lambda s, n, rs, rn: compute_loss(cfg, s, n, rs, rn, check_counts=check_counts)[0]


def fused_chunk_rows(
    n: int,
    vocab: int,
    dim: int,
    longest_pair: int,
    dtype: torch.dtype = torch.float32,
    softcap: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Rows per chunk of the fused loss: the scoring kernel's (`chunk_rows`: the byte budget,
    at most 1/6 of the N scored tokens), grown to the longest pair's scored tokens while the
    byte budget alone holds that many rows. A chunk that holds whole pairs needs no 4th GEMM;
    the cost is a buffer of up to one pair's rows when a micro-batch holds few long pairs."""
    rows = chunk_rows(n, vocab, dim, dtype, softcap, chunk_bytes)
    within_budget = chunk_rows(n, vocab, dim, dtype, softcap, chunk_bytes, logits_fraction=1)
    return max(rows, min(longest_pair, within_budget))


class ChunkPlan(NamedTuple):
    """The order in which `fused_preference_loss` scores the tokens of consecutive pairs."""

    heads: list[list[tuple[int, int]]]  # chunks of long pairs' first tokens, as token ranges
    main: list[tuple[int, int]]  # contiguous chunks [start, end) that complete their pairs


def plan_chunks(pair_tokens: Sequence[int], rows: int) -> ChunkPlan:
    """Chunks of at most `rows` tokens, for pairs stored one after the other.

    `main` chunks take whole pairs while the next one fits. A pair longer than `rows` gets a
    main chunk of exactly its last `rows` tokens; its first `size - rows` tokens (its head)
    go to `heads`, packed `rows` to a chunk across pairs. Heads are scored first, so every
    main chunk completes the pairs it touches and forms their gradient at once; heads are
    scored again at the end, once their pairs' gradients are known: `max(0, size - rows)`
    tokens of each pair are scored twice.
    """
    main: list[tuple[int, int]] = []
    head_ranges: list[tuple[int, int]] = []
    start = end = 0  # the open main chunk is [start, end)
    for size in pair_tokens:
        if size > rows:
            if end > start:
                main.append((start, end))
            head_ranges.append((end, end + size - rows))
            main.append((end + size - rows, end + size))
            start = end = end + size
        elif end - start + size <= rows:
            end += size
        else:
            main.append((start, end))
            start, end = end, end + size
    if end > start:
        main.append((start, end))
    heads: list[list[tuple[int, int]]] = []
    chunk: list[tuple[int, int]] = []
    room = rows
    for a, b in head_ranges:
        while a < b:
            take = min(b - a, room)
            chunk.append((a, a + take))
            a, room = a + take, room - take
            if room == 0:
                heads.append(chunk)
                chunk, room = [], rows
    if chunk:
        heads.append(chunk)
    return ChunkPlan(heads, main)


def _pair_grads(
    loss_fn: PairLoss,
    sums: Tensor,
    counts: Tensor,
    ref_sums: Tensor | None,
    ref_counts: Tensor | None,
    pairs: slice,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Losses (k,) of the pairs in `pairs` and scale * d(sum of losses) / d sums (2k,)."""
    r = slice(2 * pairs.start, 2 * pairs.stop)
    with torch.enable_grad():
        s = sums[r].detach().requires_grad_()
        ref = None if ref_sums is None else ref_sums[r].to(s.dtype)
        ref_n = None if ref_counts is None else ref_counts[r].to(s.dtype)
        losses = loss_fn(s, counts[r], ref, ref_n)
        if losses.shape != (pairs.stop - pairs.start,):
            raise ValueError(
                f"loss_fn must return one loss per pair, shape ({pairs.stop - pairs.start},), "
                f"got {tuple(losses.shape)}"
            )
        (grad,) = torch.autograd.grad(losses.sum() * scale, s, allow_unused=True)
    return (torch.zeros_like(s) if grad is None else grad), losses.detach()


class _Inputs(NamedTuple):
    """What one fused pass reads; tokens sorted by response id, so pairs are contiguous."""

    hidden: Tensor  # (N_h, D)
    weight: Tensor  # (V, D)
    hidden_index: Tensor  # (N,)
    targets: Tensor  # (N,)
    response_ids: Tensor  # (N,)
    counts: Tensor  # (R,)
    ref_sums: Tensor | None  # (R,)
    ref_counts: Tensor | None  # (R,)


def _fused_pass(
    x: _Inputs,
    loss_fn: PairLoss,
    scale: float,
    softcap: float | None,
    rows: int,
    pair_ends: list[int],  # (P,) host: token offset where each pair ends
    need: tuple[bool, bool],  # grads for hidden, weight
    logit_sums: Tensor | None = None,  # (R,) per response: sum of mean logits, in place
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-pair losses (P,), per-response sums (R,), and the head's grads of scale * sum of
    the losses: d hidden (N_h, D) and d weight (V, D) in the accumulation dtype (or None)."""
    hidden, weight, hidden_index, targets, response_ids = x[:5]
    acc, dev = x.counts.dtype, hidden.device
    n, vocab, num_pairs = targets.shape[0], weight.shape[0], len(pair_ends)
    sums = torch.zeros(2 * num_pairs, dtype=acc, device=dev)  # (R,)
    grad_sum = torch.zeros_like(sums)  # (R,) scale * d loss / d sum_r, once r's pair is done
    pair_losses = torch.zeros(num_pairs, dtype=acc, device=dev)  # (P,)
    lse = torch.empty(n, dtype=acc, device=dev)  # (N,) for recomputed tokens
    grad_hidden = torch.zeros_like(hidden, dtype=acc) if need[0] else None  # (N_h, D)
    grad_weight = torch.zeros_like(weight, dtype=acc) if need[1] else None  # (V, D)
    pair_starts = [0, *pair_ends[:-1]]
    plan = plan_chunks([b - a for a, b in zip(pair_starts, pair_ends)], rows)
    heads = [torch.cat([torch.arange(a, b, device=dev) for a, b in chunk]) for chunk in plan.heads]
    longest = max([e - s for s, e in plan.main] + [len(h) for h in heads], default=0)
    buf = torch.empty(longest, vocab, dtype=acc, device=dev)  # the chunk's logits (c, V)
    need_any = need[0] or need[1]

    def score(idx: slice | Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits (GEMM 1), logsumexp and log-probs of the tokens `idx`, into lse and sums."""
        tgt = targets[idx]  # (c,)
        z = logits_chunk_(hidden[hidden_index[idx]], weight, buf[: len(tgt)], softcap)
        target_logit = z.gather(1, tgt[:, None]).squeeze(1)  # (c,)
        if logit_sums is not None:  # the official trainer's logits/* metric (no gradient)
            mean_logit = z.mean(dim=1) * (1.0 if softcap is None else softcap)  # (c,)
            logit_sums.index_add_(0, response_ids[idx], mean_logit.to(logit_sums.dtype))
        if softcap is not None:
            target_logit = target_logit * softcap
        lse_c, prob_scale = lse_chunk_(z, softcap)
        lse[idx] = lse_c
        sums.index_add_(0, response_ids[idx], target_logit - lse_c)
        return z, lse_c, prob_scale

    def head_grads(idx: slice | Tensor, z: Tensor, lse_c: Tensor, scale_c: Tensor | None):
        """Tokens `idx`, logits in z, pairs done: their share of the head's grads (GEMMs 2, 3)."""
        g = grad_sum[response_ids[idx]]  # (c,)
        dz = grad_logits_chunk_(z, g, targets[idx], lse_c, softcap, scale_c)
        rows_h = hidden_index[idx]
        accumulate_head_grads(dz, hidden[rows_h], rows_h, weight, grad_hidden, grad_weight)

    def finish(pairs: slice) -> None:
        grad_sum[2 * pairs.start : 2 * pairs.stop], pair_losses[pairs] = _pair_grads(
            loss_fn, sums, x.counts, x.ref_sums, x.ref_counts, pairs, scale
        )

    for idx in heads:  # long pairs' first tokens: only their log-probs for now
        score(idx)
    done = 0  # pairs [0, done) have their losses and grad_sum
    for s, e in plan.main:
        z, lse_c, prob_scale = score(slice(s, e))
        new = bisect.bisect_right(pair_ends, e, lo=done)  # every pair here ends here
        if new > done:
            finish(slice(done, new))
        done = new
        if need_any:
            head_grads(slice(s, e), z, lse_c, prob_scale)
    if done < num_pairs:  # trailing pairs without scored tokens
        finish(slice(done, num_pairs))
    for idx in heads if need_any else ():  # long pairs' first tokens again: logits recomputed
        z = logits_chunk_(hidden[hidden_index[idx]], weight, buf[: len(idx)], softcap)
        head_grads(idx, z, lse[idx], None)
    return pair_losses, sums, grad_hidden, grad_weight


class _FusedPreferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, options = _Inputs(*args[:8]), args[8:]  # options: loss_fn, scale, softcap, ...
        pair_losses, sums, grad_hidden, grad_weight = _fused_pass(x, *options)
        ctx.grads = (grad_hidden, grad_weight)  # handed out (and dropped) by the backward
        ctx.save_for_backward(*(t for t in x if t is not None))
        ctx.rerun = (tuple(t is None for t in x), options[:-1])  # for a second backward
        ctx.mark_non_differentiable(pair_losses, sums)
        return options[1] * pair_losses.sum(), pair_losses, sums

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_pairs: Tensor, _grad_sums: Tensor
    ) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None  # no reference kept: autograd can take them over
        if grads is None:  # backward again (retain_graph, gradcheck): run the pass again
            saved, (missing, args) = iter(ctx.saved_tensors), ctx.rerun
            x = _Inputs(*(None if m else next(saved) for m in missing))
            grads = _fused_pass(x, *args)[2:]
        hidden, weight = ctx.saved_tensors[:2]
        out = [None if g is None else g.mul_(grad_loss).to(t.dtype)
               for g, t in zip(grads, (hidden, weight), strict=True)]  # fmt: skip
        return *out, *([None] * 13)


def fused_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    score: ScoreIndex,
    loss_fn: PairLoss,
    scale: float = 1.0,
    ref_sums: Tensor | None = None,
    ref_counts: Tensor | None = None,
    softcap: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    chunk_size: int | None = None,
    response_lengths: Sequence[int] | None = None,
    logit_sums: Tensor | None = None,
) -> FusedLoss:
    """lm_head + log-softmax + preference loss in one pass: `scale * sum_p loss_fn(pair p)`.

    Equal (values and gradients, to rounding) to `naive_response_logprobs` followed by
    `loss_fn` on the per-response sums, summed and scaled, with 3 vocabulary GEMMs per scored
    token (logits, d hidden, d weight) in chunks of `chunk_bytes` (`simpo.logprobs.chunk_rows`).
    The head's gradients are computed in the forward and kept until the backward, which
    multiplies them by the incoming gradient in place and hands them over (a second backward,
    with `retain_graph`, recomputes them).

    Args:
        hidden: (N_h, D) final-norm hidden states; weight: (V, D) lm_head (or tied embedding)
            weight, same dtype. With FSDP, call this inside the model's forward (unsharded head).
        score: the batch's ScoreIndex; response 2p is pair p's chosen answer, 2p + 1 its
            rejected one (tokens may come in any order; they are sorted by response).
        loss_fn: per-pair losses (k,) of k consecutive pairs from their interleaved (2k,) sums,
            counts, and reference sums/counts (None without a reference), e.g. `pair_loss(cfg)`.
            It must be a sum of independent per-pair terms: it is called once per chunk.
        scale: the step's normalisation, e.g. world_size / pairs in the optimizer step.
        ref_sums, ref_counts: (R,) reference log-prob sums and counts (DPO family), detached.
        softcap: Gemma-2's final logit soft-cap.
        chunk_bytes, chunk_size: the chunk budget, or rows per chunk (overrides the budget).
        response_lengths: host-side scored tokens per response, if the caller has them (the
            packer does): saves the one device-to-host copy (of R counts) of this function.
            They must be right (checked on CPU only).
        logit_sums: optional (R,) tensor; gets, per response, the sum over its scored tokens
            of the mean (soft-capped) logit over the vocabulary, in place, without a gradient:
            the official trainer's logits/* metric, as in `response_logprobs`.

    Returns:
        FusedLoss(loss (), pair_losses (P,), sums (R,), counts (R,)), fp32 (fp64 for fp64
        inputs); only `loss` is differentiable.
    """
    check_inputs(hidden, weight, (score.hidden_index, score.targets, score.response_ids))
    num_responses = score.num_responses
    if num_responses % 2:
        raise ValueError(f"expected interleaved pairs (an even num_responses), got {num_responses}")
    n = score.targets.shape[0]
    rows = rows_per_chunk(n, weight, softcap, chunk_bytes, chunk_size)  # validates both
    acc = torch.promote_types(hidden.dtype, torch.float32)
    order = torch.sort(score.response_ids, stable=True).indices  # pairs become contiguous
    hidden_index, targets, response_ids = (t[order] for t in score[:3])
    counts = response_counts(response_ids, num_responses, acc)  # (R,)
    if response_lengths is None:
        lengths = [int(c) for c in counts.tolist()]  # the one device-to-host copy
    else:
        lengths = [int(c) for c in response_lengths]
        bad = len(lengths) != num_responses
        if not bad and counts.device.type == "cpu":  # checked where it is free; a GPU caller
            # vouches for them. An async assert, not .tolist(): no host read to audit
            try:
                torch._assert_async(counts.eq(torch.tensor(lengths, dtype=counts.dtype)).all())
            except RuntimeError:
                bad = True
        if bad:
            raise ValueError("response_lengths must give each response's scored-token count")
    pair_tokens = [lengths[r] + lengths[r + 1] for r in range(0, num_responses, 2)]  # (P,)
    pair_ends = list(accumulate(pair_tokens))
    if chunk_size is None:  # whole pairs while the byte budget holds them: no 4th GEMM
        vocab, dim = weight.shape
        longest = max(pair_tokens, default=0)
        rows = fused_chunk_rows(n, vocab, dim, longest, weight.dtype, softcap, chunk_bytes)
    for ref in (ref_sums, ref_counts, logit_sums):
        if ref is not None and ref.shape != (num_responses,):
            raise ValueError(
                f"reference sums/counts and logit_sums must be ({num_responses},), "
                f"got {tuple(ref.shape)}"
            )
    need = (hidden.requires_grad and torch.is_grad_enabled(),
            weight.requires_grad and torch.is_grad_enabled())  # fmt: skip
    loss, pair_losses, sums = _FusedPreferenceLoss.apply(
        hidden, weight, hidden_index, targets, response_ids, counts,
        None if ref_sums is None else ref_sums.detach(),
        None if ref_counts is None else ref_counts.detach(),
        loss_fn, scale, softcap, rows, pair_ends, need, logit_sums,
    )  # fmt: skip
    return FusedLoss(loss, pair_losses, sums, counts)
