"""The fleet view: GET /api/devices (JSON) and the status page at / and /status.

`GET /api/devices` lists every device and stream heard from since the start,
plus those found in the data directory at start-up (`scan_ctx`):

    {"summary": {...}, "devices": [{"id": ..., "protocol": ..., ...}, ...]}

Query: `protocol=wattmon|json` (any registered protocol's name);
`silent_for=DURATION` (only devices with no data for at least that long);
`silent_after=DURATION` (when a device counts as silent, default 15m, or
`silent_for` when given); `order=newest|oldest` (by last seen, default
newest first); `limit=N`. A duration is seconds (`90`, `1.5`) or a number
with a unit: `90s`, `15m`, `2h`, `1d`. The summary is the whole fleet's,
whatever the filters. Times are RFC 3339 UTC. Blocks (and documents), rows
and bytes count since the start (the scan reads no file). `records`,
`hourly_records` and `records_per_minute` are the old names of `rows`,
`hourly_rows` and `rows_per_minute`, kept for clients.

Both endpoints follow `[status]`: disabled -> 404; client network and token
as on the device routes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from ingestd.config import StatusConfig
from ingestd.errors import IngestError
from ingestd.http.keys import CLOCK, CONFIG, DEVICES, SINK
from ingestd.ingest.access import RoutePolicy, client_address, networks
from ingestd.ingest.devices import DeviceRegistry, DeviceStats, scan_data_dir
from ingestd.protocols.jsonpost import rfc3339
from ingestd.protocols.registry import PROTOCOLS
from ingestd.sinks.file.sink import FileSink

log = logging.getLogger("ingestd.fleet")

DEFAULT_SILENT_AFTER_SECS = 15 * 60.0
MERGE_CHUNK = 5000  # scan results merged per turn of the event loop
RENDER_CHUNK = 1000  # devices per call of the JSON encoder
_DURATION = re.compile(r"(\d{1,12}(?:\.\d{1,6})?)([smhd]?)", re.ASCII)
_LIMIT = re.compile(r"\d{1,9}", re.ASCII)
_UNIT_SECS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class BadQuery(IngestError):
    code = "bad_query"


def unknown_protocol() -> BadQuery:
    return BadQuery(f"protocol: expected {' or '.join(PROTOCOLS)}")


# -- access ------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _policy(status: StatusConfig) -> RoutePolicy:
    # Compiled once per [status] section (a reload makes a new one).
    return RoutePolicy(status.token.encode(), networks(status.allowed_networks))


def check_access(request: web.Request) -> None:
    """404 when the fleet view is off; else 403/401 as on the device routes."""
    live = request.app[CONFIG]
    status = live.current.status
    if not status.enabled:
        raise web.HTTPNotFound()
    policy = _policy(status)
    forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, None)
    remote = client_address(
        request.remote or "", ", ".join(forwarded) if forwarded else None, live.trusted_proxies
    )
    policy.check_network(remote)
    policy.check_token(request.query_string, request.headers.get(hdrs.AUTHORIZATION))


# -- GET /api/devices ------------------------------------------------------------


def parse_duration(name: str, text: str) -> float:
    """`90`, `1.5`, `90s`, `15m`, `2h`, `1d` to seconds, or BadQuery."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise BadQuery(f"{name}: expected a duration such as 90, 90s, 15m, 2h or 1d")
    return float(match[1]) * _UNIT_SECS[match[2]]


@dataclass(frozen=True, slots=True)
class Query:
    protocol: str | None = None
    silent_for: float | None = None
    silent_after: float = DEFAULT_SILENT_AFTER_SECS
    oldest_first: bool = False
    limit: int | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Query:
        protocol = query.get("protocol") or None
        if protocol is not None and protocol not in PROTOCOLS:
            raise unknown_protocol()
        silent_for = query.get("silent_for")
        since = None if silent_for is None else parse_duration("silent_for", silent_for)
        silent_after = query.get("silent_after")
        if silent_after is not None:
            after = parse_duration("silent_after", silent_after)
        else:
            after = DEFAULT_SILENT_AFTER_SECS if since is None else since
        order = query.get("order", "newest")
        if order not in ("newest", "oldest"):
            raise BadQuery("order: expected newest or oldest")
        limit_text = query.get("limit")
        limit = None
        if limit_text is not None:
            if not _LIMIT.fullmatch(limit_text) or int(limit_text) == 0:
                raise BadQuery("limit: expected a positive whole number")
            limit = int(limit_text)
        return cls(protocol, since, after, order == "oldest", limit)


async def api_devices(request: web.Request) -> web.Response:

    check_access(request)
    query = Query.parse(request.query)
    app = request.app
    registry = app[DEVICES]
    now = app[CLOCK]()
    # Copied in the loop, where the pipeline adds devices; read in a thread,
    # since a large fleet takes a while to turn into JSON.
    devices = list(registry)
    summary = {
        "now": rfc3339(now),
        "rows_per_minute": (rows_per_minute := registry.rows_per_minute(now)),
        "records_per_minute": rows_per_minute,  # the old name
        "counters_since": None if registry.started_at is None else rfc3339(registry.started_at),
        "scan": registry.scan,
    }
    body = await asyncio.to_thread(render, devices, summary, query, now, app.get(SINK))
    return web.Response(
        body=body,
        content_type="application/json",
        headers={hdrs.CACHE_CONTROL: "no-store"},
    )


