"""Input robustness of the preference readers: a bad byte costs one line, a BOM costs nothing,
format detection by majority, truncated or fake .gz, a folder or missing path as the data."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
from sp_helpers import train_tokenizer

from simpo.config import DataConfig
from simpo.data import DataError, load_pairs
from simpo.tokenizer import Tokenizer


def flat(i: int) -> bytes:
    row = {"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"Bad {i}."}
    return json.dumps(row).encode()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(tmp_path_factory.mktemp("sp"))


def load(path: Path, tok: Tokenizer, **overrides):
    cfg = replace(DataConfig(cache_dir=str(path.parent / "cache")), **overrides)
    return load_pairs(path, tok, cfg, progress=False)


def test_a_bad_byte_costs_only_its_line(tok, tmp_path):
    """One non-UTF-8 byte used to reject the whole file with no line number."""
    path = tmp_path / "d.jsonl"
    lines = [flat(0), flat(1)[:-3] + b"\xff\xfe" + flat(1)[-3:], flat(2), flat(3)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    pairs, report = load(path, tok)
    assert [p.index for p in pairs] == [0, 2, 3]
    assert report.skipped == {"invalid_utf8": 1}
    at = len(flat(1)) - 3
    assert report.examples["invalid_utf8"] == [f"{path}:2: byte {at} of the line is not UTF-8"]


def test_a_byte_order_mark_costs_nothing(tok, tmp_path):
    """A UTF-8 BOM (Windows editors) used to make row 1 malformed JSON."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(flat(i) for i in range(3)) + b"\n")
    pairs, report = load(path, tok)
    assert len(pairs) == 3 and report.num_skipped == 0
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + b"[" + b",".join(flat(i) for i in range(3)) + b"]")
    assert len(load(as_json, tok)[0]) == 3


def test_one_odd_first_row_does_not_decide_the_format(tok, tmp_path):
    """Detection used to follow the first row: a first row without a prompt made a good flat
    file look like Anthropic HH and every row was rejected."""
    path = tmp_path / "d.jsonl"
    odd = json.dumps({"chosen": "A.", "rejected": "B."}).encode()
    path.write_bytes(b"\n".join([odd, *(flat(i) for i in range(5))]) + b"\n")
    pairs, report = load(path, tok)
    assert report.format == "flat" and len(pairs) == 5
    assert report.skipped == {"missing_field": 1}


@pytest.mark.parametrize("damage", ["truncated", "fake"])
def test_a_broken_gzip_names_the_file_and_the_last_good_line(tok, tmp_path, damage):
    path = tmp_path / "d.jsonl.gz"
    text = b"\n".join(flat(i) for i in range(400)) + b"\n"
    if damage == "truncated":
        whole = gzip.compress(text)
        path.write_bytes(whole[: len(whole) // 2])
        match = r"d\.jsonl\.gz: truncated or corrupt gzip data after line \d+ \(the last complete"
    else:
        path.write_bytes(text)  # plain text named .gz
        match = r"d\.jsonl\.gz: truncated or corrupt gzip data after line 0 .*Not a gzipped"
    with pytest.raises(DataError, match=match):
        load(path, tok)


def test_a_folder_or_a_missing_path_as_the_data_file(tok, tmp_path):
    """train.py hashed the path for its cache before checking it (IsADirectoryError,
    FileNotFoundError tracebacks); eval.py called a folder 'no such file'."""
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match=r"folder\.jsonl: is a directory; expected a data file"):
        load(tmp_path / "folder.jsonl", tok)
    with pytest.raises(DataError, match=r"nowhere\.jsonl: no such file"):
        load(tmp_path / "nowhere.jsonl", tok)


def test_invalid_utf8_in_a_json_list_names_the_line(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + flat(0) + b",\n" + flat(1).replace(b"Bad", b"B\xffd") + b"]")
    with pytest.raises(DataError, match=r"d\.json: line 2: byte \d+ is not UTF-8"):
        load(path, tok)
