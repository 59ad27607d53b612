"""The bounded queue between request handlers and the writer.

A handler submits a record and awaits its future; the writer task takes
everything queued (group commit), stores it with one sink call, and resolves
the futures. The device's `OK` is that future's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ingestd.errors import IngestError, QueueFull, ShuttingDown, StorageFailed
from ingestd.records import Outcome, Quarantined, Record

log = logging.getLogger("ingestd.pipeline")

Item = Record | Quarantined
Commit = Callable[[list[Item]], Awaitable[list[Outcome | IngestError]]]
Probe = Callable[[], Awaitable[None]]
Listener = Callable[[Item, Outcome | IngestError], None]
PROBE_INTERVAL_SECS = 1.0
# At most one commit (one log sync) per this interval; see Pipeline._run.
# Measured (docs/performance.md, "2026-12-04, evening"): at 1 ms, posts on new
# connections made batches of 8 and a third less throughput than at 3 ms;
# keep-alive batches are large anyway. An idle device's post never waits.
COMMIT_INTERVAL_SECS = 0.003


class Submitter(Protocol):
    """Where the ingest service queues an item: a pipeline, or in a worker
    the router to the shard that stores it (ingestd.ingest.shards)."""

    def try_submit(self, item: Item) -> asyncio.Future[Outcome] | None: ...

    async def submit(self, item: Item) -> Outcome: ...


@dataclass(slots=True)
class PipelineStats:
    batches: int = 0
    records_stored: int = 0
    rows_stored: int = 0
    bytes_stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    storage_errors: int = 0
    storage_ok: bool = True
    last_progress: float = field(default_factory=time.monotonic)


class Pipeline:
    def __init__(
        self,
        commit: Commit,
        probe: Probe,
        *,
        max_records: int,
        enqueue_timeout_secs: float,
        batch_max_records: int,
        listener: Listener | None = None,
        observe_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._commit = commit
        self._probe = probe
        self._prober: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Outcome]] | None] = asyncio.Queue(
            max_records
        )
        self._enqueue_timeout = enqueue_timeout_secs
        self._batch_max = batch_max_records
        self._listener = listener
        self._observe_batch = observe_batch
        self._closing = False
        self._busy = False
        self._writer: asyncio.Task[None] | None = None
        self.stats = PipelineStats()

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def making_progress(self, within_secs: float) -> bool:
        """True when idle, or when the writer finished a batch recently."""
        return self.stalled_secs() < within_secs

    def stalled_secs(self) -> float:
        """How long records have waited with no batch stored; 0 when idle."""
        if self.depth == 0 and not self._busy:
            return 0.0
        return time.monotonic() - self.stats.last_progress

    def set_enqueue_timeout(self, secs: float) -> None:
        self._enqueue_timeout = secs

    def start(self) -> None:
        self._writer = asyncio.create_task(self._run(), name="ingestd-writer")
        self._writer.add_done_callback(self._writer_done)

    async def submit(self, item: Item) -> Outcome:
        """Queue `item` and wait until it is stored (or refused)."""
        future = self.try_submit(item)
        if future is None:
            future = await self._put_waiting(item)
        return await future

    def try_submit(self, item: Item) -> asyncio.Future[Outcome] | None:
        """Queue `item` without waiting: its future, or None if the queue is
        full right now (then `submit` waits for room). The fast path's way in:
        no coroutine, no task."""
        if self._closing:
            raise ShuttingDown("shutting down; retry later")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            return None
        return future

    async def _put_waiting(self, item: Item) -> asyncio.Future[Outcome]:
        """Queue `item` into a full queue, waiting up to the deadline for
        room, else QueueFull; return the future the writer resolves."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._queue.put((item, future)), self._enqueue_timeout)
        except TimeoutError:
            raise QueueFull("queue full; retry later") from None
        return future

    async def close(self) -> None:
        """Store everything queued, then stop the writer. Idempotent."""
        self._closing = True
        if self._writer is None or self._writer.done():
            return
        await self._queue.put(None)  # the writer stops when it reaches this
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_commit = 0.0
        while True:
            entry = await self._queue.get()
            # Under load, let a batch gather for a moment: a log sync, the
            # hop to the writer thread and back, and the wake-ups around them
            # cost the same CPU whether a batch carries 2 records or 50, and
            # the HTTP side shares that CPU. Idle, the first record goes at once.
            pause = last_commit + COMMIT_INTERVAL_SECS - loop.time()
            if pause > 0 and entry is not None:
                await asyncio.sleep(pause)
            last_commit = loop.time()
            batch = []
            stop = entry is None
            if entry is not None:
                batch.append(entry)
            while not stop and len(batch) < self._batch_max and not self._queue.empty():
                entry = self._queue.get_nowait()
                if entry is None:
                    stop = True
                else:
                    batch.append(entry)
            if batch:
                self._busy = True
                try:
                    await self._store(batch)
                finally:
                    self._busy = False
            if stop:
                return

    async def _store(self, batch: list[tuple[Item, asyncio.Future[Outcome]]]) -> None:
        started = time.perf_counter()
        try:
            results = await self._commit([item for item, _ in batch])
        except Exception as exc:  # a bug in the sink must not hang the devices
            log.exception("commit_crashed records=%d", len(batch))
            results = [StorageFailed(f"storage failed ({type(exc).__name__})")] * len(batch)
        stats = self.stats
        stats.batches += 1
        stats.last_progress = time.monotonic()
        if self._observe_batch is not None:
            self._observe_batch(len(batch), time.perf_counter() - started)
        failed = False
        for (item, future), result in zip(batch, results, strict=True):
            if self._listener is not None:
                self._listener(item, result)
            if isinstance(result, IngestError):
                failed = True
                stats.storage_errors += 1
                if not future.done():
                    future.set_exception(result)
                continue
            if result is Outcome.STORED and isinstance(item, Record):
                stats.records_stored += 1
                stats.rows_stored += item.count
                stats.bytes_stored += len(item.payload)
            elif result is Outcome.DUPLICATE:
                stats.duplicates += 1
            elif result is Outcome.QUARANTINED:
                stats.quarantined += 1
            if not future.done():
                future.set_result(result)
        stats.storage_ok = not failed
        if failed and (self._prober is None or self._prober.done()):
            self._prober = asyncio.create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        """While storage fails, test it every second, so health comes back
        when the disk does, even if no device happens to post."""
        while not self.stats.storage_ok and not self._closing:
            await asyncio.sleep(PROBE_INTERVAL_SECS)
            try:
                await self._probe()
            except OSError:
                continue
            log.info("storage_recovered")
            self.stats.storage_ok = True

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        """If the writer dies, fail every waiting request instead of hanging it."""
        self._closing = True
        if not task.cancelled() and task.exception() is not None:
            log.error("writer_died error=%r", task.exception())
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not None and not entry[1].done():
                entry[1].set_exception(ShuttingDown("writer stopped; retry later"))
