"""The fused head + preference loss against full logits + compute_loss + autograd."""

import bisect
import dataclasses

import pytest
import torch
from step_checks import GemmFlops

from simpo.config import LossConfig
from simpo.data import TokenizedPair
from simpo.fused_loss import fused_chunk_rows, fused_preference_loss, pair_loss, plan_chunks
from simpo.logprobs import ScoreIndex, chunk_rows, naive_response_logprobs, response_logprobs
from simpo.losses import compute_loss
from simpo.packing import pack_pairs

D, V = 16, 97
# scored tokens per response, (chosen, rejected) per pair: pairs of 7, 11, 2 and 13 tokens
LENGTHS = [(3, 4), (9, 2), (1, 1), (6, 7)]
LOSSES = {
    "simpo": LossConfig(),
    "simpo-hinge-sft": LossConfig(loss_type="hinge", beta=1.0, sft_weight=0.3),
    "simpo-smoothed": LossConfig(label_smoothing=0.1),
    "dpo": LossConfig(name="dpo", beta=0.1),
    "ipo": LossConfig(name="ipo", beta=0.5),
    "hinge": LossConfig(name="hinge", beta=0.1),
    "rdpo": LossConfig(name="rdpo", beta=0.1, rdpo_alpha=0.05),
    "orpo": LossConfig(name="orpo"),
    "cpo": LossConfig(name="cpo", beta=0.1),
    "sft": LossConfig(name="sft"),
}


def make_case(lengths=LENGTHS, n_hidden=40, dtype=torch.float32, seed=0, shuffle=False):
    """Random head and hidden states; responses are runs of tokens in pair order (as packed),
    hidden rows repeat (as the shared prompt's last row does); `shuffle` permutes the tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_hidden, D, generator=g, dtype=dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(dtype)
    per_response = [n for pair in lengths for n in pair]
    response_ids = torch.repeat_interleave(
        torch.arange(len(per_response)), torch.tensor(per_response, dtype=torch.long)
    )
    n = response_ids.numel()
    index = ScoreIndex(
        torch.randint(0, n_hidden, (n,), generator=g),
        torch.randint(0, V, (n,), generator=g),
        response_ids,
        len(per_response),
    )
    if shuffle:
        perm = torch.randperm(n, generator=g)
        index = ScoreIndex(*(t[perm] for t in index[:3]), index.num_responses)
    ref = -torch.rand(len(per_response), generator=g, dtype=dtype) * 20  # reference sums
    return hidden.requires_grad_(), weight.requires_grad_(), index, ref


def naive(hidden, weight, index, cfg, ref=None, scale=1.0, softcap=None):
    """The reference: full logits, compute_loss, autograd."""
    sums, counts = naive_response_logprobs(hidden, weight, *index, softcap=softcap)
    losses, _ = compute_loss(cfg, sums, counts, ref)
    return scale * losses.sum(), losses.detach(), sums.detach(), counts


def grads(loss, hidden, weight):
    return torch.autograd.grad(loss, (hidden, weight))


def assert_fused_matches_naive(hidden, weight, index, cfg, ref, softcap, scale=0.25, **kw):
    ref = ref if cfg.name in ("dpo", "ipo", "hinge", "rdpo") else None
    out = fused_preference_loss(
        hidden, weight, index, pair_loss(cfg), scale, ref, softcap=softcap, **kw
    )
    want = naive(hidden, weight, index, cfg, ref, scale, softcap)
    for name, a, b in zip(["loss", "pair_losses", "sums", "counts"], out, want, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(
        ["d_hidden", "d_weight"], grads(out.loss, hidden, weight), grads(want[0], hidden, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("rows", [1, 4, 8, 12, 1024])
def test_fused_matches_naive_fp32(loss, softcap, rows):
    """rows 1/4: every pair spills into earlier chunks; 8/12: some pairs whole, some split,
    chunks that end exactly on a pair or hold only a long pair's first tokens; 1024: one chunk."""
    hidden, weight, index, ref = make_case()
    assert_fused_matches_naive(hidden, weight, index, LOSSES[loss], ref, softcap, chunk_size=rows)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_byte_budget_and_unsorted_tokens(softcap):
    """The default byte budget (rows from chunk_rows) and tokens in any order."""
    hidden, weight, index, ref = make_case(shuffle=True)
    assert_fused_matches_naive(hidden, weight, index, LOSSES["dpo"], ref, softcap)
    assert_fused_matches_naive(
        hidden, weight, index, LOSSES["simpo"], ref, softcap, chunk_bytes=6 * V * 4
    )


