"""simpo.checkpoint: HF round trips (sharded), dtypes, tied heads, FSDP2 params, bad checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hf_tiny import FAMILIES, cached_tiny_hf, load_hf, one_thread  # noqa: F401
from safetensors.torch import load_file, save_file

from simpo.demo.tiny import tiny_args
from simpo.hf import INDEX, SINGLE, load_model, load_state_into, save_hf
from simpo.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def _random_model(family: str, seed: int = 0) -> Transformer:
    model = Transformer(tiny_args(family))
    model.init_weights(seed, std=0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip_through_transformers(family: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = _random_model(family)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"spm")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    out = save_hf(model, tmp_path / "out", tokenizer_dir=tmp_path / "tok", max_shard_bytes=40_000)
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert (out / "tokenizer.model").read_bytes() == b"spm"
    assert (out / "tokenizer_config.json").is_file() and not (out / "tokenizer.json").exists()
    with torch.no_grad():
        want = model(IDS)
        hf = load_hf(out)(IDS).logits
        ours = load_model(out)(IDS)
    assert (hf - want).abs().max() < 1e-4
    assert torch.equal(ours, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_hf_single_file_in_half_precision(dtype: torch.dtype, tmp_path: Path) -> None:
    model = _random_model("gemma2")
    out = save_hf(model, tmp_path, dtype=dtype)
    assert (out / SINGLE).is_file() and not (out / INDEX).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(dtype)[6:] and config["architectures"] == ["Gemma2ForCausalLM"]
    tensors = load_file(out / SINGLE)
    assert "lm_head.weight" not in tensors  # tied: stored once, as HF does
    assert all(t.dtype == dtype for t in tensors.values())
    loaded = load_model(out)  # half precision on disk -> fp32 in memory
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[name].to(dtype).float()), name


def test_stale_shards_are_removed(tmp_path: Path) -> None:
    model = _random_model("llama")
    save_hf(model, tmp_path, max_shard_bytes=40_000)
    save_hf(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == [SINGLE]


def test_tied_checkpoint_may_store_lm_head(tmp_path: Path) -> None:
    model = _random_model("gemma")
    save_hf(model, tmp_path)
    tensors = load_file(tmp_path / SINGLE)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old llama exports
    save_file(tensors, tmp_path / SINGLE)
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.head_weight, model.head_weight)


def _break(tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """A copy of a saved tiny llama with `edit` applied to its tensors."""
    save_hf(_random_model("llama"), tmp_path)
    tensors = load_file(tmp_path / SINGLE)
    edit(tensors)
    save_file(tensors, tmp_path / SINGLE)
    return tmp_path


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = _break(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj"):
        load_model(path)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    path = _break(tmp_path, lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): model\.extra\.weight"):
        load_model(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _break(tmp_path, lambda t: t.update({name: torch.ones(16, 64)}))
    with pytest.raises(ValueError, match=rf"{name} has shape \(16, 64\), expected \(32, 64\)"):
        load_model(path)


def test_unknown_model_type(tmp_path: Path) -> None:
    save_hf(_random_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(ValueError, match="'model_type' is 'falcon'"):
        load_model(tmp_path)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return save_hf(_random_model("llama"), tmp_path / "m", max_shard_bytes=40_000)


def test_corrupt_index_json(sharded: Path) -> None:
    (sharded / INDEX).write_text('{"weight_map": {"model.norm.weight": ')
    with pytest.raises(ValueError, match=r"index\.json: corrupt index"):
        load_model(sharded)
    (sharded / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="weight_map"):
        load_model(sharded)


def test_index_naming_a_missing_shard(sharded: Path) -> None:
    index = json.loads((sharded / INDEX).read_text())
    (sharded / index["weight_map"]["model.norm.weight"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"names shard model-000\d\d-of-000\d\d"):
        load_model(sharded)


def test_index_pointing_at_the_wrong_shard(sharded: Path) -> None:
    index = json.loads((sharded / INDEX).read_text())
    wrong = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"]["model.norm.weight"] = wrong
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{wrong}: the index maps tensor model\.norm\.weight"):
        load_model(sharded)


def test_truncated_shard_and_empty_dir(sharded: Path, tmp_path: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file"):
        load_model(sharded)
    (tmp_path / "empty").mkdir()
    shutil.copy(sharded / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_model(tmp_path / "empty")


def test_fsdp2_dtensor_params_load_and_save(tmp_path: Path) -> None:
    """load_state_into / save_hf / init_weights on FSDP2-sharded params (1-rank gloo group)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    src = save_hf(_random_model("qwen2"), tmp_path / "src")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = Transformer(tiny_args("qwen2"))
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        assert isinstance(model.model.embed_tokens.weight, DTensor)
        load_state_into(model, src)
        save_hf(model, tmp_path / "out")
        model.init_weights(seed=0, std=0.1)  # same init as the source model
        again = save_hf(model, tmp_path / "again")
    finally:
        dist.destroy_process_group()
    a, b, c = (load_file(p / SINGLE) for p in (src, tmp_path / "out", again))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
