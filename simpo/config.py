"""Run configuration: one dataclass per section, a TOML file, and `--section.key=value` overrides.

Precedence is CLI > file > defaults. Every field has a default and a one-line help string
(`field(metadata={"help": ...})`). Unknown sections or keys and values of the wrong type are
errors that name the key, list the valid ones and suggest the closest match. The resolved
config is written back as TOML (`to_toml`) next to every run's outputs, so a run can be
reproduced from its output folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The choices below are each defined once, by the module that implements them.
from simpo.attention import BACKENDS
from simpo.conventions import CONVENTIONS
from simpo.data import TRUNCATION_RULES, TRUNCATIONS
from simpo.fsdp import GRAD_SYNCS, PRECISIONS
from simpo.losses import LOSS_TYPES, LOSSES
from simpo.packing import PACKINGS, pair_tokens
from simpo.readers import FORMATS
from simpo.reference import REFERENCE_MODES
from simpo.schedule import WARMUP_STYLES
from simpo.templates import TEMPLATES
from simpo.trackers import TRACKERS


def _f(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with a default, a one-line help string and optional allowed values
    (for a list field: the values each element may take)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):  # mutable: every Config gets its own copy
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("", "HF-format checkpoint dir (config.json + safetensors); empty = tiny random")
    tokenizer: str = _f("", "tokenizer dir if not inside model.path (tokenizer.model/.json)")
    attention: str = _f(
        "auto",
        "attention backend: auto (flex on CUDA, sdpa on CPU), or dense (reference)",
        BACKENDS,
    )
    logits_chunk_mib: int = _f(
        1024, "MiB for the lm_head's (chunk, vocab) logits buffer (at most 1/6 of the N x V logits)"
    )
    tiny_dim: int = _f(64, "hidden size of the tiny random model built when model.path is empty")
    tiny_layers: int = _f(2, "layers of the tiny random model")
    tiny_vocab: int = _f(512, "vocabulary of the tokenizer trained for the tiny random model")


@dataclass
class DataConfig:
    train: str = _f("", "training preference file (.jsonl, .json, .gz, .parquet)")
    eval: str = _f("", "held-out preference file; empty = split eval_fraction off train")
    eval_fraction: float = _f(0.0, "fraction of train held out for eval when data.eval is empty")
    format: str = _f("auto", "row format: messages (UltraFeedback), flat or hh", FORMATS)
    prompt_field: str = _f("prompt", "column holding the prompt")
    chosen_field: str = _f("chosen", "column holding the chosen response")
    rejected_field: str = _f("rejected", "column holding the rejected response")
    template: str = _f(
        "auto",
        "chat template: auto = the checkpoint's own (else its model_type's), or a named one",
        ("auto", *TEMPLATES),
    )
    chat_template: str = _f("", "Jinja chat template (a file path or the text); overrides template")
    mask: str = _f(
        "official",
        "tokenisation convention: official SimPO pipeline (header in |y|) or trl (DPOTrainer)",
        CONVENTIONS,
    )
    max_length: int = _f(2048, "max tokens of prompt + one response")
    max_prompt_length: int = _f(1800, "max prompt tokens")
    truncation: str = _f("keep_end", "how to cut a long prompt", TRUNCATIONS)
    truncation_rule: str = _f(
        "fit",
        "fit: prompt <= max_prompt_length, responses get the rest; official: SimPO's tokenize_row",
        TRUNCATION_RULES,
    )
    max_tokens: int = _f(4096, "tokens per packed row (micro-batch budget)")
    packing: str = _f("shared_prompt", "how pairs share packed rows", PACKINGS)
    num_workers: int = _f(1, "processes for tokenisation")
    cache_dir: str = _f("", "tokenised-data cache dir; empty = <output_dir>/cache")


@dataclass
class LossConfig:
    name: str = _f("simpo", "the preference loss", tuple(LOSSES))
    beta: float = _f(2.0, "β: reward scale (SimPO 2-10, DPO ~0.01-0.1)")
    gamma_beta_ratio: float = _f(0.5, "SimPO target margin as γ/β (official convention)")
    label_smoothing: float = _f(0.0, "ε: label smoothing (cDPO / robust SimPO)")
    loss_type: str = _f("sigmoid", "SimPO shape", LOSS_TYPES)
    sft_weight: float = _f(0.0, "weight of an NLL term on chosen tokens (off by default)")
    rdpo_alpha: float = _f(0.0, "R-DPO α: reward per token of length difference (0 = plain DPO)")
    orpo_lambda: float = _f(0.1, "ORPO λ: weight of the odds-ratio term (TRL calls it beta)")
    reference: str = _f("precompute", "DPO reference policy", REFERENCE_MODES)
    reference_path: str = _f("", "reference checkpoint dir; empty = the starting model.path")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/default", "where metrics, checkpoints and the export go")
    seed: int = _f(42, "seed for init, data order and sampling")
    batch_size: int = _f(128, "pairs per optimizer step, all ranks together")
    epochs: int = _f(1, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps; -1 = as many as epochs give")
    lr: float = _f(5e-7, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW β1")
    adam_beta2: float = _f(0.999, "AdamW β2")
    warmup_ratio: float = _f(0.1, "fraction of steps of linear warmup")
    warmup_style: str = _f(
        "linear",
        "linear: lr peak*(step+1)/warmup; hf: peak*step/warmup (HF Trainer: lr 0 at step 1)",
        WARMUP_STYLES,
    )
    min_lr_ratio: float = _f(0.0, "cosine decays to lr * min_lr_ratio")
    grad_clip: float = _f(1.0, "max global grad norm; 0 = off")
    precision: str = _f("bf16-mixed", "bf16-mixed keeps fp32 master weights", PRECISIONS)
    activation_checkpointing: str = _f("auto", "auto = on for CUDA", ("auto", "on", "off"))
    grad_sync: str = _f(
        "last",
        "reduce-scatter grads after the last micro-batch of a step (each rank holds unsharded "
        "fp32 grads until then) or after every one (ZeRO-3 memory, more traffic)",
        GRAD_SYNCS,
    )
    fused_loss: bool = _f(
        True,
        "compute the loss inside the lm_head pass (3 vocab GEMMs per token, head grads formed "
        "in the forward); false = log-probs, then the loss, then autograd (4 GEMMs)",
    )
    compile: bool = _f(False, "torch.compile each transformer block")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir")
    resume_override: str = _f(
        "", "keys that may differ on resume although they change the math, e.g. train.lr,loss.beta"
    )
    save_every: int = _f(0, "checkpoint every N steps; 0 = only at the end")
    keep_checkpoints: int = _f(2, "keep the newest N checkpoints; 0 = all")
    eval_every: int = _f(0, "evaluate on the held-out split every N steps; 0 = off")
    log_every: int = _f(1, "write metrics every N steps")
    report_to: list[str] = _f(
        ["jsonl"],
        "where metrics go: jsonl (metrics.jsonl), wandb, tensorboard; [] = none",
        TRACKERS,
    )
    export: bool = _f(True, "write an HF-format export to <output_dir>/final at the end")


# AlpacaEval 2 generation settings of the official SimPO runs (princeton-nlp/SimPO
# eval/alpacaeval2/configs/*.yaml, decoded with vLLM): eval.py --preset NAME.
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3-Instruct-8B-SimPO.yaml and Llama-3-Base-8B-SFT-SimPO.yaml
    "alpacaeval-llama3": {"temperature": 0.9, "top_p": 1.0, "max_new_tokens": 4096},
    # Mistral-7B-Base-SFT-SimPO.yaml
    "alpacaeval-mistral-base": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 2048},
    # Mistral-7B-Instruct-SimPO.yaml (top_p unset: vLLM's default 1.0)
    "alpacaeval-mistral-instruct": {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 2048},
}


@dataclass
class EvalConfig:
    """eval.py's generation defaults (its own flags; not part of a training run's Config)."""

    gen_batch: int = _f(16, "prompts decoded together in eval generation")
    max_new_tokens: int = _f(256, "generation length for eval prompts")
    temperature: float = _f(0.0, "sampling temperature; 0 = greedy")
    top_p: float = _f(1.0, "nucleus sampling threshold")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A bad config file or override; the message names the key and what was expected."""


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"valid: {', '.join(valid)}.{hint}"


