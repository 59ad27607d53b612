"""Where the file sink keeps quarantined blocks, and how they are read back.

A block that passed its MD5 but is not valid CSV is kept verbatim as
`quarantine/<protocol>/<device id>/<name>.csv`, with `<name>.json` saying
why; `<name>` is the block's MD5 (so a resend finds it there), or its
receive time for a block sent without one. A block posted again once fixed
is renamed `<name>.csv.replayed`, so it is no longer listed or counted.
The sink writes this layout (`FileSink._quarantine`); the fleet scan, the
device pages and `ingestd quarantine` read it through this module.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestd.protocols.registry import valid_id
from ingestd.records import Quarantined

QUARANTINE_DIR = "quarantine"
BLOCK_EXT = ".csv"
REPLAYED = ".replayed"
# `<md5>`, or `<received_at>` with 6 decimals for a block sent without one.
_BLOCK_NAME = re.compile(r"[0-9a-f]{32}|\d{1,12}\.\d{6}", re.ASCII)
MAX_REASON_CHARS = 500


@dataclass(frozen=True, slots=True)
class QuarantinedBlock:
    device_id: str
    name: str  # the block's MD5 (its file is `<name>.csv`)
    received_at: str | None
    reason: str | None
    bytes: int
    mtime: float


def block_name(block: Quarantined) -> str:
    """The name a block is kept under: its MD5, else its receive time."""
    return block.dedup_key or f"{block.received_at:.6f}"


def protocol_folder(data_dir: Path | str, protocol: str) -> Path:
    """`quarantine/<protocol>/`: one folder per device below it."""
    return Path(data_dir) / QUARANTINE_DIR / protocol


def folder(data_dir: Path | str, device_id: str, protocol: str) -> Path:
    """`quarantine/<protocol>/<device id>/`; ValueError for an id that is not one."""
    if not valid_id(protocol, device_id):
        raise ValueError("not a device id")
    return protocol_folder(data_dir, protocol) / device_id


def block_path(data_dir: Path | str, device_id: str, name: str, protocol: str) -> Path:
    """The block's `.csv`; ValueError for a name the sink never makes."""
    if not _BLOCK_NAME.fullmatch(name):
        raise ValueError("not a quarantined block's name")
    return folder(data_dir, device_id, protocol) / f"{name}{BLOCK_EXT}"


def list_blocks(
    data_dir: Path | str, device_id: str, protocol: str, limit: int = 100
) -> list[QuarantinedBlock]:
    """A device's quarantined blocks not yet replayed, newest first (blocking)."""
    where = folder(data_dir, device_id, protocol)
    try:
        entries = [e for e in os.scandir(where) if e.name.endswith(BLOCK_EXT)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        name = entry.name[: -len(BLOCK_EXT)]
        if not _BLOCK_NAME.fullmatch(name):
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        found.append((stat.st_mtime, name, stat.st_size))
    found.sort(reverse=True)
    blocks = []
    for mtime, name, size in found[:limit]:
        meta = _meta(where / f"{name}.json")
        reason = meta.get("reason")
        received = meta.get("received_at")
        blocks.append(
            QuarantinedBlock(
                device_id,
                name,
                received if isinstance(received, str) else None,
                reason[:MAX_REASON_CHARS] if isinstance(reason, str) else None,
                size,
                mtime,
            )
        )
    return blocks


def count_blocks(names: list[str]) -> int:
    """How many of a device folder's names are blocks not yet replayed."""
    return sum(1 for name in names if name.endswith(BLOCK_EXT))


def mark_replayed(path: Path) -> None:
    os.replace(path, path.with_name(path.name + REPLAYED))


def _meta(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            meta = json.loads(fh.read(64 * 1024))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
