"""What the health check, /metrics, the watchdog and the status line read of
storage: one pipeline (and its JetStream sink), or in worker mode the main
process's summary of every shard's (ingestd.runtime.shard_states)."""

from __future__ import annotations

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


class JetStreamCounts(Protocol):
    published: int
    duplicates: int
    failures: int
    disconnects: int


class JetStreamState(Protocol):
    @property
    def healthy(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    @property
    def stats(self) -> JetStreamCounts: ...
