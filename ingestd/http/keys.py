"""The typed keys of the shared objects on the aiohttp app and request.

A leaf: the views, the fast path and the runtime import these without the
app factory."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from ingestd.ingest.devices import DeviceRegistry
from ingestd.ingest.live import InFlight, LiveConfig
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.service import IngestService
from ingestd.ingest.state import JetStreamState, StorageState
from ingestd.runtime.logs import Throttle
from ingestd.runtime.shard_states import ShardStates
from ingestd.sinks.file.sink import FileSink

CONFIG = web.AppKey("config", LiveConfig)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
# The pipeline; in the main process of worker mode, its shards' summary.
PIPELINE: web.AppKey[StorageState] = web.AppKey("pipeline")
# The steps of a device post (set with the pipeline, which it feeds).
INGEST = web.AppKey("ingest", IngestService)
# Set where storage is: one process, or a worker.
SINK = web.AppKey("sink", FileSink)
# Set only when a route sends records to JetStream.
JETSTREAM: web.AppKey[JetStreamState] = web.AppKey("jetstream")
# The main process in worker mode: what the workers report of their shards.
SHARDS = web.AppKey("shards", ShardStates)
DEVICES = web.AppKey("devices", DeviceRegistry)
METRICS = web.AppKey("metrics", Metrics)
# (protocol, device, error code, time) of a refused request from a known
# device: the registry here; in a worker process, forwarded to the main one.
# Refusals are logged at most 10 a second per error code.
LOG_THROTTLE = web.AppKey("log_throttle", Throttle)
REPORT_ERROR: web.AppKey[Callable[[str, str, str, float], None]] = web.AppKey("report_error")

# Set by the handlers, read by the middleware that counts requests.
PROTOCOL_OF = web.RequestKey("protocol", str)
OUTCOME_OF = web.RequestKey("outcome", str)