def test_shared_prompt_packing():
    """A real packed batch: the prompt's last hidden row predicts both first response tokens."""
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(1, V, (n,), generator=g).tolist()

    sizes = [(5, 3, 6), (2, 9, 1), (7, 4, 4), (3, 2, 8)]  # prompt, chosen, rejected tokens
    pairs = [TokenizedPair(ids(m), ids(c), ids(r), i) for i, (m, c, r) in enumerate(sizes)]
    (batch,) = pack_pairs(pairs, max_tokens=80, packing="shared_prompt")
    hidden = torch.randn(batch.input_ids.numel(), D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    assert len(set(batch.score.hidden_index.tolist())) < batch.score.hidden_index.numel()
    for rows in (3, 10, 100):
        assert_fused_matches_naive(hidden, weight, batch.score, LOSSES["simpo"], None, 30.0,
                                   chunk_size=rows)  # fmt: skip


def test_tied_head_grads_add_up():
    """The head is the input embedding: its grad sums the lookup's and the head's."""
    _, weight, index, _ = make_case()
    hidden_in = torch.randn(40, D, requires_grad=True)
    tokens = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(4))
    cfg = LOSSES["simpo"]

    def run(fused):
        hidden = torch.tanh(weight[tokens] + hidden_in)  # (40, D): embedding lookup of `weight`
        if fused:
            return fused_preference_loss(hidden, weight, index, pair_loss(cfg), chunk_size=5).loss
        return naive(hidden, weight, index, cfg)[0]

    got = torch.autograd.grad(run(True), (weight, hidden_in))
    want = torch.autograd.grad(run(False), (weight, hidden_in))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("loss", ["simpo", "dpo", "orpo"])
def test_gradcheck_float64(softcap, loss):
    """Pairs of 3, 5 and 2 tokens in chunks of 2: pairs split across chunks, and recomputed."""
    hidden, weight, index, ref = make_case(
        [(1, 2), (3, 2), (1, 1)], n_hidden=6, dtype=torch.float64
    )
    hidden = (hidden.detach()[:, :4] / 2).requires_grad_()
    weight = (weight.detach()[:11, :4]).requires_grad_()
    index = ScoreIndex(index.hidden_index, index.targets % 11, *index[2:])
    cfg, ref = LOSSES[loss], ref if loss == "dpo" else None

    def fn(h, w):
        out = fused_preference_loss(h, w, index, pair_loss(cfg), 0.7, ref, softcap=softcap,
                                    chunk_size=2)  # fmt: skip
        return out.loss

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_grad_output_scales_and_repeated_backward():
    hidden, weight, index, _ = make_case()
    out = fused_preference_loss(hidden, weight, index, pair_loss(LOSSES["simpo"]), chunk_size=6)
    want = grads(naive(hidden, weight, index, LOSSES["simpo"])[0], hidden, weight)
    got3 = torch.autograd.grad(3 * out.loss, (hidden, weight), retain_graph=True)
    got_half = torch.autograd.grad(out.loss / 2, (hidden, weight))  # again: retain_graph
    for a3, a_half, b in zip(got3, got_half, want, strict=True):
        torch.testing.assert_close(a3, 3 * b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a_half, b / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["no_pairs", "empty_pair"])
