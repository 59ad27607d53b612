"""What a protocol parser hands to the pipeline, and what the writer answers."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Record:
    """One block or document, ready to append to its device's file.

    `payload` is exactly the bytes to append (CSV rows or one JSON line), each
    line ending in `\\n`. `header` is the CSV header line (with `\\n`); a file
    holds one header only, so a block with another header starts a new file.
    """

    protocol: str  # a registered protocol's name ("wattmon"): also its top-level folder
    device_id: str  # 12 lowercase hex digits, or a checked stream name
    received_at: float  # Unix seconds, from the app's clock
    payload: bytes
    header: bytes = b""
    dedup_key: str | None = None  # resends with the same key are stored once
    count: int = 1  # rows or documents in the payload


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A block that passed MD5 but is not valid CSV: kept verbatim, answered OK."""

    protocol: str
    device_id: str
    received_at: float
    raw: bytes
    reason: str
    dedup_key: str | None = None


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
