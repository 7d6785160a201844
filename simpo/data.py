"""Preference data: read, validate, render the chat template, tokenise, truncate, cache.

`load_pairs(path, tokenizer, cfg)` returns `TokenizedPair`s and a `LoadReport`. Bad rows are
skipped and counted per reason (with the first few file:line examples); a file with no usable
row is an error. `cfg` is any object with DataConfig's attributes (simpo/config.py).

Templates and conventions (data.template / data.chat_template, data.mask) are
simpo/templates.py and simpo/conventions.py. Truncation (data.truncation_rule):
  fit       the prompt is cut to `max_prompt_length` when longer (keep_end keeps BOS and the
            last tokens, keep_start the first), then each response gets
            `max_length - len(prompt)` tokens.
  official  the official SimPO trainer (`tokenize_row`): only when prompt + the longer response
            exceed `max_length` is the prompt cut to `max_prompt_length` (keep_end: its last
            tokens, BOS included in the cut), and if the pair is still too long both responses
            are cut to `max_length - max_prompt_length` (248 tokens at 2048 / 1800).
A cut response has no EOS, which biases SimPO's length normalisation: cut responses are counted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from simpo.conventions import CONVENTIONS, encode_pair
from simpo.conventions import encode_prompt as encode_prompt  # re-exported: generation prompts
from simpo.progress import progress_bar
from simpo.readers import (
    FORMATS,
    DataError,
    Fields,
    Skip,
    check_file,
    detect_format,
    parse_row,
    read_records,
    to_example,
)
from simpo.runfiles import file_sha256
from simpo.templates import ChatTemplate, TemplateError, get_template
from simpo.tokenizer import Tokenizer

TRUNCATIONS = ("keep_end", "keep_start")
TRUNCATION_RULES = ("fit", "official")
CACHE_VERSION = 2  # bump when tokenisation changes, so old caches are not reused
_EXAMPLES = 3  # file:line examples kept per skip reason
_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]  # the prompt as the convention tokenises it (simpo/conventions.py)
    chosen_ids: list[int]  # official: header .. EOS; trl: content .. turn end (unless cut)
    rejected_ids: list[int]
    index: int  # 0-based row in the source file


@dataclass
class LoadReport:
    path: str
    format: str = ""
    template: str = ""
    mask: str = ""
    truncation_rule: str = ""
    rows: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> "file:line: detail"
    truncated_prompts: int = 0
    truncated_chosen: int = 0  # cut to fit max_length: no EOS
    truncated_rejected: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COLUMNS, 0))
    cached: bool = False

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, reason: str, example: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(example)

    def add_pair(self, pair: TokenizedPair, cuts: tuple[bool, bool, bool]) -> None:
        self.pairs += 1
        for name in _COLUMNS:
            self.tokens[name] += len(getattr(pair, name))
        self.truncated_prompts += cuts[0]
        self.truncated_chosen += cuts[1]
        self.truncated_rejected += cuts[2]

    def summary(self) -> str:
        source = ", from cache" if self.cached else ""
        lines = [
            f"{self.path}: {self.pairs} pairs from {self.rows} rows ({self.format}, template "
            f"{self.template}, mask {self.mask}{source})",
            f"  truncated ({self.truncation_rule} rule): {self.truncated_prompts} prompts, "
            f"{self.truncated_chosen} chosen and "
            f"{self.truncated_rejected} rejected responses (these have no EOS)",
        ]
        if self.pairs:
            mean = ", ".join(f"{n[:-4]} {t / self.pairs:.0f}" for n, t in self.tokens.items())
            lines.append(f"  mean tokens: {mean}")
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n} ({reason}), e.g.:")
            lines += [f"    {e}" for e in self.examples[reason]]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Settings:
    """What turns a row into ids: shipped to worker processes and part of the cache key."""

    format: str
    fields: Fields
    template: ChatTemplate
    mask: str
    max_length: int
    max_prompt_length: int
    truncation: str
    truncation_rule: str


def check_config(cfg: Any) -> None:
    """Raise ValueError naming the data.* key that has a bad value."""
    choices = [("mask", CONVENTIONS), ("truncation", TRUNCATIONS), ("format", FORMATS)]
    choices.append(("truncation_rule", TRUNCATION_RULES))
    for key, allowed in choices:
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"data.{key} = {getattr(cfg, key)!r}; expected one of {allowed}")
    for key in ("max_length", "max_prompt_length"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key} = {getattr(cfg, key)}; expected >= 1")
    if cfg.truncation_rule == "official" and cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(
            f"data.max_prompt_length = {cfg.max_prompt_length} must be < data.max_length = "
            f"{cfg.max_length} with data.truncation_rule = 'official' (a cut response keeps "
            "max_length - max_prompt_length tokens)"
        )
    if not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction = {cfg.eval_fraction}; expected 0 <= x < 1")
    if cfg.num_workers < 1:
        raise ValueError(f"data.num_workers = {cfg.num_workers}; expected >= 1")


def truncate_pair(
    prompt: list[int],
    responses: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    keep_first: int = 0,
    rule: str = "fit",
) -> tuple[list[int], list[list[int]], bool, list[bool]]:
    """(prompt, responses, prompt was cut, each response was cut) under `rule` (module doc).

    "fit": keep_end never drops the first `keep_first` prompt tokens (BOS); each response keeps
    `max_length - len(prompt)` tokens, so prompt + response <= max_length; Skip when that is 0.
    """
    if rule == "official":
        return _truncate_official(prompt, responses, max_length, max_prompt_length, truncation)
    cut_prompt = len(prompt) > max_prompt_length
    if cut_prompt and truncation == "keep_start":
        prompt = prompt[:max_prompt_length]
    elif cut_prompt:
        prompt = prompt[:keep_first] + prompt[len(prompt) - max_prompt_length + keep_first :]
    budget = max_length - len(prompt)
    if budget < 1:
        raise Skip("prompt_too_long", f"{len(prompt)} prompt tokens leave no room in {max_length}")
    return prompt, [r[:budget] for r in responses], cut_prompt, [len(r) > budget for r in responses]


def _truncate_official(
    prompt: list[int],
    responses: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    truncation: str,
) -> tuple[list[int], list[list[int]], bool, list[bool]]:
    """The official trainer's `tokenize_row` truncation (simpo_trainer.py), on one shared prompt."""
    longer = max(len(r) for r in responses)
    n = len(prompt)
    if n + longer > max_length and truncation == "keep_start":
        prompt = prompt[:max_prompt_length]
    elif n + longer > max_length:  # the last tokens: BOS goes too
        prompt = prompt[-max_prompt_length:]
    cut = [False] * len(responses)
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length  # whatever the prompt's length
        cut = [len(r) > keep for r in responses]
        responses = [r[:keep] for r in responses]
    return prompt, responses, len(prompt) < n, cut


