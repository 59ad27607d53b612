"""The aiohttp application: routes, the error middleware, storage lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable

from aiohttp import hdrs, web

from ingestd.config import Config
from ingestd.errors import BodyTooLarge, IngestError
from ingestd.pipeline import Pipeline
from ingestd.protocols import jsonpost, wattmon
from ingestd.sinks.file import FileSink
from ingestd.sinks.housekeeping import Retention, sweep

log = logging.getLogger("ingestd.http")

CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Callable[[], float])
PIPELINE = web.AppKey("pipeline", Pipeline)
SINK = web.AppKey("sink", FileSink)

OK_BODY = "OK"


def make_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[error_middleware]
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app.cleanup_ctx.append(storage_ctx)
    app.cleanup_ctx.append(housekeeping_ctx)
    app.router.add_get("/healthz", healthz)
    for path in config.wattmon.paths:
        app.router.add_post(path, wattmon_handler)
    if config.json.enabled:
        app.router.add_route("*", "/{stream:.*}", json_handler)
    return app


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the sink and start the writer; on the way out, drain then close.

    Cleanup contexts run after the server has finished in-flight requests, so
    every record a handler submitted is stored before the files close.
    """
    config = app[CONFIG]
    sink = FileSink(config.data_dir, config.storage)
    await sink.open()
    pipeline = Pipeline(
        sink.commit,
        sink.probe,
        max_records=config.storage.queue_max_records,
        enqueue_timeout_secs=config.storage.enqueue_timeout_secs,
        batch_max_records=config.storage.batch_max_records,
    )
    pipeline.start()
    app[SINK] = sink
    app[PIPELINE] = pipeline
    try:
        yield
    finally:
        await pipeline.close()
        await sink.close()


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """Compress closed files and apply retention, in a thread of its own."""
    config = app[CONFIG]
    retention = Retention(
        compress=config.storage.compress,
        max_age_days=config.storage.retention_days,
        max_total_bytes=config.storage.retention_max_bytes,
    )
    executor = ThreadPoolExecutor(1, thread_name_prefix="ingestd-housekeeping")
    loop = asyncio.get_running_loop()

    async def run() -> None:
        while True:
            try:
                await loop.run_in_executor(executor, sweep, config.data_dir, retention)
            except OSError as exc:
                log.error("housekeeping_failed error=%s", exc)
            await asyncio.sleep(config.storage.housekeeping_interval_secs)

    task = asyncio.create_task(run(), name="ingestd-housekeeping")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        executor.shutdown(wait=False, cancel_futures=True)


async def read_body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"request body over {limit} bytes") from None


async def wattmon_handler(request: web.Request) -> web.Response:
    app = request.app
    body = await read_body(request)
    item = wattmon.parse(
        body,
        request.headers.get(hdrs.CONTENT_TYPE, ""),
        received_at=app[CLOCK](),
        require_md5=app[CONFIG].wattmon.require_md5,
    )
    if item is not None:
        await app[PIPELINE].submit(item)
    return web.Response(text=OK_BODY)


async def json_handler(request: web.Request) -> web.Response:
    if request.method != hdrs.METH_POST:
        raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_POST])
    app = request.app
    body = await read_body(request)
    record = jsonpost.parse(
        body,
        path=request.path,
        remote=request.remote or "",
        received_at=app[CLOCK](),
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    await app[PIPELINE].submit(record)
    return web.Response(text=OK_BODY)


async def healthz(request: web.Request) -> web.Response:
    pipeline = request.app[PIPELINE]
    if not pipeline.accepting:
        return error_response(503, "shutting down")
    if not pipeline.stats.storage_ok:
        return error_response(503, "storage failing")
    return web.Response(text=OK_BODY)


def error_response(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {hdrs.RETRY_AFTER: str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=f"ERROR: {message}", headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Every refusal is `ERROR: ...` text, so a Wattmon device resends."""
    try:
        return await handler(request)
    except IngestError as exc:
        log.info(
            "rejected status=%d code=%s path=%s remote=%s",
            exc.status, exc.code, _safe(request.path), _safe(request.remote or ""),
        )
        return error_response(exc.status, exc.message, exc.retry_after_secs)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, (exc.reason or "error").lower())
        if hdrs.ALLOW in exc.headers:
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return response


def _safe(text: str, limit: int = 200) -> str:
    """Client text for a log line: quoted, escaped, cut short."""
    return ascii(text[:limit])
