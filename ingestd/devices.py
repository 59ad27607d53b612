"""What the daemon knows of each device or stream it has heard from.

Kept small (slots, no per-device containers): a fleet of 100,000 devices
must fit in memory many times over.
"""

from __future__ import annotations

from collections.abc import Iterator

from ingestd.errors import IngestError
from ingestd.records import Outcome, Quarantined, Record


class DeviceStats:
    __slots__ = (
        "blocks",
        "bytes",
        "duplicates",
        "first_seen",
        "last_error",
        "last_error_at",
        "last_seen",
        "quarantined",
        "records",
    )

    def __init__(self, now: float) -> None:
        self.first_seen = now
        self.last_seen = now
        self.blocks = 0
        self.records = 0
        self.bytes = 0
        self.duplicates = 0
        self.quarantined = 0
        self.last_error: str | None = None  # an error code, never client text
        self.last_error_at: float | None = None


class DeviceRegistry:
    def __init__(self) -> None:
        self._devices: dict[tuple[str, str], DeviceStats] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[tuple[tuple[str, str], DeviceStats]]:
        return iter(self._devices.items())

    def get(self, protocol: str, device_id: str) -> DeviceStats | None:
        return self._devices.get((protocol, device_id))

    def _stats(self, protocol: str, device_id: str, now: float) -> DeviceStats:
        stats = self._devices.get((protocol, device_id))
        if stats is None:
            stats = self._devices[(protocol, device_id)] = DeviceStats(now)
        return stats

    def on_result(self, item: Record | Quarantined, result: Outcome | IngestError) -> None:
        """Called by the pipeline once per stored, refused or duplicate item."""
        now = item.received_at
        stats = self._stats(item.protocol, item.device_id, now)
        stats.last_seen = max(stats.last_seen, now)
        if isinstance(result, IngestError):
            self.on_error(item.protocol, item.device_id, result.code, now)
        elif result is Outcome.DUPLICATE:
            stats.duplicates += 1
        elif result is Outcome.QUARANTINED:
            stats.quarantined += 1
        elif isinstance(item, Record):
            stats.blocks += 1
            stats.records += item.count
            stats.bytes += len(item.payload)

    def on_error(self, protocol: str, device_id: str, code: str, now: float) -> None:
        stats = self._stats(protocol, device_id, now)
        stats.last_seen = max(stats.last_seen, now)
        stats.last_error = code
        stats.last_error_at = now
