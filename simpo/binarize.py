"""Scored samples -> preference pairs: chosen = highest reward, rejected = lowest.

As the official SimPO pipeline (on_policy_data_gen/post_process.py, reward_model_annotate.py):
prompts whose samples are all identical are dropped (before scoring), and the pair of a prompt
is its argmax and argmin (first on ties). A prompt whose best and worst rewards tie gives no
pair. Every prompt that gives no pair is counted under its reason, never scored 0:
  prompt_too_long      prompt + max_new_tokens exceeds the policy's context (not sampled)
  identical_responses  all K samples are the same text
  reward_error         the reward function raised or returned NaN / a non-number, or the
                       reward model could not read the conversation
  reward_context       a conversation is longer than the reward model's context
  reward_tie           highest reward == lowest reward
"""

from __future__ import annotations

from collections import Counter
from typing import Any

REASONS = (
    "prompt_too_long", "identical_responses", "reward_error", "reward_context", "reward_tie",
)  # fmt: skip


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def binarize(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(samples, pairs, summary) of scored rows (any order; sorted by `index` here).

    samples: one row per sampled prompt (prompt, responses, rewards, the chosen / rejected
    sample numbers or a `skipped` reason). pairs: UltraFeedback schema (`prompt`, `chosen` and
    `rejected` as [user, assistant] messages, `score_chosen`, `score_rejected`).
    """
    samples, pairs, skipped = [], [], Counter()
    chosen_scores, rejected_scores, tokens, capped = [], [], [], 0
    for row in sorted(rows, key=lambda r: r["index"]):
        reason = row.get("skipped")
        if reason is None:
            rewards = row["rewards"]
            hi = max(range(len(rewards)), key=lambda k: (rewards[k], -k))  # first maximum
            lo = min(range(len(rewards)), key=lambda k: (rewards[k], k))  # first minimum
            if rewards[hi] == rewards[lo]:
                reason = "reward_tie"
        if "responses" in row:
            tokens += row["num_tokens"]
            capped += sum(not s for s in row["stopped"])
            picked = {"skipped": reason} if reason else {"chosen": hi, "rejected": lo}
            samples.append(row | picked)
        if reason:
            skipped[reason] += 1
            continue
        extra = {"prompt_id": row["prompt_id"]} if "prompt_id" in row else {}
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": conversation(row["prompt"], row["responses"][hi]),
                "rejected": conversation(row["prompt"], row["responses"][lo]),
                "score_chosen": rewards[hi],
                "score_rejected": rewards[lo],
                "index": row["index"],
                **extra,
            }
        )
        chosen_scores.append(rewards[hi])
        rejected_scores.append(rewards[lo])
    summary = {
        "prompts": len(rows),
        "pairs": len(pairs),
        "skipped": {r: skipped[r] for r in REASONS if skipped[r]},
        "mean_score_chosen": _mean(chosen_scores),
        "mean_score_rejected": _mean(rejected_scores),
        "mean_response_tokens": _mean(tokens),
        "responses_hit_max_new_tokens": capped,
    }
    return samples, pairs, summary


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
