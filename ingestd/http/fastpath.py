"""The fast path: device posts answered before aiohttp's request machinery.

aiohttp builds a Request, a payload stream, a handler task step, a Response
with a header multidict and middleware frames for every request; on one
core that costs more than parsing and storing a device's block. So each
connection starts on `FastConnection`, which reads the one shape devices
send (`ingestd.http.http1`: a small POST with a Content-Length) and hands
it to the same ingest service as aiohttp's handler
(`ingestd.ingest.service`: route, access, parse, admit, submit, the answer's
metrics and refusals), with no task and no Request object.

Anything else -- a GET, a chunked or large body, `Expect`, an odd header, a
Unix socket, bytes that cannot be a head of that shape -- hands the
connection, with the bytes of that request, to aiohttp's own protocol for
good. Everything aiohttp answers stays answered by aiohttp; a request its
parser refuses gets a fixed `ERROR: ...` body (`IngestRequestHandler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import socket
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ingestd.config import ServerConfig
from ingestd.errors import IngestError, RequestTimeout
from ingestd.http.handlers import INLINE_PARSE_BYTES, MALFORMED_HTTP, OK_BODY, error_response
from ingestd.http.http1 import HEAD_END, RequestHead, parse_head
from ingestd.http.keys import CONFIG, IN_FLIGHT, INGEST, LOG_THROTTLE
from ingestd.records import Outcome
from ingestd.runtime.logs import Throttle

log = logging.getLogger("ingestd.http")

# Pipelined requests waiting behind one being stored: stop reading beyond this.
MAX_BUFFERED_BYTES = 256 * 1024
SWEEP_SECS = 1.0


class FastServer:
    """The protocol factory handed to the listening sockets: aiohttp's
    server behind it, for the connections handed over."""

    def __init__(self, aiohttp_server: web.Server, app: web.Application) -> None:
        self.aiohttp = aiohttp_server
        self.app = app
        # Looked up once: aiohttp's app[...] is a Python call, and a request
        # needs several. (Set by the time the runner makes this server.)
        self.live = app[CONFIG]
        self.ingest = app[INGEST]
        self.in_flight = app[IN_FLIGHT]
        self.throttle = app[LOG_THROTTLE]
        self.fast: set[FastConnection] = set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> asyncio.Protocol:
        if self._sweeper is None:
            self._schedule_sweep()
        return FastConnection(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.aiohttp, name)  # requests_count, request_handler, ...

    def aiohttp_handler(self) -> IngestRequestHandler:
        """What aiohttp's Server() makes for a connection, with our error page.

        Relies on aiohttp's private `Server._kwargs`: the runner's handler
        settings (header limits, keep-alive, access log), which Server() would
        pass the same way.
        """
        handler = IngestRequestHandler(
            self.aiohttp, loop=asyncio.get_running_loop(), **self.aiohttp._kwargs
        )
        handler.throttle = self.throttle
        return handler

    @property
    def connections(self) -> list[Any]:
        return [*self.aiohttp.connections, *self.fast]

    def pre_shutdown(self) -> None:
        self.closing = True
        for connection in list(self.fast):
            connection.force_close()
        self.aiohttp.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """As aiohttp's: let requests in progress finish within `timeout`,
        then cut what is left."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()

        async def finish_fast() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.in_flight.wait_idle()
            for connection in list(self.fast):
                connection.abort()

        await asyncio.gather(finish_fast(), self.aiohttp.shutdown(timeout))

    # Slow clients: one timer for every connection, not one per request.
    def _schedule_sweep(self) -> None:
        server = self.live.current.server
        interval = max(
            0.05, min(SWEEP_SECS, server.keepalive_timeout_secs / 4, server.body_timeout_secs / 4)
        )
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for connection in list(self.fast):
            if connection.deadline < now:
                connection.timed_out()
        if not self.closing:
            self._schedule_sweep()


