"""Routing records to the file sink, JetStream, or both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ingestd.errors import IngestError
from ingestd.sinks.jetstream.codec import Item, Result
from ingestd.sinks.jetstream.sink import JetStreamSink, SinkUnavailable

if TYPE_CHECKING:
    from ingestd.sinks.file.sink import FileSink


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
            i
            for i, route in enumerate(routes)
            if route == "file" or (route == "both" and not isinstance(results[i], IngestError))
        ]
        if not to_file:
            return [r if r is not None else SinkUnavailable("internal error") for r in results]
        # A duplicate with a key of its own (MD5, Idempotency-Key) may differ
        # from the stream's copy in its received time: store that copy. One
        # without is new to the file whatever the stream says, as with
        # `sink = "file"`.
        copies = await self._jetstream.stored_copies(
            {
                i: (items[i], seq)
                for n, i in enumerate(to_js)
                if routes[i] == "both"
                and items[i].dedup_key is not None
                and (seq := stored_at.get(n)) is not None
            }
        )
        file_results = await self._file.commit([copies.get(i, items[i]) for i in to_file])
        for i, result in zip(to_file, file_results, strict=True):
            # `both`: the file's outcome, now that JetStream has the record.
            results[i] = result
        return [r if r is not None else SinkUnavailable("internal error") for r in results]

    async def probe(self) -> None:
        await self._file.probe()
        await self._jetstream.probe()
