"""Packing: hand-made arrays written out, the tree mask, the score triples, fill, errors."""

import random

import pytest
import torch

from simpo.data import TokenizedPair
from simpo.packing import (
    PACKINGS,
    PackedBatch,
    empty_batch,
    pack_pairs,
    pack_stats,
    pair_tokens,
    plan_micro_batches,
)

A = TokenizedPair(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6], index=0)
B = TokenizedPair(prompt_ids=[7], chosen_ids=[8, 9, 10], rejected_ids=[11, 12, 13], index=1)


def random_pairs(n: int, seed: int = 0, max_prompt: int = 60, max_resp: int = 300):
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, 100) for _ in range(k)]

    return [
        TokenizedPair(
            ids(rng.randint(1, max_prompt)),
            ids(rng.randint(1, max_resp)),
            ids(rng.randint(1, max_resp)),
            index=100 + i,
        )
        for i in range(n)
    ]


def arrays(b: PackedBatch) -> dict[str, list]:
    lay, s = b.layout, b.score
    return {
        "ids": b.input_ids.tolist(),
        "doc": lay.doc_ids.tolist(),
        "branch": lay.branch_ids.tolist(),
        "pos": lay.position_ids.tolist(),
        "hidden": s.hidden_index.tolist(),
        "targets": s.targets.tolist(),
        "response": s.response_ids.tolist(),
    }


def test_shared_prompt_arrays_written_out():
    (b,) = pack_pairs([A, B], max_tokens=16)
    # B (7 tokens) is placed first: best-fit decreasing; responses 0, 1 are B's, 2, 3 are A's
    assert arrays(b) == {
        "ids": [[7, 8, 9, 10, 11, 12, 13, 1, 2, 3, 4, 5, 6]],
        "doc": [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]],
        "branch": [[0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 2]],
        "pos": [[0, 1, 2, 3, 1, 2, 3, 0, 1, 2, 3, 4, 3]],
        # B's rejected token 11 is predicted from column 0 (B's prompt), not column 3
        "hidden": [0, 1, 2, 0, 4, 5, 9, 10, 9],
        "targets": [8, 9, 10, 11, 12, 13, 4, 5, 6],
        "response": [0, 0, 0, 1, 1, 1, 2, 2, 3],
    }
    assert b.pair_index.tolist() == [1, 0] and b.num_pairs == 2 and b.score.num_responses == 4
    assert b.num_real_tokens == 13


def test_plain_and_padded_arrays_written_out():
    (plain,) = pack_pairs([A], max_tokens=16, packing="plain")
    assert arrays(plain) == {
        "ids": [[1, 2, 3, 4, 5, 1, 2, 3, 6]],
        "doc": [[0, 0, 0, 0, 0, 1, 1, 1, 1]],
        "branch": [[0] * 9],
        "pos": [[0, 1, 2, 3, 4, 0, 1, 2, 3]],
        "hidden": [2, 3, 7],
        "targets": [4, 5, 6],
        "response": [0, 0, 1],
    }
    (padded,) = pack_pairs([A], max_tokens=16, packing="padded")
    assert arrays(padded) == {
        "ids": [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0]],
        "doc": [[0, 0, 0, 0, 0], [1, 1, 1, 1, -1]],
        "branch": [[0] * 5, [0] * 5],
        "pos": [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]],
        "hidden": [2, 3, 7],  # row 1 starts at flat index 5
        "targets": [4, 5, 6],
        "response": [0, 0, 1],
    }
    assert plain.num_real_tokens == padded.num_real_tokens == 9


@pytest.mark.parametrize("window", [None, 3])
def test_mask_rule_is_two_causal_sequences_per_pair(window: int | None):
    """Layout's mask equals one built from the pairs, not the doc/branch arrays: each pair is
    the two sequences prompt+chosen and prompt+rejected at known columns; a query sees a key iff
    one sequence holds both and the key is at most `window` - 1 steps earlier. Positions equal
    steps."""
    pairs = random_pairs(12, seed=1, max_prompt=6, max_resp=6)
    batches = pack_pairs(pairs, max_tokens=40, rows_per_batch=2)
    for b in batches:
        B, T = b.input_ids.shape
        tree = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)  # (B, T, T); padding sees itself
        for j, idx in enumerate(b.pair_index.tolist()):
            p = pairs[idx - 100]
            # the chosen answer's first hidden index is the prompt's last token
            prompt_last = int(b.score.hidden_index[b.score.response_ids == 2 * j][0])
            row, start = prompt_last // T, prompt_last % T - len(p.prompt_ids) + 1
            m, c, r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            prompt = list(range(start, start + m))
            for cols in (prompt + list(range(start + m, start + m + c)),
                         prompt + list(range(start + m + c, start + m + c + r))):  # fmt: skip
                assert b.layout.position_ids[row, cols].tolist() == list(range(len(cols)))
                for i, qc in enumerate(cols):
                    for kk, kc in enumerate(cols[: i + 1]):
                        tree[row, qc, kc] |= window is None or i - kk < window
        assert torch.equal(b.layout.dense_mask(window)[:, 0], tree)