class FastConnection(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_buffer",
        "_busy",
        "_close_after",
        "_closed",
        "_head",
        "_paused",
        "_protocol",
        "_waiting",
        "_write_paused",
        "deadline",
        "peer",
        "server",
        "transport",
    )

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.deadline = float("inf")
        self._buffer = b""
        self._head: RequestHead | None = None
        # The protocol chosen when the head was read (a reload meanwhile
        # does not change where this request goes).
        self._protocol = ""
        # From a request's head to its answer: a stop waits for it to finish.
        self._active = False
        self._busy = False  # a request is being stored; later ones wait
        self._paused = False
        self._write_paused = False
        self._close_after = False
        self._closed = False
        # The request whose record is being stored, and its protocol.
        self._waiting: tuple[RequestHead, str] | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            self._hand_over(b"")  # the private control socket: aiohttp's
            return
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.server.fast.add(self)
        self._idle()

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self._busy or self._write_paused:
            self._keep(data)
            return
        self._consume(data)

    def eof_received(self) -> bool | None:
        return None  # as aiohttp: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.fast.discard(self)
        if self._active and not self._busy:  # gone half way through a body
            self._active = False
            self.server.in_flight.leave(self)

    def pause_writing(self) -> None:
        self._write_paused = True  # a client that does not read its answers

    def resume_writing(self) -> None:
        self._write_paused = False
        self._next()

    # -- called by the server --------------------------------------------------

    def force_close(self) -> None:
        """Stop: close now if idle, else right after the answer in progress."""
        self._close_after = True
        if not self._active and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def timed_out(self) -> None:
        """Past the deadline: headers or body too slow, or idle too long."""
        if self._busy or self.transport is None:
            return
        if self._head is not None:
            self._close_after = True
            self._refuse(RequestTimeout("request body too slow"), self._head, self._protocol)
        self.transport.close()

    # -- reading requests ------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        """Answer every complete request in `data`; keep the rest."""
        server = self.server.live.current.server
        pos, size = 0, len(data)
        while pos < size:
            head = self._head
            if head is None:
                end = data.find(HEAD_END, pos)
                if end < 0 or end - pos > server.max_header_bytes:
                    if (
                        end >= 0
                        or size - pos > server.max_header_bytes
                        or not could_be_fast_head(data, pos)
                    ):
                        # aiohttp knows the limits' answers, and answers bytes
                        # that are no such head at once, where waiting for a
                        # blank line could take until the keep-alive timeout.
                        self._hand_over(data[pos:])
                    else:
                        self._buffer = data[pos:]
                    return
                head = parse_head(data[pos:end])
                protocol = self._protocol_for(head, server) if head is not None else None
                if head is None or protocol is None:
                    self._hand_over(data[pos:])
                    return
                pos = end + len(HEAD_END)
                self._head = head
                self._protocol = protocol
                self._active = True
                self.server.in_flight.enter(self)
                self.deadline = time.monotonic() + server.body_timeout_secs
            stop = pos + head.content_length
            if size < stop:
                self._keep(data[pos:])
                return
            body = data[pos:stop]
            pos = stop
            self._head = None
            self._handle(head, body)
            if self._busy or self._closed or self._write_paused:
                self._keep(data[pos:])
                return

    def _protocol_for(self, head: RequestHead, server: ServerConfig) -> str | None:
        """The protocol of a device post this path answers; None for the
        rest, which goes to aiohttp."""
        if head.content_length > min(INLINE_PARSE_BYTES, server.max_body_bytes):
            return None  # aiohttp streams it, refuses it, or parses it off-loop
        # None for the state routes, and the 404 or 405 of a post to one.
        return self.server.ingest.route(head.path)

    def _keep(self, data: bytes) -> None:
        self._buffer = data
        if len(data) > MAX_BUFFERED_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _next(self) -> None:
        """After an answer: the requests that arrived meanwhile."""
        if self._paused and self.transport is not None and not self._closed:
            self._paused = False
            self.transport.resume_reading()
        data, self._buffer = self._buffer, b""
        if data and not self._closed:
            self._consume(data)

    def _idle(self) -> None:
        self.deadline = time.monotonic() + self.server.live.current.server.keepalive_timeout_secs

    def _hand_over(self, data: bytes) -> None:
        """From here on aiohttp serves this connection, from `data` on."""
        assert self.transport is not None
        self.server.fast.discard(self)
        handler = self.server.aiohttp_handler()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._closed = True  # to this object
        if data:
            handler.data_received(data)

    # -- one request -----------------------------------------------------------

    def _handle(self, head: RequestHead, body: bytes) -> None:
        protocol = self._protocol
        self._busy = True
        self.deadline = float("inf")
        fields = head.fields
        try:
            stored = self.server.ingest.handle(
                protocol,
                head.path,
                self.peer,
                head.forwarded_for or None,
                head.query_string,
                fields.get("authorization"),
                fields.get("content-type", ""),
                fields.get("idempotency-key"),
                body,
            )
        except IngestError as exc:
            self._refuse(exc, head, protocol)
            return
        except Exception:
            log.exception("fast_path_failed path=%s", ascii(head.path[:200]))
            self._close_after = True
            self._write(head, 500, "ERROR: internal error", {})
            return
        if stored is None:
            self._answer_ok(head, protocol, "empty")
            return
        self._waiting = (head, protocol)
        stored.add_done_callback(self._stored)

    def _stored(self, done: asyncio.Future[Outcome]) -> None:
        assert self._waiting is not None
        (head, protocol), self._waiting = self._waiting, None
        if done.cancelled():
            self._close_after = True
            self._write(head, 503, "ERROR: shutting down; retry later", {})
            return
        exc = done.exception()
        if exc is None:
            self._answer_ok(head, protocol, done.result().value)
        elif isinstance(exc, IngestError):
            self._refuse(exc, head, protocol)
        else:
            log.error("fast_path_failed path=%s error=%r", ascii(head.path[:200]), exc)
            self._close_after = True
            self._write(head, 500, "ERROR: internal error", {})

    def _answer_ok(self, head: RequestHead, protocol: str, outcome: str) -> None:
        self.server.ingest.count(protocol, outcome)
        self._write(head, 200, OK_BODY, {})

    def _refuse(self, exc: IngestError, head: RequestHead, protocol: str | None) -> None:
        status, text, headers = self.server.ingest.refused(protocol, exc, head.path, self.peer)
        self._write(head, status, text, headers)

    def _write(self, head: RequestHead, status: int, text: str, headers: dict[str, str]) -> None:
        """Send the answer; then close, or wait for the next request."""
        self._busy = False
        if self._active:
            self._active = False
            self.server.in_flight.leave(self)
        transport = self.transport
        if transport is None or self._closed:
            return
        keep_alive = head.keep_alive and not self._close_after and not self.server.closing
        transport.write(answer(status, text, headers, keep_alive, head.http10))
        if not keep_alive:
            transport.close()
            self._closed = True  # nothing after this request is read
            return
        self._idle()
        self._next()


