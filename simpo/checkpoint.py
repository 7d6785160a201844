"""Training checkpoints: sharded model + optimizer (torch.distributed.checkpoint), RNG, position.

Layout: `<output_dir>/checkpoints/step_N/` holds the DCP shards, `meta.json` (step, the
resolved config, world size, the data's identity) and `rng_rank{r}.safetensors`. A checkpoint
is written to a hidden temporary directory and renamed into place only when complete, so a
crash mid-save leaves the previous checkpoint usable; `latest_checkpoint` only sees complete
ones. Any world size can resume any checkpoint (DCP reshards). The data position is the step:
batch s is always the same pairs (see simpo.sampler), so no sampler state is needed.

Reading a checkpoint runs nothing from it (simpo.safe_dcp: no pickle); `choose_checkpoint`
skips, naming it, a newest checkpoint that is unreadable. What may change on resume, and the
fallback when a checkpoint fails to load, are in simpo.resume.
"""

from __future__ import annotations

import json
import os
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from simpo.config import Config, ConfigError, to_dict
from simpo.hf import save_hf
from simpo.runfiles import (
    FolderInUseError,
    hold_folder,
    write_atomic,
    write_failure,
    writing,
)
from simpo.safe_dcp import SafePlanner, SafeReader, UnreadableCheckpoint, verify
from simpo.world import print0

META = "meta.json"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (every rank gets the same answer)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def prepare_output_dir(out: Path, resume: bool) -> None:
    """Fail early, naming the key, if `out` is not writable, is used by another live run
    (rank 0 holds its lock for the rest of the process), or would mix two runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"train.output_dir = '{out}' is not writable ({e.strerror or e}); choose another"
        ) from None
    in_use = ""
    if _rank() == 0:
        try:
            hold_folder(out, "train.output_dir")
        except FolderInUseError as e:
            in_use = str(e)
    if _any_rank(bool(in_use)):
        raise FolderInUseError(in_use or "train.output_dir is in use by another run (see rank 0)")
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


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (meta.json written last), newest first."""
    found = [p for p in root.glob("step_*") if (p / META).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: -int(p.name[5:]))


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    return next(iter(complete_checkpoints(root)), None)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
        ok = isinstance(meta["step"], int) and isinstance(meta["config"], dict)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnreadableCheckpoint(f"{path / META}: unreadable ({type(e).__name__}: {e})") from e
    if not ok:
        raise UnreadableCheckpoint(f"{path / META}: 'step' or 'config' has the wrong type")
    return meta


def check_readable(path: Path) -> None:
    """Raise UnreadableCheckpoint unless `path` looks whole: meta.json, the DCP metadata (read
    without pickle) and every data file it needs, the saved ranks' RNG files."""
    meta = read_meta(path)
    verify(path)
    for r in range(int(meta.get("world_size", 1))):
        try:
            load_file(path / f"rng_rank{r}.safetensors")
        except (OSError, SafetensorError) as e:
            raise UnreadableCheckpoint(f"{path}/rng_rank{r}.safetensors: unreadable ({e})") from e


def choose_checkpoint(root: Path, older_than: int | None = None) -> Path | None:
    """The newest complete checkpoint that passes `check_readable` (older than step
    `older_than` if given); every newer one skipped is named, with the reason, on rank 0.
    None when there is none; a TrainingError when there are some but none is readable (a
    fresh start would throw them away)."""
    skipped = []
    for path in complete_checkpoints(root):
        if older_than is not None and int(path.name[5:]) >= older_than:
            continue
        try:
            check_readable(path)
        except UnreadableCheckpoint as e:
            print0(f"warning: skipping checkpoint {path}: {e}; trying the one before it")
            skipped.append(path.name)
            continue
        return path
    if skipped and older_than is None:
        raise TrainingError(
            f"cannot resume: no checkpoint in {root} is readable ({', '.join(skipped)}, see "
            "above); move them aside to start over"
        )
    return None


def _root_error(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (else `e`)."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    keep: int,
    data: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); keep the newest `keep` (0=all).

    `data` is the data's identity (`data_identity`), checked on resume. A failed write (full
    disk, quota) raises a one-line WriteError naming the path and the free space; the
    partial checkpoint is removed and the previous ones are untouched.
    """
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # sharded (DTensor) state
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng_rank{_rank()}.safetensors")
        failed = None
    except (CheckpointException, OSError, RuntimeError, SafetensorError) as e:
        failed = write_failure(tmp, _root_error(e))
    if _any_rank(failed is not None):  # every rank leaves together, none waits at a barrier
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial save took
        raise failed or write_failure(tmp, RuntimeError("another rank failed to write"))
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        meta = {"step": step, "world_size": world, "config": to_dict(cfg), "data": data or {}}
        write_atomic(tmp / META, json.dumps(meta, indent=2) + "\n")  # written last: "complete"
        if final.exists():  # the same step saved again (SIGTERM right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load model, optimizer and this rank's RNG state from `path` (no pickle); its step."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())
    except (CheckpointException, RuntimeError, OSError, ValueError, EOFError) as e:
        root = _root_error(e)
        text = str(root).strip().splitlines()[0] if str(root).strip() else ""
        raise UnreadableCheckpoint(f"{path}: {type(root).__name__}: {text}") from e
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rng_file = path / f"rng_rank{_rank()}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: keep the seeded RNG
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(read_meta(path)["step"])


def export_final(model: nn.Module, final: Path, tokenizer_dir: Path, dtype: torch.dtype) -> None:
    """save_hf into a temporary folder, then swap it in: `final` is the old or the new export,
    never half of one (all ranks call this; rank 0 writes)."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with writing(tmp):
        save_hf(model, tmp, tokenizer_dir=tokenizer_dir, dtype=dtype)
    if _rank() == 0:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
