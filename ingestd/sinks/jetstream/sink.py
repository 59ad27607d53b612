"""The NATS JetStream sink: each record published to a stream, OK on its ack.

Framing of a record as a message: `ingestd.sinks.jetstream.codec`.

A batch is published pipelined (every message in flight, then all acks
awaited together, bounded by `publish_timeout_secs`); a record is answered OK
only once JetStream acknowledged it, which it does once the message is in the
stream's file storage (on a quorum of replicas when replicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import time
from collections.abc import Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from ingestd.config import JetStreamConfig
from ingestd.errors import BlockTooLarge, Unavailable
from ingestd.ingest.state import JetStreamStats
from ingestd.records import Outcome, Quarantined
from ingestd.sinks.jetstream.codec import Item, Result, message, record_from, wire_size

log = logging.getLogger("ingestd.jetstream")

PROBE_INTERVAL_SECS = 1.0
ERROR_LOG_INTERVAL_SECS = 60.0
CLOSE_TIMEOUT_SECS = 5.0


class SinkUnavailable(Unavailable):
    """JetStream is unreachable, refused the message, or did not ack in time."""

    code = "sink_unavailable"
    retry_after_secs = 5


# -- connection ------------------------------------------------------------------------


async def connect_options(config: JetStreamConfig) -> dict[str, Any]:
    """nats-py `connect()` arguments for the servers and credentials."""
    options: dict[str, Any] = {"servers": list(config.servers)}
    if config.token:
        options["token"] = config.token
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.creds_file:
        options["user_credentials"] = config.creds_file
    if config.tls_ca:
        # Reads the CA file: off the loop.
        options["tls"] = await asyncio.to_thread(ssl.create_default_context, cafile=config.tls_ca)
    return options


class JetStreamSink:
    """Publishes records to one stream; connects and reconnects by itself.

    `open()` returns at once: while the server is unreachable every commit
    answers `SinkUnavailable` (503) and `healthy` is False.
    """

    def __init__(self, config: JetStreamConfig, *, max_pending: int = 4096) -> None:
        self._config = config
        self._max_pending = max_pending
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._ready = False  # connected once and the stream is there
        self._max_msg_size = -1  # the stream's own limit (headers and body); -1: none
        # A publish failed; cleared by a probe or a batch that goes through.
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._last_error_log = 0.0
        self._last_publish_error_log = 0.0
        self._last_copy_error_log = 0.0
        self._closing = False
        self._closing_task: asyncio.Task[None] | None = None
        self.stats = JetStreamStats()

    @property
    def healthy(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected and self._ready and not self._failing

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def open(self) -> None:
        options = await connect_options(self._config)
        self._task = asyncio.create_task(self._run(options), name="ingestd-jetstream")
        self._task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Publishing goes on; only health stops coming back by itself.
            log.error("jetstream_monitor_died error=%s", json.dumps(repr(task.exception())))

    async def close(self) -> None:
        """Stop the background task and close the connection; bounded in time."""
        self._closing = True
        self._wake.set()
        # nats-py swallows a cancellation in places (its flush path), so no
        # wait here is unbounded: the loop also stops on `_closing`.
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT_SECS)
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        closing = asyncio.create_task(nc.close())
        self._closing_task = closing  # a reference, even if it never ends
        done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_SECS)
        if not done:
            closing.cancel()
            log.warning("jetstream_close_timed_out")
        elif not closing.cancelled() and closing.exception() is not None:
            log.warning("jetstream_close_failed error=%s", json.dumps(repr(closing.exception())))

    async def probe(self) -> None:
        """Raise ConnectionError (an OSError) unless the stream answers."""
        if not self.connected:
            raise ConnectionError("jetstream not connected")
        try:
            await self._ensure_stream()
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise ConnectionError(f"jetstream: {exc!r}") from exc
        self._set_ready()

    # -- background: connect, keep the stream checked ----------------------------------

    async def _run(self, options: dict[str, Any]) -> None:
        nc = NATS()
        self._nc = nc
        await nc.connect(
            **options,
            name="ingestd",
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # also retries the first connect, forever
            reconnect_time_wait=self._config.reconnect_wait_secs,  # type: ignore[arg-type]
            # A hung server: pings find it within ~30 s and the client moves
            # to another server of the cluster; until then publishes time out.
            ping_interval=10,
            max_outstanding_pings=3,
            flush_timeout=self._config.publish_timeout_secs,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._js = nc.jetstream(
            timeout=self._config.publish_timeout_secs,
            publish_async_max_pending=max(self._max_pending, 1),
        )
        log.info("jetstream_connected server=%s", _server(nc))
        while not self._closing:
            self._wake.clear()
            if not self._ready or self._failing:
                with contextlib.suppress(ConnectionError):
                    await self.probe()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_INTERVAL_SECS):
                    await self._wake.wait()

    def _set_ready(self) -> None:
        if not self._ready or self._failing:
            log.info("jetstream_ready stream=%s", self._config.stream)
        self._ready = True
        self._failing = False

    async def _ensure_stream(self) -> None:
        """Create the stream if missing; bring our settings to an existing one."""
        js = self._js
        if js is None:
            raise ConnectionError("jetstream not connected")
        cfg = self._config
        subject = f"{cfg.subject_prefix}.>"
        max_age = cfg.max_age_days * 86400.0
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            self._max_msg_size = -1
            await js.add_stream(
                StreamConfig(
                    name=cfg.stream,
                    subjects=[subject],
                    retention=RetentionPolicy.LIMITS,
                    discard=DiscardPolicy.OLD,
                    storage=StorageType.FILE,
                    num_replicas=cfg.replicas,
                    max_age=max_age,
                    duplicate_window=cfg.duplicate_window_secs,
                )
            )
            log.info(
                "jetstream_stream_created stream=%s subjects=%s replicas=%d",
                cfg.stream,
                subject,
                cfg.replicas,
            )
            return
        current = info.config
        self._max_msg_size = current.max_msg_size if current.max_msg_size is not None else -1
        changes: dict[str, Any] = {}
        if subject not in (current.subjects or []):
            changes["subjects"] = [*(current.subjects or []), subject]
        if current.duplicate_window != cfg.duplicate_window_secs:
            changes["duplicate_window"] = cfg.duplicate_window_secs
        if (current.max_age or 0.0) != max_age:
            changes["max_age"] = max_age
        if current.num_replicas != cfg.replicas:
            changes["num_replicas"] = cfg.replicas
        if not changes:
            return
        try:
            await js.update_stream(dataclasses.replace(current, **changes))
        except nats.js.errors.APIError as exc:
            # Managed by someone else, or not allowed to: use it as it is.
            log.warning(
                "jetstream_stream_not_updated stream=%s settings=%s error=%s",
                cfg.stream,
                ",".join(sorted(changes)),
                json.dumps(str(exc.description)),
            )
        else:
            log.info(
                "jetstream_stream_updated stream=%s settings=%s",
                cfg.stream,
                ",".join(sorted(changes)),
            )

    async def _on_error(self, exc: Exception) -> None:
        # A failed (re)connect attempt calls this every reconnect_wait_secs.
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_SECS:
            self._last_error_log = now
            log.error("jetstream_error error=%s", json.dumps(repr(exc)))

    async def _on_disconnected(self) -> None:
        if self._ready and not self._closing:
            self.stats.disconnects += 1
            log.warning("jetstream_disconnected")
        # Acks of messages in flight will not come on this connection: answer
        # 503 now rather than at the timeout (a resend is deduplicated).
        for future in self._in_flight:
            if not future.done():
                future.set_exception(ConnectionError("jetstream disconnected"))

    async def _on_reconnected(self) -> None:
        log.info("jetstream_reconnected server=%s", _server(self._nc))
        self._failing = True  # check the stream (it may be new) before health
        self._wake.set()

    # -- the commit ------------------------------------------------------------------------

    async def commit(self, items: list[Item]) -> list[Result]:
        """Publish a batch, pipelined; one result per item, in order."""
        results, _ = await self.publish(items)
        return results

    async def publish(self, items: list[Item]) -> tuple[list[Result], dict[int, int]]:
        """`commit`, plus where the stream holds what it answered DUPLICATE
        for: {index in items: stream sequence of the copy stored first}."""
        js, nc = self._js, self._nc
        if js is None or nc is None or not nc.is_connected or not self._ready:
            self.stats.failures += len(items)
            return [SinkUnavailable("jetstream unavailable; retry later")] * len(items), {}
        cfg = self._config
        results: list[Result | None] = [None] * len(items)
        waiting: dict[asyncio.Future[Any], int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.publish_timeout_secs
        try:
            # Publishing itself can stall (a hung server's socket buffers
            # full): the deadline covers the sending as well as the acks.
            async with asyncio.timeout_at(deadline):
                for i, item in enumerate(items):
                    if loop.time() >= deadline:  # nats-py may have eaten the timeout
                        break
                    results[i], future = await self._publish(js, nc, item)
                    if future is not None:
                        waiting[future] = i
                        self._in_flight.add(future)
            if waiting:
                _, late = await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()))
                for future in late:
                    future.cancel()
        except TimeoutError:
            for future in waiting:
                future.cancel()
        finally:
            self._in_flight.difference_update(waiting)
        stored_at: dict[int, int] = {}
        for future, i in waiting.items():
            results[i] = self._result(items[i], future)
            if results[i] is Outcome.DUPLICATE:
                stored_at[i] = future.result().seq
        for i, result in enumerate(results):
            if result is None:  # not even sent before the deadline
                results[i] = self._failed(TimeoutError("publish stalled"))
        failed = sum(isinstance(r, SinkUnavailable) for r in results)
        if failed:
            self.stats.failures += failed
            self._failing = True
            self._wake.set()
        elif waiting:
            self._failing = False
        return [
            r if r is not None else SinkUnavailable("internal error") for r in results
        ], stored_at

    async def stored_copies(self, wanted: Mapping[int, tuple[Item, int]]) -> dict[int, Item]:
        """For {index: (record, stream sequence)}, the records the stream
        holds there, read back concurrently. One that cannot be read in time,
        or is not the same protocol, device and key, is left out."""
        js = self._js
        if js is None or not wanted:
            return {}
        indexes = list(wanted)
        fetches = [
            asyncio.ensure_future(js.get_msg(self._config.stream, wanted[i][1])) for i in indexes
        ]
        done, late = await asyncio.wait(fetches, timeout=self._config.publish_timeout_secs)
        for fetch in late:
            fetch.cancel()
        copies: dict[int, Item] = {}
        for i, fetch in zip(indexes, fetches, strict=True):
            if fetch not in done or fetch.exception() is not None:
                error = fetch.exception() if fetch in done else TimeoutError("no answer in time")
                self._log_copy_unavailable(wanted[i][0], error)
                continue
            stored = fetch.result()
            try:
                copy = record_from(stored.headers, stored.data or b"")
            except ValueError as exc:
                self._log_copy_unavailable(wanted[i][0], exc)
                continue
            item = wanted[i][0]
            if (copy.protocol, copy.device_id, copy.dedup_key, type(copy)) == (
                item.protocol,
                item.device_id,
                item.dedup_key,
                type(item),
            ):
                copies[i] = copy
            else:
                self._log_copy_unavailable(item, ValueError("another record at that sequence"))
        return copies

    def _log_copy_unavailable(self, item: Item, exc: BaseException | None) -> None:
        now = time.monotonic()
        if now - self._last_copy_error_log >= 1.0:  # a line a second at most
            self._last_copy_error_log = now
            log.warning(
                "jetstream_copy_unavailable protocol=%s device=%s error=%s: the file keeps "
                "the resend as received",
                item.protocol,
                item.device_id,
                json.dumps(repr(exc)),
            )

    async def _publish(
        self, js: JetStreamContext, nc: NATS, item: Item
    ) -> tuple[Result | None, asyncio.Future[Any] | None]:
        """Send one message: a future for its ack, or at once a refusal."""
        cfg = self._config
        if not nc.is_connected:  # lost mid-batch: do not buffer for a reconnect
            return self._failed(ConnectionError("jetstream disconnected")), None
        subject, headers, body = message(item, cfg.subject_prefix)
        # The server cuts the connection on an oversized message (headers
        # count too), and the stream refuses one over its max_msg_size, which
        # a resend would never get past: refuse it here, before `both` stores
        # it anywhere.
        limit = nc.max_payload
        if self._max_msg_size >= 0:
            limit = min(limit, self._max_msg_size)
        if wire_size(headers, body, cfg.stream) > limit:
            log.error(
                "jetstream_too_large protocol=%s device=%s bytes=%d max_payload=%d",
                item.protocol,
                item.device_id,
                len(body),
                limit,
            )
            return BlockTooLarge("record larger than the JetStream server's max_payload"), None
        try:
            future = await js.publish_async(
                subject,
                body,
                wait_stall=cfg.publish_timeout_secs,
                stream=cfg.stream,
                headers=headers,
            )
        except (nats.errors.Error, OSError) as exc:
            return self._failed(exc), None
        return None, future

    def _result(self, item: Item, future: asyncio.Future[Any]) -> Result:
        if future.cancelled():
            return self._failed(TimeoutError("no publish ack in time"))
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, nats.js.errors.NoStreamResponseError):
                self._ready = False  # the stream is gone: the prober recreates it
            return self._failed(exc)
        if future.result().duplicate:
            self.stats.duplicates += 1
            return Outcome.DUPLICATE
        self.stats.published += 1
        return Outcome.QUARANTINED if isinstance(item, Quarantined) else Outcome.STORED

    def _failed(self, exc: BaseException) -> SinkUnavailable:
        now = time.monotonic()
        if now - self._last_publish_error_log >= 1.0:  # a line a second while failing
            self._last_publish_error_log = now
            log.error("jetstream_publish_failed error=%s", json.dumps(repr(exc)))
        return SinkUnavailable("jetstream unavailable; retry later")


def _server(nc: NATS | None) -> str:
    url = nc.connected_url if nc is not None else None
    return url.netloc if url is not None else "-"