def test_empty_batch_and_empty_pairs(case):
    """No pairs at all (the padding micro-batch) gives loss 0 and zero grads; a pair with no
    scored token (between others) reaches loss_fn with zero counts and takes no grad."""
    if case == "no_pairs":
        hidden, weight, index, _ = make_case([])
        out = fused_preference_loss(hidden, weight, index, pair_loss(LOSSES["simpo"]))
        assert out.loss.item() == 0 and out.sums.shape == (0,) and out.pair_losses.shape == (0,)
        d_hidden, d_weight = grads(out.loss, hidden, weight)
        assert not d_hidden.any() and not d_weight.any()
        return
    hidden, weight, index, _ = make_case([(2, 3), (0, 0), (4, 1), (0, 0)])
    seen = []

    def loss_fn(s, n, rs, rn):  # SimPO where a pair has tokens, 0 for an empty pair
        seen.append(n.tolist())
        avg = s / n.clamp(min=1)
        return -torch.nn.functional.logsigmoid(2 * (avg[0::2] - avg[1::2]) - 1) * (n[0::2] > 0)

    out = fused_preference_loss(hidden, weight, index, loss_fn, chunk_size=3)
    sums, counts = naive_response_logprobs(hidden, weight, *index)
    want = loss_fn(sums, counts, None, None).sum()
    torch.testing.assert_close(out.loss, want)
    for a, b in zip(grads(out.loss, hidden, weight), grads(want, hidden, weight), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [0.0, 0.0] in [c[i : i + 2] for c in seen for i in range(0, len(c), 2)]


def test_three_gemms_not_four():
    """Vocabulary GEMM FLOPs: 3 x 2NVD for the fused loss when pairs fit a chunk, plus one
    logits GEMM for each long pair's first `size - rows` tokens; 4 x for the two-pass kernel.
    By the byte budget, a chunk holds the longest pair unless the budget cannot."""
    hidden, weight, index, _ = make_case()
    n, per_token = index.targets.numel(), 2 * V * D
    cfg = LOSSES["simpo"]

    def flops(fn):
        with GemmFlops() as counter:
            fn().backward()
        return counter.flops

    for rows, recomputed in [(13, 0), (8, 3 + 5)]:  # pairs of 7, 11, 2, 13 tokens
        got = flops(lambda: fused_preference_loss(hidden, weight, index, pair_loss(cfg),
                                                  chunk_size=rows).loss)  # fmt: skip
        assert got == (3 * n + recomputed) * per_token

    # by bytes: the kernel's <= 1/6 of N (4 rows here) grows to the longest pair (13) while
    # the budget holds it, so no token is scored twice; a budget of 8 rows splits long pairs
    row_bytes = V * 4 + 2 * D * 4  # fp32 logits row + hidden row and its grad (chunk_rows)
    assert chunk_rows(n, V, D) == 4
    for budget_rows, recomputed in [(10**6, 0), (8, 3 + 5)]:
        budget = budget_rows * row_bytes
        got = flops(lambda: fused_preference_loss(hidden, weight, index, pair_loss(cfg),
                                                  chunk_bytes=budget).loss)  # fmt: skip
        assert got == (3 * n + recomputed) * per_token, budget_rows

    def two_pass():
        sums, counts = response_logprobs(hidden, weight, *index, chunk_size=8)
        return compute_loss(cfg, sums, counts)[0].sum()

    assert flops(two_pass) == 4 * n * per_token
    assert flops(lambda: naive(hidden, weight, index, cfg)[0]) == 3 * n * per_token


def test_plan_chunks():
    sizes = [7, 11, 2, 13, 0, 4, 30, 3]
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    for rows in [1, 3, 4, 8, 12, 13, 100]:
        heads, main = plan_chunks(sizes, rows)
        head_tokens = [t for chunk in heads for a, b in chunk for t in range(a, b)]
        main_tokens = [t for s, e in main for t in range(s, e)]
        assert sorted(head_tokens + main_tokens) == list(range(sum(sizes)))  # each token once
        assert main_tokens == sorted(main_tokens)  # in order
        assert all(0 < e - s <= rows for s, e in main)
        assert all(0 < sum(b - a for a, b in chunk) <= rows for chunk in heads)
        assert all(sum(b - a for a, b in chunk) == rows for chunk in heads[:-1])  # packed full
        assert len(head_tokens) == sum(max(0, size - rows) for size in sizes)
        for size, end in zip(sizes, ends, strict=True):
            if 0 < size <= rows:  # a pair that fits is never split
                assert any(s <= end - size and end <= e for s, e in main)
            elif size > rows:  # a long pair: its last `rows` tokens are one main chunk
                assert (end - rows, end) in main
        for s, e in main:  # a main chunk completes every pair it touches (token t's pair
            # is the first whose end is past t)
            assert all(ends[bisect.bisect_right(ends, t)] <= e for t in range(s, e))


def test_bad_input_is_an_error():
    hidden, weight, index, ref = make_case()
    fn = pair_loss(LOSSES["dpo"])
    with pytest.raises(ValueError, match="even"):
        fused_preference_loss(hidden, weight, index._replace(num_responses=9), fn, ref_sums=ref)
    with pytest.raises(ValueError, match="reference"):
        fused_preference_loss(hidden, weight, index, fn, ref_sums=ref[:-1])
    with pytest.raises(ValueError, match="one loss per pair"):
        fused_preference_loss(hidden, weight, index, lambda s, n, rs, rn: s.sum())
    with pytest.raises(ValueError, match="needs reference"):
        fused_preference_loss(hidden, weight, index, fn)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_preference_loss(hidden, weight, index, fn, ref_sums=ref, chunk_size=0)
    lengths = torch.bincount(index.response_ids, minlength=index.num_responses).tolist()
    with pytest.raises(ValueError, match="response_lengths"):
        fused_preference_loss(hidden, weight, index, fn, ref_sums=ref, response_lengths=lengths[1:])
    with pytest.raises(ValueError, match="response_lengths"):
        bad = [lengths[1], lengths[0], *lengths[2:]]
        fused_preference_loss(hidden, weight, index, fn, ref_sums=ref, response_lengths=bad)


def test_host_side_lengths():
    """Lengths from the packer instead of a device-to-host copy: the same result."""
    hidden, weight, index, ref = make_case()
    lengths = [n for pair in LENGTHS for n in pair]
    assert_fused_matches_naive(hidden, weight, index, LOSSES["dpo"], ref, None, chunk_size=8,
                               response_lengths=lengths)  # fmt: skip


def test_bf16_inputs():
    """bf16 hidden/weight: fp32 loss and bf16 grads, as the naive path in bf16 gives them."""
    hidden, weight, index, _ = make_case(dtype=torch.bfloat16)
    cfg = dataclasses.replace(LOSSES["simpo"])
    out = fused_preference_loss(hidden, weight, index, pair_loss(cfg), softcap=5.0, chunk_size=8)
    want = naive(hidden, weight, index, cfg, softcap=5.0)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want[0], rtol=1e-5, atol=1e-5)
    got_g, want_g = grads(out.loss, hidden, weight), grads(want[0], hidden, weight)
    for a, b in zip(got_g, want_g, strict=True):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).norm() / b.float().norm() < 2e-2


