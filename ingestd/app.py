"""The aiohttp application: routes, the error middleware, storage lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingestd import device_view, fleet
from ingestd.ingest.access import RateLimiter, RoutePolicy, client_address, networks
from ingestd.config import (
    RELOADABLE,
    RESERVED_PATHS,
    Config,
    changed_settings,
    is_reserved,
    keep_restart_only,
)
from ingestd.ingest.devices import DeviceRegistry
from ingestd.errors import BodyTooLarge, Forbidden, IngestError, RequestTimeout
from ingestd.runtime.logs import Throttle, setup_logging
from ingestd.ingest.metrics import Metrics
from ingestd.ingest.pipeline import Pipeline
from ingestd.protocols import jsonpost, wattmon
from ingestd.records import Quarantined, Record
from ingestd.sinks.file.housekeeping import Retention, sweep
from ingestd.sinks.file.sink import FileSink

if TYPE_CHECKING:
    from ingestd.sinks.jetstream.sink import JetStreamSink

log = logging.getLogger("ingestd.http")


class LiveConfig:
    """The running config and what is compiled from it; SIGHUP swaps both."""

    def __init__(self, config: Config) -> None:
        self.limiters = {
            wattmon.PROTOCOL: RateLimiter(0, 1),
            jsonpost.PROTOCOL: RateLimiter(0, 1),
        }
        self.set(config)

    def set(self, config: Config) -> None:
        self.current = config
        self.trusted_proxies = networks(config.server.trusted_proxies)
        self.policies = {
            wattmon.PROTOCOL: RoutePolicy.of(config.wattmon),
            jsonpost.PROTOCOL: RoutePolicy.of(config.json),
        }
        macs = config.wattmon.allowed_macs
        self.allowed_macs = frozenset(wattmon.normalise_mac(m.encode()) for m in macs) or None
        self.allowed_streams = frozenset(config.json.allowed_streams) or None
        for protocol, section in ((wattmon.PROTOCOL, config.wattmon), (jsonpost.PROTOCOL, config.json)):
            self.limiters[protocol].configure(section.rate_limit_per_min, section.rate_limit_burst)


class InFlight:
    """Requests being handled, so a stop can wait for them to finish."""

    def __init__(self) -> None:
        self.count = 0
        self.busy_connections: Counter[object] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, connection: object) -> None:
        self.count += 1
        self.busy_connections[connection] += 1
        self._idle.clear()

    def leave(self, connection: object) -> None:
        self.count -= 1
        self.busy_connections[connection] -= 1
        if self.busy_connections[connection] <= 0:
            del self.busy_connections[connection]
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


CONFIG = web.AppKey("config", LiveConfig)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
CLOCK = web.AppKey("clock", Callable[[], float])
PIPELINE = web.AppKey("pipeline", Pipeline)
SINK = web.AppKey("sink", FileSink)
# Set only when a route sends records to JetStream.
JETSTREAM: web.AppKey[JetStreamSink] = web.AppKey("jetstream")
DEVICES = web.AppKey("devices", DeviceRegistry)
METRICS = web.AppKey("metrics", Metrics)
# (protocol, device, error code, time) of a refused request from a known
# device: the registry here; in a worker process, forwarded to the main one.
# Refusals are logged at most 10 a second per error code.
LOG_THROTTLE = web.AppKey("log_throttle", Throttle)
REPORT_ERROR = web.AppKey("report_error", Callable[[str, str, str, float], None])

# Set by the handlers, read by the middleware that counts requests.
PROTOCOL_OF = web.RequestKey("protocol", str)
OUTCOME_OF = web.RequestKey("outcome", str)

OK_BODY = "OK"


def make_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = LiveConfig(config)
    app[CLOCK] = clock
    app[DEVICES] = DeviceRegistry()
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    app[REPORT_ERROR] = app[DEVICES].on_error
    app[LOG_THROTTLE] = Throttle()
    # The pipeline context is registered first, so it is torn down last.
    app.cleanup_ctx.append(storage_ctx)
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
    add_device_route(app)
    return app


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


def reload_config(app: web.Application, new: Config) -> tuple[list[str], list[str]]:
    """Apply what can change while running.

    Returns the changed settings, and those among them that wait for a restart.
    """
    live = app[CONFIG]
    changed = changed_settings(live.current, new)
    live.set(keep_restart_only(live.current, new))
    app[PIPELINE].set_enqueue_timeout(live.current.storage.enqueue_timeout_secs)
    setup_logging(live.current.log.level, live.current.log.format)
    return changed, [key for key in changed if key not in RELOADABLE]


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the sink and start the writer; on the way out, drain then close.

    Cleanup contexts run after the server has finished in-flight requests, so
    every record a handler submitted is stored before the files close.
    """
    config = app[CONFIG].current
    metrics = app[METRICS]
    sink = FileSink(config.data_dir, config.storage)
    sink.observe = metrics.observe_storage
    await sink.open()
    commit, probe = sink.commit, sink.probe
    jetstream: JetStreamSink | None = None
    # `sink` is restart-only, so the routes are fixed for this run; with no
    # route on JetStream the writer calls the file sink directly.
    routes = {wattmon.PROTOCOL: config.wattmon.sink, jsonpost.PROTOCOL: config.json.sink}
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
        app[JETSTREAM] = jetstream
    pipeline = Pipeline(
        commit,
        probe,
        max_records=config.storage.queue_max_records,
        enqueue_timeout_secs=config.storage.enqueue_timeout_secs,
        batch_max_records=config.storage.batch_max_records,
        listener=app[DEVICES].on_result,
        observe_batch=metrics.observe_batch,
    )
    pipeline.start()
    metrics.watch(pipeline, app[DEVICES], lambda: sink.open_devices, jetstream)
    app[SINK] = sink
    app[PIPELINE] = pipeline
    try:
        yield
    finally:
        try:
            await pipeline.close()
            await sink.close()
        finally:
            if jetstream is not None:
                await jetstream.close()


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
                await loop.run_in_executor(executor, sweep, app[SINK].data_dir, retention)
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


