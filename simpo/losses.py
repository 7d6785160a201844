"""Preference losses on per-response log-prob sums and counts: SimPO, DPO and relatives.

Each loss is a small pure function over per-pair tensors (P,) that returns
`(losses (P,), chosen_rewards (P,), rejected_rewards (P,))`, rewards detached. Notation:
`sum(y) = Σ_t log π(y_t | x, y_<t)`, `|y|` its token count, `avg(y) = sum(y) / |y|`;
`ε` is label smoothing. `compute_loss` picks one by `cfg.name` from the interleaved
per-response tensors that `simpo.logprobs.response_logprobs` returns (R = 2P; response 2p is
pair p's chosen y_w, 2p + 1 its rejected y_l): length normalisation happens there, once, for
the losses whose `LossSpec.length_normalized` is set. The training loop sums the per-pair
losses and divides by the number of pairs of the whole step (all ranks, all micro-batches).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Triple = tuple[Tensor, Tensor, Tensor]  # losses, chosen_rewards, rejected_rewards: each (P,)


def _sigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z); `logsigmoid` is finite for any finite z."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def simpo_loss(
    chosen_avg: Tensor,
    rejected_avg: Tensor,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> Triple:
    """SimPO (Meng, Xia & Chen 2024, arXiv:2405.14734), reference-free and length-normalised:

        L = −log σ(β/|y_w|·log π(y_w|x) − β/|y_l|·log π(y_l|x) − γ) = −log σ(β·h),
        h = avg(y_w) − avg(y_l) − γ/β

    γ is passed as `gamma_beta_ratio` = γ/β (the official code's convention; TRL's
    `simpo_gamma` is the absolute γ = β·γ/β). With ε: −(1−ε)·log σ(β·h) − ε·log σ(−β·h);
    `loss_type="hinge"`: max(0, 1 − β·h). Rewards: β·avg(y_w), β·avg(y_l) (without γ).
    """
    h = chosen_avg - rejected_avg - gamma_beta_ratio  # (P,)
    if loss_type == "sigmoid":
        losses = _sigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def dpo_loss(
    policy_chosen_sum: Tensor,
    policy_rejected_sum: Tensor,
    ref_chosen_sum: Tensor,
    ref_rejected_sum: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Triple:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) on sequence log-probs:

        L = −log σ(β·h),  h = (sum_θ(y_w) − sum_ref(y_w)) − (sum_θ(y_l) − sum_ref(y_l))

    ε > 0 is conservative DPO (cDPO, Mitchell 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    Rewards: β·(sum_θ − sum_ref) per response.
    """
    chosen = policy_chosen_sum - ref_chosen_sum  # (P,) log π_θ/π_ref of y_w
    rejected = policy_rejected_sum - ref_rejected_sum
    losses = _sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(
    policy_chosen_avg: Tensor,
    policy_rejected_avg: Tensor,
    ref_chosen_avg: Tensor,
    ref_rejected_avg: Tensor,
    tau: float,
) -> Triple:
    """IPO (Azar et al. 2023, arXiv:2310.12036): L = (h − 1/(2τ))², h the DPO log-ratio margin.

    Here h is taken on length-averaged log-probs, as TRL does (the paper writes sequence
    log-probs); TRL calls τ `beta`, and so does `cfg.beta`. Rewards: τ·(avg_θ − avg_ref).
    """
    chosen = policy_chosen_avg - ref_chosen_avg  # (P,)
    rejected = policy_rejected_avg - ref_rejected_avg
    losses = (chosen - rejected - 1 / (2 * tau)) ** 2
    return losses, tau * chosen.detach(), tau * rejected.detach()