def _line_of(text: str, section: str, key: str) -> int | None:
    """1-based line of `key = ...` inside `[section]` of a TOML text (for error messages)."""
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[] ")
            if current == section and not key:
                return n
        elif current == section and stripped.split("=", 1)[0].strip() == key:
            return n
    return None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert_list(value: Any, key: str, source: str) -> list[str]:
    """A list of strings from a TOML array, or from a string: `a,b` (the CLI form; also
    accepted in TOML) or a JSON array `["a", "b"]`. An empty string is the empty list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"{source}: {key}={text!r}: expected a list of strings, e.g. a,b"
                ) from None
        else:
            value = [part.strip() for part in text.split(",")] if text else []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{source}: {key} = {value!r}: expected a list of non-empty strings, e.g. "
            f'["a", "b"] in TOML or --{key}=a,b on the command line'
        )
    if len(set(value)) != len(value):
        raise ConfigError(f"{source}: {key} = {value!r}: names a value twice")
    return value


def _convert(value: Any, typ: Any, key: str, source: str) -> Any:
    """Convert `value` (from TOML, or a string from the CLI) to `typ`, or raise naming `key`."""
    if typing.get_origin(typ) is list:  # list[str], the only list type a Config has
        return _convert_list(value, key, source)
    from_cli = isinstance(value, str) and typ is not str
    if from_cli:
        text = value.strip()
        if typ is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{source}: {key}={value!r}: expected {_tname(typ)}") from None
    ok = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(
            f"{source}: {key} = {value!r} has type {type(value).__name__}, expected {_tname(typ)}"
        )
    return float(value) if typ is float else value


def _tname(typ: Any) -> str:
    return "list of str" if typing.get_origin(typ) is list else getattr(typ, "__name__", str(typ))


def _set(cfg: Config, dotted: str, value: Any, source: str, sources: dict[str, str]) -> None:
    sections = [f.name for f in dataclasses.fields(Config)]
    if "." not in dotted:
        raise ConfigError(f"{source}: '{dotted}' must be section.key; sections: {sections}")
    section, key = dotted.split(".", 1)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}'; {_suggest(section, sections)}")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if key not in types:
        raise ConfigError(
            f"{source}: unknown key '{section}.{key}'; {_suggest(key, sorted(types))}"
        )
    value = _convert(value, types[key], dotted, source)
    choices = next(f for f in dataclasses.fields(sub) if f.name == key).metadata["choices"]
    for item in value if isinstance(value, list) else [value]:
        if choices and item not in choices:
            raise ConfigError(f"{source}: {dotted} = {value!r}: {_suggest(item, list(choices))}")
    setattr(sub, key, value)
    sources[dotted] = source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then `--section.key=value` overrides."""
    cfg, sources = Config(), {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level '{section}' must be a [section] table")
            if section not in {f.name for f in dataclasses.fields(Config)}:
                line = _line_of(text, section, "") or ""
                _set(cfg, f"{section}.?", None, f"{path}{':' if line else ''}{line}", {})  # raises
            for key, value in table.items():
                line = _line_of(text, section, key)
                where = f"{path}:{line}" if line else str(path)
                _set(cfg, f"{section}.{key}", value, where, sources)
    for arg in overrides or []:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"command line: '{arg}': expected --section.key=value")
        dotted, value = arg[2:].split("=", 1)
        _set(cfg, dotted, value, "command line", sources)
    validate(cfg, sources)
    return cfg