# The state routes (GET); every path not reserved is a device route (see
# `protocol_of`).
STATE_PATHS = RESERVED_PATHS


def protocol_of(config: Config, path: str) -> str | None:
    """Which protocol a device path is for, or None (404)."""
    # `/wattmon/` too: a device URL typed with a slash must not become a stream.
    if path in config.wattmon.paths or (path[-1:] == "/" and path[:-1] in config.wattmon.paths):
        return wattmon.PROTOCOL
    if config.json.enabled:
        return jsonpost.PROTOCOL
    return None


def check_access(
    live: LiveConfig,
    protocol: str,
    peer: str,
    forwarded_for: list[str] | None,
    query_string: str,
    authorization: str | None,
) -> str:
    """Network and token checks, which need no body; returns the client address."""
    # Every X-Forwarded-For line: a proxy may add its own after a forged one.
    remote = client_address(
        peer, ", ".join(forwarded_for) if forwarded_for else None, live.trusted_proxies
    )
    policy = live.policies[protocol]
    policy.check_network(remote)
    policy.check_token(query_string, authorization)
    return remote


async def dispatch(request: web.Request) -> web.Response:
    """Route a device request, after the checks that need no body."""
    live = request.app[CONFIG]
    if is_reserved(request.path):  # never a stream: a POST to /status is a mistake
        if request.path in STATE_PATHS:
            raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_GET, hdrs.METH_HEAD])
        raise web.HTTPNotFound()
    protocol = protocol_of(live.current, request.path)
    if protocol is None:
        raise web.HTTPNotFound()
    request[PROTOCOL_OF] = protocol
    if request.method != hdrs.METH_POST:
        raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_POST])
    remote = check_access(
        live,
        protocol,
        request.remote or "",
        request.headers.getall("X-Forwarded-For", None),
        request.query_string,
        request.headers.get(hdrs.AUTHORIZATION),
    )
    if protocol == wattmon.PROTOCOL:
        return await wattmon_post(request, live)
    return await json_post(request, live, remote)


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


# -- the steps of a device post, shared by aiohttp's handlers and the fast path
# (ingestd.fastpath). Parsing is pure, so it may run in a thread; the steps
# around it touch shared state and run on the loop.

Parsed = Record | Quarantined | None | IngestError


def parse_wattmon(live: LiveConfig, body: bytes, content_type: str, now: float) -> Parsed:
    """The block, None (no data), or the refusal, returned rather than raised."""
    config = live.current
    try:
        return wattmon.parse(
            body,
            content_type,
            received_at=now,
            require_md5=config.wattmon.require_md5,
            max_rows=config.wattmon.max_rows,
            max_columns=config.wattmon.max_columns,
            allowed_macs=live.allowed_macs,
        )
    except IngestError as exc:
        return exc


