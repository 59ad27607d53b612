"""A worker process: serves the port with the others, stores its shard.

With `server.workers` above 1, the main process binds the port (or takes
systemd's sockets), locks the data dir and replays any log left in it, then
starts N workers that inherit the sockets. Each worker stores the devices of
its shard (ingestd.ingest.shards): its own write-ahead log, group commit,
device files and resend keys, so nothing on a post's way to `OK` passes
through one process, and no device has two writers. A post for another
shard's device is handed to that worker (ingestd.runtime.handoff), which
answers once it is stored. State requests (/healthz, /metrics, the fleet
view, device pages) are passed to the main process, which sees every
shard through the workers' reports (ingestd.runtime.ipc).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import hdrs, web

from ingestd.config import Config, ConfigError
from ingestd.http import device_view
from ingestd.http.app import Storage, open_storage, reload_config
from ingestd.http.fastpath import make_runner
from ingestd.http.handlers import (
    CLIENT_HEADER,
    STATE_PATHS,
    add_device_route,
    error_middleware,
    expect_continue,
    start_ingest,
)
from ingestd.http.keys import (
    CLOCK,
    CONFIG,
    IN_FLIGHT,
    INGEST,
    LOG_THROTTLE,
    METRICS,
    REPORT_ERROR,
    SINK,
)
from ingestd.ingest.live import InFlight, LiveConfig
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.shards import ShardRouter
from ingestd.runtime.handoff import HandoffServer, Owners, socket_path
from ingestd.runtime.ipc import CONTROL_SOCKET, MAIN_SOCKET, MainLink, Reporter, ShardSnapshot
from ingestd.runtime.lifecycle import drain, raise_open_file_limit
from ingestd.runtime.logs import Throttle

log = logging.getLogger("ingestd.workers")

# How often the main process hears of each shard (its views lag by this).
REPORT_INTERVAL_SECS = 0.5
# Beyond the shutdown timeout, how long a drained worker waits for the others.
CLOSE_WAIT_SECS = 5.0


def set_parent_death_signal() -> None:
    """Linux: die with the main process, even when it is killed.

    Without it nothing can be stored, so a worker has nothing to finish:
    its devices see the connection drop and resend.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def make_worker_app(
    config: Config, link: MainLink, runtime: Path, shard: int, shards: int
) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = LiveConfig(config)
    app[CLOCK] = time.time
    app[METRICS] = Metrics()  # its request tally goes into the reports
    app[IN_FLIGHT] = InFlight()
    reporter = Reporter(app[METRICS].requests)
    app[REPORT_ERROR] = reporter.report_error
    app[LOG_THROTTLE] = Throttle()

    async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
        """This shard's storage, the socket other workers hand its devices'
        posts to, and the reports to the main process."""
        async with open_storage(
            config,
            shard=shard,
            listener=reporter.on_result,
            observe_batch=reporter.observe_batch,
            observe_storage=reporter.observe_storage,
        ) as storage:
            app[SINK] = storage.sink
            owners = Owners(runtime, shards, shard)
            router = ShardRouter(
                shard, shards, storage.pipeline, owners.hand_over, lambda item: ingest.admit(item)
            )
            start_ingest(app, storage.pipeline, submit_to=router, limits=False, owns=router.owns)
            ingest = app[INGEST]
            handoff = HandoffServer(router.accept)
            await handoff.start(socket_path(runtime, shard))
            reports = asyncio.create_task(_report_every(REPORT_INTERVAL_SECS, storage, send_report))
            try:
                yield
            finally:
                reports.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reports
                owners.close()  # first: a peer's server may wait for this connection
                await handoff.close()

    async def send_report(storage: Storage) -> None:
        pipeline, sink, jetstream = storage.pipeline, storage.sink, storage.jetstream
        snapshot = ShardSnapshot(
            pid=os.getpid(),
            depth=pipeline.depth,
            stalled_secs=pipeline.stalled_secs(),
            stats=dataclasses.replace(pipeline.stats),
            open_devices=sink.open_devices,
            jetstream=None
            if jetstream is None
            else (
                jetstream.healthy,
                jetstream.connected,
                jetstream.stats.published,
                jetstream.stats.duplicates,
                jetstream.stats.failures,
                jetstream.stats.disconnects,
            ),
        )
        await link.send(("report", reporter.take(shard, snapshot, sink.current_file)))

    async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(runtime / CONTROL_SOCKET))
        )
        app[PROXY_SESSION] = session
        try:
            yield
        finally:
            await session.close()

    app.cleanup_ctx.append(storage_ctx)
    app.cleanup_ctx.append(proxy_ctx)
    for path in STATE_PATHS:  # the main process answers them: it sees every shard
        app.router.add_get(path, proxy_to_main, expect_handler=expect_continue)
    for prefix in device_view.PREFIXES:  # one device's view, also the main process's
        app.router.add_get(prefix + "{rest:.*}", proxy_to_main, expect_handler=expect_continue)
    add_device_route(app)
    return app


