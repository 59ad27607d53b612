"""The private aiohttp API the fast path (ingestd/http/fastpath.py) relies on.

The fast path overrides `AppRunner._make_server` to wrap aiohttp's `Server`,
reads the runner's `_app`, builds aiohttp's connection handler itself from
`Server._kwargs` when it hands a connection over (`transport.set_protocol`,
then `connection_made` and `data_received`), overrides
`RequestHandler.handle_error` for its error page, and reads and resets
`request.writer.output_size`. None of that is public: pyproject.toml pins
aiohttp to one minor version, and these tests, which use plain aiohttp and no
ingestd code, say which assumption a new version breaks before the pin moves.
"""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SETTINGS: dict[str, Any] = {
    "handle_signals": False,
    "access_log": None,
    "shutdown_timeout": 1.5,
    "keepalive_timeout": 7.0,
    "max_line_size": 4321,
    "max_field_size": 4322,
}
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def test_installed_aiohttp_is_the_pinned_minor_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in project["dependencies"] if r.startswith("aiohttp")]
    assert len(pins) == 1
    specifier = pins[0].specifier
    assert Version(aiohttp.__version__) in specifier, (
        f"aiohttp {aiohttp.__version__} is installed, pyproject.toml pins {specifier}"
    )
    # One minor version only: a new one must pass this file before it is let in.
    installed = Version(aiohttp.__version__)
    next_minor = Version(f"{installed.major}.{installed.minor + 1}.0")
    assert next_minor not in specifier, f"pyproject.toml lets in aiohttp {next_minor}"


# -- a wrapping runner, as the fast path's ------------------------------------------


class WrappedServer:
    """Stands in front of aiohttp's Server as the fast path's FastServer does:
    the sockets' protocol factory, forwarding everything else."""

    def __init__(self, server: web.Server, app: web.Application) -> None:
        self.aiohttp = server
        self.app = app
        self.calls: list[str] = []
        self.handed_over: list[web.RequestHandler] = []
        self.handler_class: type[web.RequestHandler] = web.RequestHandler

    def __call__(self) -> asyncio.Protocol:
        self.calls.append("connection")
        return HandOver(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.aiohttp, name)

    def make_handler(self) -> web.RequestHandler:
        handler = self.handler_class(
            self.aiohttp, loop=asyncio.get_running_loop(), **self.aiohttp._kwargs
        )
        self.handed_over.append(handler)
        return handler

    def pre_shutdown(self) -> None:
        self.calls.append("pre_shutdown")
        self.aiohttp.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        self.calls.append(f"shutdown {timeout}")
        await self.aiohttp.shutdown(timeout)


class HandOver(asyncio.Protocol):
    """Takes a connection's first bytes, then gives the connection to aiohttp."""

    def __init__(self, server: WrappedServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        handler = self.server.make_handler()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        handler.data_received(data)


class WrappingRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return WrappedServer(server, self._app)  # type: ignore[return-value]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Any]]:
    runners: list[WrappingRunner] = []

    async def start(app: web.Application) -> tuple[WrappingRunner, int]:
        runner = WrappingRunner(app, **SETTINGS)
        runners.append(runner)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


def wrapped(runner: web.AppRunner) -> WrappedServer:
    server = runner.server
    assert isinstance(server, WrappedServer), (
        f"AppRunner.setup() no longer serves what _make_server() returns: {server!r}"
    )
    return server


# -- the assumptions ---------------------------------------------------------------


def test_make_server_is_an_async_method_of_app_runner_taking_no_arguments() -> None:
    make_server = web.AppRunner.__dict__.get("_make_server")
    assert make_server is not None, "AppRunner._make_server is gone"
    assert inspect.iscoroutinefunction(make_server)
    assert list(inspect.signature(make_server).parameters) == ["self"]


async def test_what_make_server_returns_serves_the_sockets_and_is_shut_down(serve) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner, port = await serve(app)
    server = wrapped(runner)
    assert server.app is app  # AppRunner._app

    answer = await exchange(port, REQUEST)

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello")
    assert server.calls == ["connection"]
    await runner.cleanup()
    assert server.calls == ["connection", "pre_shutdown", "shutdown 1.5"]


async def test_server_kwargs_hold_the_runner_settings_a_handler_is_made_with(serve) -> None:
    runner, _ = await serve(web.Application())
    server = wrapped(runner).aiohttp
    assert isinstance(server._kwargs, dict)
    for name in ("keepalive_timeout", "max_line_size", "max_field_size", "access_log"):
        assert server._kwargs[name] == SETTINGS[name], name
    assert "access_log_class" in server._kwargs

    ours = web.RequestHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)
    theirs = server()  # what aiohttp makes for a connection

    assert type(theirs) is web.RequestHandler
    simple = (int, float, bool, str, type(None))
    compared = 0
    for name in web.RequestHandler.__slots__:
        mine, its = getattr(ours, name, None), getattr(theirs, name, None)
        if isinstance(its, simple) or name in ("_manager", "_request_handler"):
            assert mine == its, (
                f"RequestHandler.{name}: {mine!r} from _kwargs, {its!r} from Server()"
            )
            compared += 1
    assert compared > 10
    assert (ours.max_line_size, ours._keepalive_timeout) == (4321, 7.0)


async def test_a_handed_over_connection_is_served_and_shut_down_by_aiohttp(serve) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", slow)
    runner, port = await serve(app)
    server = wrapped(runner)
    answer = asyncio.ensure_future(exchange(port, REQUEST))
    await entered.wait()

    assert server.aiohttp.connections == server.handed_over  # registered by connection_made
    release.set()
    assert (await answer).endswith(b"done")


def test_handle_error_signature() -> None:
    parameters = inspect.signature(web.RequestHandler.handle_error).parameters
    assert [(p.name, p.default) for p in parameters.values()] == [
        ("self", inspect.Parameter.empty),
        ("request", inspect.Parameter.empty),
        ("status", 500),
        ("exc", None),
        ("message", None),
    ]


async def test_handle_error_answers_a_request_aiohttp_refuses(serve) -> None:
    seen: list[tuple[int, int]] = []

    class OwnErrorPage(web.RequestHandler):
        __slots__ = ("note",)  # RequestHandler has __slots__: a subclass adds its own

        def handle_error(
            self,
            request: web.BaseRequest,
            status: int = 500,
            exc: BaseException | None = None,
            message: str | None = None,
        ) -> web.StreamResponse:
            seen.append((status, request.writer.output_size))
            response = web.Response(status=status, text="ERROR: ours")
            response.force_close()
            return response

    runner, port = await serve(web.Application())
    wrapped(runner).handler_class = OwnErrorPage

    answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: test\r\nBad Header: x\r\n\r\n")

    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert answer.endswith(b"ERROR: ours")
    assert seen == [(400, 0)]


async def test_writer_output_size_counts_bytes_written_and_can_be_reset(serve) -> None:
    """The fast path's Expect handler writes `100 Continue` itself and resets
    output_size, as aiohttp's own does, so an error may still be answered."""
    sizes: list[int] = []
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"

    async def interim_then_answer(request: web.Request) -> web.Response:
        sizes.append(request.writer.output_size)
        await request.writer.write(interim)
        sizes.append(request.writer.output_size)
        request.writer.output_size = 0
        return web.Response(text="answer")

    app = web.Application()
    app.router.add_get("/", interim_then_answer)
    _, port = await serve(app)

    answer = await exchange(port, REQUEST)

    assert sizes == [0, len(interim)]
    assert answer.startswith(interim + b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"answer")
