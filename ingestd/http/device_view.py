"""One device's view: its API, its stored data, its page.

- `GET /api/devices/{id}`: counters (as in the fleet list), the CSV header
  (Wattmon), the files (newest first), the quarantined blocks and the
  formats the data API serves for it.
- `GET /api/devices/{id}/data`: the stored records, streamed (see
  `record_formats`); `from`, `to` (RFC 3339 or a duration back from now:
  `24h`), `format=csv|json|ndjson`, `limit`, `on_header_change=section|reject`.
- `GET /api/devices/{id}/chart`: what the page draws: the latest record's
  values and every numeric column over `window` (default 24h), min/max
  downsampled to at most `MAX_POINTS` points per series.
- `GET /api/devices/{id}/files/{name}`: one stored file, as it is on disk.
- `GET /devices/{id}`: the page.

`{id}` is a device id of any registered protocol (a MAC in any spelling, a
stream name); `?protocol=wattmon|json` picks one when a stream is named like
a MAC. Not an id: 400; not known (neither heard from nor on disk): 404. The
same access rules as the fleet view (`[status]`). Every file is read in a
thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from ingestd.errors import IngestError
from ingestd.http import fleet, series
from ingestd.http.keys import CLOCK, CONFIG, DEVICES, METRICS, SINK
from ingestd.http.record_formats import CONTENT_TYPES, FORMATS, as_csv, as_json, as_ndjson, cells
from ingestd.ingest.devices import DeviceStats
from ingestd.protocols.base import DeviceProtocol
from ingestd.protocols.registry import PROTOCOLS
from ingestd.sinks.file import quarantine, reader
from ingestd.sinks.file.reader import StoredFile, UnknownDevice

log = logging.getLogger("ingestd.device_view")

# Paths under these are this view's, never a JSON stream's.
PREFIXES = ("/api/devices/", "/devices/")
MAX_POINTS = 500  # per series on a chart: min and max of MAX_POINTS / 2 buckets
DEFAULT_WINDOW = "24h"
MAX_LISTED_QUARANTINE = 100
COUNT_ROWS_MAX_BYTES = 1024 * 1024  # plain files this small get their rows counted

PAGE = fleet.load_page("device.html")  # at import, outside the event loop


class NotADevice(IngestError):
    code = "bad_device"


class UnknownDeviceError(IngestError):
    status = 404
    code = "unknown_device"


class MixedHeaders(IngestError):
    status = 409
    code = "mixed_headers"


def setup(app: web.Application) -> None:
    """Routes (before the device routes' catch-all) and the fleet gauges."""
    app.router.add_get("/api/devices/{id}", device_api)
    app.router.add_get("/api/devices/{id}/data", data_api)
    app.router.add_get("/api/devices/{id}/chart", chart_api)
    app.router.add_get("/api/devices/{id}/files/{name}", file_download)
    app.router.add_get("/devices/{id}", device_page)

    def settings() -> tuple[float, int]:
        status = app[CONFIG].current.status
        return status.silent_after_secs, status.last_seen_metric_devices

    app[METRICS].watch_fleet(app[DEVICES], app[CLOCK], settings)


# -- which device ----------------------------------------------------------------------


def candidates(raw: str, protocol: str | None) -> list[tuple[str, str]]:
    """(protocol, id) pairs `raw` may name, in the registry's order (Wattmon first)."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise fleet.unknown_protocol()
    found = []
    for form in PROTOCOLS.values():
        if protocol in (None, form.name) and (device_id := form.device_named(raw)) is not None:
            found.append((form.name, device_id))
    if not found:
        kinds = ", or ".join(form.id_description for form in PROTOCOLS.values())
        raise NotADevice(f"not a device id ({kinds})")
    return found


def _on_disk(data_dir: Path, protocol: str, device_id: str) -> bool:
    if os.path.isdir(reader.device_folder(data_dir, protocol, device_id)):
        return True
    return PROTOCOLS[protocol].quarantines and os.path.isdir(
        quarantine.folder(data_dir, device_id, protocol)
    )


def formats(form: DeviceProtocol[Any]) -> list[str]:
    """The data API's formats for a protocol's records, its default first."""
    return ["csv", "json", "ndjson"] if form.has_header else ["ndjson", "json"]


async def resolve(request: web.Request) -> tuple[str, str]:
    """The device the path names, after the access checks; 400 or 404."""
    fleet.check_access(request)
    pairs = candidates(request.match_info["id"], request.query.get("protocol") or None)
    registry = request.app[DEVICES]
    for protocol, device_id in pairs:
        if registry.get(protocol, device_id) is not None:
            return protocol, device_id
    data_dir = _data_dir(request)
    for protocol, device_id in pairs:
        if await asyncio.to_thread(_on_disk, data_dir, protocol, device_id):
            return protocol, device_id
    raise UnknownDeviceError("no such device or stream")


def _data_dir(request: web.Request) -> Path:

    return Path(request.app[CONFIG].current.data_dir)


def _now(request: web.Request) -> float:

    return float(request.app[CLOCK]())


# -- query ------------------------------------------------------------------------------


def parse_when(name: str, text: str, now: float) -> float:
    """RFC 3339 (`2026-11-21T08:00:00Z`; no zone: UTC) or a duration back
    from now (`24h`)."""
    ts = reader.parse_time(text.strip().encode("ascii", "replace"))
    if ts is not None and "-" in text:
        return ts
    try:
        return now - fleet.parse_duration(name, text)
    except fleet.BadQuery:
        raise fleet.BadQuery(
            f"{name}: expected an RFC 3339 time (2026-11-21T08:00:00Z) or a duration (24h)"
        ) from None


def parse_limit(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) == 0:
        raise fleet.BadQuery("limit: expected a positive whole number")
    return int(text)


# -- GET /api/devices/{id} ---------------------------------------------------------------


def file_json(
    protocol: str, device_id: str, stored: StoredFile, rows: int | None
) -> dict[str, Any]:
    return {
        "name": stored.name,
        "path": f"{protocol}/{device_id}/{stored.name}",
        "period": stored.period,
        "bytes": stored.size,
        "compressed": stored.compressed,
        "rows": rows,
        "modified": fleet.timestamp(stored.mtime),
    }


def describe_files(
    data_dir: Path, protocol: str, device_id: str
) -> tuple[dict[str, Any], float | None]:
    """Files (newest first), the CSV header, quarantined blocks, the data
    formats; and the newest file's mtime (blocking)."""
    form = PROTOCOLS[protocol]
    try:
        files = reader.list_files(data_dir, protocol, device_id)
    except UnknownDevice:
        files = []
    folder = reader.device_folder(data_dir, protocol, device_id)
    listed = []
    for stored in reversed(files):
        rows = None
        if not stored.compressed and stored.size <= COUNT_ROWS_MAX_BYTES:
            rows = sum(1 for _ in reader.read_lines(folder, stored))
            rows -= form.has_header and rows > 0  # the header line
        listed.append(file_json(protocol, device_id, stored, rows))
    header = None
    if form.has_header and files:
        line = reader.first_line(folder, files[-1])
        header = None if line is None else cells(line)
    blocks = []
    if form.quarantines:
        blocks = [
            {**asdict(block), "modified": fleet.timestamp(block.mtime)}
            for block in quarantine.list_blocks(
                data_dir, device_id, protocol, MAX_LISTED_QUARANTINE
            )
        ]
    described = {
        "header": header,
        "files": listed,
        "quarantined_blocks": blocks,
        "formats": formats(form),
    }
    return described, files[-1].mtime if files else None


async def device_api(request: web.Request) -> web.Response:

    protocol, device_id = await resolve(request)
    now = _now(request)
    stats = request.app[DEVICES].get(protocol, device_id)
    described, newest = await asyncio.to_thread(
        describe_files, _data_dir(request), protocol, device_id
    )
    if stats is None:  # on disk, not yet scanned: no counters
        stats = DeviceStats(now if newest is None else newest)
    silent_after = request.app[CONFIG].current.status.silent_after_secs
    doc = fleet.device_json((protocol, device_id), stats, now, silent_after, request.app.get(SINK))
    doc.update(described)
    doc["recent_errors"] = [
        {"at": fleet.timestamp(at), "code": code}
        for at, code in reversed(stats.recent_errors or ())
    ]
    return web.json_response(doc, headers={hdrs.CACHE_CONTROL: "no-store"})


# -- streaming out of a thread -------------------------------------------------------------


async def off_loop(chunks: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
    """Each chunk made in a thread of this request's own, which also closes
    the generator (and its open file) when the client goes away."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="ingestd-read")
    loop = asyncio.get_running_loop()
    try:
        while True:
            chunk = await loop.run_in_executor(executor, next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        # Queued after any read still running: never two at once.
        executor.submit(chunks.close)
        executor.shutdown(wait=False)


# -- GET /api/devices/{id}/data -------------------------------------------------------------


async def data_api(request: web.Request) -> web.StreamResponse:
    protocol, device_id = await resolve(request)
    query = request.query
    now = _now(request)
    form = PROTOCOLS[protocol]
    fmt = query.get("format", formats(form)[0])
    if fmt not in FORMATS:
        raise fleet.BadQuery("format: expected csv, json or ndjson")
    if fmt == "csv" and not form.has_header:
        raise fleet.BadQuery("format: csv is for Wattmon devices; use json or ndjson")
    on_change = query.get("on_header_change", "section")
    if on_change not in ("section", "reject"):
        raise fleet.BadQuery("on_header_change: expected section or reject")
    start = parse_when("from", query["from"], now) if "from" in query else None
    end = parse_when("to", query["to"], now) if "to" in query else None
    limit = parse_limit(query.get("limit"))
    data_dir = _data_dir(request)
    try:
        files = await asyncio.to_thread(reader.list_files, data_dir, protocol, device_id)
    except UnknownDevice:
        files = []  # known from its quarantined blocks only
    late = reader.late_secs(protocol)
    selected = reader.files_in_range(files, start, end, late)
    if fmt == "csv" and on_change == "reject":
        folder = reader.device_folder(data_dir, protocol, device_id)
        headers = await asyncio.to_thread(
            lambda: {reader.first_line(folder, f) for f in selected} - {None}
        )
        if len(headers) > 1:
            raise MixedHeaders(
                f"the selected rows have {len(headers)} different headers; narrow the range, "
                "or use on_header_change=section, format=json or format=ndjson"
            )
    items = reader.records(data_dir, protocol, device_id, selected, start, end)
    if fmt == "csv":
        chunks = as_csv(items, limit)
    elif fmt == "json":
        chunks = as_json(form.stored_as, items, limit)
    else:
        chunks = as_ndjson(form.stored_as, items, limit)
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: CONTENT_TYPES[fmt],
            hdrs.CACHE_CONTROL: "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    if "download" in query:
        response.headers[hdrs.CONTENT_DISPOSITION] = f'attachment; filename="{device_id}.{fmt}"'
    response.enable_chunked_encoding()  # a cut transfer shows as cut
    await response.prepare(request)
    async for chunk in off_loop(chunks):
        await response.write(chunk)
    await response.write_eof()
    return response


# -- GET /api/devices/{id}/chart -------------------------------------------------------------


def chart(
    data_dir: Path, protocol: str, device_id: str, start: float, end: float
) -> dict[str, Any]:
    """The page's data (blocking): latest values and downsampled series."""
    form = PROTOCOLS[protocol]
    try:
        files = reader.list_files(data_dir, protocol, device_id)
    except UnknownDevice:
        files = []
    folder = reader.device_folder(data_dir, protocol, device_id)
    latest = None
    for stored in reversed(files):  # the newest file with a record in it
        line = reader.last_line(folder, stored)
        header = reader.first_line(folder, stored) if form.has_header else b""
        if line is not None and (not form.has_header or line != header):
            ts = reader.TIME_OF[form.stored_as](line)
            latest = {
                "file": stored.name,
                "time": None if ts is None else fleet.timestamp(ts),
                "values": series.latest_values(form.stored_as, header or b"", line),
            }
            break
    selected = reader.files_in_range(files, start, end, reader.LATE_ROWS_SECS)
    items = reader.records(data_dir, protocol, device_id, selected, start, end)
    found, count = series.collect(form.stored_as, items)
    charted = series.downsampled(found, start, end, MAX_POINTS // 2)
    return {
        "id": device_id,
        "protocol": protocol,
        "from": fleet.timestamp(start),
        "to": fleet.timestamp(end),
        "records": count,
        "max_points": MAX_POINTS,
        "latest": latest,
        "series": [
            {"name": name, "points": [[round(t, 3), v] for t, v in points]}
            for name, points in charted.items()
        ],
    }


async def chart_api(request: web.Request) -> web.Response:
    protocol, device_id = await resolve(request)
    now = _now(request)
    window = fleet.parse_duration("window", request.query.get("window", DEFAULT_WINDOW))
    if window <= 0:
        raise fleet.BadQuery("window: must be longer than 0")
    started = time.monotonic()
    # Up to and including now: a record stored this instant is on the chart.
    end = math.nextafter(now, math.inf)
    doc = await asyncio.to_thread(chart, _data_dir(request), protocol, device_id, now - window, end)
    doc["secs"] = round(time.monotonic() - started, 3)
    body = await asyncio.to_thread(json.dumps, doc, separators=(",", ":"))
    return web.Response(
        text=body, content_type="application/json", headers={hdrs.CACHE_CONTROL: "no-store"}
    )


# -- GET /api/devices/{id}/files/{name} ---------------------------------------------------


async def file_download(request: web.Request) -> web.StreamResponse:
    protocol, device_id = await resolve(request)
    name = request.match_info["name"]
    data_dir = _data_dir(request)
    try:
        files = await asyncio.to_thread(reader.list_files, data_dir, protocol, device_id)
    except UnknownDevice:
        files = []
    # Only a name the listing holds: nothing a client types reaches open().
    stored = next((f for f in files if f.name == name), None)
    if stored is None:
        raise UnknownDeviceError("no such file")
    path = reader.device_folder(data_dir, protocol, device_id) / stored.name
    content_type = "application/gzip" if stored.compressed else PROTOCOLS[protocol].content_type
    return web.FileResponse(
        path,
        headers={
            hdrs.CONTENT_TYPE: content_type,
            hdrs.CONTENT_DISPOSITION: f'attachment; filename="{device_id}_{stored.name}"',
            hdrs.CACHE_CONTROL: "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


# -- GET /devices/{id} -----------------------------------------------------------------------


async def device_page(request: web.Request) -> web.Response:
    await resolve(request)
    return web.Response(body=PAGE.body, headers=PAGE.headers)
