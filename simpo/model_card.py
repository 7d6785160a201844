"""The model card of an export: `final/README.md` in Hugging Face's format.

YAML front matter (base_model when the base is a hub checkpoint, its license when its own card
states one, library_name, pipeline_tag, tags), then what a reader needs to trust the weights:
the base model, the data files and their sha256, the loss and its hyperparameters, the
optimizer and schedule, steps and pairs seen, the final metrics, eval.py's results (eval.py
adds them to the card of the checkpoint it evaluates), the resolved config with the command
that reproduces the run, and the simpo / torch versions. So a checkpoint pushed to a hub
explains itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import simpo
from simpo.config import Config, DataConfig, to_toml
from simpo.runfiles import file_sha256 as sha256_file

CARD = "README.md"
EVAL_START, EVAL_END = "<!-- simpo:eval", "<!-- simpo:eval:end -->"
# loss.* keys each loss reads (sft_weight is shown whenever it is not 0)
LOSS_KEYS = {
    "simpo": ("beta", "gamma_beta_ratio", "loss_type", "label_smoothing"),
    "dpo": ("beta", "label_smoothing", "reference"),
    "ipo": ("beta", "reference"),
    "hinge": ("beta", "reference"),
    "rdpo": ("beta", "rdpo_alpha", "label_smoothing", "reference"),
    "orpo": ("orpo_lambda",),
    "cpo": ("beta", "label_smoothing"),
    "sft": (),
}
EVAL_COLUMNS = (
    ("pairs", "num_pairs", "d"), ("accuracy", "accuracy", ".3f"), ("margin", "margin", ".3f"),
    ("chosen longer", "accuracy_chosen_longer", ".3f"),
    ("rejected longer", "accuracy_rejected_longer", ".3f"),
    ("corr(reward, length)", "length_corr", "+.2f"), ("β", "beta", "g"),
    ("DPO accuracy", "dpo_accuracy", ".3f"), ("generated", "gen_num", "d"),
    ("generated length", "gen_mean_tokens", ".1f"),
)  # fmt: skip


def hub_id(model_dir: Path) -> str | None:
    """The hub id of a local checkpoint, when it can be told: a Hugging Face cache snapshot
    (`models--org--name/snapshots/<hash>`) or config.json's `_name_or_path` ("org/name")."""
    for part in model_dir.resolve().parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/", 1)
    config = model_dir / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def base_license(model_dir: Path) -> dict[str, str]:
    """license / license_name / license_link from the front matter of the base model's card."""
    card = model_dir / CARD
    text = card.read_text(errors="replace") if card.is_file() else ""
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    found = {}
    for line in match.group(1).splitlines() if match else []:
        key, _, value = line.partition(":")
        if key in ("license", "license_name", "license_link") and value.strip():
            found[key] = value.strip().strip("\"'")
    return found


