"""simpo/model_card.py: hub ids, licenses, the loss table, eval.py's section (no training here;
tests/test_run_outputs.py checks the card of a real export)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from simpo.config import LossConfig
from simpo.losses import LOSSES
from simpo.model_card import (
    EVAL_END,
    LOSS_KEYS,
    add_eval_results,
    base_license,
    eval_block,
    hub_id,
    sha256_file,
)


def test_hub_id_from_the_hf_cache_or_name_or_path(tmp_path):
    snap = tmp_path / "hub" / "models--meta-llama--Meta-Llama-3-8B-Instruct" / "snapshots" / "ab12"
    snap.mkdir(parents=True)
    assert hub_id(snap) == "meta-llama/Meta-Llama-3-8B-Instruct"
    local = tmp_path / "ckpt"
    local.mkdir()
    assert hub_id(local) is None  # no config.json
    (local / "config.json").write_text(json.dumps({"_name_or_path": "google/gemma-2-9b-it"}))
    assert hub_id(local) == "google/gemma-2-9b-it"
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/data/ckpt/x"}))
    assert hub_id(local) is None  # a local path is not a hub id


def test_license_comes_from_the_base_models_card(tmp_path):
    assert base_license(tmp_path) == {}
    (tmp_path / "README.md").write_text(
        "---\nlanguage:\n- en\nlicense: other\nlicense_name: llama3\n"
        "license_link: LICENSE\ntags:\n- llama\n---\n# Llama 3\nlicense: not front matter\n"
    )
    assert base_license(tmp_path) == {
        "license": "other", "license_name": "llama3", "license_link": "LICENSE",
    }  # fmt: skip


def test_every_loss_lists_only_keys_it_has():
    assert set(LOSS_KEYS) == set(LOSSES)
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert all(set(keys) <= fields for keys in LOSS_KEYS.values())


def test_sha256_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_eval_results_replace_their_row_and_keep_the_others(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(f"# run\n\n## Evaluation\n\n{eval_block({})}\n\n## Reproduce\n\nmore\n")
    m1 = {"num_pairs": 400, "accuracy": 0.71234, "margin": 0.5, "length_corr": -0.05}
    assert add_eval_results(tmp_path, "heldout.jsonl", m1) == card
    add_eval_results(tmp_path, "other -->.jsonl", {"num_pairs": 10, "accuracy": 0.5})
    add_eval_results(tmp_path, "heldout.jsonl", m1 | {"accuracy": 0.8, "model": "x"})
    text = card.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `heldout.jsonl` | 400 | 0.800 | 0.500 |")  # replaced
    assert rows[1].startswith("| `other -->.jsonl` | 10 | 0.500 |") and len(rows) == 2
    assert text.count(EVAL_END) == 1 and text.endswith("## Reproduce\n\nmore\n")
    assert "No eval.py results yet" not in text


def test_eval_results_leave_a_card_of_someone_else_alone(tmp_path):
    assert add_eval_results(tmp_path, "x.jsonl", {"accuracy": 1.0}) is None  # no card
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# Someone's model\n")
    assert add_eval_results(tmp_path, "x.jsonl", {"accuracy": 1.0}) is None
    assert (tmp_path / "README.md").read_text() == "---\nlicense: mit\n---\n# Someone's model\n"