def render(
    devices: list[tuple[tuple[str, str], DeviceStats]],
    summary: dict[str, Any],
    query: Query,
    now: float,
    sink: FileSink | None,
) -> bytes:
    """The /api/devices document (runs in a thread)."""
    silent = sum(1 for _, stats in devices if now - stats.last_seen >= query.silent_after)
    picked = [
        (key, stats)
        for key, stats in devices
        if (query.protocol is None or key[0] == query.protocol)
        and (query.silent_for is None or now - stats.last_seen >= query.silent_for)
    ]
    # Most recently seen first (or last); ties by id, so the order is stable.
    picked.sort(key=lambda item: (item[0][1], item[0][0]))
    picked.sort(key=lambda item: item[1].last_seen, reverse=not query.oldest_first)
    matched = len(picked)
    if query.limit is not None:
        picked = picked[: query.limit]
    summary = {
        **summary,
        "devices": len(devices),
        "reporting": len(devices) - silent,
        "silent": silent,
        "silent_after_secs": query.silent_after,
        "matched": matched,
        "listed": len(picked),
    }
    # Encoded a chunk at a time: the C encoder holds the GIL for a whole
    # call, which would stall the event loop on a large fleet; and only a
    # chunk of dicts exists at once.
    encode = json.JSONEncoder(separators=(",", ":")).encode
    parts = []
    for i in range(0, len(picked), RENDER_CHUNK):
        chunk = picked[i : i + RENDER_CHUNK]
        listed = [device_json(key, stats, now, query.silent_after, sink) for key, stats in chunk]
        parts.append(encode(listed)[1:-1])
    return f'{{"summary":{encode(summary)},"devices":[{",".join(parts)}]}}'.encode()


def device_json(
    key: tuple[str, str],
    stats: DeviceStats,
    now: float,
    silent_after: float,
    sink: FileSink | None,
) -> dict[str, Any]:
    protocol, device_id = key
    current = sink.current_file(protocol, device_id) if sink is not None else None
    if current is not None:
        stats.current_file = current  # remembered for when the writer closes it
    silent_secs = max(0.0, now - stats.last_seen)
    error_at = stats.last_error_at
    return {
        "id": device_id,
        "protocol": protocol,
        "first_seen": timestamp(stats.first_seen),
        "last_seen": timestamp(stats.last_seen),
        "silent_secs": round(silent_secs, 3),
        "silent": now - stats.last_seen >= silent_after,  # as counted in the summary
        "blocks": stats.blocks,
        "rows": stats.rows,
        "records": stats.rows,  # the old name of `rows`
        "bytes": stats.bytes,
        "duplicates": stats.duplicates,
        "quarantined": stats.quarantined,
        "last_error": stats.last_error,
        "last_error_at": None if error_at is None else timestamp(error_at),
        "current_file": stats.current_file,
        "hourly_rows": (hourly := stats.hourly_rows(now)),
        "hourly_records": hourly,  # the old name of `hourly_rows`
    }


def timestamp(ts: float) -> str:
    """As `rfc3339`, a few times faster: the minute's text is cached."""
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return f"{_minute(whole // 60)}:{whole % 60:02d}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _minute(minute: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M", time.gmtime(minute * 60))


# -- the status page ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    headers: dict[str, str]


def _csp_hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
        for b in blocks
    )


def load_page(name: str = "status.html") -> Page:
    """The page and its headers; its inline script and style are allowed by
    hash, nothing else (no other origin, no inline handlers)."""
    html = resources.files("ingestd.http").joinpath(f"static/{name}").read_text("utf-8")
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hashes(html, 'script')}; "
        f"style-src {_csp_hashes(html, 'style')}; "
        "connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return Page(
        html.encode(),
        {
            hdrs.CONTENT_TYPE: "text/html; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-store",
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",  # the URL may carry ?token=
            "X-Content-Type-Options": "nosniff",
        },
    )


# Read at import, outside the event loop: it is part of the package.
PAGE = load_page()


async def status_page(request: web.Request) -> web.Response:
    check_access(request)
    return web.Response(body=PAGE.body, headers=PAGE.headers)


# -- start-up scan -----------------------------------------------------------------


async def scan_ctx(app: web.Application) -> AsyncIterator[None]:
    """Learn the devices already on disk, in a thread, after start-up."""
    registry = app[DEVICES]
    registry.started_at = app[CLOCK]()
    registry.scan = "running"
    stop = threading.Event()
    task = asyncio.create_task(
        load_scan(registry, app[CONFIG].current.data_dir, stop), name="ingestd-fleet-scan"
    )
    try:
        yield
    finally:
        stop.set()  # the thread ends at its next device folder
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def load_scan(registry: DeviceRegistry, data_dir: Path, stop: threading.Event) -> None:
    started = time.monotonic()
    try:
        found = await asyncio.to_thread(scan_data_dir, data_dir, stop)
    except OSError as exc:  # the devices still show once they post
        log.error("fleet_scan_failed error=%s", exc)
        registry.scan = "failed"
        return
    for i in range(0, len(found), MERGE_CHUNK):
        registry.merge_scan(found[i : i + MERGE_CHUNK])
        await asyncio.sleep(0)  # let requests in between
    registry.scan = "done"
    log.info("fleet_scan devices=%d secs=%.2f", len(found), time.monotonic() - started)
