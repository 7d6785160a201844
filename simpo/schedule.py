"""Learning-rate schedule: linear warmup, then cosine decay (the official SimPO recipes).

A pure function of the step, so a resumed run needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math

WARMUP_STYLES = ("linear", "hf")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps: ceil(ratio x total), as Hugging Face's Trainer."""
    return math.ceil(warmup_ratio * total_steps)


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_ratio: float,
    min_lr_ratio: float = 0.0,
    warmup_style: str = "linear",
) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`.

    Warmup "linear": peak * (step + 1) / warmup, so the first update already moves. "hf":
    peak * step / warmup, Hugging Face's `get_cosine_schedule_with_warmup` as the official
    SimPO runs use it (the first update has lr 0). Then cosine from peak down to
    peak * min_lr_ratio at the end of training (the same in both styles).
    """
    if warmup_style not in WARMUP_STYLES:
        raise ValueError(f"warmup_style {warmup_style!r}; expected one of {WARMUP_STYLES}")
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return peak_lr * (step + (warmup_style == "linear")) / warm
    progress = (step - warm) / max(1, total_steps - warm)  # in [0, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
