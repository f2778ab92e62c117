"""The history rows of a W&B run file (``run-<id>.wandb``), read without a W&B server: the file is a
LevelDB-style log (7-byte header ``:W&B`` + magic + version, then 32 KiB blocks of records, each a 7-byte
header: crc32, little-endian length, kind 1 full / 2 first / 3 middle / 4 last) of ``Record`` protobufs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def history(path: Path) -> list[dict]:
    """Each history row as {key: value}, W&B's own ``_step``, ``_runtime``, ``_timestamp`` included."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]
