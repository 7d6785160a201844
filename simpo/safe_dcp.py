"""Read torch.distributed.checkpoint (DCP) folders without running code from them.

DCP's own reader unpickles `.metadata` with `pickle.load` and every non-tensor entry (the
optimizer's param_groups) with `torch.load(weights_only=False)`: a crafted checkpoint folder
runs whatever it likes on resume. Here `.metadata` goes through an Unpickler whose
`find_class` allows only the classes DCP itself writes there (its metadata dataclasses,
torch.Size, dtypes, layouts, a path), whose constructors only store their arguments; the
non-tensor entries and tensors are read with torch's weights-only unpickler. torch's
weights-only unpickler cannot read `.metadata` itself: DCP writes it with pickle protocol 5
(STACK_GLOBAL, FRAME, MEMOIZE), which that unpickler does not implement. We keep DCP for its
resharding (a checkpoint of N ranks resumes on M).

`verify` checks a checkpoint folder cheaply before anything is built: the metadata parses,
every data file it names exists and is long enough for the bytes it points at.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP = "torch.distributed.checkpoint"
ALLOWED = {
    *((f"{_DCP}.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
}  # fmt: skip


class UnreadableCheckpoint(ValueError):
    """A checkpoint folder that cannot (or must not) be read; the message says why."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnreadableCheckpoint(
            f"it refers to {module}.{name}, which DCP metadata never holds (refused: "
            "loading it could run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnreadableCheckpoint("it holds a persistent id, which DCP metadata never holds")


def read_metadata(path: Path) -> Metadata:
    """The DCP Metadata of checkpoint folder `path`, read without running code from it."""
    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnreadableCheckpoint as e:
        raise UnreadableCheckpoint(f"{file}: {e}") from None
    except Exception as e:  # truncated / garbage: EOFError, UnpicklingError, ValueError, ...
        raise UnreadableCheckpoint(f"{file}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UnreadableCheckpoint(f"{file}: not DCP metadata ({type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader with `read_metadata` above (tensors: weights_only already)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are unpickled weights-only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def verify(path: Path) -> None:
    """Raise UnreadableCheckpoint unless `path`'s metadata parses and every data file it names
    holds the bytes it points at (catches truncated or missing .distcp files)."""
    metadata = read_metadata(path)
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(info.relative_path)
        need[name] = max(need.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(need.items()):
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UnreadableCheckpoint(f"{path}/.metadata: names a file outside the folder: {name}")
        if not file.is_file():
            raise UnreadableCheckpoint(f"{file}: missing")
        if file.stat().st_size < size:
            raise UnreadableCheckpoint(
                f"{file}: truncated ({file.stat().st_size} bytes, the metadata needs {size})"
            )
