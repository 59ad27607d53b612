"""The aiohttp handlers: device posts (dispatch), /healthz, /metrics, the
`Expect` handling, and the error middleware."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import TypeVar

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingestd.config import RESERVED_PATHS, Config, is_reserved
from ingestd.errors import BodyTooLarge, IngestError, RequestTimeout
from ingestd.http.keys import (
    CLOCK,
    CONFIG,
    IN_FLIGHT,
    INGEST,
    JETSTREAM,
    LOG_THROTTLE,
    METRICS,
    OUTCOME_OF,
    PIPELINE,
    PROTOCOL_OF,
    REPORT_ERROR,
)
from ingestd.ingest.pipeline import Pipeline, Submitter
from ingestd.ingest.service import IngestService

OK_BODY = "OK"


def add_device_route(app: web.Application) -> None:
    """Every path the state routes do not take: matched by hand in
    `dispatch`, since a reload may change them."""
    app.router.add_route("*", "/{path:.*}", dispatch, expect_handler=expect_continue)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default `Expect` handling, with a fixed error body (its own
    417 quotes the header back): `100 Continue`, or 417 for any other
    expectation. aiohttp runs this before the middleware."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return error_response(417, "expectation failed")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's: the answer proper is yet to come
    return None


# The state routes (GET); every path not reserved is a device route
# (`IngestService.route`).
STATE_PATHS = RESERVED_PATHS


def start_ingest(
    app: web.Application,
    pipeline: Pipeline,
    *,
    submit_to: Submitter | None = None,
    limits: bool = True,
    owns: Callable[[str, str], bool] | None = None,
) -> None:
    """The ingest service over the app's state, once its pipeline runs.

    In a worker, posts go `submit_to` its router to their shard, and the
    shard applies the limits (`limits` False); `owns` tells the worker's
    own devices, whose limits it can check before a body."""
    app[PIPELINE] = pipeline
    app[INGEST] = IngestService(
        app[CONFIG],
        submit_to or pipeline,
        clock=app[CLOCK],
        report_error=app[REPORT_ERROR],
        requests=app[METRICS].requests,
        throttle=app[LOG_THROTTLE],
        limits=limits,
        owns=owns,
    )


async def dispatch(request: web.Request) -> web.Response:
    """A device post: the ingest service's steps around reading the body."""
    if is_reserved(request.path):  # never a stream: a POST to /status is a mistake
        if request.path in STATE_PATHS:
            raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_GET, hdrs.METH_HEAD])
        raise web.HTTPNotFound()
    service = request.app[INGEST]
    path = request.path
    protocol = service.route(path)
    if protocol is None:
        raise web.HTTPNotFound()
    request[PROTOCOL_OF] = protocol
    if request.method != hdrs.METH_POST:
        raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_POST])
    headers = request.headers
    remote = service.check(
        protocol,
        path,
        request.remote or "",
        headers.getall("X-Forwarded-For", None),
        request.query_string,
        headers.get(hdrs.AUTHORIZATION),
    )
    body = await read_body(request, request.app[CONFIG].current)
    now = service.clock()
    parse = functools.partial(
        service.parse,
        protocol,
        body,
        headers.get(hdrs.CONTENT_TYPE, ""),
        path,
        remote,
        headers.get("Idempotency-Key"),
        now,
    )
    stored = service.submit(protocol, await off_loop_if_large(len(body), parse), path, now)
    request[OUTCOME_OF] = "empty" if stored is None else (await stored).value
    return web.Response(text=OK_BODY)


# The answer to a request that is not valid HTTP/1.1, found in its head
# (`fastpath.IngestRequestHandler`) or its body (chunks, Content-Encoding).
MALFORMED_HTTP = "malformed HTTP request"


async def read_body(request: web.Request, config: Config) -> bytes:
    """The whole body; refuses more than max_body_bytes, a body that trickles,
    or one whose chunks or compression are broken."""
    try:
        return await _read_body(request, config)
    except web.RequestPayloadError:
        # Nothing more to read: else aiohttp, draining the rest of the body
        # after the answer, meets the error again and logs it as a crash.
        request.content.feed_eof()
        raise MalformedBody(MALFORMED_HTTP) from None


class MalformedBody(IngestError):
    """Broken chunks or compression: what follows on the connection cannot be
    told apart, so it closes after the answer."""


async def _read_body(request: web.Request, config: Config) -> bytes:
    limit = config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    content = request.content
    if content.is_eof():  # the usual small post: it came with its headers
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        return body
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(config.server.body_timeout_secs):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"request body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("request body too slow") from None
    return b"".join(chunks)


# Devices send a few KiB; parsing that inline is cheaper than a thread hop.
# A body larger than this (up to max_body_bytes) is parsed in a thread, so a
# hostile 8 MiB body cannot stall every other device for a second.
INLINE_PARSE_BYTES = 64 * 1024

T = TypeVar("T")


async def off_loop_if_large(size: int, parse: Callable[[], T]) -> T:
    if size <= INLINE_PARSE_BYTES:
        return parse()
    return await asyncio.to_thread(parse)


async def healthz(request: web.Request) -> web.Response:
    pipeline = request.app[PIPELINE]
    if not pipeline.accepting:
        return error_response(503, "shutting down")
    # Before storage_ok, which a JetStream outage also clears: name the cause.
    jetstream = request.app.get(JETSTREAM)
    if jetstream is not None and not jetstream.healthy:
        return error_response(503, "jetstream unavailable")
    if not pipeline.stats.storage_ok:
        return error_response(503, "storage failing")
    return web.Response(text=OK_BODY)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})


def error_response(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {hdrs.RETRY_AFTER: str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=f"ERROR: {message}", headers=headers)


# Worker processes pass state requests to the main process over a private
# Unix socket, naming the device's address in this header.
CLIENT_HEADER = "X-Ingestd-Worker-Client"


def _worker_client(request: web.Request) -> web.Request:
    """On the main process's private socket only: the device's address the
    worker saw. Never believed from TCP."""
    client = request.headers.get(CLIENT_HEADER)
    if client is not None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family == socket.AF_UNIX:
            return request.clone(remote=client)
    return request


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is `ERROR: ...` text, so a Wattmon device resends.

    Also counts each device request by protocol and outcome for /metrics,
    and the requests in flight, which a stop waits for.
    """
    request = _worker_client(request)
    in_flight = request.app[IN_FLIGHT]
    in_flight.enter(request.protocol)
    try:
        return await _answer(request, handler)
    finally:
        in_flight.leave(request.protocol)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
        outcome = request.get(OUTCOME_OF)
    except IngestError as exc:
        status, text, headers = request.app[INGEST].refused(
            request.get(PROTOCOL_OF), exc, request.path, request.remote or ""
        )
        response = web.Response(status=status, text=text, headers=headers)
        if isinstance(exc, MalformedBody):
            response.force_close()
        return response  # counted by `refused`
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, (exc.reason or "error").lower())
        if hdrs.ALLOW in exc.headers:
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        outcome = f"http_{exc.status}"
    protocol = request.get(PROTOCOL_OF)
    if protocol is not None and outcome is not None:
        request.app[INGEST].count(protocol, outcome)
    return response