@pytest.mark.parametrize("frozen", ["hidden", "weight", "both"])
def test_frozen_inputs_and_no_grad(frozen):
    """Only the inputs that need a grad get one (a frozen head, say); no grad at all (under
    no_grad or with everything frozen) computes the loss alone."""
    hidden, weight, index, _ = make_case()
    hidden = hidden.detach() if frozen in ("hidden", "both") else hidden
    weight = weight.detach() if frozen in ("weight", "both") else weight
    cfg, trainable = LOSSES["simpo"], [t for t in (hidden, weight) if t.requires_grad]
    out = fused_preference_loss(hidden, weight, index, pair_loss(cfg), chunk_size=6)
    want = naive(hidden, weight, index, cfg)[0]
    torch.testing.assert_close(out.loss.detach(), want.detach())
    assert out.loss.requires_grad == bool(trainable)
    if trainable:
        got, ref = torch.autograd.grad(out.loss, trainable), torch.autograd.grad(want, trainable)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = fused_preference_loss(hidden, weight, index, pair_loss(cfg), chunk_size=6)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, want.detach())


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logit_sums_metric(softcap):
    """The official logits/* metric: per response, the sum of each token's mean (capped) logit;
    long pairs' first tokens, scored twice, count once."""
    hidden, weight, index, _ = make_case(shuffle=True)
    got = torch.zeros(index.num_responses)
    fused_preference_loss(hidden, weight, index, pair_loss(LOSSES["simpo"], check_counts=False),
                          softcap=softcap, chunk_size=4, logit_sums=got)  # fmt: skip
    logits = hidden[index.hidden_index].detach() @ weight.detach().t()  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.zeros(index.num_responses).index_add_(0, index.response_ids, logits.mean(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_chunk_rows():
    """The fused loss's chunk: the kernel's rows (budget, <= 1/6 of N), grown to the longest
    pair while the byte budget alone holds it; never above the budget's rows."""
    v, d, mib = 256_000, 2048, 2**20
    row = v * 4 + 2 * d * 4  # fp32 logits row + hidden row and its grad
    kernel = chunk_rows(4096, v, d)
    assert fused_chunk_rows(4096, v, d, longest_pair=kernel - 1) == kernel  # pairs fit already
    assert fused_chunk_rows(1024, v, d, longest_pair=512) == 512  # 2 pairs: grown past N/6
    assert chunk_rows(1024, v, d) == 167
    assert fused_chunk_rows(1024, v, d, 512, chunk_bytes=300 * row) == 300  # the budget wins
    assert fused_chunk_rows(10**6, v, d, 5000) == 1024 * mib // row  # 1 GiB: 1,032 rows
