"""Stored records as CSV, JSON or NDJSON, a chunk of bytes at a time.

Generators that run in a thread (they pull from `sinks.reader.records`,
which reads files): the data API writes each chunk as it comes, so a
device's whole history is never in memory.

- `csv` (a protocol stored as CSV: Wattmon): the rows as stored, under
  their header. When the header changes within the selection, a blank line
  and the new header start a new section (or, with `reject_mixed`,
  `MixedHeaders` is raised before the first byte: the caller checks with
  `headers_of` first).
- `ndjson`: one JSON object per line: a CSV row as `{column: cell}`
  (cells as the text stored), a JSON document's stored line as it is
  (`{"received_at": ..., "remote": ..., "path": ..., "body": ...}`), a text
  line as `{"line": text}`.
- `json`: the same objects in one array.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Generator, Iterable, Iterator

from ingestd.protocols.base import StoredAs
from ingestd.sinks.file.reader import StoredRecord

FORMATS = ("csv", "json", "ndjson")
CHUNK_BYTES = 64 * 1024
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "ndjson": "application/x-ndjson",
}


def cells(line: bytes) -> list[str]:
    """One CSV line's cells (quotes understood), as the text stored."""
    return next(csv.reader([line.decode("utf-8", "replace")]), [])


def _limited(items: Iterable[StoredRecord], limit: int | None) -> Iterator[StoredRecord]:
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            return
        yield item


Chunks = Generator[bytes, None, None]


def _chunked(parts: Iterable[bytes]) -> Chunks:
    buffer: list[bytes] = []
    size = 0
    for part in parts:
        buffer.append(part)
        size += len(part)
        if size >= CHUNK_BYTES:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


def as_csv(items: Iterable[StoredRecord], limit: int | None = None) -> Chunks:
    def parts() -> Iterator[bytes]:
        header: bytes | None = None
        for item in _limited(items, limit):
            if item.header != header:
                yield (b"" if header is None else b"\n") + item.header + b"\n"
                header = item.header
            yield item.line + b"\n"

    return _chunked(parts())


def _objects(stored_as: StoredAs, items: Iterable[StoredRecord]) -> Iterator[bytes]:
    """Each record as one JSON object's bytes."""
    if stored_as is StoredAs.JSON_LINES:
        yield from (item.line for item in items)  # stored as JSON already
        return
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    if stored_as is StoredAs.TEXT:
        for item in items:
            yield encode({"line": item.line.decode("utf-8", "replace")}).encode()
        return
    header: bytes | None = None
    names: list[str] = []
    for item in items:
        if item.header != header:
            header = item.header
            names = cells(header)
        row = cells(item.line)
        yield encode(dict(zip(names, row, strict=False))).encode()


def as_ndjson(
    stored_as: StoredAs, items: Iterable[StoredRecord], limit: int | None = None
) -> Chunks:
    return _chunked(obj + b"\n" for obj in _objects(stored_as, _limited(items, limit)))


def as_json(stored_as: StoredAs, items: Iterable[StoredRecord], limit: int | None = None) -> Chunks:
    def parts() -> Iterator[bytes]:
        yield b"["
        for i, obj in enumerate(_objects(stored_as, _limited(items, limit))):
            yield obj if i == 0 else b",\n" + obj
        yield b"]\n"

    return _chunked(parts())
