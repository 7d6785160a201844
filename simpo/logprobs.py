"""Per-response log-probabilities from final hidden states: a chunked, fused lm_head kernel.

For every scored token t we need log softmax(W h_t)[y_t], summed per response. Computing the
full logits `(N, V)` first is the largest tensor of a preference step (N = 4096 tokens at
V = 256k is 4 GiB in fp32, and autograd keeps several of them). `response_logprobs` instead
walks the N scored tokens in chunks: it materialises one `(chunk, V)` block at a time, keeps
only each token's logsumexp for the backward, and recomputes the block's logits there. A
chunk's length follows from a byte budget (`chunk_rows`). The chunk primitives here are shared
with the fused preference loss (`simpo.fused_loss`), which needs no recomputation.

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


DEFAULT_CHUNK_BYTES = 1 << 30  # 1 GiB: 1,024 fp32 rows at V = 256k, 8,192 at V = 32k
LOGITS_FRACTION = 6  # a chunk never holds more than 1/6 of the full (N, V) fp32 logits
SOFTCAP_SPLIT = 8  # soft-capped chunks are exponentiated in 8 column slices (a 1/8 temporary)


def chunk_rows(
    n: int,
    vocab: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    softcap: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    logits_fraction: int = LOGITS_FRACTION,
) -> int:
    """Scored tokens per chunk: as many as fit in `chunk_bytes`, and at most 1/6 of N's worth
    (1/`logits_fraction`; 1 = the byte budget alone).

    A row of a chunk costs its (V,) logits in the accumulation dtype, a (V,) copy in the GEMM
    dtype when that is lower (bf16 GEMM output, bf16 grad), 1/8 of a row more with a soft-cap
    (`SOFTCAP_SPLIT`) and its gathered hidden row and hidden grad (2 x D). The second cap keeps
    the kernel's buffers at <= 1/6 of one (N, V) fp32 block, so <= 1/12 of what the naive
    path needs at any N and D: its forward alone holds two such blocks (logits, log-probs),
    its backward three. (1/12 leaves room for what the buffers do not count, e.g. the GEMM
    library's workspace, ~8 MiB on CPU.) The byte budget bounds the size at large N.
    """
    acc = torch.promote_types(dtype, torch.float32).itemsize
    low = dtype.itemsize if dtype.itemsize < acc else 0
    per_row = vocab * (acc + low) + 2 * dim * acc
    if softcap is not None:
        per_row += -(-vocab // SOFTCAP_SPLIT) * acc
    budget = min(chunk_bytes, n * vocab * 4 // logits_fraction)
    return max(1, min(n, budget // per_row))


def logits_chunk_(h: Tensor, weight: Tensor, out: Tensor, softcap: float | None) -> Tensor:
    """Write `h @ weight.T` into `out` (c, V), then `tanh(z / softcap)` in place if capped.

    `out` has the accumulation dtype (fp32, or fp64 for gradcheck); the GEMM runs in the input
    dtype (bf16 on GPU) with fp32 accumulation inside it. With a soft-cap `out` holds
    t = tanh(z / s) and the capped logits are s * t (Gemma-2's `final_logit_softcapping`).
    """
    if h.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())
    return out if softcap is None else out.div_(softcap).tanh_()


def column_slices(z: Tensor) -> tuple[Tensor, ...]:
    """`SOFTCAP_SPLIT` column views of z (c, V): elementwise work on a soft-capped chunk goes
    slice by slice, so its temporary is (c, V / 8) rather than a second (c, V) block."""
    return z.split(-(-z.shape[1] // SOFTCAP_SPLIT), dim=1)


def lse_chunk_(z: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """Row logsumexp (c,) of the chunk's (capped) logits, and a probability scale.

    Without a soft-cap, z is overwritten with exp(z - max) and the scale is 1 / its row sum:
    softmax = z * scale, ready for `grad_logits_chunk_` without a second exp. With a soft-cap, z
    (holding t) is left as is and the scale is None.
    """
    if softcap is None:
        zmax = z.amax(dim=1)  # (c,)
        sumexp = z.sub_(zmax[:, None]).exp_().sum(dim=1)
        return zmax + sumexp.log(), sumexp.reciprocal()
    zmax = z.amax(dim=1) * softcap  # tanh is increasing and softcap > 0
    sumexp = sum(b.mul(softcap).sub_(zmax[:, None]).exp_().sum(dim=1) for b in column_slices(z))
    return zmax + sumexp.log(), None


def grad_logits_chunk_(
    z: Tensor,
    g: Tensor,
    targets: Tensor,
    lse: Tensor,
    softcap: float | None,
    prob_scale: Tensor | None = None,
) -> Tensor:
    """Turn a chunk's logits z (c, V) into d(sum_t g_t logp_t) / d z, in place.

    d logp_t / d c = onehot(y_t) - softmax(c_t) for the logits c fed to the softmax; with a
    soft-cap c = s * tanh(z / s) and d c / d z = 1 - t^2. z holds what `logits_chunk_` wrote (raw
    logits or t), or, with `prob_scale` (no soft-cap), what `lse_chunk_` left: exp(z - max).
    g: (c,) upstream gradient of each token's log-prob; lse: (c,) of the capped logits.
    """
    g = g.to(z.dtype)
    if softcap is None:
        if prob_scale is None:  # z is raw: softmax = exp(z - lse)
            scale = -g
            z.sub_(lse[:, None]).exp_()
        else:
            scale = -g * prob_scale
        return z.mul_(scale[:, None]).scatter_add_(1, targets[:, None], g[:, None])
    t_target = z.gather(1, targets[:, None])  # (c, 1)
    for b in column_slices(z):
        probs = b.mul(softcap).sub_(lse[:, None]).exp_()  # (c, V / 8) temporary
        b.square_().neg_().add_(1).mul_(probs).mul_(-g[:, None])  # -g * softmax * (1 - t^2)
    return z.scatter_add_(1, targets[:, None], g[:, None] * (1 - t_target.square()))


def accumulate_head_grads(
    dz: Tensor,
    h: Tensor,
    rows: Tensor,
    weight: Tensor,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
) -> None:
    """grad_hidden[rows] += dz @ W (c, D) and grad_weight += dz^T h (V, D): the head's two
    backward GEMMs, in the weight's dtype (bf16 as under autocast), accumulated in fp32."""
    acc = dz.dtype
    dz = dz.to(weight.dtype)  # a no-op in fp32
    if grad_hidden is not None:  # index_put_ as autograd's own index backward: CPU's
        # parallel index_add_ spins for 100s of ms per call when its threads are descheduled
        grad_hidden.index_put_((rows,), (dz @ weight).to(acc), accumulate=True)
    if grad_weight is not None and dz.dtype == acc:
        grad_weight.addmm_(dz.t(), h)  # (V, D) accumulated in place
    elif grad_weight is not None:
        grad_weight.add_(dz.t() @ h)  # low precision GEMM, fp32 accumulation across chunks


def response_counts(response_ids: Tensor, num_responses: int, dtype: torch.dtype) -> Tensor:
    """Scored tokens per response (R,); `index_add_` (unlike bincount) rejects ids >= R."""
    ones = torch.ones_like(response_ids, dtype=dtype)
    return torch.zeros(num_responses, dtype=dtype, device=ones.device).index_add_(
        0, response_ids, ones
    )


def check_inputs(hidden: Tensor, weight: Tensor, index: tuple[Tensor, Tensor, Tensor]) -> None:
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


def rows_per_chunk(
    n: int,
    weight: Tensor,
    softcap: float | None,
    chunk_bytes: int,
    chunk_size: int | None,
) -> int:
    """Rows per chunk from the byte budget, or `chunk_size` when given; validates both."""
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    vocab, dim = weight.shape
    return chunk_rows(n, vocab, dim, weight.dtype, softcap, chunk_bytes)


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
        rows: int,
        logit_sums: Tensor | None,
    ) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        n, vocab = targets.shape[0], weight.shape[0]
        sums = torch.zeros(num_responses, dtype=acc, device=hidden.device)  # (R,)
        lse = torch.empty(n, dtype=acc, device=hidden.device)  # (N,) kept for the backward
        buf = torch.empty(min(rows, n), vocab, dtype=acc, device=hidden.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            z = logits_chunk_(hidden[hidden_index[s:e]], weight, buf[: e - s], softcap)
            target_logit = z.gather(1, targets[s:e, None]).squeeze(1)  # (c,)
            if logit_sums is not None:  # the official trainer's logits/* metric (no gradient)
                mean_logit = z.mean(dim=1) * (1.0 if softcap is None else softcap)  # (c,)
                logit_sums.index_add_(0, response_ids[s:e], mean_logit.to(logit_sums.dtype))
            if softcap is not None:
                target_logit = target_logit * softcap
            lse[s:e] = lse_chunk_(z, softcap)[0]
            sums.index_add_(0, response_ids[s:e], target_logit - lse[s:e])
        ctx.save_for_backward(hidden, weight, hidden_index, targets, response_ids, lse)
        ctx.softcap, ctx.rows = softcap, rows
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_sums: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, hidden_index, targets, response_ids, lse = ctx.saved_tensors
        softcap, rows = ctx.softcap, ctx.rows
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc, n = lse.dtype, targets.shape[0]
        grad_tok = grad_sums.to(acc)[response_ids]  # (N,) d loss / d logp_t = g of its response
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_hidden else None  # (N_h, D)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None  # (V, D)
        buf = torch.empty(min(rows, n), weight.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h = hidden[hidden_index[s:e]]  # (c, D)
            z = logits_chunk_(h, weight, buf[: e - s], softcap)  # recomputed: the 4th GEMM
            dz = grad_logits_chunk_(z, grad_tok[s:e], targets[s:e], lse[s:e], softcap)
            accumulate_head_grads(dz, h, hidden_index[s:e], weight, grad_hidden, grad_weight)
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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    chunk_size: int | None = None,
    logit_sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of token log-probs and token count per response, without an (N, V) tensor.

    The two-pass kernel: the forward keeps each token's logsumexp, the backward recomputes
    each chunk's logits (4 vocabulary GEMMs in all). For scoring and the reference pass; the
    training loss has a 3-GEMM path, `simpo.fused_loss.fused_preference_loss`.

    Args:
        hidden: (N_h, D) final-norm hidden states (e.g. a (B, T, D) batch flattened).
        weight: (V, D) lm_head weight (or the tied embedding); same dtype as `hidden`.
        hidden_index, targets, response_ids: (N,) long, one entry per scored token (ScoreIndex).
        num_responses: R; responses with no scored token get sum 0 and count 0.
        softcap: Gemma-2 `final_logit_softcapping`, applied before the log-softmax.
        chunk_bytes: memory budget of the chunk buffers; rows per chunk = `chunk_rows(...)`
            (also capped at 1/6 of the full (N, V) fp32 logits).
        chunk_size: scored tokens per chunk, overriding `chunk_bytes` (tests, benchmarks).
        logit_sums: optional (R,) tensor; gets, per response, the sum over its scored tokens
            of the mean logit over the vocabulary (soft-capped), added in place without a
            gradient. Divided by the token count this is the official SimPO trainer's
            `logits/chosen` / `logits/rejected` restricted to response positions (it averages
            `logits.mean()` over the whole padded batch, prompt and padding positions included).

    Returns:
        sum (R,) and count (R,), fp32 (fp64 for fp64 inputs). Only `sum` is differentiable;
        gradients flow to `hidden` and `weight` (and add up with a tied embedding's).
    """
    check_inputs(hidden, weight, (hidden_index, targets, response_ids))
    if logit_sums is not None and logit_sums.shape != (num_responses,):
        raise ValueError(f"logit_sums must have shape ({num_responses},)")
    rows = rows_per_chunk(targets.shape[0], weight, softcap, chunk_bytes, chunk_size)
    sums = _ResponseLogprobs.apply(
        hidden, weight, hidden_index, targets, response_ids, num_responses, softcap, rows,
        logit_sums,
    )  # fmt: skip
    return sums, response_counts(response_ids, num_responses, sums.dtype)


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
    check_inputs(hidden, weight, (hidden_index, targets, response_ids))
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden[hidden_index] @ weight.t()).to(acc)  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    sums = torch.zeros(num_responses, dtype=acc, device=hidden.device).index_add(
        0, response_ids, logp
    )
    return sums, response_counts(response_ids, num_responses, acc)