def git_commit() -> str | None:
    """The simpo checkout's commit, "-dirty" with uncommitted changes (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(simpo.__file__).parent,
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += ["| " + k + " | " + str(v).replace("|", "\\|") + " |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _data_line(path: str, report: Any | None) -> str:
    p = Path(path)
    digest = f"sha256 `{sha256_file(p)}`" if p.is_file() else "not found at export"
    line = f"`{p.name}` ({digest})"
    if report is not None:
        line += f": {report.pairs} pairs of {report.rows} rows ({report.format})"
        line += f", {report.num_skipped} skipped" if report.num_skipped else ""
    return line


def model_card(
    cfg: Config,
    *,
    model_dir: Path,
    data_cfg: DataConfig,
    reports: Sequence[Any],
    steps: int,
    world_size: int,
    metrics: dict[str, float],
) -> str:
    """The card text (see the module docstring); `reports` are the data loader's LoadReports
    (train, then eval when a separate file), `metrics` the last step's record."""
    tc, loss = cfg.train, cfg.loss
    base = hub_id(model_dir)
    front: dict[str, Any] = {"base_model": base} if base else {}
    front |= base_license(model_dir)
    front |= {"library_name": "transformers", "pipeline_tag": "text-generation"}
    tags = ["simpo", loss.name] + ([] if loss.name == "sft" else ["preference-optimization"])
    front["tags"] = list(dict.fromkeys(tags))
    yaml = "\n".join(
        f"{k}:\n" + "\n".join(f"- {json.dumps(t)}" for t in v) if isinstance(v, list)
        else f"{k}: {json.dumps(v)}" for k, v in front.items()
    )  # fmt: skip
    name = Path(tc.output_dir).resolve().name
    described = f"`{base}`" if base else f"the checkpoint at `{model_dir}`"
    if not cfg.model.path:
        described = "a tiny random Llama built from the data (model.path empty: the demo path)"
    hyper = {k: getattr(loss, k) for k in LOSS_KEYS.get(loss.name, ())}
    hyper |= {"sft_weight": loss.sft_weight} if loss.sft_weight else {}
    eval_line = "-"
    if data_cfg.eval:
        eval_line = _data_line(data_cfg.eval, reports[1] if len(reports) > 1 else None)
    elif data_cfg.eval_fraction:
        eval_line = f"{data_cfg.eval_fraction:g} of the training file, held out (seed {tc.seed})"
    template = reports[0].template if reports else data_cfg.template  # "auto" resolved
    training = [
        ("base model", described),
        ("training data", _data_line(data_cfg.train, reports[0] if reports else None)),
        ("held-out data", eval_line),
        ("chat template", f"{template} (mask {data_cfg.mask}), max_length "
                          f"{data_cfg.max_length}, max_prompt_length {data_cfg.max_prompt_length}"),
        ("loss", f"`{loss.name}`" + "".join(f", {k} = {_value(v)}" for k, v in hyper.items())),
        ("optimizer", f"AdamW (β1 {tc.adam_beta1}, β2 {tc.adam_beta2}, weight decay "
                      f"{tc.weight_decay:g}), grad clip {tc.grad_clip:g}"),
        ("schedule", f"peak lr {tc.lr:g}, linear warmup {tc.warmup_ratio:.0%}, cosine to "
                     f"{tc.min_lr_ratio:g} x peak"),
        ("steps", f"{steps} optimizer steps x {tc.batch_size} pairs = {steps * tc.batch_size} "
                  f"pairs seen ({_value(metrics.get('epoch'))} epochs), seed {tc.seed}"),
        ("precision / devices", f"{tc.precision}, {world_size} process(es)"),
    ]  # fmt: skip
    final = [(f"`{k}`", _value(v)) for k, v in metrics.items() if k not in ("step", "epoch")]
    launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
    commit = git_commit()
    version = f"simpo {simpo.__version__}" + (f" (git {commit})" if commit else "")
    return f"""---
{yaml}
---

# {name}

Trained from {described} with the **{loss.name}** loss by {version}, a pure-PyTorch
preference-optimisation codebase. The weights are a plain Hugging Face checkpoint
(config.json, safetensors, tokenizer): `AutoModelForCausalLM.from_pretrained` loads them.

## Training

{_table(training)}
## Final metrics (step {steps})

Training batch of the last step; `eval/` keys are the held-out split at the last evaluation.

{_table(final)}
## Evaluation

{eval_block({})}

## Reproduce

```
{launcher} train.py --config config.toml
```

with this resolved config (every key, as in `<output_dir>/config.toml`; paths as they were on
the training machine):

<details><summary>config.toml</summary>

```toml
{to_toml(cfg).strip()}
```

</details>

## Framework versions

{version}, torch {torch.__version__}, Python {sys.version.split()[0]}
"""


def eval_block(results: dict[str, dict[str, Any]]) -> str:
    """The Evaluation section's body: eval.py's results by data file (kept as JSON in the
    opening comment, so a later evaluation updates its row and keeps the others)."""
    data = json.dumps(results, sort_keys=True).replace(">", "\\u003e")  # no "-->" inside
    head = f"{EVAL_START} {data} -->"
    if not results:
        body = "No eval.py results yet: `python eval.py --model <this directory> --data FILE` adds them here."  # noqa: E501
    else:
        header = ["data", *(label for label, _, _ in EVAL_COLUMNS)]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for data, m in sorted(results.items()):
            cells = [
                "-" if m.get(key) is None else format(m[key], spec) for _, key, spec in EVAL_COLUMNS
            ]
            lines.append(f"| `{data}` | " + " | ".join(cells) + " |")
        body = "\n".join(lines) + (
            "\n\nAccuracy: SimPO's reward β·avg log π(y|x) ranks chosen over rejected; chosen / "
            "rejected longer: accuracy on the pairs where that response has more tokens."
        )
    return f"{head}\n{body}\n{EVAL_END}"


def write_model_card(final_dir: Path, cfg: Config, **info: Any) -> Path:
    """Write `<final_dir>/README.md` (see `model_card` for `info`)."""
    path = Path(final_dir) / CARD
    path.write_text(model_card(cfg, **info), encoding="utf-8")
    return path


def add_eval_results(model_dir: Path, data_name: str, metrics: dict[str, Any]) -> Path | None:
    """Put eval.py's `metrics` for `data_name` into the card of `model_dir` if simpo wrote that
    card; the path written, or None (no card of ours)."""
    path = Path(model_dir) / CARD
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    match = re.search(re.escape(EVAL_START) + r" (.*?) -->.*?" + re.escape(EVAL_END), text, re.S)
    if not match:
        return None
    results = json.loads(match.group(1))
    keep = {key for _, key, _ in EVAL_COLUMNS}
    results[data_name] = {k: v for k, v in metrics.items() if k in keep and v is not None}
    path.write_text(text[: match.start()] + eval_block(results) + text[match.end() :])
    return path