@pytest.mark.parametrize("packing", PACKINGS)
def test_score_triples_point_at_the_right_tokens(packing: str):
    pairs = random_pairs(30, seed=2)
    batches = pack_pairs(pairs, max_tokens=1024, packing=packing, rows_per_batch=2)
    seen = []
    for b in batches:
        flat_ids, flat_pos = b.input_ids.flatten(), b.layout.position_ids.flatten()
        s = b.score
        for j, idx in enumerate(b.pair_index.tolist()):
            p = pairs[idx - 100]
            for r, resp in ((2 * j, p.chosen_ids), (2 * j + 1, p.rejected_ids)):
                hid = s.hidden_index[s.response_ids == r]
                assert s.targets[s.response_ids == r].tolist() == resp
                # the hidden state predicting token t sits on token t-1 (prompt's last for t=0)
                assert flat_ids[hid].tolist() == [p.prompt_ids[-1], *resp[:-1]]
                m = len(p.prompt_ids)
                assert flat_pos[hid].tolist() == list(range(m - 1, m - 1 + len(resp)))
            seen.append(idx)
        assert s.num_responses == 2 * b.num_pairs
        for row in b.layout.doc_ids.tolist():  # each document one contiguous span, pad at end
            runs = [d for k, d in enumerate(row) if k == 0 or d != row[k - 1]]
            assert len(runs) == len(set(runs)) and -1 not in runs[:-1]
        assert b.num_real_tokens == int((b.layout.doc_ids >= 0).sum())
    assert sorted(seen) == [p.index for p in pairs]


def test_best_fit_fill_and_row_limits():
    pairs = random_pairs(400, seed=3, max_prompt=200, max_resp=700)
    for packing in ("shared_prompt", "plain"):
        batches = pack_pairs(pairs, max_tokens=2048, packing=packing, rows_per_batch=4)
        stats = pack_stats(batches, 2048, rows_per_batch=4)
        assert stats.fill > 0.9, stats
        assert stats.num_pairs == 400
        assert stats.real_tokens == sum(pair_tokens(p, packing) for p in pairs)
        assert all(b.input_ids.shape[0] <= 4 and b.input_ids.shape[1] <= 2048 for b in batches)
    padded = pack_pairs(pairs, max_tokens=2048, packing="padded", rows_per_batch=4)
    assert all(b.input_ids.numel() <= 4 * 2048 for b in padded)
    assert torch.cat([b.pair_index for b in padded]).tolist() == [p.index for p in pairs]
    assert pack_stats(padded, 2048, 4).fill < 0.75 < stats.fill


def test_too_long_pair_and_empty_response_are_errors():
    with pytest.raises(ValueError, match=r"pair 1 needs 7 tokens .* max_tokens is 6.*max_length"):
        pack_pairs([A, B], max_tokens=6)
    with pytest.raises(ValueError, match=r"pair 0 needs 10 tokens with packing .padded."):
        pack_pairs([A], max_tokens=9, packing="padded")
    with pytest.raises(ValueError, match=r"pair 5: .*at least one token \(got 3, 2, 0\)"):
        pack_pairs([TokenizedPair([1, 2, 3], [4, 5], [], index=5)], max_tokens=16)
    with pytest.raises(ValueError, match="unknown packing .rows."):
        pack_pairs([A], max_tokens=16, packing="rows")


def test_deterministic():
    pairs = random_pairs(50, seed=4)
    for packing in PACKINGS:
        one, two = (pack_pairs(pairs, 1500, packing, rows_per_batch=2) for _ in range(2))
        assert [arrays(b) for b in one] == [arrays(b) for b in two]


def test_empty_batch_and_micro_batch_plan():
    e = empty_batch()
    assert e.input_ids.shape == e.layout.doc_ids.shape == (1, 1)
    assert e.layout.doc_ids.item() == -1 and e.num_pairs == 0 and e.num_real_tokens == 0
    assert e.score.num_responses == 0 and e.score.hidden_index.numel() == 0
    assert e.to("cpu").input_ids.shape == (1, 1)

    pairs = random_pairs(7, seed=5)
    plans = [plan_micro_batches(pairs, 700, world_size=3, rank=r) for r in range(3)]
    assert len({len(p) for p in plans}) == 1  # every rank runs the same number of micro-steps
    indices = [torch.cat([b.pair_index for b in plan]).tolist() for plan in plans]
    assert sorted(sum(indices, [])) == [p.index for p in pairs]
    loads = [sum(pair_tokens(pairs[i - 100]) for i in idx) for idx in indices]
    assert max(loads) - min(loads) <= max(pair_tokens(p) for p in pairs)
    # more ranks than pairs: the ranks without pairs get only empty batches
    lonely = [plan_micro_batches(pairs[:1], 700, world_size=2, rank=r) for r in range(2)]
    assert [[b.num_pairs for b in plan] for plan in lonely] == [[1], [0]]
