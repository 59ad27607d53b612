"""The one sequence of a device post, free of any transport.

route -> access -> parse -> admit -> submit -> answer, with the per-request
metrics and the refusal's log line. Both transports call it: the fast path
(ingestd.http.fastpath) for the usual small post, aiohttp's handler
(ingestd.http.handlers) for everything else. Nothing here awaits: `submit`
hands back the pipeline's future, so the fast path answers from its callback
with no task per request, and aiohttp's handler awaits it.

Parsing is pure (it may run in a thread for a large body); every other step
touches shared state (rate limits, the pipeline) and runs on the loop. What
differs between protocols (which paths, what a path says, how a body
parses) is each protocol's `Route` (ingestd.protocols.base), compiled by the
live config at each load; `protocol` here is its name.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from ingestd.config import is_reserved
from ingestd.errors import IngestError
from ingestd.ingest.access import client_address
from ingestd.ingest.live import LiveConfig
from ingestd.ingest.pipeline import Item, Submitter
from ingestd.records import Outcome, Quarantined, Record
from ingestd.runtime.logs import Throttle

log = logging.getLogger("ingestd.http")

# What a parse gives: the item, None (nothing to store: a Wattmon post
# without data), or the refusal, returned rather than raised so a parse in a
# thread hands it back.
Parsed = Record | Quarantined | None | IngestError
# (protocol, device, error code, time) of a refused post from a known device.
ReportError = Callable[[str, str, str, float], None]


class IngestService:
    """The steps of a device post over the live config and the pipeline.

    `handle` runs them all for a body already read; aiohttp's handler calls
    `check` before reading the body and `parse` + `submit` after it.
    """

    __slots__ = (
        "_limits",
        "_live",
        "_owns",
        "_pipeline",
        "_report_error",
        "_requests",
        "_throttle",
        "clock",
    )

    def __init__(
        self,
        live: LiveConfig,
        pipeline: Submitter,
        *,
        clock: Callable[[], float],
        report_error: ReportError,
        requests: Counter[tuple[str, str]],
        throttle: Throttle,
        limits: bool = True,
        owns: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._live = live
        # Rate limits are per device: in a worker process the shard that
        # stores the device applies them (`admit`), wherever it was posted;
        # `owns(protocol, device)` tells this worker's own devices.
        self._limits = limits
        self._owns = owns
        self._pipeline = pipeline
        self.clock = clock
        self._report_error = report_error
        self._requests = requests  # (protocol, outcome) -> count, for /metrics
        self._throttle = throttle

    # -- the steps, in order ---------------------------------------------------

    def route(self, path: str) -> str | None:
        """The protocol of a device post to `path`; None for a reserved path
        or one no protocol takes (with JSON off, any other's: 404)."""
        if is_reserved(path):
            return None
        for route in self._live.in_match_order:
            if route.steps.matches(path):
                return route.protocol
        return None

    def check(
        self,
        protocol: str,
        path: str,
        peer: str,
        forwarded_for: list[str] | None,
        query_string: str,
        authorization: str | None,
    ) -> str:
        """The checks that need no body: network, token, and the device a
        path names (a JSON stream: allowed, rate limit). Returns the
        client's address."""
        live = self._live
        # Every X-Forwarded-For line: a proxy may add its own after a forged one.
        remote = client_address(
            peer, ", ".join(forwarded_for) if forwarded_for else None, live.trusted_proxies
        )
        route = live.routes[protocol]
        route.policy.check_network(remote)
        route.policy.check_token(query_string, authorization)
        if route.steps.path_names_device:
            device = route.steps.device_from_path(path)
            if self._limits:
                route.limiter.check(device, self.clock())
            elif self._owns is not None and self._owns(protocol, device):
                # The bucket is here: refuse before the body if it is empty;
                # the token is taken after the body, by `admit`.
                route.limiter.peek(device, self.clock())
        return remote

    def parse(
        self,
        protocol: str,
        body: bytes,
        content_type: str,
        path: str,
        remote: str,
        idempotency_key: str | None,
        now: float,
    ) -> Parsed:
        """Pure: the body's item or its refusal (safe in a thread)."""
        steps = self._live.routes[protocol].steps
        try:
            return steps.parse(body, content_type, path, remote, idempotency_key, now)
        except IngestError as exc:
            return exc

    def submit(
        self, protocol: str, parsed: Parsed, path: str, now: float
    ) -> asyncio.Future[Outcome] | None:
        """Admit what the parse gave and queue it: its future, or None when
        there is nothing to store. Raises the refusal."""
        if isinstance(parsed, IngestError):
            self._report(protocol, parsed, path, now)
            raise parsed
        if parsed is None:
            return None
        if self._limits:
            route = self._live.routes[protocol]
            # A post whose path names its device was limited in `check`, before its body.
            if not route.steps.path_names_device:
                route.limiter.check(parsed.device_id, now)
        future = self._pipeline.try_submit(parsed)
        if future is None:  # the queue is full: wait for room, up to its deadline
            future = asyncio.ensure_future(self._pipeline.submit(parsed))
        return future

    def handle(
        self,
        protocol: str,
        path: str,
        peer: str,
        forwarded_for: list[str] | None,
        query_string: str,
        authorization: str | None,
        content_type: str,
        idempotency_key: str | None,
        body: bytes,
    ) -> asyncio.Future[Outcome] | None:
        """Every step for a post whose body is here: `check`, `parse`, `submit`."""
        remote = self.check(protocol, path, peer, forwarded_for, query_string, authorization)
        now = self.clock()
        parsed = self.parse(protocol, body, content_type, path, remote, idempotency_key, now)
        return self.submit(protocol, parsed, path, now)

    def admit(self, item: Item) -> None:
        """The device's rate limit, applied where its posts from every
        worker meet (the shard that stores it); raises the refusal."""
        self._live.routes[item.protocol].limiter.check(item.device_id, self.clock())

    # -- the answer ------------------------------------------------------------

    def count(self, protocol: str, outcome: str) -> None:
        """One answered device request, by outcome (stored, duplicate,
        empty, an error code), for /metrics."""
        self._requests[(protocol, outcome)] += 1

    def refused(
        self, protocol: str | None, exc: IngestError, path: str, peer: str
    ) -> tuple[int, str, dict[str, str]]:
        """Log a refusal (throttled), count it; its status, body and headers."""
        allowed, held_back = self._throttle.allow(exc.code)
        if allowed:
            log.info(
                "rejected status=%d code=%s device=%s path=%s remote=%s held_back=%d",
                exc.status,
                exc.code,
                exc.device or "-",
                _safe(path),
                _safe(peer),
                held_back,
            )
        if protocol is not None:
            self.count(protocol, exc.code)
        return exc.status, f"ERROR: {exc.message}", refusal_headers(exc)

    def _report(self, protocol: str, exc: IngestError, path: str, now: float) -> None:
        """A known device's refused post (bad MD5, too large) is its last
        error in the fleet view; a device not allowed stays unknown."""
        device = self._live.routes[protocol].steps.refused_device(exc, path)
        if device is not None:
            exc.device = device  # so the log line names it
            self._report_error(protocol, device, exc.code, now)


def refusal_headers(exc: IngestError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if exc.retry_after_secs is not None:
        headers["Retry-After"] = str(exc.retry_after_secs)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="ingestd"'
    return headers


def _safe(text: str, limit: int = 200) -> str:
    """Client text for a log line: quoted, escaped, cut short."""
    return ascii(text[:limit])
