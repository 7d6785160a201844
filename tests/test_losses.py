"""Loss math with the arithmetic written out (docs/design.md §1), plus the dispatcher.

Notation: w/l = chosen/rejected; sp(x) = −log σ(x) = log(1 + e^−x); sp(−x) = sp(x) + x.
"""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from simpo.config import LossConfig
from simpo.logprobs import ScoreIndex, response_logprobs
from simpo.losses import (
    LOSSES,
    check_loss_config,
    compute_loss,
    cpo_loss,
    dpo_loss,
    get_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    rdpo_loss,
    simpo_loss,
)

LOG2 = 0.6931471805599453


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def cfg(**kw):
    return replace(LossConfig(), **kw)


def interleave(w, lo):
    """(P,), (P,) -> (2P,) with response 2p = chosen, 2p + 1 = rejected."""
    return torch.stack([w, lo], dim=1).flatten()


def random_pairs(p=6, seed=0):
    """Sums and counts of 2p responses (float64) in the kernel's interleaved layout."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(1, 40, (2 * p,), generator=g).double()
    return -count * torch.rand(2 * p, generator=g, dtype=torch.float64) * 3, count


# --- hand-computed values ---------------------------------------------------------------


@pytest.mark.parametrize(
    "beta, ratio, avg_w, avg_l, want",
    [
        # h = −1.0 − (−1.5) − 0.5 = 0             -> sp(0) = log 2
        (2.0, 0.5, -1.0, -1.5, LOG2),
        # h = −0.8 − (−1.2) − 0.1 = 0.3, βh = 0.75 -> log(1 + e^−0.75)
        (2.5, 0.1, -0.8, -1.2, 0.38687100611489994),
        # h = −0.5 − (−0.7) − 0.5 = −0.3, βh = −3  -> log(1 + e^3)
        (10.0, 0.5, -0.5, -0.7, 3.048587351573742),
    ],
)
def test_simpo_hand_computed(beta, ratio, avg_w, avg_l, want):
    losses, rw, rl = simpo_loss(t(avg_w), t(avg_l), beta, ratio)
    assert losses.item() == pytest.approx(want, abs=1e-12)
    assert (rw.item(), rl.item()) == pytest.approx((beta * avg_w, beta * avg_l))  # no γ


def test_simpo_label_smoothing_and_hinge_hand_computed():
    # β = 1, h = −1 − (−2.5) − 0.5 = 1, ε = 0.1: 0.9·sp(1) + 0.1·sp(−1) = sp(1) + 0.1
    losses, _, _ = simpo_loss(t(-1.0), t(-2.5), 1.0, 0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.31326168751822286 + 0.1, abs=1e-12)
    # hinge, β = 2: h = 0.25 -> 1 − 0.5 = 0.5; h = 1 -> 0; h = −1 -> 3
    losses, _, _ = simpo_loss(t(0.25, 1.0, -1.0), t(0.0, 0.0, 0.0), 2.0, 0.0, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.5, 0.0, 3.0])
    with pytest.raises(ValueError, match="loss_type"):
        simpo_loss(t(0.0), t(0.0), 2.0, 0.5, loss_type="ipo")


def test_dpo_and_cdpo_hand_computed():
    # h = (−10 + 11) − (−14 + 12) = 3, β = 0.1 -> βh = 0.3
    args = t(-10.0), t(-14.0), t(-11.0), t(-12.0)
    losses, rw, rl = dpo_loss(*args, beta=0.1)
    assert losses.item() == pytest.approx(0.5543552444685271, abs=1e-12)  # sp(0.3)
    assert (rw.item(), rl.item()) == pytest.approx((0.1, -0.2))  # β·(1), β·(−2)
    # cDPO ε = 0.25: 0.75·sp(0.3) + 0.25·sp(−0.3) = sp(0.3) + 0.25·0.3
    losses, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.25)
    assert losses.item() == pytest.approx(0.5543552444685271 + 0.075, abs=1e-12)


def test_relatives_hand_computed():
    # IPO, τ = 0.5 so 1/(2τ) = 1: h = (−1 + 1.5) − (−2 + 1.5) = 1 -> (1 − 1)² = 0;
    # with ref_l = −0.5: h = 0.5 − (−1.5) = 2 -> (2 − 1)² = 1
    losses, _, _ = ipo_loss(t(-1.0, -1.0), t(-2.0, -2.0), t(-1.5, -1.5), t(-1.5, -0.5), tau=0.5)
    assert losses.tolist() == pytest.approx([0.0, 1.0])
    # SLiC hinge, β = 0.5: h = 1 -> 1 − 0.5 = 0.5; h = 3 -> 0
    losses, _, _ = hinge_loss(t(-1.0, -1.0), t(-2.0, -4.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.5)
    assert losses.tolist() == pytest.approx([0.5, 0.0])
    # R-DPO, β = 0.1, α = 0.01, h = 3, |y_w| = 50, |y_l| = 20: z = 0.3 + 0.01·30 = 0.6 -> sp(0.6)
    dpo_args = t(-10.0), t(-14.0), t(-11.0), t(-12.0)
    losses, _, _ = rdpo_loss(*dpo_args, t(50.0), t(20.0), beta=0.1, alpha=0.01)
    assert losses.item() == pytest.approx(0.4374879504858856, abs=1e-12)
    # ORPO: avg_w = log 0.5 (odds 1), avg_l = log 0.2 (odds 1/4): log odds ratio = log 4,
    # L_OR = −log σ(log 4) = −log(4/5) = log 1.25; NLL = log 2; λ = 0.1
    losses, _, _ = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), lambda_=0.1)
    assert losses.item() == pytest.approx(LOG2 + 0.1 * math.log(1.25), abs=1e-12)
    # CPO, β = 0.1: z = 0.1·(−10 + 14) = 0.4 -> sp(0.4); NLL = 10/5 = 2
    losses, rw, _ = cpo_loss(t(-10.0), t(-14.0), t(5.0), beta=0.1)
    assert losses.item() == pytest.approx(0.5130152523999526 + 2.0, abs=1e-12)
    assert rw.item() == pytest.approx(-1.0)


# --- each loss against its paper formula, written independently -----------------------


def nlogsig(x):
    return torch.log1p(torch.exp(-x))  # −log σ(x), fine for the moderate x used here


def test_simpo_equals_paper_form():
    """−log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ) with γ = β·(γ/β)."""
    s, n = random_pairs()
    beta, ratio = 2.5, 0.4
    losses, _ = compute_loss(cfg(beta=beta, gamma_beta_ratio=ratio), s, n)
    gamma = beta * ratio
    paper = nlogsig(beta / n[0::2] * s[0::2] - beta / n[1::2] * s[1::2] - gamma)
    torch.testing.assert_close(losses, paper, rtol=1e-12, atol=1e-12)


def test_every_loss_equals_its_formula():
    s, n = random_pairs()
    ref = s * 0.9 - 0.3  # (R,) a made-up reference policy
    sw, sl, nw, nl, rw, rl = s[0::2], s[1::2], n[0::2], n[1::2], ref[0::2], ref[1::2]
    aw, al = sw / nw, sl / nl
    beta, eps, alpha, lam = 0.3, 0.1, 0.02, 0.2
    h = (sw - rw) - (sl - rl)
    h_avg = (aw - rw / nw) - (al - rl / nl)
    logodds = lambda a: torch.log(torch.exp(a) / (1 - torch.exp(a)))  # noqa: E731
    want = {
        "dpo": (1 - eps) * nlogsig(beta * h) + eps * nlogsig(-beta * h),
        "ipo": (h_avg - 1 / (2 * beta)) ** 2,
        "hinge": torch.clamp(1 - beta * h, min=0),
        "rdpo": (1 - eps) * nlogsig(beta * h + alpha * (nw - nl))
        + eps * nlogsig(-beta * h - alpha * (nw - nl)),
        "orpo": -aw + lam * nlogsig(logodds(aw) - logodds(al)),
        "cpo": (1 - eps) * nlogsig(beta * (sw - sl)) + eps * nlogsig(-beta * (sw - sl)) - aw,
        "sft": -aw,
    }
    assert set(want) | {"simpo"} == set(LOSSES)
    for name, formula in want.items():
        c = cfg(name=name, beta=beta, label_smoothing=eps, rdpo_alpha=alpha, orpo_lambda=lam)
        losses, _ = compute_loss(c, s, n, ref)
        torch.testing.assert_close(losses, formula, rtol=1e-10, atol=1e-12, msg=name)


# --- limits and properties ---------------------------------------------------------------


def test_sigmoid_limits_and_stability():
    beta = 2.0
    h = t(-1e4, -100.0, -101.0, 0.0, 100.0, 1e4)
    losses, _, _ = simpo_loss(h, torch.zeros_like(h), beta, 0.0)
    assert torch.isfinite(losses).all()
    assert losses[-1] == 0 and losses[-2] < 1e-80  # → 0 as the margin → +∞
    assert losses[0].item() == pytest.approx(2e4)  # → −β·h as the margin → −∞
    assert (losses[2] - losses[1]).item() == pytest.approx(beta)  # slope β there


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_finite_at_extremes(name):
    s = t(-1e4, -1e-3, -1e-3, -1e4, -5e3, -5e3)  # margins of about ±1e4 and 0
    n = t(1.0, 1.0, 1.0, 1.0, 3.0, 7.0)
    s.requires_grad_()
    c = cfg(name=name, beta=0.1 if name != "simpo" else 2.0, rdpo_alpha=0.01)
    losses, metrics = compute_loss(c, s, n, ref_sum=torch.zeros_like(s))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(s.grad).all()
    assert all(torch.isfinite(m).all() for m in metrics.values())


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_swapping_chosen_and_rejected(eps):
    """L_ε(w, l) = L_{1−ε}(l, w) (γ = 0), so with ε = 0: e^−L(w,l) + e^−L(l,w) = 1;
    rewards swap."""
    w, lo = t(-0.7, -2.0, -1.1), t(-1.3, -0.4, -1.1)
    a, rw, rl = simpo_loss(w, lo, 3.0, 0.0, label_smoothing=eps)
    b, rw2, rl2 = simpo_loss(lo, w, 3.0, 0.0, label_smoothing=1 - eps)
    torch.testing.assert_close(a, b)
    assert torch.equal(rw, rl2) and torch.equal(rl, rw2)
    d, _, _ = dpo_loss(w, lo, t(0, 0, 0), t(0, 0, 0), 0.5, label_smoothing=eps)
    d2, _, _ = dpo_loss(lo, w, t(0, 0, 0), t(0, 0, 0), 0.5, label_smoothing=1 - eps)
    torch.testing.assert_close(d, d2)
    if eps == 0:
        swapped, _, _ = simpo_loss(lo, w, 3.0, 0.0)
        torch.testing.assert_close(torch.exp(-a) + torch.exp(-swapped), torch.ones(3).double())


def test_simpo_invariant_to_repeating_tokens_dpo_is_not():
    """Repeating a response's tokens doubles its sum and its count: SimPO's avg is unchanged."""
    s, n = random_pairs()
    simpo_once, m_once = compute_loss(cfg(), s, n)
    simpo_twice, m_twice = compute_loss(cfg(), 2 * s, 2 * n)
    torch.testing.assert_close(simpo_once, simpo_twice)
    torch.testing.assert_close(m_once["rewards/margins"], m_twice["rewards/margins"])
    dpo_once, _ = compute_loss(cfg(name="dpo", beta=0.1), s, n, s * 0.5)
    dpo_twice, _ = compute_loss(cfg(name="dpo", beta=0.1), 2 * s, 2 * n, s)
    assert not torch.allclose(dpo_once, dpo_twice)


def test_dpo_with_zero_reference_is_reference_free():
    s, n = random_pairs()
    zeros = torch.zeros(3).double()
    losses, _, _ = dpo_loss(s[0:6:2], s[1:6:2], zeros, zeros, beta=0.1)
    torch.testing.assert_close(losses, nlogsig(0.1 * (s[0:6:2] - s[1:6:2])))
    # = CPO's preference term (CPO minus its NLL)
    cpo, _, _ = cpo_loss(s[0:6:2], s[1:6:2], n[0:6:2], beta=0.1)
    torch.testing.assert_close(losses, cpo + s[0:6:2] / n[0:6:2])


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_gradient_closed_form(eps):
    """d/dh of −(1−ε)·log σ(βh) − ε·log σ(−βh) = −β·[(1−ε)·σ(−βh) − ε·σ(βh)];
    with ε = 0 that is −β·σ(−βh)."""
    beta, ratio = 2.0, 0.5
    h = t(-3.0, -0.2, 0.0, 0.4, 5.0)
    chosen = (h + ratio).requires_grad_()  # h = avg_w − 0 − γ/β
    losses, _, _ = simpo_loss(chosen, torch.zeros_like(h), beta, ratio, label_smoothing=eps)
    (grad,) = torch.autograd.grad(losses.sum(), chosen)
    want = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
    torch.testing.assert_close(grad, want)


def test_gradcheck_every_loss():
    g = torch.Generator().manual_seed(5)

    def x():  # (3,) float64 log-probs, away from the hinge kinks
        return (-torch.rand(3, generator=g, dtype=torch.float64) * 3).requires_grad_()

    n = t(4.0, 9.0, 2.0)
    cases = {
        "simpo": (lambda a, b: simpo_loss(a, b, 2.0, 0.5, 0.1)[0], 2),
        "simpo_hinge": (lambda a, b: simpo_loss(a, b, 0.05, 0.5, loss_type="hinge")[0], 2),
        "dpo": (lambda a, b, c, d: dpo_loss(a, b, c, d, 0.1, 0.1)[0], 4),
        "ipo": (lambda a, b, c, d: ipo_loss(a, b, c, d, 0.5)[0], 4),
        "hinge": (lambda a, b, c, d: hinge_loss(a, b, c, d, 0.05)[0], 4),
        "rdpo": (lambda a, b, c, d: rdpo_loss(a, b, c, d, n, n.flip(0), 0.1, 0.02)[0], 4),
        "orpo": (lambda a, b: orpo_loss(a, b, 0.1)[0], 2),
        "cpo": (lambda a, b: cpo_loss(a, b, n, 0.1)[0], 2),
    }
    for name, (fn, arity) in cases.items():
        assert torch.autograd.gradcheck(fn, tuple(x() for _ in range(arity))), name


# --- dispatcher, metrics, guardrails -------------------------------------------------------


def test_compute_loss_interleaving_and_metrics():
    # responses: pair 0 = (sum −4 over 2, sum −9 over 3), pair 1 = (−1 over 1, −8 over 4)
    s, n = t(-4.0, -9.0, -1.0, -8.0), t(2.0, 3.0, 1.0, 4.0)
    losses, m = compute_loss(cfg(beta=2.0, gamma_beta_ratio=0.5), s, n)
    # avg: w = (−2, −1), l = (−3, −2); h = (1, 1) − 0.5 = 0.5; βh = 1 -> sp(1)
    torch.testing.assert_close(losses, t(0.31326168751822286, 0.31326168751822286))
    assert set(m) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "rewards/margins", "logps/chosen", "logps/rejected",
    }  # fmt: skip
    assert m["logps/chosen"].tolist() == [-2.0, -1.0]  # avg: what SimPO sees
    assert m["rewards/rejected"].tolist() == [-6.0, -4.0]
    assert m["rewards/margins"].tolist() == [2.0, 2.0]
    assert m["rewards/accuracies"].tolist() == [1.0, 1.0]
    _, m = compute_loss(cfg(name="dpo", beta=0.1), s, n, torch.zeros(4).double())
    assert m["logps/chosen"].tolist() == [-4.0, -1.0]  # sums: what DPO sees


def test_dpo_first_step_tie_is_not_accurate():
    """Policy == reference (DPO's first step): every reward is exactly 0, a tie, and the
    accuracy is 0.0 (strict `>`, as TRL's and the official trainer's `chosen > rejected`)."""
    s, n = random_pairs()
    for name in ("dpo", "ipo", "hinge", "rdpo"):
        _, m = compute_loss(cfg(name=name, beta=0.1), s, n, s.clone(), n)
        assert m["rewards/margins"].tolist() == [0.0] * 6, name
        assert m["rewards/accuracies"].tolist() == [0.0] * 6, name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_identical_chosen_and_rejected_is_not_accurate(name):
    """A pair whose two responses score alike ties under every loss: accuracy 0.0, not 1.0."""
    s, n = random_pairs()
    s, n = s[0::2].repeat_interleave(2), n[0::2].repeat_interleave(2)  # rejected := chosen
    ref = (s - 1.0) if get_loss(name).needs_reference else None
    _, m = compute_loss(cfg(name=name, beta=2.0), s, n, ref)
    assert m["rewards/chosen"].tolist() == m["rewards/rejected"].tolist()
    assert m["rewards/accuracies"].tolist() == [0.0] * 6


def test_compute_loss_sft_and_sft_weight():
    s, n = t(-4.0, -9.0, -1.0, -8.0), t(2.0, 3.0, 1.0, 4.0)
    nll = t(2.0, 1.0)  # −sum_w/|y_w| per pair, not a global token mean
    losses, m = compute_loss(cfg(name="sft"), s, n)
    torch.testing.assert_close(losses, nll)
    torch.testing.assert_close(m["nll_loss"], nll)
    base, m0 = compute_loss(cfg(), s, n)
    with_sft, m1 = compute_loss(cfg(sft_weight=0.5), s, n)
    torch.testing.assert_close(with_sft - base, 0.5 * nll)
    assert "nll_loss" not in m0 and "nll_loss" in m1
    assert "nll_loss" in compute_loss(cfg(name="cpo", beta=0.1), s, n)[1]


def test_compute_loss_accepts_any_config_object_and_grads_flow():
    s, n = random_pairs()
    s.requires_grad_()
    duck = SimpleNamespace(
        name="simpo", beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0,
        loss_type="sigmoid", sft_weight=0.0,
    )  # fmt: skip
    losses, metrics = compute_loss(duck, s, n)
    losses.sum().backward()
    assert s.grad is not None and not any(v.requires_grad for v in metrics.values())


def test_compute_loss_errors():
    s, n = t(-4.0, -9.0), t(2.0, 3.0)
    with pytest.raises(ValueError, match="needs reference"):
        compute_loss(cfg(name="dpo"), s, n)
    with pytest.raises(ValueError, match="count 0"):
        compute_loss(cfg(), s, t(2.0, 0.0))
    with pytest.raises(ValueError, match=r"\(2P,\)"):
        compute_loss(cfg(), t(-1.0, -2.0, -3.0), t(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="Did you mean 'simpo'") as err:
        get_loss("simppo")
    assert "dpo, ipo, hinge, rdpo, orpo, cpo, sft" in str(err.value)


def test_ipo_uses_ref_count_when_given():
    s, n = t(-4.0, -9.0), t(2.0, 3.0)
    ref = t(-2.0, -3.0)
    a, _ = compute_loss(cfg(name="ipo", beta=0.5), s, n, ref)  # ref avg = (−1, −1)
    b, _ = compute_loss(cfg(name="ipo", beta=0.5), s, n, ref, ref_count=t(1.0, 1.0))  # (−2, −3)
    # a: h = (−2 + 1) − (−3 + 1) = 1 -> 0;  b: h = (−2 + 2) − (−3 + 3) = 0 -> (0 − 1)² = 1
    assert (a.item(), b.item()) == (0.0, 1.0)


@pytest.mark.parametrize(
    "overrides, has_ref, expect",
    [
        ({}, False, None),
        ({"name": "dpo", "beta": 0.1}, True, None),
        ({"beta": 0.1}, False, "looks like a DPO"),
        ({"gamma_beta_ratio": 5.0}, False, "absolute γ"),
        ({"sft_weight": 1.0}, False, "SFT term on"),
        ({"name": "cpo", "beta": 0.1, "sft_weight": 1.0}, False, "already has"),
        ({"name": "dpo", "beta": 0.1}, False, "needs a reference"),
        ({"name": "dpo"}, True, "large for dpo"),
        ({"label_smoothing": 0.5}, False, "outside [0, 0.5)"),
        ({"label_smoothing": -0.1}, False, "outside [0, 0.5)"),
        ({"name": "ipo", "beta": 0.1, "label_smoothing": 0.1}, True, "ignored by ipo"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, False, "ignored by simpo"),
        ({"name": "rdpo", "beta": 0.1}, True, "plain DPO"),
        ({"name": "dpo", "beta": 0.1, "loss_type": "hinge"}, True, "loss.name='hinge'"),
    ],
)
def test_guardrail_warnings(overrides, has_ref, expect):
    warnings = check_loss_config(cfg(**overrides), has_reference=has_ref)
    if expect is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expect in warnings[0], warnings


def test_guardrail_errors():
    with pytest.raises(ValueError, match="unknown loss.name"):
        check_loss_config(cfg(name="simPO"), has_reference=False)
    with pytest.raises(ValueError, match="loss_type"):
        check_loss_config(cfg(loss_type="ipo"), has_reference=False)


# --- end to end with the kernel -------------------------------------------------------------


def test_simpo_from_kernel_equals_padded_full_logits():
    """A toy per-position model: SimPO from the kernel's (sum, count) on flattened hidden states
    equals the official trainer's path (full logits of a right-padded [2P, T] batch,
    log_softmax, gather with a one-token shift, masked average) in value and gradient."""
    g = torch.Generator().manual_seed(7)
    vocab, dim, pad = 50, 8, -100
    prompt = [[5, 6, 7], [8, 9]]
    answers = [[[1, 2, 3, 4], [10, 11]], [[12], [13, 14, 15, 16, 17]]]  # pair -> (chosen, rejected)
    rows = [(p, a) for p, pair in zip(prompt, answers, strict=True) for a in pair]  # 2P rows
    length = max(len(p) + len(a) for p, a in rows)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(tokens, pad)  # loss mask: response tokens only
    for b, (p, a) in enumerate(rows):
        tokens[b, : len(p) + len(a)] = torch.tensor(p + a)
        labels[b, len(p) : len(p) + len(a)] = torch.tensor(a)
    emb = torch.randn(vocab, dim, generator=g, requires_grad=True)
    head = torch.randn(vocab, dim, generator=g, requires_grad=True)
    hidden = torch.tanh(emb[tokens])  # (2P, T, D)
    loss_cfg = cfg(beta=2.0, gamma_beta_ratio=0.5)

    # official path: logits[:, :-1] predict labels[:, 1:]
    logp = torch.log_softmax(hidden @ head.t(), -1)[:, :-1]  # (2P, T-1, V)
    target, mask = labels[:, 1:], labels[:, 1:] != pad
    per_tok = logp.gather(2, target.clamp(min=0)[..., None]).squeeze(-1)  # (2P, T-1)
    avg = (per_tok * mask).sum(-1) / mask.sum(-1)  # (2P,)
    want = simpo_loss(avg[0::2], avg[1::2], 2.0, 0.5)[0].mean()

    # kernel path: hidden row b*T + j − 1 predicts token (b, j)
    b, j = (labels != pad).nonzero(as_tuple=True)
    index = ScoreIndex(b * length + j - 1, tokens[b, j], b, len(rows))
    sums, counts = response_logprobs(hidden.reshape(-1, dim), head, *index, chunk_size=3)
    got = compute_loss(loss_cfg, sums, counts)[0].mean()

    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (emb, head), retain_graph=True)
    for a, c in zip(got_grads, torch.autograd.grad(want, (emb, head)), strict=True):
        torch.testing.assert_close(a, c)
