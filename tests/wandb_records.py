"""Read what an offline W&B run wrote: the records of its ``run-<id>.wandb`` file.

An offline run has no ``wandb-summary.json``; everything it logged is in ``run-<id>.wandb``, a
LevelDB-style log (a 7-byte header ``:W&B``, version; then 32 KiB blocks of chunks, each with a 7-byte
header: CRC-32, length, type FULL/FIRST/MIDDLE/LAST) whose payloads are ``wandb_internal_pb2.Record``
protobufs. wandb >= 0.19 writes it from its Go core and no longer ships a Python reader, so the few
lines below read it.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    """Every record of a ``.wandb`` file, parsed with wandb's own protobuf class."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file (header {ident!r})"
    out, pos, pending = [], 7, b""
    while pos + CHUNK_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER.size:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        out.append(record)
    return out


@dataclass
class OfflineRun:
    """What one offline run logged: history rows, config, artifacts."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""
    name: str = ""
    #: The run's final summary (wandb-core's last summary records), by key.
    summary: dict[str, Any] = field(default_factory=dict)
    #: ``define_metric`` definitions by metric name: ``step_metric`` and the ``summary`` kinds.
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def last(self, key: str) -> Any:
        """The last logged value of ``key``."""
        values = [row[key] for row in self.history if key in row]
        assert values, f"{key!r} was never logged; logged: {sorted(self.keys())}"
        return values[-1]


def finished_records(path: str | Path, timeout: float = 20.0) -> list[Any]:
    """The records of a finished run: wandb's service process may still be writing the file for a moment
    after ``wandb.finish()`` returns, so wait (up to ``timeout`` s) for its ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def read_run(path: str | Path) -> OfflineRun:
    """Parse ``run-<id>.wandb`` (once finished) into its history rows, config and artifact records."""
    run = OfflineRun(Path(path))
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "files": [e.path for e in a.manifest.contents],
                    "metadata": json.loads(a.metadata or "{}"),
                }
            )
        elif kind == "run":
            run.run_id, run.name = record.run.run_id, record.run.display_name
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "metric" and record.metric.name:
            m = record.metric
            kinds = [f.name for f, value in m.summary.ListFields() if value is True]
            run.metrics[m.name] = {"step_metric": m.step_metric, "summary": kinds}
    return run


def run_files(save_dir: str | Path) -> list[Path]:
    """The ``run-<id>.wandb`` files of every offline run under ``<save_dir>/wandb``."""
    return sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)
