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
import pickle
import signal
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from ingestd import device_view
from ingestd.app import (
    CLIENT_HEADER,
    CLOCK,
    CONFIG,
    DEVICES,
    IN_FLIGHT,
    LOG_THROTTLE,
    METRICS,
    PIPELINE,
    REPORT_ERROR,
    STATE_PATHS,
    InFlight,
    LiveConfig,
    add_device_route,
    error_middleware,
    expect_continue,
)
from ingestd.config import Config, ConfigError
from ingestd.errors import IngestError, StorageFailed
from ingestd.fastpath import make_runner
from ingestd.logs import Throttle
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.pipeline import Item, Pipeline
from ingestd.records import Outcome

log = logging.getLogger("ingestd.workers")

_LENGTH = struct.Struct(">I")
STORAGE_SOCKET = "storage.sock"
CONTROL_SOCKET = "control.sock"
TALLY_INTERVAL_SECS = 2.0
MAX_PENDING_ERRORS = 10_000


# -- messages on the private socket ------------------------------------------------


async def send_message(writer: asyncio.StreamWriter, message: object) -> None:
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(blob)) + blob)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at end of stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        blob = await reader.readexactly(_LENGTH.unpack(head)[0])
    except asyncio.IncompleteReadError:
        return None
    # Both ends are this program, over a socket in a private 0700 folder.
    return pickle.loads(blob)


def encode_result(result: Outcome | IngestError) -> object:
    if isinstance(result, IngestError):
        return (result.status, result.code, result.message, result.retry_after_secs)
    return result


class RemoteError(IngestError):
    """An error the main process gave for a record, rebuilt in a worker."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_secs = retry_after


def decode_result(value: object) -> Outcome | IngestError:
    if isinstance(value, tuple):
        return RemoteError(*value)
    assert isinstance(value, Outcome)
    return value


# -- the main process side -----------------------------------------------------------


class StorageServer:
    """Takes batches from the workers into the main process's pipeline."""

    def __init__(
        self,
        app: web.Application,
        on_hello: Callable[[int], None],
        on_reloaded: Callable[[int], None],
    ) -> None:
        self._app = app
        self._on_hello = on_hello
        self._on_reloaded = on_reloaded
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while (message := await read_message(reader)) is not None:
                await self._handle(message, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _handle(self, message: tuple[Any, ...], writer: asyncio.StreamWriter) -> None:
        kind = message[0]
        if kind == "commit":
            items: list[Item] = message[1]
            self._merge_tally(message[2])
            self._merge_errors(message[3])
            results = await self._app[PIPELINE].submit_many(items)
            await send_message(writer, [encode_result(r) for r in results])
        elif kind == "tally":
            self._merge_tally(message[1])
            self._merge_errors(message[2])
        elif kind == "hello":
            self._on_hello(message[1])
        elif kind == "reloaded":
            self._on_reloaded(message[1])

    def _merge_tally(self, tally: dict[tuple[str, str], int]) -> None:
        if tally:
            self._app[METRICS].requests.update(tally)

    def _merge_errors(self, errors: list[tuple[str, str, str, float]]) -> None:
        """Requests a worker refused for a known device: the fleet view's last error."""
        for protocol, device, code, at in errors:
            self._app[DEVICES].on_error(protocol, device, code, at)


def set_parent_death_signal() -> None:
    """Linux: die with the main process, even when it is killed.

    Without it nothing can be stored, so a worker has nothing to finish:
    its devices see the connection drop and resend.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


# -- the worker side -------------------------------------------------------------------


class RemoteStorage:
    """A worker's view of storage: one batch at a time over the socket."""

    def __init__(self, path: Path, tally: Counter[tuple[str, str]]) -> None:
        self._path = path
        self._tally = tally
        self._sent: Counter[tuple[str, str]] = Counter()
        self._errors: list[tuple[str, str, str, float]] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.lost = asyncio.Event()

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(str(self._path))

    async def commit(self, items: list[Item]) -> list[Outcome | IngestError]:
        async with self._lock:
            try:
                assert self._reader is not None and self._writer is not None
                await send_message(
                    self._writer, ("commit", items, self._tally_delta(), self._take_errors())
                )
                reply = await read_message(self._reader)
            except (ConnectionError, AssertionError):
                reply = None
            if reply is None:
                self.lost.set()
                return [StorageFailed("storage process gone; retry later")] * len(items)
            return [decode_result(value) for value in reply]

    async def send_tally(self) -> None:
        async with self._lock:
            delta, errors = self._tally_delta(), self._take_errors()
            if (delta or errors) and self._writer is not None:
                with contextlib.suppress(ConnectionError):
                    await send_message(self._writer, ("tally", delta, errors))

    def report_error(self, protocol: str, device: str, code: str, at: float) -> None:
        """A refused request of a known device, for the main process's registry."""
        if len(self._errors) < MAX_PENDING_ERRORS:
            self._errors.append((protocol, device, code, at))

    def _take_errors(self) -> list[tuple[str, str, str, float]]:
        errors, self._errors = self._errors, []
        return errors

    async def tell(self, kind: str, worker_id: int) -> None:
        """`hello` once serving, `reloaded` after applying a SIGHUP."""
        async with self._lock:
            if self._writer is not None:
                with contextlib.suppress(ConnectionError):
                    await send_message(self._writer, (kind, worker_id))

    async def probe(self) -> None:
        """Storage health is the main process's business: nothing to test here."""

    def _tally_delta(self) -> dict[tuple[str, str], int]:
        delta = {key: count - self._sent[key] for key, count in self._tally.items()}
        delta = {key: n for key, n in delta.items() if n}
        self._sent.update(delta)
        return delta

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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
        app[PIPELINE] = pipeline
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


async def proxy_to_main(request: web.Request) -> web.Response:
    """Answer a state request from the main process, which sees every record."""
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.lower() in ("authorization", "accept", "x-forwarded-for")
    }
    # The main process checks access on the device's address, not ours.
    headers[CLIENT_HEADER] = request.remote or ""
    try:
        async with request.app[PROXY_SESSION].get(
            f"http://ingestd{request.rel_url}", headers=headers, allow_redirects=False
        ) as upstream:
            body = await upstream.read()
            passed = {
                name: value
                for name, value in upstream.headers.items()
                if name.lower() in PASSED_HEADERS
            }
            return web.Response(status=upstream.status, body=body, headers=passed)
    except aiohttp.ClientError:
        return web.Response(
            status=503, text="ERROR: storage process unavailable", headers={hdrs.RETRY_AFTER: "5"}
        )


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
    from ingestd.app import reload_config
    from ingestd.daemon import raise_open_file_limit
    from ingestd.tls import reload_certificate, server_context

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
    from ingestd.daemon import drain

    await drain(runner, app, server.shutdown_timeout_secs)
    await runner.cleanup()
    await storage.close()
    for future in (lost, stopped):
        future.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process: `python -m ingestd.workers ...`."""
    import argparse

    import uvloop

    from ingestd.config import load_config, with_overrides
    from ingestd.logs import setup_logging

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