# key -> (test, what is expected): values that type-check but make a run meaningless
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.tiny_dim": (lambda v: v >= 16, ">= 16"),
    "model.logits_chunk_mib": (lambda v: v >= 1, ">= 1"),
    "model.tiny_layers": (lambda v: v >= 1, ">= 1"),
    "model.tiny_vocab": (lambda v: v >= 64, ">= 64"),
    "data.max_length": (lambda v: v >= 1, ">= 1"),
    "data.max_prompt_length": (lambda v: v >= 1, ">= 1"),
    "data.max_tokens": (lambda v: v >= 2, ">= 2"),
    "data.num_workers": (lambda v: v >= 1, ">= 1"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "0 <= x < 1"),
    "loss.label_smoothing": (lambda v: 0 <= v < 1, "0 <= x < 1"),
    "loss.sft_weight": (lambda v: v >= 0, ">= 0"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.epochs": (lambda v: v >= 1, ">= 1"),
    "train.max_steps": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.adam_beta1": (lambda v: 0 <= v < 1, "0 <= x < 1"),
    "train.adam_beta2": (lambda v: 0 <= v < 1, "0 <= x < 1"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "0 <= x < 1"),
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "0 <= x <= 1"),
    "train.grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "train.save_every": (lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "train.keep_checkpoints": (lambda v: v >= 0, ">= 0 (0 = keep all)"),
    "train.eval_every": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
}


