"""What the main process knows of the storage shards in worker mode, from
their reports: the health check, /metrics, the fleet view, the watchdog
and the status line read it as they read one process's pipeline."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingestd.ingest.devices import DeviceRegistry
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.pipeline import PipelineStats
from ingestd.ingest.state import JetStreamStats
from ingestd.runtime.ipc import Report, ShardSnapshot

_COUNTERS = (
    "batches",
    "records_stored",
    "rows_stored",
    "bytes_stored",
    "duplicates",
    "quarantined",
    "storage_errors",
)


class ShardsJetStream:
    """Every shard's JetStream connection, as one (a `JetStreamState`):
    healthy only while every shard's is."""

    def __init__(self, states: ShardStates) -> None:
        self._states = states

    @property
    def healthy(self) -> bool:
        reported = self._states.jetstream_states()
        return len(reported) == self._states.shards and all(state[0] for state in reported)

    @property
    def connected(self) -> bool:
        reported = self._states.jetstream_states()
        return len(reported) == self._states.shards and all(state[1] for state in reported)

    @property
    def stats(self) -> JetStreamStats:
        totals = dataclasses.replace(self._states.retired_jetstream)
        for state in self._states.jetstream_states():
            totals.published += state[2]
            totals.duplicates += state[3]
            totals.failures += state[4]
            totals.disconnects += state[5]
        return totals


class ShardStates:
    """The latest report of each shard (a `StorageState`)."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        now = time.monotonic()
        # When each shard's worker last reported (or said hello), and what.
        self._heard: dict[int, float] = dict.fromkeys(range(shards), now)
        self._latest: dict[int, ShardSnapshot] = {}
        # Counters of workers that were replaced: the totals never go back.
        self._retired = PipelineStats()
        self.retired_jetstream = JetStreamStats()
        self._stopping = False
        self._down: set[int] = set()  # shards whose worker exited, until a new one is up
        self.exits = 0  # workers that exited while serving (each is restarted)
        self._exited: set[int] = set()  # pids

    def on_hello(self, shard: int) -> None:
        """A (new) worker for `shard` serves: its counters start from zero."""
        self._down.discard(shard)
        self._heard[shard] = time.monotonic()

    def on_exit(self, shard: int, pid: int) -> None:
        """`shard`'s worker `pid` exited: the shard is down until a new one
        says hello, and its counters so far are kept."""
        if not self._stopping:
            self.exits += 1
        self._down.add(shard)
        self._exited.add(pid)
        old = self._latest.pop(shard, None)
        if old is None or old.pid != pid:
            return
        retired = self._retired
        for name in _COUNTERS:
            setattr(retired, name, getattr(retired, name) + getattr(old.stats, name))
        if old.jetstream is not None:
            totals = self.retired_jetstream
            totals.published += old.jetstream[2]
            totals.duplicates += old.jetstream[3]
            totals.failures += old.jetstream[4]
            totals.disconnects += old.jetstream[5]

    def update(self, shard: int, snapshot: ShardSnapshot) -> None:
        if snapshot.pid in self._exited:
            return  # read after its worker's exit: counted in the retired totals
        self._latest[shard] = snapshot
        self._heard[shard] = time.monotonic()

    def stop(self) -> None:
        self._stopping = True

    # -- as a StorageState -------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return not self._stopping

    @property
    def depth(self) -> int:
        return sum(snapshot.depth for snapshot in self._latest.values())

    @property
    def stats(self) -> PipelineStats:
        total = dataclasses.replace(self._retired)
        for snapshot in self._latest.values():
            for name in _COUNTERS:
                setattr(total, name, getattr(total, name) + getattr(snapshot.stats, name))
        total.storage_ok = not self._down and all(s.stats.storage_ok for s in self._latest.values())
        return total

    def making_progress(self, within_secs: float) -> bool:
        """Every shard's worker reported lately, and none has records
        waiting with no batch stored for as long: one stuck shard is a
        stuck daemon, as far as the watchdog is concerned."""
        now = time.monotonic()
        for shard in range(self.shards):
            if now - self._heard[shard] >= within_secs:
                return False
            snapshot = self._latest.get(shard)
            if snapshot is not None and snapshot.stalled_secs >= within_secs:
                return False
        return True

    def set_enqueue_timeout(self, secs: float) -> None:
        """Each worker applies the reloaded config to its own pipeline."""

    @property
    def open_devices(self) -> int:
        return sum(snapshot.open_devices for snapshot in self._latest.values())

    def shard_up(self, shard: int, within_secs: float) -> bool:
        """Its worker is serving and reported within `within_secs`."""
        return shard not in self._down and time.monotonic() - self._heard[shard] < within_secs

    def shard_depth(self, shard: int) -> int:
        snapshot = self._latest.get(shard)
        return snapshot.depth if snapshot is not None else 0

    def jetstream_states(self) -> list[tuple[bool, bool, int, int, int, int]]:
        return [s.jetstream for s in self._latest.values() if s.jetstream is not None]


def apply_report(
    report: Report, states: ShardStates, devices: DeviceRegistry, metrics: Metrics
) -> None:
    """A worker's report, into the main process's state."""
    if report.requests:
        metrics.requests.update(report.requests)
    for protocol, device, code, at in report.errors:
        devices.on_error(protocol, device, code, at)
    count = devices.count_result
    for result in report.results:
        count(*result)
    for (protocol, device), current in report.current_files.items():
        stats = devices.get(protocol, device)
        if stats is not None:
            stats.current_file = current
    for size, seconds in report.batches:
        metrics.observe_batch(size, seconds)
    for what, seconds in report.storage_timings:
        metrics.observe_storage(what, seconds)
    states.update(report.worker, report.state)


# A shard whose worker has not reported for this long counts as down in
# /metrics (it reports twice a second).
SHARD_SILENT_SECS = 5.0


class ShardCollector(Collector):
    """Per shard in /metrics: which one is stuck or down, not only that one is."""

    def __init__(self, states: ShardStates) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        states = self._states
        up = GaugeMetricFamily(
            "ingestd_shard_up",
            "1 while the shard's worker serves and reports",
            labels=["shard"],
        )
        depth = GaugeMetricFamily(
            "ingestd_shard_queue_depth", "Records waiting for the shard's writer", labels=["shard"]
        )
        for shard in range(states.shards):
            up.add_metric([str(shard)], 1 if states.shard_up(shard, SHARD_SILENT_SECS) else 0)
            depth.add_metric([str(shard)], states.shard_depth(shard))
        yield up
        yield depth
        yield CounterMetricFamily(
            "ingestd_worker_exits",
            "Worker processes that exited (restarted while serving)",
            value=states.exits,
        )
