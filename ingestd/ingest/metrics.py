"""Prometheus metrics at /metrics, with the maintained prometheus_client.

Counters kept on the hot path are plain integers in the pipeline, the device
registry and a request tally; a custom collector turns them into metrics at
scrape time, so a request pays for no metric object. Only per-batch timings
use histograms.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingestd.ingest.devices import DeviceRegistry
from ingestd.ingest.state import StorageState
from ingestd.protocols.registry import PROTOCOLS
from ingestd.runtime.logs import DroppingQueueHandler

RequestTally = Counter[tuple[str, str]]  # (protocol, outcome) -> requests

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# A checkpoint syncs every file written since the last one: seconds with a
# large fleet, bounded by storage.checkpoint_interval_secs to keep up.
_CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests: RequestTally = Counter()
        self.batch_size = Histogram(
            "ingestd_batch_records",
            "Records per group commit",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "ingestd_batch_seconds",
            "Time to store one batch (log sync and file writes)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sync_seconds = Histogram(
            "ingestd_log_sync_seconds",
            "Time of the write-ahead log's fdatasync per batch",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.write_seconds = Histogram(
            "ingestd_file_write_seconds",
            "Time to append a batch to the device files",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.checkpoint_seconds = Histogram(
            "ingestd_checkpoint_sync_seconds",
            "Time a checkpoint spent fsyncing the files the log held, its pacing pauses"
            " left out; near storage.checkpoint_interval_secs, checkpoints fall behind",
            buckets=_CHECKPOINT_BUCKETS,
            registry=self.registry,
        )
        self._storage_timings = {
            "log_sync": self.sync_seconds,
            "write": self.write_seconds,
            "checkpoint_sync": self.checkpoint_seconds,
        }

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_storage(self, what: str, seconds: float) -> None:
        """Called from the storage threads; prometheus_client is thread-safe."""
        self._storage_timings[what].observe(seconds)

    def watch(
        self,
        pipeline: StorageState,
        devices: DeviceRegistry,
        open_handles: Callable[[], int],
        jetstream: Any = None,
    ) -> None:
        self.registry.register(_StateCollector(self.requests, pipeline, devices, open_handles))
        if jetstream is not None:
            self.registry.register(_JetStreamCollector(jetstream))

    def watch_fleet(
        self,
        devices: DeviceRegistry,
        clock: Callable[[], float],
        settings: Callable[[], tuple[float, int]],
    ) -> None:
        """Silent and known devices; `settings` gives (silent after secs,
        devices with a last-seen series at most) at each scrape."""
        self.registry.register(_FleetCollector(devices, clock, settings))


class _StateCollector(Collector):
    def __init__(
        self,
        requests: RequestTally,
        pipeline: StorageState,
        devices: DeviceRegistry,
        open_handles: Callable[[], int],
    ) -> None:
        self._requests = requests
        self._pipeline = pipeline
        self._devices = devices
        self._open_handles = open_handles

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "ingestd_requests", "Requests by protocol and outcome", labels=["protocol", "outcome"]
        )
        for (protocol, outcome), count in sorted(self._requests.items()):
            requests.add_metric([protocol, outcome], count)
        yield requests
        stats = self._pipeline.stats
        for name, doc, value in (
            ("ingestd_records_stored", "Blocks and documents stored", stats.records_stored),
            ("ingestd_rows_stored", "CSV rows and JSON documents stored", stats.rows_stored),
            ("ingestd_bytes_stored", "Payload bytes stored", stats.bytes_stored),
            ("ingestd_duplicates_suppressed", "Resends answered OK, not stored", stats.duplicates),
            ("ingestd_quarantined_blocks", "Bad blocks kept in quarantine", stats.quarantined),
            (
                "ingestd_storage_errors",
                "Records refused because storage failed",
                stats.storage_errors,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "ingestd_queue_depth", "Records waiting for the writer", value=self._pipeline.depth
        )
        yield GaugeMetricFamily(
            "ingestd_devices_seen",
            "Devices and streams heard from since start",
            value=len(self._devices),
        )
        yield GaugeMetricFamily(
            "ingestd_open_file_handles",
            "Devices with open file handles",
            value=self._open_handles(),
        )
        yield GaugeMetricFamily(
            "ingestd_storage_ok",
            "1 while storage accepts writes",
            value=1 if stats.storage_ok else 0,
        )
        yield CounterMetricFamily(
            "ingestd_log_lines_dropped",
            "Log lines dropped because stderr could not keep up",
            value=DroppingQueueHandler.dropped,
        )


class _FleetCollector(Collector):
    """Gauges to alert on silent devices, counted at scrape time."""

    def __init__(
        self,
        devices: DeviceRegistry,
        clock: Callable[[], float],
        settings: Callable[[], tuple[float, int]],
    ) -> None:
        self._devices = devices
        self._clock = clock
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        silent_after, last_seen_max = self._settings()
        known: Counter[str] = Counter()
        silent: Counter[str] = Counter()
        for (protocol, _), stats in self._devices:
            known[protocol] += 1
            if now - stats.last_seen >= silent_after:
                silent[protocol] += 1
        for name, doc, counts in (
            ("ingestd_devices_known", "Devices and streams known (heard from, or on disk)", known),
            (
                "ingestd_devices_silent",
                "Known devices with no data for [status] silent_after_secs",
                silent,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["protocol"])
            for protocol in PROTOCOLS:
                gauge.add_metric([protocol], counts[protocol])
            yield gauge
        if last_seen_max > 0:
            # The first devices by id, so the set of series stays the same
            # from one scrape to the next.
            first = heapq.nsmallest(last_seen_max, self._devices, key=lambda item: item[0])
            gauge = GaugeMetricFamily(
                "ingestd_device_last_seen_timestamp_seconds",
                "When a device was last heard from (Unix seconds); "
                "[status] last_seen_metric_devices devices at most",
                labels=["protocol", "device"],
            )
            for (protocol, device_id), stats in first:
                gauge.add_metric([protocol, device_id], stats.last_seen)
            yield gauge


class _JetStreamCollector(Collector):
    """The JetStream sink's state, when a route uses it."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ingestd_jetstream_up",
            "1 while JetStream takes records",
            value=1 if self._sink.healthy else 0,
        )
        yield GaugeMetricFamily(
            "ingestd_jetstream_connected",
            "1 while connected to NATS",
            value=1 if self._sink.connected else 0,
        )
        stats = self._sink.stats
        for name in ("published", "duplicates", "failures", "disconnects"):
            yield CounterMetricFamily(
                f"ingestd_jetstream_{name}",
                f"JetStream {name} since start",
                value=getattr(stats, name),
            )
