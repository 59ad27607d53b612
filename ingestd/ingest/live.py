"""What a running app holds besides its storage: the live config (swapped by
SIGHUP) and the requests in flight (which a stop waits for)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from ingestd.config import Config
from ingestd.ingest.access import RateLimiter, RoutePolicy, networks
from ingestd.protocols.base import Route
from ingestd.protocols.registry import PROTOCOLS, match_order


@dataclass(frozen=True, slots=True)
class LiveRoute:
    """One protocol's route under the running config: its own steps and the
    rules every route shares."""

    protocol: str
    steps: Route  # match, the checks of its path, parse
    policy: RoutePolicy  # client network, token
    limiter: RateLimiter  # per device; kept across reloads


class LiveConfig:
    """The running config and what is compiled from it; SIGHUP swaps both.

    Each registered protocol's route is compiled here, once per load: a
    request looks its protocol up in `routes` and reads nothing else.
    """

    def __init__(self, config: Config) -> None:
        # Kept across reloads: a device's bucket outlives a SIGHUP.
        self._limiters = {name: RateLimiter(0, 1) for name in PROTOCOLS}
        self.set(config)

    def set(self, config: Config) -> None:
        self.current = config
        self.trusted_proxies = networks(config.server.trusted_proxies)
        routes = {}
        for protocol in match_order():
            section = config.section(protocol.name)
            limiter = self._limiters[protocol.name]
            limiter.configure(section.rate_limit_per_min, section.rate_limit_burst)
            routes[protocol.name] = LiveRoute(
                protocol.name, protocol.route(section), RoutePolicy.of(section), limiter
            )
        self.routes = routes
        # The order a post's path is tried in: catch-alls (JSON) last.
        self.in_match_order = tuple(routes.values())


class InFlight:
    """Requests being handled, so a stop can wait for them to finish."""

    def __init__(self) -> None:
        self.count = 0
        self.busy_connections: Counter[object] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, connection: object) -> None:
        self.count += 1
        self.busy_connections[connection] += 1
        self._idle.clear()

    def leave(self, connection: object) -> None:
        self.count -= 1
        self.busy_connections[connection] -= 1
        if self.busy_connections[connection] <= 0:
            del self.busy_connections[connection]
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
