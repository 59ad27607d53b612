"""A strict reader for the one request shape devices send: a small POST.

Sans-I/O: bytes in, a `RequestHead` out, or None for anything else. None is
not an error: the connection is handed to aiohttp, whose full HTTP parser
(llhttp) answers it. So this reader only has to be right about what it
accepts, and it accepts little: `POST <origin-form> HTTP/1.x`, ASCII only,
`name: value` fields, at most one Content-Length of plain digits, and no
Transfer-Encoding, Expect, Upgrade or folded lines (the shapes behind
request smuggling are exactly the ones it refuses to judge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEAD_END = b"\r\n\r\n"

# The whole head in one match: `POST`, an origin-form target without
# percent-escapes, '+' or a fragment (so path and query are the same raw as
# decoded: what aiohttp would hand the handler), HTTP/1.0 or 1.1, then field
# lines of a token, a colon and visible ASCII or tabs. No bare CR or LF, no
# control character, no folded line or space before a colon gets through.
_HEAD = re.compile(
    r"POST (/[A-Za-z0-9._~!$&'()*,;=:@/-]*)(?:\?([A-Za-z0-9._~!$&'()*,;=:@/?-]*))?"
    r" HTTP/1\.([01])((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*)*)"
)
# One field line of a head that _HEAD has matched.
_FIELD = re.compile(r"\r\n([^:]+):([^\r]*)")
# Fields whose presence means "not the simple shape": aiohttp handles them.
_HAND_OVER = frozenset(
    {"transfer-encoding", "expect", "upgrade", "content-encoding", "sec-websocket-key1"}
)
# Fields aiohttp refuses to see twice (its SINGLETON_HEADERS): a repeat is
# handed over, so aiohttp gives its own 400.
_SINGLE = frozenset(
    {
        "content-length",
        "content-type",
        "host",
        "user-agent",
        "etag",
        "max-forwards",
        "server",
        "content-range",
        "content-location",
    }
)
_MAX_LENGTH_DIGITS = 12
# Devices send a handful of fields; more, and aiohttp's limits decide.
_MAX_FIELDS = 32


@dataclass(slots=True)
class RequestHead:
    path: str
    http10: bool  # an HTTP/1.0 client is told when its connection stays open
    query_string: str
    keep_alive: bool
    content_length: int
    # Lower-case names; the first value of each, as aiohttp's `get` gives.
    fields: dict[str, str]
    # Every X-Forwarded-For value, in order (a proxy may add its own line).
    forwarded_for: list[str]


def parse_head(head: bytes) -> RequestHead | None:
    """`head` is everything before the blank line, without it."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    match = _HEAD.fullmatch(text)
    if match is None:
        return None
    path = match[1]
    if "/." in path:
        return None  # a dot segment: yarl would normalise it
    pairs = _FIELD.findall(match[4])
    if len(pairs) > _MAX_FIELDS:
        return None
    # The first value of each name wins, as aiohttp's headers.get gives.
    fields = {name.lower(): value.strip(" \t") for name, value in reversed(pairs)}
    if not _HAND_OVER.isdisjoint(fields):
        return None
    http10 = match[3] == "0"
    if not http10 and "host" not in fields:
        return None  # aiohttp refuses HTTP/1.1 without Host
    forwarded: list[str] = []
    connection = fields.get("connection")
    if len(fields) != len(pairs):  # a name repeated: rare, look closer
        names = [name.lower() for name, _ in pairs]
        if any(names.count(name) > 1 for name in _SINGLE.intersection(names)):
            return None
        forwarded = [v.strip(" \t") for name, v in pairs if name.lower() == "x-forwarded-for"]
        # Every Connection line's tokens count, as in aiohttp.
        lines = [v for name, v in pairs if name.lower() == "connection"]
        connection = ",".join(lines) if lines else None
    elif "x-forwarded-for" in fields:
        forwarded = [fields["x-forwarded-for"]]
    length = fields.get("content-length", "0")
    if not length.isdigit() or len(length) > _MAX_LENGTH_DIGITS:
        return None
    keep_alive = not http10
    if connection is not None:
        tokens = {token.strip().lower() for token in connection.split(",")}
        if "upgrade" in tokens:
            return None
        if "close" in tokens:
            keep_alive = False
        elif "keep-alive" in tokens:
            keep_alive = True
    return RequestHead(
        path=path,
        http10=http10,
        query_string=match[2] or "",
        keep_alive=keep_alive,
        content_length=int(length),
        fields=fields,
        forwarded_for=forwarded,
    )
