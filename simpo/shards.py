"""Resumable output in shards: a shard file exists whole or not at all.

A shard is written under a temporary name in its directory, flushed, fsync'ed and renamed to
`NNNNN.jsonl` (rename is atomic on POSIX), and the directory is fsync'ed so the rename itself
survives a crash. Only `NNNNN.jsonl` names are shards: a temporary file left by a killed run is
never read as one, and the next run removes it. A rerun skips every shard that exists; a
shard's content is a pure function of the settings, so skipped work equals redone work.

`settings.json` records the settings each stage ran with (a later stage's include the earlier
ones'); a rerun with different ones over existing shards is refused (its shards would mix two
runs) with the differing fields named.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SHARD = re.compile(r"^(\d{5})\.jsonl$")
TEMP_MARK = ".tmp-"


class ShardError(ValueError):
    """An output directory that cannot be resumed as asked; the message says why."""


def shard_path(directory: Path, i: int) -> Path:
    return directory / f"{i:05d}.jsonl"


def finished_shards(directory: Path) -> set[int]:
    """Numbers of the shards that exist (complete by construction)."""
    if not directory.is_dir():
        return set()
    return {int(m.group(1)) for p in directory.iterdir() if (m := SHARD.match(p.name))}


def remove_temporary(directory: Path) -> None:
    """Delete the temporary files of killed runs (never shards)."""
    if directory.is_dir():
        for p in directory.iterdir():
            if TEMP_MARK in p.name:
                p.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that `path` holds either its old content or all of `text`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_if_changed(path: Path, text: str) -> bool:
    """write_atomic unless `path` already holds exactly `text`; whether it wrote."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_atomic(path, text)
    return True


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a shard or output file; a corrupt line is an error naming file and line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}:{n}: not JSON ({e.msg}); delete the file to redo it") from e
    return rows


def check_settings(out: Path, stage: str, settings: dict[str, Any]) -> None:
    """Record `settings` for `stage` in out/settings.json, or refuse if shards of that stage
    (out/<stage>/) exist from a run with different settings, naming each differing field."""
    path = out / "settings.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    before = recorded.get(stage)
    if before == settings:
        return
    if before is not None and finished_shards(out / stage):
        diff = [
            f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now"
            for k in sorted(set(before) | set(settings))
            if before.get(k) != settings.get(k)
        ]
        raise ShardError(
            f"{out / stage} holds shards made with other settings ({'; '.join(diff)}); use "
            f"another --out, or delete {out / stage} to redo that stage"
        )
    recorded[stage] = settings
    write_atomic(path, json.dumps(recorded, indent=2) + "\n")