def validate(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """Every start-time check of a Config, in one place: train.py, eval.py and bench/ all get
    them from `load_config`. Raises ConfigError naming where the key was set and a fix."""
    sources = sources or {}

    def fail(key: str, value: Any, expected: str) -> None:
        where = sources.get(key, "default")
        raise ConfigError(f"{where}: {key} = {value!r}: expected {expected}")

    for key, (ok, expected) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            fail(key, value, expected)
    if cfg.loss.name not in ("sft", "orpo") and cfg.loss.beta <= 0:
        fail("loss.beta", cfg.loss.beta, f"> 0 ({cfg.loss.name} scales its rewards by β)")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        fail(
            "data.max_prompt_length", cfg.data.max_prompt_length,
            f"< data.max_length = {cfg.data.max_length} (the response gets what is left)",
        )  # fmt: skip
    if cfg.data.eval and cfg.data.eval_fraction:
        fail("data.eval_fraction", cfg.data.eval_fraction, "0 when data.eval is set (not both)")
    keys = [f"{section}.{key}" for section, values in to_dict(cfg).items() for key in values]
    for key in (k.strip() for k in cfg.train.resume_override.split(",") if k.strip()):
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see train.py --help)"
            fail(
                "train.resume_override",
                cfg.train.resume_override,
                f"config keys; {key!r} is not one{hint}",
            )


def check_data_fits(cfg: Config, splits: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Every tokenised pair of each (file, pairs) fits one packed row of data.max_tokens
    tokens; otherwise a ConfigError naming the longest pair's file and line, found at start
    rather than when that pair is drawn."""
    budget, packing = cfg.data.max_tokens, cfg.data.packing
    for path, pairs in splits:
        need, pair = max(((pair_tokens(p, packing), p) for p in pairs), default=(0, None),
                         key=lambda t: t[0])  # fmt: skip
        if need > budget:
            n = pair.index + 1
            where = f"{path}:{n}" if ".jsonl" in Path(path).name else f"{path} row {n}"
            raise ConfigError(
                f"data.max_tokens = {budget} is too small: the pair at {where} needs {need} "
                f"tokens with data.packing = {packing!r}; set --data.max_tokens={need} or more "
                f"(2 x data.max_length = {2 * cfg.data.max_length} fits any pair) or lower "
                "data.max_length"
            )


def parse_args(argv: list[str]) -> Config:
    """`--config FILE` (or `--config=FILE`) plus `--section.key=value` overrides."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("command line: --config needs a file")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        else:
            rest.append(arg)
        i += 1
    return load_config(path, rest)


def help_text() -> str:
    """Every section.key with its default and help line."""
    lines = ["usage: train.py [--config FILE] [--section.key=value ...]", ""]
    for sec in dataclasses.fields(Config):
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(sec.default_factory):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            key = f"{sec.name}.{f.name} = {default!r}"
            lines.append(f"  {key:<44} {f.metadata['help']}")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, str | list) else str(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal Config."""
    out = []
    for sec in dataclasses.fields(cfg):
        out.append(f"[{sec.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, sec.name)).items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)