_FAST_START = b"POST /"


def could_be_fast_head(data: bytes, pos: int) -> bool:
    """Can the incomplete head at `data[pos:]` still become one the fast path
    reads? Not if it starts otherwise than `POST /`, or holds a CR or LF
    outside a CRLF (aiohttp refuses bare line ends; a trailing CR may yet
    get its LF)."""
    start = data[pos : pos + len(_FAST_START)]
    if not _FAST_START.startswith(start):
        return False
    crlf = data.count(b"\r\n", pos)
    lone_cr = data.count(b"\r", pos) - crlf - data.endswith(b"\r")
    return lone_cr == 0 and data.count(b"\n", pos) == crlf


class IngestRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, whose error page is a fixed `ERROR: ...`.

    aiohttp answers a request its parser refuses (and a handler that raised
    something the middleware does not map) through `handle_error`, before any
    middleware; its own page quotes the offending bytes back to the client
    and logs them in a traceback.
    """

    __slots__ = ("throttle",)
    throttle: Throttle  # refusals are logged at most 10 a second

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp's: too late for an answer
            raise ConnectionError("response already started; cannot send the error")
        remote = ascii(request.remote or "")
        if status >= 500:
            log.error("internal_error status=%d remote=%s", status, remote, exc_info=exc)
            text = "internal error"
        else:
            allowed, held_back = self.throttle.allow("bad_request")
            if allowed:
                # aiohttp's message quotes the request: escaped, cut short.
                log.info(
                    "rejected status=%d code=bad_request remote=%s held_back=%d error=%s",
                    status,
                    remote,
                    held_back,
                    ascii((message or str(exc))[:200]),
                )
            text = MALFORMED_HTTP if status == 400 else HTTPStatus(status).phrase.lower()
        response = error_response(status, text)
        response.force_close()
        return response


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date[1]


_ok_answers: dict[tuple[bytes, bool, bool], bytes] = {}


def answer(
    status: int, text: str, headers: dict[str, str], keep_alive: bool, http10: bool = False
) -> bytes:
    if status == 200 and not headers:  # OK: the same bytes all second long
        key = (http_date(), keep_alive, http10)
        cached = _ok_answers.get(key)
        if cached is None:
            if len(_ok_answers) > 8:
                _ok_answers.clear()
            cached = _ok_answers[key] = _answer(status, text, headers, keep_alive, http10)
        return cached
    return _answer(status, text, headers, keep_alive, http10)


def _answer(
    status: int, text: str, headers: dict[str, str], keep_alive: bool, http10: bool
) -> bytes:
    body = text.encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode()),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Date: " + http_date(),
        b"Server: ingestd",
    ]
    lines += [f"{name}: {value}".encode() for name, value in headers.items()]
    if not keep_alive:
        lines.append(b"Connection: close")
    elif http10:
        lines.append(b"Connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class IngestRunner(web.AppRunner):
    """aiohttp's AppRunner whose sockets start every connection on the fast path."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if INGEST not in self._app:
            return server  # the main process in worker mode: no device posts here
        return FastServer(server, self._app)  # type: ignore[return-value]


def make_runner(app: web.Application, server: ServerConfig, **extra: Any) -> IngestRunner:
    """The daemon's runner; `extra` runner settings are the test server's."""
    settings: dict[str, Any] = {
        "handle_signals": False,
        "access_log": None,
        # drain() has waited for the handlers already (within
        # server.shutdown_timeout_secs): aiohttp only closes what is left.
        "shutdown_timeout": 2.0,
        "keepalive_timeout": server.keepalive_timeout_secs,
        "max_line_size": server.max_header_bytes,
        "max_field_size": server.max_header_bytes,
    }
    return IngestRunner(app, **(settings | extra))
