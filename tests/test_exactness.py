"""Packing is exact: shared-prompt and plain rows give the padded batch's (sum, count) and
SimPO gradients, and all three match a reference that scores each sequence on its own."""

import random

import pytest
import torch
import torch.nn.functional as F

from simpo.data import TokenizedPair
from simpo.demo.tiny import tiny_args
from simpo.model import Transformer
from simpo.packing import PackedBatch, empty_batch, pack_pairs

VOCAB = 96
BETA, GAMMA_BETA_RATIO = 2.0, 0.5
# (prompt, chosen, rejected) lengths: several pairs per row, length-1 prompts and responses,
# and responses longer than the tiny models' sliding window (8)
LENGTHS = [(3, 1, 5), (5, 12, 1), (1, 9, 11), (6, 14, 3), (2, 1, 1), (4, 7, 13)]


def make_pairs() -> list[TokenizedPair]:
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    return [TokenizedPair(ids(m), ids(c), ids(r), index=i) for i, (m, c, r) in enumerate(LENGTHS)]


def make_model(family: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_args(family, vocab_size=VOCAB))
    model.init_weights(seed=0)
    with torch.no_grad():  # random norm weights, so a wrong norm or (1 + w) cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def run(model: Transformer, batches: list[PackedBatch], num_pairs: int):
    """(sum, count) per response (2 * num_pairs,), responses in the order of TokenizedPair.index."""
    sums = torch.zeros(2 * num_pairs)
    counts = torch.zeros(2 * num_pairs)
    for b in batches:
        s, c = model(b.input_ids, b.layout, b.score)  # (2P,) each
        order = torch.stack([2 * b.pair_index, 2 * b.pair_index + 1], dim=1).flatten()  # (2P,)
        sums = sums.index_add(0, order, s)
        counts = counts.index_add(0, order, c)
    return sums, counts


def naive(model: Transformer, pairs: list[TokenizedPair]):
    """Each [prompt | response] alone through `model(input_ids)`: logits, log_softmax, gather."""
    sums, counts = [], []
    for p in pairs:
        for response in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + response])  # (1, m + n)
            logp = F.log_softmax(model(ids)[0].float(), dim=-1)  # (m + n, V)
            m, n = len(p.prompt_ids), len(response)
            sums.append(logp[m - 1 : m + n - 1].gather(1, ids[0, m:, None]).sum())
            counts.append(float(n))
    return torch.stack(sums), torch.tensor(counts)


def simpo_loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sum over pairs of -log sigmoid(beta * (avg_w - avg_l - gamma/beta))."""
    avg = sums / counts  # (2P,): chosen at even, rejected at odd entries
    return -F.logsigmoid(BETA * (avg[0::2] - avg[1::2] - GAMMA_BETA_RATIO)).sum()


def grads(model: Transformer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gemma2"])
def test_packed_layouts_equal_padded_and_naive(family: str):
    pairs = make_pairs()
    model = make_model(family)
    if model.args.sliding_window is not None:
        assert model.args.sliding_window < max(sum(x) for x in LENGTHS)
    shared, plain = pack_pairs(pairs, 40, "shared_prompt", 2), pack_pairs(pairs, 64, "plain", 2)
    assert any(len(set(row.tolist()) - {-1}) > 2 for b in shared for row in b.layout.doc_ids)
    results = {
        # the padded baseline, one pair at a time
        "padded": [run(model, pack_pairs([p], 64, "padded"), len(pairs)) for p in pairs],
        "shared_prompt": [run(model, shared, len(pairs))],
        "plain": [run(model, plain, len(pairs))],
        "naive": [naive(model, pairs)],
    }
    totals = {k: (sum(s for s, _ in v), sum(c for _, c in v)) for k, v in results.items()}
    want_sum, want_count = totals.pop("padded")
    assert want_count.tolist() == [float(n) for _, c, r in LENGTHS for n in (c, r)]
    want_grads = grads(model, simpo_loss(want_sum, want_count))
    for name, (got_sum, got_count) in totals.items():
        assert torch.equal(got_count, want_count), name
        torch.testing.assert_close(got_sum, want_sum, atol=1e-4, rtol=1e-5, msg=name)
        got_grads = grads(model, simpo_loss(got_sum, got_count))
        for param, g in got_grads.items():
            torch.testing.assert_close(g, want_grads[param], atol=1e-5, rtol=1e-4, msg=param)


def test_empty_batch_runs_forward_and_backward():
    model = make_model("gemma2")
    b = empty_batch()
    s, c = model(b.input_ids, b.layout, b.score)
    assert s.shape == c.shape == (0,)
    model.zero_grad()
    simpo_loss(s, c).backward()  # zero pairs: loss 0, every gradient zero (FSDP still syncs)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
