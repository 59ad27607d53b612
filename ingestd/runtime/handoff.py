"""Handing a post to the worker that owns its device, over a Unix socket.

Every worker listens on `shard-<id>.sock` in the private runtime folder and
connects to the others on first need. A request is one parsed item, framed
by hand (a fixed head, then its strings and bytes: no pickle, no object per
field); the answer names the request it answers, since the owner answers in
the order its group commits finish, not the order of asking. Frames written
in one turn of the event loop go out in one write.

A worker that loses its connection to an owner (the owner died) answers
503 to those devices: they resend, and the restarted owner, which replayed
its log, tells a resend of a stored block from a new one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import cast

from ingestd.errors import IngestError, StorageFailed
from ingestd.ingest.pipeline import Item
from ingestd.records import Outcome, Quarantined, Record

log = logging.getLogger("ingestd.handoff")

_LENGTH = struct.Struct(">I")
# request: id, kind (0 record, 1 quarantined), received_at, count, and the
# lengths of protocol, device id, key, header (or reason), payload (or raw)
_REQUEST = struct.Struct(">IBdIHHHII")
# answer: id, outcome (index in _OUTCOMES, or 255: refused), status,
# retry-after (-1: none), lengths of error code and message
_ANSWER = struct.Struct(">IBHiHH")
_OUTCOMES = (Outcome.STORED, Outcome.DUPLICATE, Outcome.QUARANTINED)
_OUTCOME_INDEX = {outcome: i for i, outcome in enumerate(_OUTCOMES)}
_REFUSED = 255
MAX_FRAME_BYTES = 1 << 30
# How long posts wait for an owner that is not listening (a worker being
# restarted: 1 s, then its start-up and the replay of its log).
CONNECT_PATIENCE_SECS = 5.0
CONNECT_RETRY_SECS = 0.1


def socket_path(runtime: Path, shard: int) -> Path:
    return runtime / f"shard-{shard}.sock"


def encode_request(request_id: int, item: Item) -> bytes:
    protocol = item.protocol.encode()
    device = item.device_id.encode()
    key = (item.dedup_key or "").encode()
    if isinstance(item, Record):
        kind, count, text, data = 0, item.count, item.header, item.payload
    else:
        kind, count, text, data = 1, 0, item.reason.encode(), item.raw
    head = _REQUEST.pack(
        request_id,
        kind,
        item.received_at,
        count,
        len(protocol),
        len(device),
        len(key),
        len(text),
        len(data),
    )
    size = len(head) + len(protocol) + len(device) + len(key) + len(text) + len(data)
    return b"".join((_LENGTH.pack(size), head, protocol, device, key, text, data))


def decode_request(frame: bytes) -> tuple[int, Item]:
    request_id, kind, received_at, count, *lengths = _REQUEST.unpack_from(frame)
    fields = []
    pos = _REQUEST.size
    for length in lengths:
        fields.append(frame[pos : pos + length])
        pos += length
    protocol, device, key, text, data = fields
    dedup_key = key.decode() or None
    item: Item
    if kind == 0:
        item = Record(protocol.decode(), device.decode(), received_at, data, text, dedup_key, count)
    else:
        item = Quarantined(
            protocol.decode(), device.decode(), received_at, data, text.decode(), dedup_key
        )
    return request_id, item


def encode_answer(request_id: int, result: Outcome | BaseException) -> bytes:
    if isinstance(result, Outcome):
        head = _ANSWER.pack(request_id, _OUTCOME_INDEX[result], 0, -1, 0, 0)
        return _LENGTH.pack(len(head)) + head
    if not isinstance(result, IngestError):
        log.error("handoff_store_failed error=%s", ascii(repr(result)))
        result = StorageFailed("internal error; retry later")
    code, message = result.code.encode(), result.message.encode()
    retry = result.retry_after_secs if result.retry_after_secs is not None else -1
    head = _ANSWER.pack(request_id, _REFUSED, result.status, retry, len(code), len(message))
    return _LENGTH.pack(len(head) + len(code) + len(message)) + head + code + message


class HandedBackError(IngestError):
    """A refusal the owner gave, rebuilt where the device is waiting."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_secs = retry_after


def decode_answer(frame: bytes) -> tuple[int, Outcome | IngestError]:
    request_id, outcome, status, retry, code_len, message_len = _ANSWER.unpack_from(frame)
    if outcome != _REFUSED:
        return request_id, _OUTCOMES[outcome]
    pos = _ANSWER.size
    code = frame[pos : pos + code_len].decode()
    message = frame[pos + code_len : pos + code_len + message_len].decode()
    return request_id, HandedBackError(status, code, message, None if retry < 0 else retry)


