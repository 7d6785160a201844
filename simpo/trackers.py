"""Where the per-step metrics go: metrics.jsonl, Weights & Biases, TensorBoard (`train.report_to`).

Every sink has the same two methods, `write(record)` (one step's metrics, with its "step")
and `close()`; `open_trackers` returns one object that fans a record out to all of them, on
rank 0 only (the other ranks get an empty fan-out). Nothing is imported unless asked for:
`["jsonl"]` (the default) needs no package; "wandb" and "tensorboard" import theirs when the
run starts, and `check_trackers` turns a missing one into a one-line error with the install
command before any expensive work.

Names follow TRL's Trainer in W&B: `train/<key>` for the training metrics (train/loss,
train/rewards/margins, ...) and `eval/<key>` for the held-out ones, so simpo and TRL runs plot
side by side in one project. metrics.jsonl keeps the unprefixed keys.

A run keeps its W&B id in `<output_dir>/trackers.json`, so `--train.resume=true` continues the
same W&B run (resume="allow"); TensorBoard's `purge_step` drops the events a crashed run wrote
after the checkpoint it resumes from. Resume is exact (tests/test_train.py), so the steps that
W&B refuses to log again (its step must increase) carry the same values it already has.
W&B reads its usual environment: WANDB_PROJECT (default "simpo"), WANDB_ENTITY, WANDB_MODE
(offline, disabled), WANDB_API_KEY.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simpo.config import Config

TRACKERS = ("jsonl", "wandb", "tensorboard")
# tracker -> (module that must be importable, pip package)
PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}
RUN_FILE = "trackers.json"  # the W&B run id of this output directory


def check_trackers(names: list[str]) -> None:
    """A ConfigError naming the pip command if a tracker's package is not installed (cheap:
    looks the package up without importing it)."""
    from simpo.config import ConfigError  # config imports TRACKERS from here

    for name in names:
        module, package = PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to includes '{name}' but {package} is not installed: "
                f"pip install {package}  (or pip install -e '.[trackers]')"
            )


def tracker_names(record: dict[str, Any]) -> dict[str, float]:
    """TRL's W&B names: eval/<key> stays, every other metric becomes train/<key>; no "step"."""
    return {
        (key if key.startswith("eval/") else f"train/{key}"): float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float)
    }


def run_id(out: Path, resume: bool) -> str:
    """This output directory's W&B run id: the stored one when resuming, else a new one."""
    path = out / RUN_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if resume and stored.get("wandb_id"):
        return stored["wandb_id"]
    new = secrets.token_hex(4)  # 8 characters of [0-9a-f]: a valid W&B id
    path.write_text(json.dumps({**stored, "wandb_id": new}) + "\n")
    return new


class WandbSink:
    """One W&B run per output directory, resumed under the same id."""

    def __init__(self, out: Path, config: dict[str, Any], resume: bool) -> None:
        wandb = importlib.import_module("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "simpo",
            name=out.resolve().name,
            id=run_id(out, resume),
            resume="allow",
            dir=str(out),
            config=config,
            reinit="finish_previous",  # in-process runs (tests, the demo) come one after another
        )

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(tracker_names(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Scalars in `<output_dir>/tensorboard/`, flushed every step (a crash loses nothing)."""

    def __init__(self, out: Path, config_toml: str, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # purge_step: events at or after it in earlier files (a crashed run's last steps, or
        # a whole earlier run in this directory that never checkpointed) are dropped
        purge = 1 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)
        if resume_step is None:  # indented: TensorBoard's text tab renders markdown
            self.writer.add_text("config", "    " + config_toml.replace("\n", "\n    "), 0)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in tracker_names(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Trackers:
    """The sinks of one run behind the same two methods."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            if hasattr(sink, "close"):  # MetricsWriter appends and closes per record
                sink.close()
        self.sinks = []


def open_trackers(cfg: Config, out: Path, enabled: bool, resume_step: int | None) -> Trackers:
    """The sinks `cfg.train.report_to` names, on the process with `enabled` (rank 0).
    `resume_step`: the checkpoint step a resumed run continues from (None on a fresh run)."""
    if not enabled:
        return Trackers([])
    from simpo.config import to_dict, to_toml
    from simpo.metrics import MetricsWriter

    check_trackers(cfg.train.report_to)
    sinks: list[Any] = []
    for name in cfg.train.report_to:
        if name == "jsonl":
            sinks.append(MetricsWriter(out / "metrics.jsonl", True, resume_step))
        elif name == "wandb":
            sinks.append(WandbSink(out, to_dict(cfg), resume_step is not None))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(out, to_toml(cfg), resume_step))
        else:  # config validation already refuses this
            raise ValueError(f"unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
    return Trackers(sinks)
