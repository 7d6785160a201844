"""Preference files -> `Example(prompt messages, chosen text, rejected text)`, or a `Skip`.

Files: .jsonl, .json (a list of objects), either gzipped (.gz), and .parquet (optional pyarrow).
Text is decoded line by line: a line that is not UTF-8 is one skipped row (reason
invalid_utf8, with file:line), a UTF-8 byte-order mark is ignored, and a truncated or corrupt
.gz is an error naming the last complete line. Formats ("auto": the majority of the first
100 rows that have the chosen field, so one odd row does not decide):
  messages  UltraFeedback-binarized: `chosen` / `rejected` are message lists ending with the
            assistant's; the messages before it are the prompt and must match in both (when
            there are none, `prompt` holds it: a string or a message list).
  flat      `prompt`, `chosen`, `rejected` strings (the prompt is one user message).
  hh        Anthropic HH: `chosen` / `rejected` are whole dialogues
            "\\n\\nHuman: ...\\n\\nAssistant: ..."; the shared part up to the last common
            "\\n\\nAssistant:" becomes a multi-turn prompt.
Field names are configurable. A bad row raises `Skip(reason, detail)`; a bad file `DataError`.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("auto", "messages", "flat", "hh")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(ValueError):
    """A data file that cannot be used at all (unreadable, unsupported, nothing usable)."""


class Skip(Exception):
    """A row that is skipped and counted under `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Fields:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass(frozen=True)
class Example:
    prompt: list[dict[str, str]]  # messages; the last one is the user's
    chosen: str
    rejected: str


DETECT_ROWS = 100  # rows format detection looks at


def check_file(path: Path) -> None:
    """A DataError unless `path` is a readable file (a missing path and a folder differ)."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a data file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _lines(path: Path) -> list[tuple[int, str | bytes]]:
    """(0-based line, text) of every non-blank line; a line that is not UTF-8 stays bytes
    (parse_row skips it). A .gz that ends early is an error naming the last whole line."""
    out: list[tuple[int, str | bytes]] = []
    i = -1
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            for i, raw in enumerate(f):
                if i == 0 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    line: str | bytes = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw
                if line.strip():
                    out.append((i, line))
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{path}: truncated or corrupt gzip data after line {i + 1} (the last complete "
            f"one; {e}); re-download or re-compress it"
        ) from None
    return out


def _json_text(path: Path) -> str:
    """The whole (maybe gzipped) .json file as text; errors name the file and position."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: byte {e.start} is not UTF-8 ({e.reason})") from None


def read_records(path: Path) -> tuple[list[tuple[int, Any]], str]:
    """(0-based row, value) pairs and the unit rows are counted in ("line" or "row").

    A .jsonl value is the line's text (parsed later, so a malformed line is one skipped row and
    parsing can run in worker processes); blank lines are not rows.
    """
    check_file(path)
    kind = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if kind == ".jsonl":
        return _lines(path), "line"
    if kind == ".json":
        try:
            data = json.loads(_json_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return list(enumerate(data)), "row"
    if kind == ".parquet" and path.suffix != ".gz":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(
                f"{path}: reading parquet needs pyarrow: pip install pyarrow (or pip install "
                "simpo[parquet]), or convert it to JSONL elsewhere, e.g. with pandas: "
                "pd.read_parquet(src).to_json(dst, orient='records', lines=True)"
            ) from e
        return list(enumerate(pq.read_table(path).to_pylist())), "row"
    raise DataError(f"{path}: unsupported file type; expected .jsonl, .json (or .gz), .parquet")


def parse_row(value: Any) -> dict[str, Any]:
    """The row object of a record (a .jsonl line is parsed here)."""
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("invalid_utf8", f"byte {e.start} of the line is not UTF-8") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Skip("malformed_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(value, dict):
        raise Skip("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value


def detect_format(rows: Iterable[dict[str, Any]], fields: Fields) -> str:
    """The format most of the first DETECT_ROWS rows that have the chosen field look like: a
    list is "messages", a string with a prompt field "flat", a string without one "hh"."""
    votes: Counter[str] = Counter()
    for row in rows:
        if fields.chosen in row:
            if isinstance(row[fields.chosen], list):
                votes["messages"] += 1
            else:
                votes["flat" if fields.prompt in row else "hh"] += 1
            if votes.total() == DETECT_ROWS:
                break
    return votes.most_common(1)[0][0] if votes else "flat"


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row:
        raise Skip("missing_field", f"no {name!r} field")
    return row[name]


def _text(row: dict[str, Any], name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise Skip("non_string_content", f"{name} is {type(value).__name__}, expected a string")
    return value


def _messages(value: list[Any], name: str) -> list[dict[str, str]]:
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise Skip("bad_messages", f"{name}: expected messages {{'role': ..., 'content': ...}}")
        if not isinstance(m["content"], str):
            raise Skip("non_string_content", f"{name}: content is {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversation(row: dict[str, Any], name: str) -> tuple[list[dict[str, str]], str]:
    """(messages before the response, response text) of a chosen / rejected message list."""
    value = _field(row, name)
    if not isinstance(value, list):
        raise Skip("bad_messages", f"{name} is {type(value).__name__}, expected a message list")
    messages = _messages(value, name)
    if not messages or messages[-1]["role"] != "assistant":
        raise Skip("bad_messages", f"{name}: the last message must be the assistant's")
    return messages[:-1], messages[-1]["content"]


def _flat(row: dict[str, Any], fields: Fields) -> Example:
    prompt = [{"role": "user", "content": _text(row, fields.prompt)}]
    return Example(prompt, _text(row, fields.chosen), _text(row, fields.rejected))


def _ultrafeedback(row: dict[str, Any], fields: Fields) -> Example:
    before, chosen = _conversation(row, fields.chosen)
    rejected_before, rejected = _conversation(row, fields.rejected)
    if before != rejected_before:
        raise Skip("prompt_mismatch", "chosen and rejected differ before the last message")
    if before:  # the conversation carries the prompt (UltraFeedback's prompt field repeats it)
        return Example(before, chosen, rejected)
    prompt = _field(row, fields.prompt)
    if isinstance(prompt, list):
        return Example(_messages(prompt, fields.prompt), chosen, rejected)
    return Example([{"role": "user", "content": _text(row, fields.prompt)}], chosen, rejected)


def _hh(row: dict[str, Any], fields: Fields) -> Example:
    dialogues = [_text(row, fields.chosen), _text(row, fields.rejected)]
    cut = os.path.commonprefix(dialogues).rfind(ASSISTANT)
    if cut < 0:
        raise Skip("bad_dialogue", "no shared '\\n\\nAssistant:' turn")
    responses = [d[cut + len(ASSISTANT) :] for d in dialogues]
    if any(HUMAN in r or ASSISTANT in r for r in responses):
        raise Skip("bad_dialogue", "chosen and rejected differ before the last assistant turn")
    parts = _HH_TURN.split(dialogues[0][:cut])  # ["", "Human", " text", "Assistant", " text", ...]
    if parts[0].strip():
        raise Skip("bad_dialogue", "text before the first '\\n\\nHuman:' turn")
    prompt = [
        {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
        for role, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    return Example(prompt, responses[0].strip(), responses[1].strip())


_PARSERS = {"messages": _ultrafeedback, "flat": _flat, "hh": _hh}


def to_example(row: dict[str, Any], fmt: str, fields: Fields) -> Example:
    """Parse and validate one row of format `fmt` ("messages", "flat" or "hh")."""
    ex = _PARSERS[fmt](row, fields)
    if any(not m["content"].strip() for m in ex.prompt if m["role"] != "system"):
        raise Skip("empty_prompt", "a prompt message is empty")
    if not ex.chosen.strip() or not ex.rejected.strip():
        raise Skip("empty_response", "chosen or rejected is empty")
    if ex.chosen.strip() == ex.rejected.strip():
        raise Skip("identical_responses", "chosen == rejected")
    return ex
