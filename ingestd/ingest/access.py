"""Who may post: shared tokens, client networks, device allow-lists, rate limits.

A route's policy is compiled from the config once per (re)load, so a request
pays for a few comparisons only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ingestd.config import RouteAccess
from ingestd.errors import Forbidden, RateLimited, Unauthorized

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SWEEP_AT = 4 * 65536  # rate-limit buckets before the first sweep


def networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def in_networks(address: str, nets: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The device's address: the peer, or, behind a trusted proxy, the last
    address in X-Forwarded-For that is not itself a trusted proxy."""
    if not trusted or forwarded_for is None or not in_networks(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, trusted):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    token: bytes
    nets: tuple[IPNetwork, ...]

    @classmethod
    def of(cls, access: RouteAccess) -> RoutePolicy:
        return cls(access.token.encode(), networks(access.allowed_networks))

    def check_network(self, address: str) -> None:
        if self.nets and not in_networks(address, self.nets):
            raise Forbidden("client network not allowed")

    def check_token(self, query_string: str, authorization: str | None) -> None:
        """Raise Unauthorized unless one of the offered tokens is right."""
        if not self.token:
            return
        offered = [value for name, value in parse_qsl(query_string) if name == "token"]
        offered += _from_authorization(authorization)
        # Compare every candidate, in constant time each, so timing tells
        # nothing about which one was close.
        matched = False
        for candidate in offered:
            matched |= hmac.compare_digest(candidate.encode(), self.token)
        if not matched:
            raise Unauthorized()


def _from_authorization(header: str | None) -> list[str]:
    if not header:
        return []
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return [value.strip()]
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return []
        user, _, password = decoded.partition(":")
        # A device URL `http://token@host/` or `http://any:token@host/`.
        return [password] if password else [user]
    return []


class RateLimiter:
    """A token bucket per device: `per_min` blocks a minute, bursts of `burst`."""

    def __init__(self, per_min: float, burst: int) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, at)
        self._sweep_at = SWEEP_AT
        self.configure(per_min, burst)

    def configure(self, per_min: float, burst: int) -> None:
        self._rate = per_min / 60.0
        self._burst = float(burst)

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def check(self, device: str, now: float) -> None:
        """Take a token for `device` or raise RateLimited with the wait."""
        if not self.enabled:
            return
        tokens = self._tokens(device, now)
        if tokens < 1.0:
            self._buckets[device] = (tokens, now)
            raise self._refusal(device, tokens)
        self._buckets[device] = (tokens - 1.0, now)
        if len(self._buckets) > self._sweep_at:
            self._forget_full(now)

    def peek(self, device: str, now: float) -> None:
        """Raise RateLimited as `check` would, but take no token: a post
        refused before its body by the shard that holds the bucket, whose
        `check` after the body then counts each post once."""
        if self.enabled and (tokens := self._tokens(device, now)) < 1.0:
            raise self._refusal(device, tokens)

    def _tokens(self, device: str, now: float) -> float:
        """The device's tokens now, refilled since it last posted."""
        tokens, at = self._buckets.get(device, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def _refusal(self, device: str, tokens: float) -> RateLimited:
        refused = RateLimited(max(1, math.ceil((1.0 - tokens) / self._rate)))
        refused.device = device  # checked already: a MAC or a stream name
        return refused

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold no information.

        The next sweep waits until the table has doubled, so sweeps stay
        amortised O(1) a request even when nothing can be dropped.
        """
        refill = self._burst / self._rate
        self._buckets = {
            device: bucket for device, bucket in self._buckets.items() if now - bucket[1] < refill
        }
        self._sweep_at = max(SWEEP_AT, 2 * len(self._buckets))