def admit_wattmon(
    app: web.Application, live: LiveConfig, parsed: Parsed, now: float
) -> Record | Quarantined | None:
    """Raise the parse's refusal (a device not allowed among them), or the
    device's rate limit."""
    if isinstance(parsed, IngestError):
        # A known device's refused block (bad MD5, too large) is its last
        # error in the fleet view; a device not allowed stays unknown.
        mac = parsed.device
        if mac is not None and (live.allowed_macs is None or mac in live.allowed_macs):
            app[REPORT_ERROR](wattmon.PROTOCOL, mac, parsed.code, now)
        raise parsed
    if parsed is None:
        return None
    live.limiters[wattmon.PROTOCOL].check(parsed.device_id, now)
    return parsed


def admit_stream(live: LiveConfig, path: str, now: float) -> str:
    """A JSON post's stream, checked before its body is read."""
    stream = jsonpost.stream_name(path)
    if live.allowed_streams is not None and stream not in live.allowed_streams:
        raise Forbidden("stream not allowed")
    live.limiters[jsonpost.PROTOCOL].check(stream, now)
    return stream


def parse_json(
    config: Config, body: bytes, path: str, remote: str, key: str | None, now: float
) -> Record | IngestError:
    try:
        return jsonpost.parse(
            body,
            path=path,
            remote=remote,
            received_at=now,
            idempotency_key=key,
            max_depth=config.json.max_depth,
        )
    except IngestError as exc:
        return exc


def admit_json(
    app: web.Application, stream: str, parsed: Record | IngestError, now: float
) -> Record:
    if isinstance(parsed, IngestError):
        parsed.device = stream
        app[REPORT_ERROR](jsonpost.PROTOCOL, stream, parsed.code, now)
        raise parsed
    return parsed


async def wattmon_post(request: web.Request, live: LiveConfig) -> web.Response:
    app = request.app
    config = live.current
    body = await read_body(request, config)
    now = app[CLOCK]()
    content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
    parse = functools.partial(parse_wattmon, live, body, content_type, now)
    item = admit_wattmon(app, live, await off_loop_if_large(len(body), parse), now)
    if item is None:
        request[OUTCOME_OF] = "empty"
        return web.Response(text=OK_BODY)
    outcome = await app[PIPELINE].submit(item)
    request[OUTCOME_OF] = outcome.value
    return web.Response(text=OK_BODY)


async def json_post(request: web.Request, live: LiveConfig, remote: str) -> web.Response:
    app = request.app
    config = live.current
    now = app[CLOCK]()
    stream = admit_stream(live, request.path, now)
    body = await read_body(request, config)
    key = request.headers.get("Idempotency-Key")
    parse = functools.partial(parse_json, config, body, request.path, remote, key, now)
    record = admit_json(app, stream, await off_loop_if_large(len(body), parse), now)
    outcome = await app[PIPELINE].submit(record)
    request[OUTCOME_OF] = outcome.value
    return web.Response(text=OK_BODY)


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
async def error_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
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


async def _answer(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
        outcome = request.get(OUTCOME_OF)
    except IngestError as exc:
        status, text, headers = refusal(request.app, exc, request.path, request.remote or "")
        response = web.Response(status=status, text=text, headers=headers)
        if isinstance(exc, MalformedBody):
            response.force_close()
        outcome = exc.code
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, (exc.reason or "error").lower())
        if hdrs.ALLOW in exc.headers:
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        outcome = f"http_{exc.status}"
    protocol = request.get(PROTOCOL_OF)
    if protocol is not None and outcome is not None:
        request.app[METRICS].requests[(protocol, outcome)] += 1
    return response


def refusal(
    app: web.Application, exc: IngestError, path: str, peer: str
) -> tuple[int, str, dict[str, str]]:
    """Log a refused request (throttled); its status, body and headers."""
    allowed, held_back = app[LOG_THROTTLE].allow(exc.code)
    if allowed:
        log.info(
            "rejected status=%d code=%s device=%s path=%s remote=%s held_back=%d",
            exc.status, exc.code, exc.device or "-", _safe(path), _safe(peer), held_back,
        )
    headers: dict[str, str] = {}
    if exc.retry_after_secs is not None:
        headers[hdrs.RETRY_AFTER] = str(exc.retry_after_secs)
    if exc.status == 401:
        headers[hdrs.WWW_AUTHENTICATE] = 'Basic realm="ingestd"'
    return exc.status, f"ERROR: {exc.message}", headers


def _safe(text: str, limit: int = 200) -> str:
    """Client text for a log line: quoted, escaped, cut short."""
    return ascii(text[:limit])
