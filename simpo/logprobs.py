"""Per-response log-probabilities from final hidden states: a chunked, fused lm_head kernel.

For every scored token t we need log softmax(W h_t)[y_t], summed per response. Computing the
full logits `(N, V)` first is the largest tensor of a preference step (N = 4096 tokens at
V = 256k is 4 GiB in fp32, and autograd keeps several of them). `response_logprobs` instead
walks the N scored tokens in chunks: it materialises one `(chunk, V)` block at a time, keeps
only each token's logsumexp for the backward, and recomputes the block's logits there.

Which hidden row scores which token is explicit (a `ScoreIndex`) rather than a plain shift:
with the shared-prompt packing the first rejected token is predicted from the prompt's last
hidden state, which also predicts the first chosen token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


class ScoreIndex(NamedTuple):
    """The N scored tokens of a batch: which hidden row predicts which token of which response."""

    hidden_index: Tensor  # (N,) long: row of the flattened (B*T, D) hidden states
    targets: Tensor  # (N,) long: the token that row predicts
    response_ids: Tensor  # (N,) long: response r; r = 2p is pair p's chosen, 2p + 1 its rejected
    num_responses: int  # R

    def to(self, device: torch.device | str) -> ScoreIndex:
        return ScoreIndex(
            self.hidden_index.to(device),
            self.targets.to(device),
            self.response_ids.to(device),
            self.num_responses,
        )


def _logits(h: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """Write `h @ weight.T` into `out` (c, V), which has the accumulation dtype (fp32 or fp64).

    The GEMM runs in the input dtype (bf16 on GPU) with fp32 accumulation inside it; a
    preallocated `out` avoids a fresh (c, V) allocation per chunk.
    """
    if h.dtype == out.dtype:
        return torch.mm(h, weight.t(), out=out)
    return out.copy_(h @ weight.t())


def _softcap_(z: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2 final-logit soft-cap `softcap * tanh(z / softcap)`, in place."""
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def _counts(response_ids: Tensor, num_responses: int, dtype: torch.dtype) -> Tensor:
    """Scored tokens per response (R,); `index_add_` (unlike bincount) rejects ids >= R."""
    ones = torch.ones_like(response_ids, dtype=dtype)
    return torch.zeros(num_responses, dtype=dtype, device=ones.device).index_add_(
        0, response_ids, ones
    )


def _check(hidden: Tensor, weight: Tensor, index: tuple[Tensor, Tensor, Tensor]) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N_h, D) and weight (V, D), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    n = index[0].shape
    if any(t.dim() != 1 or t.shape != n or t.dtype != torch.long for t in index):
        raise ValueError("hidden_index, targets, response_ids must be 1-D long, of one length")