def check_roles(messages: list[dict[str, str]]) -> None:
    """Skip unless: an optional system message, then user / assistant alternating, ending with
    user (every reader's prompt; templates may check less)."""
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * len(turns)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "user":
        raise Skip(
            "bad_roles",
            f"roles {roles}: expected an optional system message, then user/assistant "
            "alternating, ending with user",
        )


Result = tuple[TokenizedPair, tuple[bool, bool, bool]] | Skip


def _encode(tokenizer: Tokenizer, s: _Settings, record: tuple[int, Any]) -> Result:
    index, value = record
    try:
        ex = to_example(parse_row(value), s.format, s.fields)
        check_roles(ex.prompt)
        try:
            prompt, responses = encode_pair(
                tokenizer, s.template, ex.prompt, [ex.chosen, ex.rejected], s.mask
            )
        except TemplateError as e:
            raise Skip("template_refused", str(e)) from None
        if not all(responses):
            raise Skip("empty_response", "a response has no tokens after the prompt's")
        keep_first = int(bool(prompt) and prompt[0] == tokenizer.bos_id)
        prompt, (chosen, rejected), cut, (cut_c, cut_r) = truncate_pair(
            prompt, responses, s.max_length, s.max_prompt_length, s.truncation, keep_first,
            s.truncation_rule,
        )  # fmt: skip
    except Skip as skip:
        return skip
    return TokenizedPair(prompt, chosen, rejected, index), (cut, cut_c, cut_r)


_worker: tuple[Tokenizer, _Settings]  # set in each worker process by _init_worker


def _init_worker(tokenizer: Tokenizer, settings: _Settings) -> None:
    global _worker
    _worker = (tokenizer, settings)


def _work(record: tuple[int, Any]) -> Result:
    return _encode(*_worker, record)


def _run(
    tokenizer: Tokenizer, s: _Settings, records: list[tuple[int, Any]], workers: int, bar: bool
) -> Iterator[Result]:
    progress = {"total": len(records), "desc": "tokenising", "unit": "row", "disable": not bar}
    if workers <= 1:
        yield from progress_bar((_encode(tokenizer, s, r) for r in records), **progress)
        return
    with multiprocessing.Pool(workers, _init_worker, (tokenizer, s)) as pool:
        yield from progress_bar(pool.imap(_work, records, chunksize=64), **progress)


def _parsed(records: Iterable[tuple[int, Any]]) -> Iterator[dict[str, Any]]:
    for _, value in records:
        try:
            yield parse_row(value)
        except Skip:
            continue


