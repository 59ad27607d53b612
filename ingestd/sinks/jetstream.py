"""The NATS JetStream sink: each record published to a stream, OK on its ack.

Subjects: `<prefix>.wattmon.<mac>`, `<prefix>.json.<stream>` (every `.` of a
stream name becomes `_`, since `.` separates subject tokens; the exact name is
in the `Ingestd-Device` header) and `<prefix>.quarantine.wattmon.<mac>` for
blocks that passed MD5 but are not CSV.

Body: exactly the bytes the file sink appends: the CSV rows of a Wattmon block
(its header line is in `Ingestd-Csv-Header`), or the JSON Lines line of a JSON
document (`{"received_at":...,"remote":...,"path":...,"body":<document>}`), or
the raw block of a quarantined one. So a consumer can rebuild the files byte
for byte (`python -m ingestd.export`).

`Nats-Msg-Id` is `<protocol>:<device>:<key>`, the key being the block's MD5, the
hash of a JSON post's Idempotency-Key, or else a hash of the stored JSON line
(received time, remote, path, document): the server stores a resend of the
same block or key once within the stream's duplicate window. A JSON post with
no Idempotency-Key is a new document every time, as in the file sink.

A batch is published pipelined (every message in flight, then all acks
awaited together, bounded by `publish_timeout_secs`); a record is answered OK
only once JetStream acknowledged it, which it does once the message is in the
stream's file storage (on a quorum of replicas when replicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from ingestd.config import JetStreamConfig
from ingestd.errors import (
    BadDeviceKey,
    BadStreamName,
    BlockTooLarge,
    IngestError,
    Unavailable,
)
from ingestd.protocols.jsonpost import stream_name
from ingestd.protocols.wattmon import normalise_mac
from ingestd.records import Outcome, Quarantined, Record

if TYPE_CHECKING:
    from ingestd.sinks.file import FileSink

log = logging.getLogger("ingestd.jetstream")

Item = Record | Quarantined
Result = Outcome | IngestError

# Message headers (besides Nats-Msg-Id and Nats-Expected-Stream).
PROTOCOL = "Ingestd-Protocol"
DEVICE = "Ingestd-Device"
RECEIVED_AT = "Ingestd-Received-At"  # RFC 3339, microseconds, UTC
KEY = "Ingestd-Key"  # 32 hex digits; the last part of Nats-Msg-Id
COUNT = "Ingestd-Count"  # CSV rows, or 1
CSV_HEADER = "Ingestd-Csv-Header"  # percent-escaped, see escape_header()
REMOTE = "Ingestd-Remote"  # JSON only: what the line's "remote" holds
PATH = "Ingestd-Path"  # JSON only
QUARANTINED = "Ingestd-Quarantined"  # the reason, percent-escaped

PROBE_INTERVAL_SECS = 1.0
ERROR_LOG_INTERVAL_SECS = 60.0
CLOSE_TIMEOUT_SECS = 5.0


class SinkUnavailable(Unavailable):
    """JetStream is unreachable, refused the message, or did not ack in time."""

    code = "sink_unavailable"
    retry_after_secs = 5


# -- messages ------------------------------------------------------------------------

# Printable ASCII but `%` stays as is; anything else is %XX, so the value
# survives any NATS client (which strip and may re-encode header values).
_HEADER_SAFE = b"".join(bytes([c]) for c in range(0x20, 0x7F) if c != 0x25)


def escape_header(raw: bytes) -> str:
    """Bytes to a header value that `unquote_to_bytes` turns back into them."""
    value = quote_from_bytes(raw, safe=_HEADER_SAFE)
    if value[:1] == " " or value[-1:] == " ":  # clients strip header values
        inner = value.strip(" ")
        if not inner:
            return "%20" * len(value)
        lead = len(value) - len(value.lstrip(" "))
        trail = len(value) - len(value.rstrip(" "))
        value = "%20" * lead + inner + "%20" * trail
    return value


def unescape_header(value: str) -> bytes:
    return unquote_to_bytes(value)


def format_time(ts: float) -> str:
    """Unix seconds to `2026-11-21T08:00:00.123456Z`, truncated, never rounded
    up across a second (so never into the next rotation period)."""
    micros = int(ts * 1_000_000)
    whole, frac = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac:06d}Z"


def subject_token(device_id: str) -> str:
    return device_id.replace(".", "_")


def line_key(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:32]


_DECODER = json.JSONDecoder()


def json_line_meta(line: bytes) -> tuple[str, str] | None:
    """The remote and path of a stored JSON line (they come before the body)."""
    head = line[:4096].decode("utf-8", "ignore")
    start = head.find(',"remote":')
    if start < 0:
        return None
    try:
        remote, end = _DECODER.raw_decode(head, start + len(',"remote":'))
        if not head.startswith(',"path":', end):
            return None
        path, _ = _DECODER.raw_decode(head, end + len(',"path":'))
    except ValueError:
        return None
    if not isinstance(remote, str) or not isinstance(path, str):
        return None
    return remote, path


def message(item: Item, prefix: str) -> tuple[str, dict[str, str], bytes]:
    """The subject, headers and body that carry one record."""
    headers = {
        PROTOCOL: item.protocol,
        DEVICE: item.device_id,
        RECEIVED_AT: format_time(item.received_at),
    }
    token = subject_token(item.device_id)
    if isinstance(item, Quarantined):
        key = item.dedup_key or line_key(item.raw)
        headers[QUARANTINED] = escape_header(item.reason.encode("utf-8", "replace"))
        headers[KEY] = key
        headers["Nats-Msg-Id"] = f"quarantine:{item.protocol}:{item.device_id}:{key}"
        return f"{prefix}.quarantine.{item.protocol}.{token}", headers, item.raw
    key = item.dedup_key or line_key(item.payload)
    headers[KEY] = key
    headers[COUNT] = str(item.count)
    headers["Nats-Msg-Id"] = f"{item.protocol}:{item.device_id}:{key}"
    if item.header:
        headers[CSV_HEADER] = escape_header(item.header.rstrip(b"\n"))
    if item.protocol == "json":
        meta = json_line_meta(item.payload)
        if meta is not None:
            headers[REMOTE] = escape_header(meta[0].encode("utf-8", "replace"))
            headers[PATH] = escape_header(meta[1].encode("utf-8", "replace"))
    return f"{prefix}.{item.protocol}.{token}", headers, item.payload


_KEY = re.compile(r"[0-9a-f]{32}")


def record_from(headers: Mapping[str, str] | None, body: bytes) -> Item:
    """The record a stored message carries (`message()` read back): what
    export writes, and what `both` writes for a resend the stream had.
    ValueError if it is not one of ours."""
    headers = headers or {}
    protocol = headers.get(PROTOCOL)
    device = headers.get(DEVICE, "")
    if protocol not in ("wattmon", "json"):
        raise ValueError(f"no {PROTOCOL} header")
    try:
        if protocol == "wattmon":
            valid = normalise_mac(device.encode()) == device
        else:
            valid = stream_name("/" + device) == device
    except (BadDeviceKey, BadStreamName):
        valid = False
    if not valid:  # it becomes a folder name: never trust it unchecked
        raise ValueError("bad device id")
    received = headers.get(RECEIVED_AT, "")
    when = datetime.datetime.fromisoformat(received.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    received_at = when.timestamp()
    key = headers.get(KEY)
    if key is not None and not _KEY.fullmatch(key):
        key = None
    if QUARANTINED in headers:
        reason = unescape_header(headers[QUARANTINED]).decode("utf-8", "replace")
        return Quarantined(protocol, device, received_at, body, reason, key)
    header = b""
    if CSV_HEADER in headers:
        header = unescape_header(headers[CSV_HEADER])
        if b"\n" in header or b"\r" in header:
            raise ValueError("CSV header of more than one line")
        header += b"\n"
    count = int(headers.get(COUNT, "1"))
    return Record(protocol, device, received_at, body, header, key, count)


def wire_size(headers: Mapping[str, str], body: bytes, stream: str) -> int:
    """What the server counts against max_payload: headers block and body."""
    size = len(b"NATS/1.0\r\n\r\n") + len(body)
    size += len("Nats-Expected-Stream: \r\n") + len(stream)
    return size + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


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


@dataclass(slots=True)
class JetStreamStats:
    published: int = 0
    duplicates: int = 0
    failures: int = 0
    disconnects: int = 0


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
                cfg.stream, subject, cfg.replicas,
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
                cfg.stream, ",".join(sorted(changes)), json.dumps(str(exc.description)),
            )
        else:
            log.info("jetstream_stream_updated stream=%s settings=%s",
                     cfg.stream, ",".join(sorted(changes)))

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
            asyncio.ensure_future(js.get_msg(self._config.stream, wanted[i][1]))
            for i in indexes
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
            if (
                (copy.protocol, copy.device_id, copy.dedup_key, type(copy))
                == (item.protocol, item.device_id, item.dedup_key, type(item))
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
                item.protocol, item.device_id, json.dumps(repr(exc)),
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
                item.protocol, item.device_id, len(body), limit,
            )
            return BlockTooLarge("record larger than the JetStream server's max_payload"), None
        try:
            future = await js.publish_async(
                subject, body, wait_stall=cfg.publish_timeout_secs,
                stream=cfg.stream, headers=headers,
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


# -- routing -----------------------------------------------------------------------------


class Fanout:
    """Sends each record to the sinks its route names: `file`, `jetstream` or
    `both`. One result per record.

    `both` is JetStream first, then the file: a record goes to the file only
    once JetStream acknowledged it, and is answered OK only once the file
    stored it too. Refused by JetStream (down, hung, too large), it is in
    neither; refused by the file after the ack, it is in the stream only,
    and the device's resend is a duplicate there. A record JetStream already
    had (a resend after a lost answer) goes to the file as the stream holds
    it, received time and all, so files and stream agree (and export
    rebuilds the files)."""

    def __init__(self, file: FileSink, jetstream: JetStreamSink, routes: Mapping[str, str]) -> None:
        self._file = file
        self._jetstream = jetstream
        self._routes = dict(routes)

    async def commit(self, items: list[Item]) -> list[Result]:
        routes = [self._routes.get(item.protocol, "file") for item in items]
        to_js = [i for i, route in enumerate(routes) if route != "file"]
        if not to_js:
            return await self._file.commit(items)
        if len(to_js) == len(items) and "both" not in routes:
            return await self._jetstream.commit(items)
        published, stored_at = await self._jetstream.publish([items[i] for i in to_js])
        results: list[Result | None] = [None] * len(items)
        for i, result in zip(to_js, published, strict=True):
            results[i] = result
        # To the file: its own routes' records, and `both`'s that the stream has.
        to_file = [
            i for i, route in enumerate(routes)
            if route == "file" or (route == "both" and not isinstance(results[i], IngestError))
        ]
        if not to_file:
            return [r if r is not None else SinkUnavailable("internal error") for r in results]
        # A duplicate with a key of its own (MD5, Idempotency-Key) may differ
        # from the stream's copy in its received time: store that copy. One
        # without is new to the file whatever the stream says, as with
        # `sink = "file"`.
        copies = await self._jetstream.stored_copies({
            i: (items[i], seq) for n, i in enumerate(to_js)
            if routes[i] == "both" and items[i].dedup_key is not None
            and (seq := stored_at.get(n)) is not None
        })
        file_results = await self._file.commit([copies.get(i, items[i]) for i in to_file])
        for i, result in zip(to_file, file_results, strict=True):
            # `both`: the file's outcome, now that JetStream has the record.
            results[i] = result
        return [r if r is not None else SinkUnavailable("internal error") for r in results]

    async def probe(self) -> None:
        await self._file.probe()
        await self._jetstream.probe()
