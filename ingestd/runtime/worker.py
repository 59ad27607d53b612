"""Several HTTP worker processes on one port, one storage writer.

With `server.workers` above 1, the main process owns storage (the log, the
device files, resend detection) and runs no public listener; it binds the
port (or takes systemd's sockets) and starts N workers that inherit it.
Each worker parses requests and group-commits its records to the main
process over a private Unix socket, answering a device only when the main
process says the batch is stored. One writer means a resend reaching another
worker is still a duplicate, and no file can get interleaved lines or a
second header. Requests for state (/healthz, /metrics, /api/devices, the
status page) are passed to the main process, which sees every record.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp import hdrs, web

from ingestd.config import Config, ConfigError
from ingestd.http import device_view
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
    LOG_THROTTLE,
    METRICS,
    REPORT_ERROR,
)
from ingestd.ingest.live import InFlight, LiveConfig
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.pipeline import Pipeline
from ingestd.runtime.ipc import CONTROL_SOCKET, STORAGE_SOCKET, RemoteStorage
from ingestd.runtime.lifecycle import drain, raise_open_file_limit
from ingestd.runtime.logs import Throttle

log = logging.getLogger("ingestd.workers")

TALLY_INTERVAL_SECS = 2.0


def set_parent_death_signal() -> None:
    """Linux: die with the main process, even when it is killed.

    Without it nothing can be stored, so a worker has nothing to finish:
    its devices see the connection drop and resend.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def make_worker_app(config: Config, storage: RemoteStorage, control: Path) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = LiveConfig(config)
    app[CLOCK] = time.time
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    app[REPORT_ERROR] = storage.report_error
    app[LOG_THROTTLE] = Throttle()
    storage._tally = app[METRICS].requests

    async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
        pipeline = Pipeline(
            storage.commit,
            storage.probe,
            max_records=config.storage.queue_max_records,
            enqueue_timeout_secs=config.storage.enqueue_timeout_secs,
            batch_max_records=config.storage.batch_max_records,
            # No pause here: the main process's pipeline paces the log syncs,
            # and a second pause would only add to every answer's wait.
            commit_interval_secs=0.0,
        )
        pipeline.start()
        start_ingest(app, pipeline, limits=False)
        tally = asyncio.create_task(_send_tally(storage))
        try:
            yield
        finally:
            await pipeline.close()
            tally.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tally
            await storage.send_tally()

    async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(control)))
        app[PROXY_SESSION] = session
        try:
            yield
        finally:
            await session.close()

    app.cleanup_ctx.append(pipeline_ctx)
    app.cleanup_ctx.append(proxy_ctx)
    for path in STATE_PATHS:  # the main process answers them: state lives there
        app.router.add_get(path, proxy_to_main, expect_handler=expect_continue)
    for prefix in device_view.PREFIXES:  # one device's view, also the main process's
        app.router.add_get(prefix + "{rest:.*}", proxy_to_main, expect_handler=expect_continue)
    add_device_route(app)
    return app


PROXY_SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)


async def _send_tally(storage: RemoteStorage) -> None:
    while True:
        await asyncio.sleep(TALLY_INTERVAL_SECS)
        await storage.send_tally()


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
            status=503, text="ERROR: storage process unavailable", headers={hdrs.RETRY_AFTER: "5"}
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
    config: Config, load: Callable[[], Config], worker_id: int, fds: list[int], runtime: Path
) -> int:
    """One worker: serve the inherited sockets until SIGTERM, then drain."""
    from ingestd.http.app import reload_config
    from ingestd.runtime.tls import reload_certificate, server_context

    raise_open_file_limit()
    set_parent_death_signal()
    if os.getppid() == 1:
        return 1  # the main process died before we could ask to follow it
    storage = RemoteStorage(runtime / STORAGE_SOCKET, Counter())
    await storage.connect()
    app = make_worker_app(config, storage, runtime / CONTROL_SOCKET)
    server = config.server
    runner = make_runner(app, server)
    await runner.setup()
    ssl_context = server_context(server.tls_cert, server.tls_key) if server.tls_cert else None
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    await storage.tell("hello", worker_id)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides

    async def reload() -> None:
        """The main process has checked the file already; apply it here too."""
        try:
            new = await asyncio.to_thread(load)
            reload_config(app, new)
            if ssl_context is not None and new.server.tls_cert:
                reload_certificate(ssl_context, new.server.tls_cert, new.server.tls_key)
        except (ConfigError, OSError, ssl.SSLError):
            pass  # the main process checked the same file and logged why
        finally:
            await storage.tell("reloaded", worker_id)

    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    lost = asyncio.ensure_future(storage.lost.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if storage.lost.is_set():
        log.error("worker=%d storage_process_gone: exiting", worker_id)
    await drain(runner, app, server.shutdown_timeout_secs)
    await runner.cleanup()
    await storage.close()
    for future in (lost, stopped):
        future.cancel()
    return 0


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
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--fds", required=True, help="inherited listening sockets")
    args = parser.parse_args(argv)

    def load() -> Config:
        return with_overrides(load_config(args.config), listen=args.listen, data_dir=args.data_dir)

    config = load()
    setup_logging(config.log.level, config.log.format)
    fds = [int(fd) for fd in args.fds.split(",")]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_worker(config, load, args.worker_id, fds, Path(args.runtime_dir)))


if __name__ == "__main__":
    sys.exit(main())