def hinge_loss(
    policy_chosen_sum: Tensor,
    policy_rejected_sum: Tensor,
    ref_chosen_sum: Tensor,
    ref_rejected_sum: Tensor,
    beta: float,
) -> Triple:
    """SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425) on reference-normalised
    log-probs, the "hinge-norm" form of RSO (Liu et al. 2023, arXiv:2309.06657) and TRL:

        L = max(0, 1 − β·h) = β·max(0, δ − h),  δ = 1/β,  h as in `dpo_loss`

    With zero reference log-probs this is SLiC-HF's max(0, δ − log π(y_w|x) + log π(y_l|x)).
    Rewards: β·(sum_θ − sum_ref).
    """
    chosen = policy_chosen_sum - ref_chosen_sum  # (P,)
    rejected = policy_rejected_sum - ref_rejected_sum
    losses = torch.relu(1 - beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def rdpo_loss(
    policy_chosen_sum: Tensor,
    policy_rejected_sum: Tensor,
    ref_chosen_sum: Tensor,
    ref_rejected_sum: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Triple:
    """R-DPO, length-regularised DPO (Park, Rafailov, Ermon & Finn 2024, "Disentangling Length
    from Quality in Direct Preference Optimization", arXiv:2403.19159):

        L = −log σ(β·h + α·(|y_w| − |y_l|)),  h as in `dpo_loss`, |y| in tokens

    The length penalty α|y| in the RLHF objective makes the implicit reward
    β·log π_θ/π_ref + α|y|, so a longer chosen answer already earns α per extra token and the
    policy gains less by growing it. ε as in cDPO. Rewards: β·(sum_θ − sum_ref) (no α term).
    """
    chosen = policy_chosen_sum - ref_chosen_sum  # (P,)
    rejected = policy_rejected_sum - ref_rejected_sum
    z = beta * (chosen - rejected) + alpha * (chosen_len - rejected_len)
    return _sigmoid_loss(z, label_smoothing), beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    near_zero = x > -0.6931471805599453  # x > −log 2: expm1 keeps 1 − e^x accurate
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, lambda_: float = 0.1) -> Triple:
    """ORPO (Hong, Lee & Thorne 2024, arXiv:2403.07691), reference-free:

        L = L_SFT + λ·L_OR,  L_SFT = −avg(y_w),
        L_OR = −log σ(log odds(y_w) − log odds(y_l)),  odds(y) = P(y)/(1 − P(y)), P = exp(avg)

    P is the length-normalised likelihood, as in the paper. λ = 0.1 (TRL calls it `beta`).
    Rewards: λ·avg (as TRL logs them).
    """
    # avg = 0 exactly (every token certain) would make log odds infinite; keep it just below 0
    tiny = torch.finfo(chosen_avg.dtype).tiny
    w, lo = chosen_avg.clamp(max=-tiny), rejected_avg.clamp(max=-tiny)  # (P,)
    log_odds = (w - _log1mexp(w)) - (lo - _log1mexp(lo))
    losses = -chosen_avg - lambda_ * F.logsigmoid(log_odds)
    return losses, lambda_ * chosen_avg.detach(), lambda_ * rejected_avg.detach()


def cpo_loss(
    policy_chosen_sum: Tensor,
    policy_rejected_sum: Tensor,
    chosen_len: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Triple:
    """CPO (Xu et al. 2024, arXiv:2401.08417), reference-free, on sequence log-probs:

        L = −log σ(β·sum(y_w) − β·sum(y_l)) + L_NLL,  L_NLL = −sum(y_w)/|y_w|,  β = 0.1

    The paper writes L_NLL = −log π(y_w|x); like its code and TRL (`cpo_alpha` = 1) we take
    the token mean. ε as in cDPO. Rewards: β·sum.
    """
    losses = _sigmoid_loss(beta * (policy_chosen_sum - policy_rejected_sum), label_smoothing)
    losses = losses - policy_chosen_sum / chosen_len
    return losses, beta * policy_chosen_sum.detach(), beta * policy_rejected_sum.detach()


def sft_loss(chosen_avg: Tensor, rejected_avg: Tensor) -> Triple:
    """Supervised fine-tuning on the chosen answers: L = −avg(y_w), the token-mean NLL of each
    pair (the loop then averages pairs, so each pair weighs the same whatever its length;
    TRL and the official SimPO code take one token mean over all chosen tokens of the batch).
    Rewards: avg(y_w), avg(y_l) unscaled, so accuracy and margin stay meaningful.
    """
    return -chosen_avg, chosen_avg.detach(), rejected_avg.detach()


class Pairs(NamedTuple):
    """Per-pair inputs of a loss; log-probs are avg or sum as its `LossSpec` says."""

    chosen: Tensor  # (P,) policy log-prob of y_w
    rejected: Tensor  # (P,) policy log-prob of y_l
    ref_chosen: Tensor | None  # (P,) reference log-prob of y_w (None when not needed)
    ref_rejected: Tensor | None  # (P,)
    chosen_len: Tensor  # (P,) |y_w| in tokens
    rejected_len: Tensor  # (P,) |y_l|


@dataclass(frozen=True)
class LossSpec:
    """What the training loop needs to know about a loss, so it has no per-loss branches."""

    name: str
    needs_reference: bool  # needs π_ref log-probs (a reference model, live or precomputed)
    length_normalized: bool  # works on avg(y) = sum(y) / |y| rather than on sum(y)
    has_nll: bool  # the loss itself contains the NLL of the chosen answer
    fn: Callable[[Any, Pairs], Triple]  # (cfg, pairs) -> (losses, chosen_rw, rejected_rw)


# fmt: off
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in [
    #        name     needs_reference  length_normalized  has_nll
    LossSpec("simpo", False,           True,              False, lambda c, p: simpo_loss(
        p.chosen, p.rejected, c.beta, c.gamma_beta_ratio, c.label_smoothing, c.loss_type)),
    LossSpec("dpo",   True,            False,             False, lambda c, p: dpo_loss(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, c.beta, c.label_smoothing)),
    LossSpec("ipo",   True,            True,              False, lambda c, p: ipo_loss(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, c.beta)),
    LossSpec("hinge", True,            False,             False, lambda c, p: hinge_loss(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, c.beta)),
    LossSpec("rdpo",  True,            False,             False, lambda c, p: rdpo_loss(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.chosen_len, p.rejected_len,
        c.beta, c.rdpo_alpha, c.label_smoothing)),
    LossSpec("orpo",  False,           True,              True,  lambda c, p: orpo_loss(
        p.chosen, p.rejected, c.orpo_lambda)),
    LossSpec("cpo",   False,           False,             True,  lambda c, p: cpo_loss(
        p.chosen, p.rejected, p.chosen_len, c.beta, c.label_smoothing)),
    LossSpec("sft",   False,           True,              True,  lambda c, p: sft_loss(
        p.chosen, p.rejected)),
]}
# fmt: on
LOSS_TYPES = ("sigmoid", "hinge")  # SimPO's shape (loss.loss_type)
_SMOOTHED = {"simpo", "dpo", "rdpo", "cpo"}  # losses that use label_smoothing (simpo: sigmoid)
_DPO_BETA = {"dpo", "ipo", "hinge", "rdpo", "cpo"}  # β of the DPO family (papers: 0.01 … 0.5)


def get_loss(name: str) -> LossSpec:
    """The LossSpec registered under `name`; an unknown name lists the valid ones."""
    if name in LOSSES:
        return LOSSES[name]
    close = difflib.get_close_matches(name, list(LOSSES), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown loss.name '{name}'; valid: {', '.join(LOSSES)}.{hint}")


def compute_loss(
    cfg: Any,
    policy_sum: Tensor,
    policy_count: Tensor,
    ref_sum: Tensor | None = None,
    ref_count: Tensor | None = None,
    *,
    check_counts: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses and metrics from interleaved per-response log-probs.

    Args:
        cfg: a LossConfig (or any object with its attributes).
        policy_sum, policy_count: (R,) with R = 2P; response 2p is pair p's chosen answer.
        ref_sum, ref_count: the same from the reference policy (losses with needs_reference);
            ref_count defaults to policy_count.
        check_counts: raise if a response has no scored token (its average would be 0/0).
            Reading the check's answer is a host synchronisation on a GPU; the training step
            passes False because `simpo.packing` already rejects pairs with an empty part.

    Returns:
        losses (P,), plus `cfg.sft_weight` x NLL(y_w) when that is non-zero, and detached
        metrics, each (P,): rewards/chosen, rewards/rejected, rewards/accuracies (chosen >
        rejected), rewards/margins, logps/chosen, logps/rejected (avg for length-normalised
        losses, sum otherwise: what the loss sees) and nll_loss (token-mean NLL of y_w) when
        the loss or sft_weight uses it.
    """
    spec = get_loss(cfg.name)
    if policy_sum.dim() != 1 or policy_sum.shape[0] % 2:
        raise ValueError(f"expected (2P,) interleaved responses, got {tuple(policy_sum.shape)}")
    if spec.needs_reference and ref_sum is None:
        raise ValueError(f"loss '{spec.name}' needs reference log-probs (ref_sum)")
    if check_counts and bool((policy_count <= 0).any()):  # an empty response has no avg
        raise ValueError("a response has no scored tokens (count 0); drop such pairs upstream")
    count = policy_count.to(policy_sum.dtype)  # (R,)

    def per_pair(x: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:  # (R,) -> (P,), (P,)
        x = x / n if spec.length_normalized else x
        return x[0::2], x[1::2]

    chosen, rejected = per_pair(policy_sum, count)
    ref_chosen = ref_rejected = None
    if spec.needs_reference:
        n_ref = count if ref_count is None else ref_count.to(ref_sum.dtype)
        ref_chosen, ref_rejected = per_pair(ref_sum, n_ref)
    pairs = Pairs(chosen, rejected, ref_chosen, ref_rejected, count[0::2], count[1::2])
    losses, chosen_rewards, rejected_rewards = spec.fn(cfg, pairs)

    nll = -policy_sum[0::2] / count[0::2]  # (P,) token-mean NLL of each chosen answer
    if cfg.sft_weight:
        losses = losses + cfg.sft_weight * nll
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    if spec.has_nll or cfg.sft_weight:
        metrics["nll_loss"] = nll.detach()
    return losses, metrics


def check_loss_config(cfg: Any, has_reference: bool) -> list[str]:
    """Warnings for settings that run but look like a mistake (the caller prints them once).

    Raises ValueError for settings that cannot run (unknown name or loss_type).
    """
    spec = get_loss(cfg.name)
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss.loss_type must be 'sigmoid' or 'hinge', got {cfg.loss_type!r}")
    out = []
    if spec.name == "simpo" and cfg.beta < 0.5:
        out.append(
            f"loss.beta={cfg.beta} is small for SimPO and looks like a DPO β; the official "
            "SimPO recipes use β = 2.0 … 10 (its rewards are per-token averages, not sums)"
        )
    if spec.name == "simpo" and cfg.gamma_beta_ratio > 3:
        out.append(
            f"loss.gamma_beta_ratio={cfg.gamma_beta_ratio} looks like an absolute γ (TRL's "
            "simpo_gamma); this key is γ/β, the official recipes use 0.1 … 0.8 — for an "
            f"absolute γ set gamma_beta_ratio = γ/β = γ/{cfg.beta}"
        )
    if spec.name in _DPO_BETA and cfg.beta > 1:
        out.append(
            f"loss.beta={cfg.beta} is large for {spec.name} (a SimPO-sized β?); DPO-family "
            "papers use β = 0.01 … 0.5 (CPO: 0.1)"
        )
    if cfg.sft_weight > 0:
        already = f" on top of the NLL that {spec.name} already has" if spec.has_nll else ""
        out.append(
            f"SFT term on: each pair's loss adds loss.sft_weight={cfg.sft_weight} x the "
            f"token-mean NLL of its chosen answer{already} (set sft_weight = 0 to turn it off)"
        )
    if spec.needs_reference and not has_reference:
        out.append(f"loss.name='{spec.name}' needs a reference policy but none is configured")
    if not 0 <= cfg.label_smoothing < 0.5:
        out.append(
            f"loss.label_smoothing={cfg.label_smoothing} is outside [0, 0.5); from ε = 0.5 on "
            "the loss no longer prefers the chosen answers"
        )
    smoothed = spec.name in _SMOOTHED and not (spec.name == "simpo" and cfg.loss_type == "hinge")
    if cfg.label_smoothing and not smoothed:
        out.append(f"loss.label_smoothing={cfg.label_smoothing} is ignored by {spec.name}")
    if spec.name != "simpo" and cfg.loss_type != "sigmoid":
        out.append(
            f"loss.loss_type='{cfg.loss_type}' only shapes SimPO and is ignored by {spec.name} "
            "(DPO's hinge form is loss.name='hinge')"
        )
    if spec.name == "rdpo" and cfg.rdpo_alpha == 0:
        out.append("loss.rdpo_alpha=0: R-DPO without its length term is plain DPO")
    return out