def _cache_file(cfg: Any, path: Path, tokenizer: Tokenizer, s: _Settings) -> Path:
    key = {"version": CACHE_VERSION, "data": file_sha256(path), "tokenizer": tokenizer.fingerprint}
    key |= asdict(s)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cfg.cache_dir).expanduser() / f"{path.name}.{digest[:16]}.npz"


def _save_cache(file: Path, pairs: list[TokenizedPair], report: LoadReport) -> None:
    """Flat int32 ids + lengths per column (numpy .npz, no pickle), written atomically."""
    arrays = {
        "index": np.array([p.index for p in pairs], dtype=np.int64),
        "report": np.array(json.dumps(asdict(report))),
    }
    for name in _COLUMNS:
        seqs = [getattr(p, name) for p in pairs]
        arrays[name] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32)
        arrays[name + "_len"] = np.array([len(x) for x in seqs], dtype=np.int64)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, file)  # ranks racing to write the same cache never leave half a file


def _load_cache(file: Path, path: Path) -> tuple[list[TokenizedPair], LoadReport]:
    with np.load(file, allow_pickle=False) as z:
        columns = [np.split(z[n], np.cumsum(z[n + "_len"])[:-1]) for n in _COLUMNS]
        pairs = [
            TokenizedPair(p.tolist(), c.tolist(), r.tolist(), i)
            for i, p, c, r in zip(z["index"].tolist(), *columns, strict=True)
        ]
        report = LoadReport(**json.loads(str(z["report"])))
    report.path, report.cached = str(path), True
    return pairs, report


def load_pairs(
    path: str | Path, tokenizer: Tokenizer, cfg: Any, *, progress: bool = True
) -> tuple[list[TokenizedPair], LoadReport]:
    """Tokenised pairs of a preference file, in file order, and what was skipped / truncated."""
    check_config(cfg)
    path = Path(path)
    try:
        template = get_template(tokenizer, cfg.template, cfg.chat_template)
    except TemplateError as e:
        raise DataError(str(e)) from None
    fields = Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    lengths = (cfg.max_length, cfg.max_prompt_length, cfg.truncation, cfg.truncation_rule)
    s = _Settings(cfg.format, fields, template, cfg.mask, *lengths)
    check_file(path)  # before hashing it for the cache key
    cache = _cache_file(cfg, path, tokenizer, s) if cfg.cache_dir else None
    if cache is not None and cache.is_file():
        return _load_cache(cache, path)
    records, unit = read_records(path)
    if s.format == "auto":
        s = replace(s, format=detect_format(_parsed(records), fields))
    report = LoadReport(str(path), s.format, template.name, cfg.mask, cfg.truncation_rule)
    report.rows = len(records)
    pairs = []
    results = _run(tokenizer, s, records, cfg.num_workers, progress)
    for (index, _), result in zip(records, results, strict=True):
        if isinstance(result, Skip):
            where = f"{path}:{index + 1}" if unit == "line" else f"{path} row {index + 1}"
            report.add_skip(result.reason, f"{where}: {result.detail}")
        else:
            pairs.append(result[0])
            report.add_pair(*result)
    if not pairs:
        hint = ""
        if "template_refused" in report.skipped and cfg.mask == "official":
            hint = (
                "\n  the official convention renders each response as a lone assistant message, "
                "which this template refuses; the official SimPO run replaced Mistral's template "
                "(data.chat_template = 'configs/templates/mistral-simpo.jinja'), or use "
                "data.mask = 'trl'"
            )
        raise DataError(f"{path}: no usable preference pairs\n{report.summary()}{hint}")
    if cache is not None:
        _save_cache(cache, pairs, report)
    return pairs, report


def split_pairs(
    pairs: list[TokenizedPair], fraction: float, seed: int
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train, held_out): shuffled by `seed`, then round(fraction * n) pairs held out (>= 1)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction {fraction}; expected 0 <= x < 1")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(order))) if fraction > 0 else 0
    if n >= len(order):
        raise DataError(f"holding out {fraction} of {len(order)} pairs leaves none to train on")
    return order[n:], order[:n]


def load_datasets(
    cfg: Any, tokenizer: Tokenizer, seed: int, *, progress: bool = True
) -> tuple[list[TokenizedPair], list[TokenizedPair], list[LoadReport]]:
    """(train pairs shuffled by `seed`, eval pairs, reports): eval from cfg.eval, else a held-out
    cfg.eval_fraction of cfg.train."""
    if cfg.eval and cfg.eval_fraction:
        raise ValueError("set data.eval or data.eval_fraction, not both")
    train, report = load_pairs(cfg.train, tokenizer, cfg, progress=progress)
    if not cfg.eval:
        return *split_pairs(train, cfg.eval_fraction, seed), [report]
    held_out, eval_report = load_pairs(cfg.eval, tokenizer, cfg, progress=progress)
    return split_pairs(train, 0.0, seed)[0], held_out, [report, eval_report]
