"""The private socket between the main process and its workers: length-
prefixed messages, the main side (`StorageServer`, which feeds its
pipeline) and the worker side (`RemoteStorage`, a worker's storage).

See ingestd/runtime/worker.py for why storage stays in the main process.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ingestd.errors import IngestError, StorageFailed
from ingestd.http.keys import DEVICES, INGEST, METRICS, PIPELINE
from ingestd.ingest.pipeline import Item
from ingestd.records import Outcome

_LENGTH = struct.Struct(">I")
STORAGE_SOCKET = "storage.sock"
CONTROL_SOCKET = "control.sock"
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
            # Per device, whichever worker took the post: limits apply here.
            refusals = self._app[INGEST].limit(items)
            admitted = [
                item for item, refused in zip(items, refusals, strict=True) if refused is None
            ]
            stored = iter(await self._app[PIPELINE].submit_many(admitted))
            results = [next(stored) if refused is None else refused for refused in refusals]
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
