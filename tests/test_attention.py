"""simpo.attention: the mask rule, SDPA vs FlexAttention, and packed rows through the model."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_tiny import one_thread  # noqa: F401

from simpo.attention import Layout, attend, masked_attention
from simpo.attention_varlen import DocMasks, LayoutError
from simpo.demo.tiny import tiny_args
from simpo.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _packed_layout(specs: list[list[tuple[int, int, int]]], width: int) -> Layout:
    """Rows of shared-prompt pairs (prompt, chosen, rejected lengths), right-padded to width."""
    rows = []
    for pairs in specs:
        doc, branch, pos = [], [], []
        for d, (p, c, r) in enumerate(pairs):
            doc += [d] * (p + c + r)
            branch += [0] * p + [1] * c + [2] * r
            pos += [*range(p + c), *range(p, p + r)]  # rejected restarts after the prompt
        pad = width - len(doc)
        rows.append((doc + [-1] * pad, branch + [0] * pad, pos + [0] * pad))
    doc, branch, pos = (torch.tensor([r[i] for r in rows]) for i in range(3))
    return Layout(doc, branch, pos)


LAYOUT = _packed_layout([[(3, 4, 2), (2, 1, 5)], [(5, 6, 6)]], width=20)


def _brute_force(layout: Layout, window: int | None) -> torch.Tensor:
    """The contract's rule, one (q, k) at a time."""
    B, T = layout.doc_ids.shape
    doc, br, pos = (x.tolist() for x in (layout.doc_ids, layout.branch_ids, layout.position_ids))
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(T):
                same = doc[b][q] == doc[b][k] != -1 and k <= q
                branch = br[b][k] == 0 or br[b][k] == br[b][q]
                near = window is None or pos[b][q] - pos[b][k] < window
                mask[b, 0, q, k] = (same and branch and near) or q == k
    return mask


@pytest.mark.parametrize("window", [None, 3])
def test_mask_rule_matches_brute_force(window: int | None) -> None:
    assert torch.equal(LAYOUT.dense_mask(window), _brute_force(LAYOUT, window))
    assert LAYOUT.dense_mask(window) is LAYOUT.dense_mask(window)  # built once, then cached


def test_rejected_sees_prompt_not_chosen() -> None:
    mask = LAYOUT.dense_mask(None)[1, 0]  # row 1: prompt 0..4, chosen 5..10, rejected 11..16
    assert mask[11, :5].all() and not mask[11, 5:11].any() and mask[16, 11:17].all()
    windowed = LAYOUT.dense_mask(3)[1, 0]  # rejected at position 5 (row 11) is near the prompt
    assert windowed[11, 3:5].all() and not windowed[11, :3].any()
    assert not LAYOUT.dense_mask(None)[0, 0, 18, :18].any()  # padding sees only itself


def _qkv(layout: Layout, hq: int = 4, hkv: int = 2, d: int = 16) -> list[torch.Tensor]:
    B, T = layout.doc_ids.shape
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, T, d, generator=g) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4, None), (None, 0.5), (4, 0.5)])
def test_flex_forward_equals_sdpa(window: int | None, softcap: float | None) -> None:
    q, k, v = _qkv(LAYOUT)
    kw = dict(window=window, softcap=softcap, scale=0.3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unoptimised
        flex = attend(q, k, v, LAYOUT, backend="flex", **kw)
        sdpa = attend(q, k, v, LAYOUT, backend="sdpa", **kw)
    real = LAYOUT.doc_ids != -1  # (B, T): padding outputs are never used
    torch.testing.assert_close(flex.transpose(1, 2)[real], sdpa.transpose(1, 2)[real])


def test_plain_causal_fast_path_equals_dense_mask() -> None:
    q, k, v = _qkv(LAYOUT)
    pos = torch.arange(20).expand(2, 20)
    dense = Layout(torch.zeros_like(pos), torch.zeros_like(pos), pos)  # not flagged plain
    fast = attend(q, k, v, None)
    torch.testing.assert_close(fast, attend(q, k, v, dense, backend="sdpa"))
    torch.testing.assert_close(fast, attend(q, k, v, Layout.causal(pos)))


def test_sdpa_backward_with_softcap_and_window() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(LAYOUT))
    attend(q, k, v, LAYOUT, window=4, softcap=0.5, backend="sdpa").sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (4, 0.5)])
def test_per_document_path_equals_dense_mask(window: int | None, softcap: float | None) -> None:
    """The per-document SDPA path gives the dense-mask outputs and gradients (GQA, windows
    shorter than the documents, plain documents and shared-prompt pairs in one row)."""
    g = torch.Generator().manual_seed(2)

    def n(lo: int) -> int:
        return int(torch.randint(lo, 9, (), generator=g))

    rows = [[(n(1), n(0) if k % 2 else 0, n(1) if k % 2 else 0) for k in range(4)] for _ in "ab"]
    rows[0][1] = (2, 3, 3)  # a pair of equal sequences: one batched call of two
    width = max(sum(map(sum, r)) for r in rows) + 2
    layout = _packed_layout(rows, width)
    assert isinstance(layout.mask(window, softcap, "sdpa"), DocMasks)
    q, k, v = _qkv(layout, hq=6, hkv=2, d=8)
    results = []
    for fn in (
        lambda q, k, v: attend(q, k, v, layout, window=window, softcap=softcap, scale=0.4),
        lambda q, k, v: masked_attention(q, k, v, layout.dense_mask(window), 0.4, softcap),
    ):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*qkv)
        out.backward(torch.cos(torch.arange(out.numel()).view_as(out).float()))
        results.append([out, *(t.grad for t in qkv)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unplannable_packed_layout_is_an_error_not_a_dense_fallback() -> None:
    """A document split over two spans has no per-document plan: "sdpa" raises LayoutError
    naming the row (no silent switch to a dense mask); "dense" asks for the mask explicitly."""
    doc = torch.tensor([[0, 0, 1, 1, 0]])
    layout = Layout(doc, torch.zeros_like(doc), torch.arange(5)[None])
    q, k, v = _qkv(layout)
    with pytest.raises(LayoutError, match="row 0: document 0 is split over two spans"):
        attend(q, k, v, layout, scale=0.25)
    assert isinstance(layout.mask(None, None, "dense"), torch.Tensor)
    want = masked_attention(q, k, v, layout.dense_mask(None), 0.25, None)
    torch.testing.assert_close(attend(q, k, v, layout, scale=0.25, backend="dense"), want)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2"])
def test_packed_row_equals_separate_sequences(family: str) -> None:
    """[p|c|r] with the tree layout gives the logits of [p|c] and [p|r] run on their own."""
    model = Transformer(tiny_args(family))
    model.init_weights(seed=0, std=0.1)
    g = torch.Generator().manual_seed(1)
    prompt, chosen, rejected = (torch.randint(0, 256, (n,), generator=g) for n in (6, 7, 9))
    other = torch.randint(0, 256, (5,), generator=g)  # a second document in the row
    ids = torch.cat([other, prompt, chosen, rejected, torch.zeros(3, dtype=torch.long)])[None]
    layout = _packed_layout([[(5, 0, 0), (6, 7, 9)]], width=ids.shape[1])
    with torch.no_grad():
        packed = model(ids, layout)[0]  # (T, V)
        pc = model(torch.cat([prompt, chosen])[None])[0]
        pr = model(torch.cat([prompt, rejected])[None])[0]
        alone = model(other[None])[0]
    torch.testing.assert_close(packed[:5], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[5:18], pc, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[18:27], pr[6:], atol=1e-5, rtol=0)