class _Framed(asyncio.Protocol):
    """Length-prefixed frames in, frames out batched per loop turn."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos = 0
        while len(buffer) - pos >= 4:
            (size,) = _LENGTH.unpack_from(buffer, pos)
            if size > MAX_FRAME_BYTES:
                assert self.transport is not None
                self.transport.abort()  # both ends are ours: a bug, not a device
                return
            if len(buffer) - pos - 4 < size:
                break
            self.frame_received(bytes(buffer[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buffer[:pos]

    def frame_received(self, frame: bytes) -> None:
        raise NotImplementedError

    def send(self, frame: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


class _OwnerSide(_Framed):
    """One peer's connection to this worker: store what it hands over."""

    def __init__(self, accept: Callable[[Item], asyncio.Future[Outcome]]) -> None:
        super().__init__()
        self._accept = accept

    def frame_received(self, frame: bytes) -> None:
        request_id, item = decode_request(frame)
        try:
            future = self._accept(item)
        except Exception as exc:  # noqa: BLE001 (a bug costs this post, not the others)
            self.send(encode_answer(request_id, exc))
            return
        future.add_done_callback(
            lambda future: self.send(encode_answer(request_id, _result(future)))
        )


def _result(future: asyncio.Future[Outcome]) -> Outcome | BaseException:
    if future.cancelled():
        return StorageFailed("shutting down; retry later")
    return future.exception() or future.result()


class HandoffServer:
    """This worker's socket, on which the others hand over its devices' posts."""

    def __init__(self, accept: Callable[[Item], asyncio.Future[Outcome]]) -> None:
        self._accept = accept
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: Path) -> None:
        # A socket left by this shard's worker before it died.
        await asyncio.to_thread(path.unlink, missing_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _OwnerSide(self._accept), path=str(path)
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# A request handed over and not yet answered: its future, and its device
# (a refusal names it in the log line of the worker the device talks to).
Pending = dict[int, tuple["asyncio.Future[Outcome]", str]]


class _PeerSide(_Framed):
    def __init__(self, pending: Pending, lost: Callable[[], None]):
        super().__init__()
        self._pending = pending
        self._lost = lost

    def frame_received(self, frame: bytes) -> None:
        request_id, result = decode_answer(frame)
        future, device = self._pending.pop(request_id, (None, ""))
        if future is None or future.done():
            return
        if isinstance(result, IngestError):
            result.device = device
            future.set_exception(result)
        else:
            future.set_result(result)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._lost()


class Owner:
    """This worker's connection to another worker that owns devices."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._protocol: _PeerSide | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: list[bytes] = []  # framed while connecting
        self._pending: Pending = {}
        self._next_id = 0

    def hand_over(self, item: Item) -> asyncio.Future[Outcome]:
        self._next_id = request_id = (self._next_id + 1) & 0xFFFFFFFF
        frame = encode_request(request_id, item)  # first: a frame that fails leaves nothing
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, item.device_id)
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.send(frame)
        else:
            self._waiting.append(frame)
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
        return future

    async def _connect(self) -> None:
        protocol = await self._dial()
        waiting, self._waiting = self._waiting, []
        self._connecting = None
        if protocol is None or protocol.transport is None:
            # Not reached, or lost already (an owner dying as it starts).
            self._fail_pending()
            return
        self._protocol = protocol
        for frame in waiting:
            protocol.send(frame)

    async def _dial(self) -> _PeerSide | None:
        """Connect, waiting a while for an owner that is (re)starting: its
        devices' posts wait for it rather than fail at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_PATIENCE_SECS
        while True:
            try:
                _, protocol = await loop.create_unix_connection(
                    lambda: _PeerSide(self._pending, self._on_lost), str(self._path)
                )
                return protocol
            except OSError:
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(CONNECT_RETRY_SECS)

    def _on_lost(self) -> None:
        self._protocol = None
        self._fail_pending()

    def _fail_pending(self) -> None:
        """The owner is gone (it died, or is restarting): the devices resend."""
        pending, self._pending = self._pending, {}
        for future, device in pending.values():
            if not future.done():
                exc = StorageFailed("storage shard unavailable; retry later")
                exc.device = device
                future.set_exception(exc)

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()


class Owners:
    """Every other worker of this one, by shard id."""

    def __init__(self, runtime: Path, shards: int, me: int) -> None:
        self._owners = {
            shard: Owner(socket_path(runtime, shard)) for shard in range(shards) if shard != me
        }

    def hand_over(self, shard: int, item: Item) -> asyncio.Future[Outcome]:
        return self._owners[shard].hand_over(item)

    def close(self) -> None:
        for owner in self._owners.values():
            owner.close()
