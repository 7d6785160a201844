"""Read an offline W&B run file back (the tests' independent check of what W&B stored)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (LevelDB log framing after a 7-byte
    W&B header: 32 KiB blocks, each record chunk with crc32 (4), length (2), type (1))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            break
        chunks += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(run_dir: Path) -> tuple[str, dict[int, dict[str, float]], dict]:
    """(run id, {step: metrics}, config) of an offline run directory."""
    (file,) = run_dir.glob("run-*.wandb")
    history, config, run_id = {}, {}, None
    for r in read_wandb_records(file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history[int(items.pop("_step"))] = {k: v for k, v in items.items() if k[0] != "_"}
        elif kind == "run":
            run_id = r.run.run_id
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
            config = {k: v for k, v in config.items() if k != "_wandb"}  # W&B's own entry
    return run_id, history, config