async def _report_every(
    interval: float, storage: Storage, send: Callable[[Storage], Awaitable[None]]
) -> None:
    while True:
        await send(storage)
        await asyncio.sleep(interval)


PROXY_SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)


async def proxy_to_main(request: web.Request) -> web.StreamResponse:
    """Answer a state request from the main process, which sees every record.

    Streamed through: a device's data (GET /api/devices/{id}/data) may be
    its whole history, which must not be held in a worker's memory.
    """
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.lower() in ("authorization", "accept", "x-forwarded-for")
    }
    # The main process checks access on the device's address, not ours.
    headers[CLIENT_HEADER] = request.remote or ""
    response: web.StreamResponse | None = None
    try:
        async with request.app[PROXY_SESSION].get(
            f"http://ingestd{request.rel_url}", headers=headers, allow_redirects=False
        ) as upstream:
            passed = {
                name: value
                for name, value in upstream.headers.items()
                if name.lower() in PASSED_HEADERS
            }
            response = web.StreamResponse(status=upstream.status, headers=passed)
            # Known ahead for all but a device's streamed data: sent as is
            # rather than chunked, as the main process answered.
            response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(PROXY_CHUNK_BYTES):
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError:
        if response is not None:
            raise  # cut mid-answer: the client sees the connection close
        return web.Response(
            status=503, text="ERROR: main process unavailable", headers={hdrs.RETRY_AFTER: "5"}
        )


PROXY_CHUNK_BYTES = 64 * 1024
PASSED_HEADERS = frozenset(
    {
        "content-type",
        "retry-after",
        "www-authenticate",
        "allow",
        "cache-control",
        "content-disposition",
        "content-security-policy",
        "referrer-policy",
        "x-content-type-options",
    }
)


async def run_worker(
    config: Config,
    load: Callable[[], Config],
    shard: int,
    shards: int,
    fds: list[int],
    runtime: Path,
) -> int:
    """One worker: serve the inherited sockets until SIGTERM, then drain,
    and close storage once every worker has drained (the main process says
    so: until then, others may still hand over posts of this shard)."""
    from ingestd.runtime.tls import reload_certificate, server_context

    raise_open_file_limit()
    set_parent_death_signal()
    if os.getppid() == 1:
        return 1  # the main process died before we could ask to follow it
    link = MainLink(runtime / MAIN_SOCKET)
    await link.connect()
    app = make_worker_app(config, link, runtime, shard, shards)
    server = config.server
    runner = make_runner(app, server)
    await runner.setup()  # opens this shard's storage: replays its log if it died
    ssl_context = server_context(server.tls_cert, server.tls_key) if server.tls_cert else None
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    await link.send(("hello", shard))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides

    async def reload() -> None:
        """The main process has checked the file already; apply it here too."""
        try:
            new = await asyncio.to_thread(load)
            reload_config(app, new)
            await app[SINK].reopen()
            if ssl_context is not None and new.server.tls_cert:
                reload_certificate(ssl_context, new.server.tls_cert, new.server.tls_key)
        except (ConfigError, OSError, ssl.SSLError):
            pass  # the main process checked the same file and logged why
        finally:
            await link.send(("reloaded", shard))

    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await _first(link.lost, stop)
    if link.lost.is_set():
        log.error("worker=%d main_process_gone: exiting", shard)
    await drain(runner, app, server.shutdown_timeout_secs)
    await link.send(("drained", shard))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(server.shutdown_timeout_secs + CLOSE_WAIT_SECS):
            await _first(link.lost, link.closing)
    await runner.cleanup()  # stores what is queued, closes the files
    await link.close()
    return 0


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process: `python -m ingestd.runtime.worker ...`."""
    import argparse

    import uvloop

    from ingestd.config import load_config, with_overrides
    from ingestd.runtime.logs import setup_logging

    parser = argparse.ArgumentParser(prog="ingestd-worker")
    parser.add_argument("--config")
    parser.add_argument("--listen")
    parser.add_argument("--data-dir")
    parser.add_argument("--worker-id", type=int, required=True, help="its shard")
    parser.add_argument("--workers", type=int, required=True, help="how many shards")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--fds", required=True, help="inherited listening sockets")
    args = parser.parse_args(argv)

    def load() -> Config:
        return with_overrides(load_config(args.config), listen=args.listen, data_dir=args.data_dir)

    config = load()
    setup_logging(config.log.level, config.log.format)
    fds = [int(fd) for fd in args.fds.split(",")]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            run_worker(config, load, args.worker_id, args.workers, fds, Path(args.runtime_dir))
        )


if __name__ == "__main__":
    sys.exit(main())