class _ResponseLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,  # (N_h, D)
        weight: Tensor,  # (V, D)
        hidden_index: Tensor,  # (N,)
        targets: Tensor,  # (N,)
        response_ids: Tensor,  # (N,)
        num_responses: int,
        softcap: float | None,
        chunk_size: int,
        logit_sums: Tensor | None,
    ) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        n, vocab = targets.shape[0], weight.shape[0]
        sums = torch.zeros(num_responses, dtype=acc, device=hidden.device)  # (R,)
        lse = torch.empty(n, dtype=acc, device=hidden.device)  # (N,) kept for the backward
        buf = torch.empty(min(chunk_size, n), vocab, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _softcap_(_logits(hidden[hidden_index[s:e]], weight, buf[: e - s]), softcap)
            target_logit = z.gather(1, targets[s:e, None]).squeeze(1)  # (c,)
            if logit_sums is not None:  # the official trainer's logits/* metric (no gradient)
                logit_sums.index_add_(0, response_ids[s:e], z.mean(dim=1).to(logit_sums.dtype))
            # logsumexp in place: z is not needed afterwards, so no second (c, V) block
            zmax = z.amax(dim=1)  # (c,)
            lse[s:e] = zmax + z.sub_(zmax[:, None]).exp_().sum(dim=1).log_()
            sums.index_add_(0, response_ids[s:e], target_logit - lse[s:e])
        ctx.save_for_backward(hidden, weight, hidden_index, targets, response_ids, lse)
        ctx.softcap, ctx.chunk_size = softcap, chunk_size
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_sums: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, hidden_index, targets, response_ids, lse = ctx.saved_tensors
        softcap, chunk_size = ctx.softcap, ctx.chunk_size
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc, n = lse.dtype, targets.shape[0]
        grad_tok = grad_sums.to(acc)[response_ids]  # (N,) d loss / d logp_t = g of its response
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_hidden else None  # (N_h, D)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None  # (V, D)
        shape = (min(chunk_size, n), weight.shape[0])
        buf = torch.empty(shape, dtype=acc, device=hidden.device)
        exp_buf = None if softcap is None else torch.empty_like(buf)  # second (c, V) block
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            rows = hidden_index[s:e]
            h = hidden[rows]  # (c, D)
            g = grad_tok[s:e, None]  # (c, 1)
            z = _logits(h, weight, buf[: e - s])  # (c, V) raw logits, recomputed
            if softcap is None:
                # d logp / d z = onehot(y) - softmax(z); softmax = exp(z - lse)
                dz = z.sub_(lse[s:e, None]).exp_().mul_(-g)
                dz.scatter_add_(1, targets[s:e, None], g)
            else:
                # capped c = s*tanh(z/s); d logp / d c as above, times d c / d z = 1 - tanh^2
                t = z.div_(softcap).tanh_()
                dz = torch.mul(t, softcap, out=exp_buf[: e - s]).sub_(lse[s:e, None]).exp_()
                dz.mul_(-g).scatter_add_(1, targets[s:e, None], g)
                dz.mul_(t.square_().neg_().add_(1))
            dz = dz.to(weight.dtype)  # bf16 GEMMs as in autocast; a no-op in fp32
            if need_hidden:
                grad_hidden.index_add_(0, rows, (dz @ weight).to(acc))  # (c, D) rows
            if need_weight and dz.dtype == acc:
                grad_weight.addmm_(dz.t(), h)  # (V, D) accumulated in place
            elif need_weight:
                grad_weight.add_(dz.t() @ h)  # low precision GEMM, fp32 accumulation across chunks
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def response_logprobs(
    hidden: Tensor,
    weight: Tensor,
    hidden_index: Tensor,
    targets: Tensor,
    response_ids: Tensor,
    num_responses: int,
    softcap: float | None = None,
    chunk_size: int = 1024,
    logit_sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of token log-probs and token count per response, without an (N, V) tensor.

    Args:
        hidden: (N_h, D) final-norm hidden states (e.g. a (B, T, D) batch flattened).
        weight: (V, D) lm_head weight (or the tied embedding); same dtype as `hidden`.
        hidden_index, targets, response_ids: (N,) long, one entry per scored token (ScoreIndex).
        num_responses: R; responses with no scored token get sum 0 and count 0.
        softcap: Gemma-2 `final_logit_softcapping`, applied before the log-softmax.
        chunk_size: scored tokens per block; peak extra memory is about
            chunk_size x V x 4 bytes (x2 in the backward with a soft-cap).
        logit_sums: optional (R,) tensor; gets, per response, the sum over its scored tokens
            of the mean logit over the vocabulary (soft-capped), added in place without a
            gradient. Divided by the token count this is the official SimPO trainer's
            `logits/chosen` / `logits/rejected` restricted to response positions (it averages
            `logits.mean()` over the whole padded batch, prompt and padding positions included).

    Returns:
        sum (R,) and count (R,), fp32 (fp64 for fp64 inputs). Only `sum` is differentiable;
        gradients flow to `hidden` and `weight` (and add up with a tied embedding's).
    """
    _check(hidden, weight, (hidden_index, targets, response_ids))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if logit_sums is not None and logit_sums.shape != (num_responses,):
        raise ValueError(f"logit_sums must have shape ({num_responses},)")
    sums = _ResponseLogprobs.apply(
        hidden, weight, hidden_index, targets, response_ids, num_responses, softcap, chunk_size,
        logit_sums,
    )  # fmt: skip
    return sums, _counts(response_ids, num_responses, sums.dtype)


def naive_response_logprobs(
    hidden: Tensor,
    weight: Tensor,
    hidden_index: Tensor,
    targets: Tensor,
    response_ids: Tensor,
    num_responses: int,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference for `response_logprobs`: full (N, V) logits, log_softmax, gather, scatter."""
    _check(hidden, weight, (hidden_index, targets, response_ids))
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden[hidden_index] @ weight.t()).to(acc)  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    sums = torch.zeros(num_responses, dtype=acc, device=hidden.device).index_add(
        0, response_ids, logp
    )
    return sums, _counts(response_ids, num_responses, acc)
