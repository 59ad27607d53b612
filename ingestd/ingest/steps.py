"""The steps of a device post, shared by aiohttp's handlers and the fast path
(ingestd.http.fastpath): route, access, parse, admit, and the refusal.
Parsing is pure, so it may run in a thread; the steps around it touch shared
state and run on the loop."""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from ingestd.config import Config
from ingestd.errors import Forbidden, IngestError
from ingestd.http.keys import LOG_THROTTLE, REPORT_ERROR
from ingestd.ingest.access import client_address
from ingestd.ingest.live import LiveConfig
from ingestd.protocols import jsonpost, wattmon
from ingestd.records import Quarantined, Record

log = logging.getLogger("ingestd.http")


def protocol_of(config: Config, path: str) -> str | None:
    """Which protocol a device path is for, or None (404)."""
    # `/wattmon/` too: a device URL typed with a slash must not become a stream.
    if path in config.wattmon.paths or (path[-1:] == "/" and path[:-1] in config.wattmon.paths):
        return wattmon.PROTOCOL
    if config.json.enabled:
        return jsonpost.PROTOCOL
    return None


def check_access(
    live: LiveConfig,
    protocol: str,
    peer: str,
    forwarded_for: list[str] | None,
    query_string: str,
    authorization: str | None,
) -> str:
    """Network and token checks, which need no body; returns the client address."""
    # Every X-Forwarded-For line: a proxy may add its own after a forged one.
    remote = client_address(
        peer, ", ".join(forwarded_for) if forwarded_for else None, live.trusted_proxies
    )
    policy = live.policies[protocol]
    policy.check_network(remote)
    policy.check_token(query_string, authorization)
    return remote


Parsed = Record | Quarantined | None | IngestError


def parse_wattmon(live: LiveConfig, body: bytes, content_type: str, now: float) -> Parsed:
    """The block, None (no data), or the refusal, returned rather than raised."""
    config = live.current
    try:
        return wattmon.parse(
            body,
            content_type,
            received_at=now,
            require_md5=config.wattmon.require_md5,
            max_rows=config.wattmon.max_rows,
            max_columns=config.wattmon.max_columns,
            allowed_macs=live.allowed_macs,
        )
    except IngestError as exc:
        return exc


def admit_wattmon(
    app: web.Application, live: LiveConfig, parsed: Parsed, now: float
) -> Record | Quarantined | None:
    """Raise the parse's refusal (a device not allowed among them), or the
    device's rate limit."""
    if isinstance(parsed, IngestError):
        # A known device's refused block (bad MD5, too large) is its last
        # error in the fleet view; a device not allowed stays unknown.
        mac = parsed.device
        if mac is not None and (live.allowed_macs is None or mac in live.allowed_macs):
            app[REPORT_ERROR](wattmon.PROTOCOL, mac, parsed.code, now)
        raise parsed
    if parsed is None:
        return None
    live.limiters[wattmon.PROTOCOL].check(parsed.device_id, now)
    return parsed


def admit_stream(live: LiveConfig, path: str, now: float) -> str:
    """A JSON post's stream, checked before its body is read."""
    stream = jsonpost.stream_name(path)
    if live.allowed_streams is not None and stream not in live.allowed_streams:
        raise Forbidden("stream not allowed")
    live.limiters[jsonpost.PROTOCOL].check(stream, now)
    return stream


def parse_json(
    config: Config, body: bytes, path: str, remote: str, key: str | None, now: float
) -> Record | IngestError:
    try:
        return jsonpost.parse(
            body,
            path=path,
            remote=remote,
            received_at=now,
            idempotency_key=key,
            max_depth=config.json.max_depth,
        )
    except IngestError as exc:
        return exc


def admit_json(
    app: web.Application, stream: str, parsed: Record | IngestError, now: float
) -> Record:
    if isinstance(parsed, IngestError):
        parsed.device = stream
        app[REPORT_ERROR](jsonpost.PROTOCOL, stream, parsed.code, now)
        raise parsed
    return parsed


def refusal(
    app: web.Application, exc: IngestError, path: str, peer: str
) -> tuple[int, str, dict[str, str]]:
    """Log a refused request (throttled); its status, body and headers."""
    allowed, held_back = app[LOG_THROTTLE].allow(exc.code)
    if allowed:
        log.info(
            "rejected status=%d code=%s device=%s path=%s remote=%s held_back=%d",
            exc.status, exc.code, exc.device or "-", _safe(path), _safe(peer), held_back,
        )
    headers: dict[str, str] = {}
    if exc.retry_after_secs is not None:
        headers[hdrs.RETRY_AFTER] = str(exc.retry_after_secs)
    if exc.status == 401:
        headers[hdrs.WWW_AUTHENTICATE] = 'Basic realm="ingestd"'
    return exc.status, f"ERROR: {exc.message}", headers


def _safe(text: str, limit: int = 200) -> str:
    """Client text for a log line: quoted, escaped, cut short."""
    return ascii(text[:limit])
