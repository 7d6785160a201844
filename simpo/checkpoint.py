"""Training checkpoints: sharded model + optimizer (torch.distributed.checkpoint), RNG, position.

Layout: `<output_dir>/checkpoints/step_N/` holds the DCP shards, `meta.json` (step, the
resolved config, world size) and `rng_rank{r}.safetensors`. A checkpoint is written to a
hidden temporary directory and renamed into place only when complete, so a crash mid-save
leaves the previous checkpoint usable; `latest_checkpoint` only sees complete ones. Any world
size can resume any checkpoint (DCP reshards). The data position is the step: batch s is
always the same pairs (see simpo.sampler), so no sampler state is needed.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from simpo.config import Config, ConfigError, to_dict

META = "meta.json"
# Keys that may change between a run and its resume; any other difference is an error.
RESUMABLE_KEYS = {
    "train.output_dir", "train.resume", "train.save_every", "train.eval_every",
    "train.log_every", "train.export", "train.activation_checkpointing", "train.compile",
    "train.keep_checkpoints",
    "data.num_workers", "data.cache_dir", "model.attention",
}  # fmt: skip


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_output_dir(out: Path, resume: bool) -> None:
    """Fail early, naming the key, if `out` is not writable or would mix two runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_rank{_rank()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"train.output_dir = '{out}' is not writable ({e.strerror or e}); choose another"
        ) from None
    if not resume and latest_checkpoint(out / "checkpoints") is not None:
        raise ConfigError(
            f"train.output_dir = '{out}' holds checkpoints of an earlier run: pass "
            "--train.resume=true to continue it, or choose a new train.output_dir"
        )


@contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """An Event set by SIGTERM (preemption) while the block runs; the old handler returns after.

    The loop checks it once per step (reduced over ranks) and saves a checkpoint. Signal
    handlers can only be installed from the main thread; elsewhere the event never fires.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    found = [p for p in root.glob("step_*") if (p / META).is_file() and p.name[5:].isdigit()]
    return max(found, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); keep the newest `keep` (0=all)."""
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # sharded (DTensor) state
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / f"rng_rank{_rank()}.safetensors")
    _barrier()  # every rank's files are in tmp
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        meta = {"step": step, "world_size": world, "config": to_dict(cfg)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: "complete"
        if final.exists():  # the same step saved again (SIGTERM right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    _barrier()
    return final


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """`section.key: saved -> now` for every key that differs and may not change on resume."""
    now = to_dict(cfg)
    out = []
    for section, values in now.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, "<absent>")
            if f"{section}.{key}" not in RESUMABLE_KEYS and old != value:
                out.append(f"{section}.{key}: {old!r} -> {value!r}")
    return out


def check_resumable(path: Path, cfg: Config) -> int:
    """The step of checkpoint `path`; a ConfigError if the run's config changed incompatibly."""
    meta = json.loads((path / META).read_text())
    diffs = config_differences(meta["config"], cfg)
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the checkpointed run in "
            + "; ".join(diffs)
            + ". Resume with the original values, or start a new run in another train.output_dir"
        )
    return int(meta["step"])


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load model, optimizer and this rank's RNG state from `path`; returns its step."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rng_file = path / f"rng_rank{_rank()}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: keep the seeded RNG
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(json.loads((path / META).read_text())["step"])
