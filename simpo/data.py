"""Preference data: read, validate, render the chat template, tokenise, truncate, cache.

`load_pairs(path, tokenizer, cfg)` returns `TokenizedPair`s and a `LoadReport`. Bad rows are
skipped and counted per reason (with the first few file:line examples); a file with no usable
row is an error. `cfg` is any object with DataConfig's attributes (simpo/config.py).

Truncation: the prompt is cut to `max_prompt_length` (keep_end keeps BOS and the last tokens,
keep_start the first), then each response gets `max_length - len(prompt)` tokens, not the
official trainer's `max_length - max_prompt_length`. A cut response has no EOS, which biases
SimPO's length normalisation: cut responses are counted.
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
from simpo.templates import MASKS, TEMPLATES, TemplateError, encode_conversation, get_template
from simpo.templates import encode_prompt as encode_prompt  # re-exported: prompts for generation
from simpo.tokenizer import Tokenizer

TRUNCATIONS = ("keep_end", "keep_start")
CACHE_VERSION = 1  # bump when tokenisation changes, so old caches are not reused
_EXAMPLES = 3  # file:line examples kept per skip reason
_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]  # BOS + prompt turns (+ assistant header with mask "trl")
    chosen_ids: list[int]  # end with EOS / end-of-turn unless truncated
    rejected_ids: list[int]
    index: int  # 0-based row in the source file


@dataclass
class LoadReport:
    path: str
    format: str = ""
    template: str = ""
    mask: str = ""
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
            f"  truncated: {self.truncated_prompts} prompts, {self.truncated_chosen} chosen and "
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
    template: str
    mask: str
    max_length: int
    max_prompt_length: int
    truncation: str


def check_config(cfg: Any) -> None:
    """Raise ValueError naming the data.* key that has a bad value."""
    for key, allowed in (("mask", MASKS), ("truncation", TRUNCATIONS), ("format", FORMATS)):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"data.{key} = {getattr(cfg, key)!r}; expected one of {allowed}")
    for key in ("max_length", "max_prompt_length"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key} = {getattr(cfg, key)}; expected >= 1")
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
) -> tuple[list[int], list[list[int]], bool, list[bool]]:
    """(prompt, responses, prompt was cut, each response was cut).

    keep_end never drops the first `keep_first` prompt tokens (BOS). Each response keeps
    `max_length - len(prompt)` tokens, so prompt + response <= max_length; Skip when that is 0.
    """
    cut_prompt = len(prompt) > max_prompt_length
    if cut_prompt and truncation == "keep_start":
        prompt = prompt[:max_prompt_length]
    elif cut_prompt:
        prompt = prompt[:keep_first] + prompt[len(prompt) - max_prompt_length + keep_first :]
    budget = max_length - len(prompt)
    if budget < 1:
        raise Skip("prompt_too_long", f"{len(prompt)} prompt tokens leave no room in {max_length}")
    return prompt, [r[:budget] for r in responses], cut_prompt, [len(r) > budget for r in responses]


Result = tuple[TokenizedPair, tuple[bool, bool, bool]] | Skip


def _encode(tokenizer: Tokenizer, s: _Settings, record: tuple[int, Any]) -> Result:
    index, value = record
    try:
        ex = to_example(parse_row(value), s.format, s.fields)
        try:
            prompt, responses = encode_conversation(
                tokenizer, TEMPLATES[s.template], ex.prompt, [ex.chosen, ex.rejected], s.mask
            )
        except TemplateError as e:
            raise Skip("bad_roles", str(e)) from None
        keep_first = int(tokenizer.bos_id is not None)
        prompt, (chosen, rejected), cut, (cut_c, cut_r) = truncate_pair(
            prompt, responses, s.max_length, s.max_prompt_length, s.truncation, keep_first
        )
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cache_file(cfg: Any, path: Path, tokenizer: Tokenizer, s: _Settings) -> Path:
    key = {"version": CACHE_VERSION, "data": _sha256(path), "tokenizer": tokenizer.fingerprint}
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
    template = get_template(cfg.template, tokenizer).name
    fields = Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    lengths = (cfg.max_length, cfg.max_prompt_length, cfg.truncation)
    s = _Settings(cfg.format, fields, template, cfg.mask, *lengths)
    check_file(path)  # before hashing it for the cache key
    cache = _cache_file(cfg, path, tokenizer, s) if cfg.cache_dir else None
    if cache is not None and cache.is_file():
        return _load_cache(cache, path)
    records, unit = read_records(path)
    if s.format == "auto":
        s = replace(s, format=detect_format(_parsed(records), fields))
    report = LoadReport(str(path), s.format, template, cfg.mask, rows=len(records))
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
        raise DataError(f"{path}: no usable preference pairs\n{report.summary()}")
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
