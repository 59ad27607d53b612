"""The aiohttp application: the factory, reload, and storage lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from ingestd.config import Config, changed_settings, is_reloadable, keep_restart_only
from ingestd.http import device_view, fleet
from ingestd.http.handlers import (
    add_device_route,
    error_middleware,
    expect_continue,
    healthz,
    metrics,
    start_ingest,
)
from ingestd.http.keys import (
    CLOCK,
    CONFIG,
    DEVICES,
    IN_FLIGHT,
    JETSTREAM,
    LOG_THROTTLE,
    METRICS,
    PIPELINE,
    REPORT_ERROR,
    SHARDS,
    SINK,
)
from ingestd.ingest.devices import DeviceRegistry
from ingestd.ingest.live import InFlight, LiveConfig
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.pipeline import Listener, Pipeline
from ingestd.protocols.registry import PROTOCOLS
from ingestd.runtime.logs import Throttle, setup_logging
from ingestd.runtime.shard_states import ShardCollector, ShardsJetStream, ShardStates
from ingestd.sinks.file.housekeeping import Retention, sweep
from ingestd.sinks.file.sink import FileSink

if TYPE_CHECKING:
    from ingestd.sinks.jetstream.sink import JetStreamSink

log = logging.getLogger("ingestd.http")


def make_app(
    config: Config, *, clock: Callable[[], float] = time.time, shards: int | None = None
) -> web.Application:
    """The app of a daemon that stores in its own process (`shards` None),
    or of the main process in worker mode, whose `shards` workers store and
    report to it (the state views, housekeeping, the data dir's lock)."""
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = LiveConfig(config)
    app[CLOCK] = clock
    app[DEVICES] = DeviceRegistry()
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    app[REPORT_ERROR] = app[DEVICES].on_error
    app[LOG_THROTTLE] = Throttle()
    # The storage context is registered first, so it is torn down last.
    if shards is None:
        app.cleanup_ctx.append(storage_ctx)
    else:
        app.cleanup_ctx.append(functools.partial(shards_ctx, shards=shards))
    app.cleanup_ctx.append(housekeeping_ctx)
    app.cleanup_ctx.append(fleet.scan_ctx)  # devices already on disk, in the background
    for path, handler in (
        ("/healthz", healthz),
        ("/metrics", metrics),
        ("/api/devices", fleet.api_devices),
        ("/", fleet.status_page),
        ("/status", fleet.status_page),
    ):
        app.router.add_get(path, handler, expect_handler=expect_continue)
    device_view.setup(app)
    if shards is None:
        add_device_route(app)
    return app


def reload_config(app: web.Application, new: Config) -> tuple[list[str], list[str]]:
    """Apply what can change while running.

    Returns the changed settings, and those among them that wait for a restart.
    """
    live = app[CONFIG]
    changed = changed_settings(live.current, new)
    live.set(keep_restart_only(live.current, new))
    app[PIPELINE].set_enqueue_timeout(live.current.storage.enqueue_timeout_secs)
    setup_logging(live.current.log.level, live.current.log.format)
    return changed, [key for key in changed if not is_reloadable(key)]


@dataclass(frozen=True, slots=True)
class Storage:
    sink: FileSink
    pipeline: Pipeline
    jetstream: JetStreamSink | None


@contextlib.asynccontextmanager
async def open_storage(
    config: Config,
    *,
    shard: int | None,
    listener: Listener,
    observe_batch: Callable[[int, float], None],
    observe_storage: Callable[[str, float], None],
) -> AsyncIterator[Storage]:
    """Open the sink (one process's, or a worker's `shard`), start the
    writer; on the way out, store what is queued, then close."""
    sink = FileSink(config.data_dir, config.storage, shard=shard)
    sink.observe = observe_storage
    await sink.open()
    commit, probe = sink.commit, sink.probe
    jetstream: JetStreamSink | None = None
    # `sink` is restart-only, so the routes are fixed for this run; with no
    # route on JetStream the writer calls the file sink directly.
    routes = sink_routes(config)
    if any(route != "file" for route in routes.values()):
        # Imported here: nats-py is needed only when a route uses JetStream.
        from ingestd.sinks.jetstream.fanout import Fanout
        from ingestd.sinks.jetstream.sink import JetStreamSink

        jetstream = JetStreamSink(config.jetstream, max_pending=config.storage.batch_max_records)
        try:
            await jetstream.open()  # connects in the background; 503 until then
        except BaseException:
            await sink.close()
            raise
        fanout = Fanout(sink, jetstream, routes)
        commit, probe = fanout.commit, fanout.probe
    pipeline = Pipeline(
        commit,
        probe,
        max_records=config.storage.queue_max_records,
        enqueue_timeout_secs=config.storage.enqueue_timeout_secs,
        batch_max_records=config.storage.batch_max_records,
        listener=listener,
        observe_batch=observe_batch,
    )
    pipeline.start()
    try:
        yield Storage(sink, pipeline, jetstream)
    finally:
        try:
            await pipeline.close()
            await sink.close()
        finally:
            if jetstream is not None:
                await jetstream.close()


def sink_routes(config: Config) -> dict[str, str]:
    """Each protocol's `sink` setting."""
    return {name: config.section(name).sink for name in PROTOCOLS}


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    """One process: storage here.

    Cleanup contexts run after the server has finished in-flight requests, so
    every record a handler submitted is stored before the files close.
    """
    metrics = app[METRICS]
    async with open_storage(
        app[CONFIG].current,
        shard=None,
        listener=app[DEVICES].on_result,
        observe_batch=metrics.observe_batch,
        observe_storage=metrics.observe_storage,
    ) as storage:
        sink = storage.sink
        metrics.watch(storage.pipeline, app[DEVICES], lambda: sink.open_devices, storage.jetstream)
        app[SINK] = sink
        if storage.jetstream is not None:
            app[JETSTREAM] = storage.jetstream
        start_ingest(app, storage.pipeline)
        yield


async def shards_ctx(app: web.Application, *, shards: int) -> AsyncIterator[None]:
    """The main process in worker mode: hold the data dir, replay what any
    earlier run left in it before the workers start, and keep the shards'
    reported state for the views."""
    config = app[CONFIG].current
    lock = await asyncio.to_thread(FileSink(config.data_dir, config.storage).take_over)
    states = ShardStates(shards)
    app[SHARDS] = states
    app[PIPELINE] = states
    jetstream = None
    if any(route != "file" for route in sink_routes(config).values()):
        jetstream = app[JETSTREAM] = ShardsJetStream(states)
    app[METRICS].watch(states, app[DEVICES], lambda: states.open_devices, jetstream)
    app[METRICS].registry.register(ShardCollector(states))
    try:
        yield
    finally:
        lock.release()


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """Compress closed files and apply retention, in a thread of its own."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="ingestd-housekeeping")
    loop = asyncio.get_running_loop()

    async def run() -> None:
        while True:
            storage = app[CONFIG].current.storage
            retention = Retention(
                compress=storage.compress,
                max_age_days=storage.retention_days,
                max_total_bytes=storage.retention_max_bytes,
            )
            try:
                await loop.run_in_executor(executor, sweep, app[CONFIG].current.data_dir, retention)
            except OSError as exc:
                log.error("housekeeping_failed error=%s", exc)
            await asyncio.sleep(storage.housekeeping_interval_secs)

    task = asyncio.create_task(run(), name="ingestd-housekeeping")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        executor.shutdown(wait=False, cancel_futures=True)
