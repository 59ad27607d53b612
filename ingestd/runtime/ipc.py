"""The private socket between the main process and its workers.

Workers store their own shards (ingestd.ingest.shards); the main process
supervises them and answers the state requests (/healthz, /metrics, the
fleet view), from what each worker reports about once a second: its request
tally, each stored item's result (the fleet view's counts), its batch
timings, and its storage state. Messages are length-prefixed pickles: both
ends are this program, over a socket in a private 0700 folder, and none of
it is on a post's way to its `OK`.

worker -> main: ("hello", id), ("report", Report), ("reloaded", id),
("drained", id: its requests in flight are answered); main -> worker:
("close",): every worker has drained, so no more posts will be handed over:
close storage and exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import pickle
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingestd.errors import IngestError
from ingestd.ingest.pipeline import Item, PipelineStats
from ingestd.records import Record

_LENGTH = struct.Struct(">I")
CONTROL_SOCKET = "control.sock"
MAIN_SOCKET = "main.sock"
# Items held for one report, at most: a report goes twice a second, so only
# a main process that stopped reading lets it fill (the fleet view's counts
# then fall short; storage is not affected).
MAX_PENDING = 200_000


async def send_message(writer: asyncio.StreamWriter, message: object) -> None:
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(blob)) + blob)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at end of stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        blob = await reader.readexactly(_LENGTH.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return pickle.loads(blob)


@dataclass(slots=True)
class ShardSnapshot:
    """A shard's storage as its worker saw it when reporting."""

    pid: int  # the worker's: a restarted shard's counters start again
    depth: int
    stalled_secs: float  # with records waiting, since the last batch stored; else 0
    stats: PipelineStats
    open_devices: int
    # (healthy, connected, published, duplicates, failures, disconnects)
    jetstream: tuple[bool, bool, int, int, int, int] | None


# (protocol, device, received_at, outcome or error code, rows, payload bytes)
Result = tuple[str, str, float, str, int, int]


@dataclass(slots=True)
class Report:
    worker: int
    state: ShardSnapshot
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: list[tuple[str, str, str, float]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    # The file each device stored in this report was last written to.
    current_files: dict[tuple[str, str], str] = field(default_factory=dict)
    batches: list[tuple[int, float]] = field(default_factory=list)
    storage_timings: list[tuple[str, float]] = field(default_factory=list)


# -- the worker side ---------------------------------------------------------------


class Reporter:
    """What a worker gathers for its next report: the pipeline's listener,
    its error reporter and its metrics' observers all feed it."""

    def __init__(self, requests: Counter[tuple[str, str]]) -> None:
        self._requests = requests
        self._sent: Counter[tuple[str, str]] = Counter()
        self._errors: list[tuple[str, str, str, float]] = []
        self._results: list[Result] = []
        self._batches: list[tuple[int, float]] = []
        # Appended to by the writer thread: a deque's append and popleft
        # are atomic, so nothing is lost between two reports.
        self._timings: collections.deque[tuple[str, float]] = collections.deque()

    def on_result(self, item: Item, result: Any) -> None:
        if len(self._results) >= MAX_PENDING:
            return
        outcome = result.code if isinstance(result, IngestError) else result.value
        if isinstance(item, Record):
            rows, size = item.count, len(item.payload)
        else:
            rows, size = 0, 0
        self._results.append((item.protocol, item.device_id, item.received_at, outcome, rows, size))

    def report_error(self, protocol: str, device: str, code: str, at: float) -> None:
        """A refused request of a known device, for the main process's registry."""
        if len(self._errors) < MAX_PENDING:
            self._errors.append((protocol, device, code, at))

    def observe_batch(self, size: int, seconds: float) -> None:
        self._batches.append((size, seconds))

    def observe_storage(self, what: str, seconds: float) -> None:
        self._timings.append((what, seconds))

    def take(
        self,
        worker: int,
        state: ShardSnapshot,
        current_file: Callable[[str, str], str | None],
    ) -> Report:
        """Everything since the last report."""
        delta = {key: n - self._sent[key] for key, n in self._requests.items()}
        delta = {key: n for key, n in delta.items() if n}
        self._sent.update(delta)
        results, self._results = self._results, []
        errors, self._errors = self._errors, []
        batches, self._batches = self._batches, []
        timings = []
        while self._timings:
            timings.append(self._timings.popleft())
        files = {}
        for protocol, device, *_ in results:
            if (protocol, device) not in files:
                current = current_file(protocol, device)
                if current is not None:
                    files[(protocol, device)] = current
        return Report(worker, state, delta, errors, results, files, batches, timings)


class MainLink:
    """A worker's connection to the main process."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.lost = asyncio.Event()
        self.closing = asyncio.Event()  # the main process said "close"

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self._path))
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await read_message(reader)) is not None:
            if message[0] == "close":
                self.closing.set()
        self.lost.set()

    async def send(self, message: tuple[Any, ...]) -> None:
        async with self._lock:
            if self._writer is not None and not self.lost.is_set():
                with contextlib.suppress(ConnectionError):
                    await send_message(self._writer, message)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()


# -- the main process side ------------------------------------------------------------


class WorkerLinks:
    """The main process's end: takes each worker's messages."""

    def __init__(
        self,
        on_hello: Callable[[int], None],
        on_report: Callable[[Report], None],
        on_reloaded: Callable[[int], None],
        on_drained: Callable[[int], None],
    ) -> None:
        self._on_hello = on_hello
        self._on_report = on_report
        self._on_reloaded = on_reloaded
        self._on_drained = on_drained
        self._server: asyncio.AbstractServer | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    async def tell_close(self) -> None:
        """Every worker: no more posts come; close storage and exit."""
        for writer in list(self._writers.values()):
            with contextlib.suppress(ConnectionError):
                await send_message(writer, ("close",))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while (message := await read_message(reader)) is not None:
                kind = message[0]
                if kind == "report":
                    self._on_report(message[1])
                elif kind == "hello":
                    self._writers[message[1]] = writer
                    self._on_hello(message[1])
                elif kind == "reloaded":
                    self._on_reloaded(message[1])
                elif kind == "drained":
                    self._on_drained(message[1])
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            for worker, known in list(self._writers.items()):
                if known is writer:
                    del self._writers[worker]
            writer.close()
