"""The chunked log-prob kernel against the full-logits reference: values, gradients, edge cases."""

import pytest
import torch

from simpo.logprobs import (
    DEFAULT_CHUNK_BYTES,
    ScoreIndex,
    chunk_rows,
    naive_response_logprobs,
    response_logprobs,
)

N_H, D, V, N, R = 40, 16, 97, 33, 7  # hidden rows, width, vocab, scored tokens, responses


def make_case(n=N, dtype=torch.float32, seed=0):
    """Random hidden/weight and a ScoreIndex whose responses are contiguous runs of tokens (so
    chunks cut through them), hidden rows repeat (as the shared prompt's last row does), and the
    last response has no token at all."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_H, D, generator=g, dtype=dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(dtype)
    index = ScoreIndex(
        torch.randint(0, N_H, (n,), generator=g),
        torch.randint(0, V, (n,), generator=g),
        torch.sort(torch.randint(0, R - 1, (n,), generator=g)).values,
        R,
    )
    return hidden.requires_grad_(), weight.requires_grad_(), index


def value_and_grads(fn, hidden, weight, index, seed=1, **kw):
    """(sum, count) of `fn` and the grads of a random linear function of `sum`."""
    sums, counts = fn(hidden, weight, *index, **kw)
    upstream = torch.randn(index.num_responses, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((sums * upstream.to(sums.dtype)).sum(), (hidden, weight))
    return sums, counts, *grads


CHUNKINGS = [{"chunk_size": c} for c in (1, 7, N - 1, N, N + 5, 1024)]
CHUNKINGS += [{"chunk_bytes": b} for b in (1, 5 * V * 4, DEFAULT_CHUNK_BYTES)]  # by bytes


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda c: "-".join(map(str, c.items())))
def test_kernel_matches_naive_fp32(softcap, chunking):
    hidden, weight, index = make_case()
    got = value_and_grads(response_logprobs, hidden, weight, index, softcap=softcap, **chunking)
    want = value_and_grads(naive_response_logprobs, hidden, weight, index, softcap=softcap)
    for name, a, b in zip(["sum", "count", "d_hidden", "d_weight"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_chunk_rows_from_bytes():
    mib, v, d = 2**20, 32_000, 512
    fp32_row = v * 4 + 2 * d * 4  # logits + gathered hidden row + its grad
    assert chunk_rows(10**6, v, d, chunk_bytes=64 * mib) == 64 * mib // fp32_row
    bf16_row = v * (4 + 2) + 2 * d * 4  # + the bf16 GEMM output / grad copy
    assert chunk_rows(10**6, v, d, torch.bfloat16, chunk_bytes=64 * mib) == 64 * mib // bf16_row
    capped_row = fp32_row + v // 8 * 4  # + the soft-cap's column-slice temporary
    assert chunk_rows(10**6, v, d, softcap=30.0, chunk_bytes=64 * mib) == 64 * mib // capped_row
    assert chunk_rows(10**6, v, d, chunk_bytes=1) == 1  # never below one row
    assert chunk_rows(3, v, d, chunk_bytes=1 << 40) == 1  # 1/6 of 3 rows rounds to one
    assert chunk_rows(10**6, 256_000, 2048) == 1032  # the default 1 GiB at large N, V = 256k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunk_buffers_stay_a_sixth_of_the_logits(dtype, softcap):
    """At every N from 1k to 32k and V from 32k to 256k the chunk's buffers take <= 1/6 of
    one fp32 (N, V) logits block, whatever the byte budget: 1/12 of the two blocks that the
    naive path's forward holds (logits and log-probs)."""
    for n in [1024, 1500, 2048, 4096, 8192, 16384, 32768]:
        for v in [32_000, 32_768, 128_256, 151_936, 256_000]:
            for d in [2048, 4096]:
                for budget in [DEFAULT_CHUNK_BYTES, 1 << 34]:
                    rows = chunk_rows(n, v, d, dtype, softcap, budget)
                    acc, low = 4, 2 if dtype == torch.bfloat16 else 0
                    extra = -(-v // 8) * acc if softcap else 0
                    per_row = v * (acc + low) + extra + 2 * d * acc
                    assert rows * per_row <= n * v * 4 / 6, (n, v, d)
                    assert (rows + 1) * per_row > min(budget, n * v * 4 / 6)  # the most that fit


def test_counts_and_empty_response():
    _, _, index = make_case()
    sums, counts = response_logprobs(*make_case()[:2], *index, chunk_size=8)
    assert counts.tolist() == torch.bincount(index.response_ids, minlength=R).float().tolist()
    assert counts[-1] == 0 and sums[-1] == 0  # response R-1 has no scored token
    assert not counts.requires_grad


def test_response_split_across_chunks_by_hand():
    """Responses of 5, 9 and 3 tokens with chunk 4: every response straddles a chunk border."""
    hidden, weight, _ = make_case()
    ids = torch.tensor([0] * 5 + [1] * 9 + [2] * 3)
    index = ScoreIndex(torch.arange(17), torch.arange(17) * 5 % V, ids, 3)
    got = value_and_grads(response_logprobs, hidden, weight, index, chunk_size=4)
    logp = torch.log_softmax(hidden[:17] @ weight.t(), -1)[torch.arange(17), index.targets]
    torch.testing.assert_close(
        got[0], torch.stack([logp[:5].sum(), logp[5:14].sum(), logp[14:].sum()])
    )
    torch.testing.assert_close(got[1], torch.tensor([5.0, 9.0, 3.0]))


@pytest.mark.parametrize("chunk_size", [1, 1024])
def test_no_scored_tokens(chunk_size):
    hidden, weight, index = make_case(n=0)
    sums, counts, d_hidden, d_weight = value_and_grads(
        response_logprobs, hidden, weight, index, chunk_size=chunk_size
    )
    assert sums.shape == counts.shape == (R,)
    assert not sums.any() and not counts.any() and not d_hidden.any() and not d_weight.any()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bf16_inputs(softcap):
    """bf16 hidden/weight: fp32 sums, bf16 grads. The logits GEMM runs in bf16 (rounding each
    logit to 8 significant bits, up to ~0.03 at |logit| ~ 10 here) exactly as the naive path
    does, so against naive-in-bf16 the sums agree to 1e-5 per token; against the fp32 reference
    on the same bf16-rounded values: per-token average within 3e-2, grads within 2% (relative
    Frobenius norm). Measured: 6e-7; 1.1e-2 and 0.6%."""
    hidden, weight, index = make_case(dtype=torch.bfloat16)
    got = value_and_grads(response_logprobs, hidden, weight, index, softcap=softcap, chunk_size=8)
    same = value_and_grads(naive_response_logprobs, hidden, weight, index, softcap=softcap)
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    fp32 = value_and_grads(naive_response_logprobs, hidden32, weight32, index, softcap=softcap)
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.bfloat16
    count = fp32[1].clamp(min=1)
    assert ((got[0] - same[0]) / count).abs().max() < 1e-5
    assert ((got[0] - fp32[0]) / count).abs().max() < 3e-2
    for a, b in zip(got[2:], fp32[2:], strict=True):
        assert (a.float() - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck_float64(softcap):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=g, requires_grad=True)
    index = ScoreIndex(torch.tensor([0, 1, 1, 3, 4, 5, 2]), torch.tensor([3, 0, 10, 7, 7, 1, 5]),
                       torch.tensor([0, 0, 1, 1, 1, 2, 2]), 4)  # fmt: skip

    def fn(h, w):
        return response_logprobs(h, w, *index, softcap=softcap, chunk_size=3)[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_tied_embedding_grads_add_up():
    """The lm_head weight is also the input embedding: both uses contribute to one grad."""
    hidden_in, weight, index = make_case()
    tokens = torch.randint(0, V, (N_H,), generator=torch.Generator().manual_seed(4))

    def loss(fn, **kw):
        hidden = torch.tanh(weight[tokens] + hidden_in)  # (N_H, D): embedding lookup of `weight`
        return fn(hidden, weight, *index, **kw)[0].square().mean() / 100

    got = torch.autograd.grad(loss(response_logprobs, chunk_size=5), (weight, hidden_in))
    want = torch.autograd.grad(loss(naive_response_logprobs), (weight, hidden_in))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_no_grad():
    hidden, weight, index = make_case()
    weight = weight.detach()  # e.g. a frozen head: only hidden needs a grad
    (d_hidden,) = torch.autograd.grad(response_logprobs(hidden, weight, *index)[0].sum(), hidden)
    (want,) = torch.autograd.grad(naive_response_logprobs(hidden, weight, *index)[0].sum(), hidden)
    torch.testing.assert_close(d_hidden, want)
    with torch.no_grad():  # the reference model's forward
        sums, _ = response_logprobs(hidden, weight, *index, chunk_size=4)
    assert not sums.requires_grad
    torch.testing.assert_close(sums, naive_response_logprobs(hidden, weight, *index)[0])


def test_score_index_to():
    index = make_case()[2].to("cpu")
    assert isinstance(index, ScoreIndex) and index.num_responses == R


def test_bad_input_is_an_error():
    hidden, weight, index = make_case()
    with pytest.raises(ValueError, match="hidden"):
        response_logprobs(hidden, weight[:, :-1], *index)
    with pytest.raises(ValueError, match="1-D long"):
        response_logprobs(hidden, weight, index.hidden_index, index.targets[:-1], *index[2:])
    with pytest.raises(ValueError, match="chunk_size"):
        response_logprobs(hidden, weight, *index, chunk_size=0)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        response_logprobs(hidden, weight.bfloat16(), *index)
    with pytest.raises((IndexError, RuntimeError)):  # a response id >= num_responses
        response_logprobs(hidden, weight, *index[:3], 2)
