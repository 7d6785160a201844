"""Resuming a run: which config changes a checkpoint allows, the data's identity, and loading
with a fallback to the checkpoint before an unreadable one.

Changes are judged by what they mean. Keys that only change how the work is split, checked,
logged or saved may change freely (so may the number of ranks); every other key changes the
math of the steps still to run (lr, schedule, loss, batch, seed, precision, data) and needs
`--train.resume_override=key,...`, which train.py records in metrics.jsonl. The data is
judged by content: each checkpoint holds the sha256 of `data.train` and the tokenizer's
fingerprint, so a moved file resumes and a changed one needs the override.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simpo.checkpoint import (
    TrainingError,
    choose_checkpoint,
    load_checkpoint,
    read_meta,
)
from simpo.config import Config, ConfigError, to_dict
from simpo.readers import check_file
from simpo.runfiles import append_line, file_sha256
from simpo.safe_dcp import UnreadableCheckpoint
from simpo.world import print0

# Keys that only change how the work is split, checked, logged or saved: free on resume
# (the number of ranks is free too). Every other key changes the math of later steps.
FREE_ON_RESUME = {
    "train.output_dir", "train.resume", "train.resume_override", "train.save_every",
    "train.eval_every", "train.log_every", "train.export", "train.activation_checkpointing",
    "train.compile", "train.keep_checkpoints", "train.grad_sync",
    "data.max_tokens", "data.packing", "data.num_workers", "data.cache_dir", "data.eval",
    "data.train",  # its path may move: its content is checked instead (meta["data"])
    "model.attention", "model.logits_chunk_mib", "train.fused_loss", "train.report_to",
}  # fmt: skip


def data_identity(train_file: str | Path, tokenizer_fingerprint: str) -> dict[str, str]:
    """What makes the training data itself: the file's content and the tokenizer."""
    check_file(Path(train_file))  # a DataError naming it, before hashing it
    return {"data.train": file_sha256(train_file), "tokenizer": tokenizer_fingerprint}


def overrides(cfg: Config) -> set[str]:
    return {k.strip() for k in cfg.train.resume_override.split(",") if k.strip()}


def config_differences(saved: dict[str, Any], cfg: Config) -> dict[str, list[Any]]:
    """`key: [saved value, now]` for every key outside FREE_ON_RESUME that differs from the
    checkpointed run's config `saved` (a `to_dict`)."""
    changes = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, "<absent>")
            if f"{section}.{key}" not in FREE_ON_RESUME and old != value:
                changes[f"{section}.{key}"] = [old, value]
    return changes


def resume_changes(
    path: Path, cfg: Config, data: dict[str, str] | None = None
) -> dict[str, list[Any]]:
    """`key: [checkpoint's value, now]` for every difference that needs an override."""
    meta = read_meta(path)
    changes = config_differences(meta["config"], cfg)
    for key, digest in (data or {}).items():
        old = meta.get("data", {}).get(key)
        if old is not None and old != digest:  # absent: a checkpoint written before this check
            name = key if key != "tokenizer" else "model.tokenizer"
            changes[name] = [f"{key} {old[:12]}", f"{key} {digest[:12]} (contents changed)"]
    return changes


def record_overrides(out: Path, cfg: Config, step: int, changes: dict[str, list[Any]]) -> None:
    """Say which overridden keys changed and append the event to metrics.jsonl (rank 0; the
    other trackers take numbers per step, not events)."""
    if not changes:
        return
    print0("resume_override: " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0 and "jsonl" in cfg.train.report_to:
        event = {"step": step, "event": "resume_override", "changed": changes}
        append_line(out / "metrics.jsonl", json.dumps(event))


def check_resumable(path: Path, cfg: Config, data: dict[str, str] | None = None) -> int:
    """The step of checkpoint `path`; a ConfigError naming every change that needs
    `train.resume_override` and does not have it."""
    meta = read_meta(path)
    refused = {k: v for k, v in resume_changes(path, cfg, data).items() if k not in overrides(cfg)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the checkpointed run in "
            f"{listed}. These change the math of the steps still to run: to continue anyway "
            f"pass --train.resume_override={','.join(refused)} (recorded in metrics.jsonl); or "
            "resume with the original values, or start a new run in another train.output_dir"
        )
    return int(meta["step"])


def resume_state(
    path: Path,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: dict[str, str] | None = None,
) -> tuple[Path, int]:
    """Load `path`, or when its contents turn out unreadable the newest older checkpoint that
    loads (each skip named on rank 0); (the checkpoint loaded, its step)."""
    while True:
        try:
            return path, load_checkpoint(path, model, optimizer)
        except UnreadableCheckpoint as e:
            older = choose_checkpoint(path.parent, older_than=int(path.name[5:]))
            if older is None:
                raise TrainingError(
                    f"cannot resume: {e}; no older readable checkpoint in {path.parent}"
                ) from e
            print0(f"warning: skipping checkpoint {path}: {e}; resuming from {older}")
            check_resumable(older, cfg, data)
            path = older


def out_of_memory(step: int, cfg: Config, last: Path | None) -> TrainingError:
    """The error for an out-of-memory step: what to change, and that the change is allowed."""
    e = TrainingError(
        f"step {step}: out of GPU memory with data.max_tokens = {cfg.data.max_tokens}. Last good "
        f"checkpoint: {last or 'none'}. Resume with --train.resume=true and a smaller "
        "--data.max_tokens (it only sets the micro-batch size, so it may change on resume) or "
        "--train.activation_checkpointing=on"
    )
    e.rank_local = True  # only this rank knows: simpo.exits prints it from here
    return e
