"""What the health check, /metrics, the watchdog and the status line read of
storage: one pipeline (and its JetStream sink), or in worker mode the main
process's summary of every shard's (ingestd.runtime.shard_states)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ingestd.ingest.pipeline import PipelineStats


class StorageState(Protocol):
    @property
    def accepting(self) -> bool: ...

    @property
    def depth(self) -> int: ...

    @property
    def stats(self) -> PipelineStats: ...

    def making_progress(self, within_secs: float) -> bool: ...

    def set_enqueue_timeout(self, secs: float) -> None: ...


@dataclass(slots=True)
class JetStreamStats:
    """A JetStream sink's counters (here, not beside the sink, so the main
    process of worker mode sums its shards' without importing nats)."""

    published: int = 0
    duplicates: int = 0
    failures: int = 0
    disconnects: int = 0


class JetStreamState(Protocol):
    @property
    def healthy(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    @property
    def stats(self) -> JetStreamStats: ...
