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

# RFC 9110 token characters, for field names.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Origin-form without percent-escapes, '+' or a fragment, so the path and
# query are the same decoded as raw: what aiohttp would hand the handler.
_TARGET = re.compile(rb"(/[A-Za-z0-9._~!$&'()*,;=:@/-]*)(?:\?([A-Za-z0-9._~!$&'()*,;=:@/?-]*))?")
# Control characters other than HTAB: never in a field value.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Fields whose presence means "not the simple shape": aiohttp handles them.
_HAND_OVER = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"})
_MAX_LENGTH_DIGITS = 12
# Devices send a handful of fields; more, and aiohttp's limits decide.
_MAX_FIELDS = 32


@dataclass(slots=True)
class RequestHead:
    path: str
    query_string: str
    keep_alive: bool
    content_length: int
    # Lower-case names; the first value of each, as aiohttp's `get` gives.
    fields: dict[str, str]
    # Every X-Forwarded-For value, in order (a proxy may add its own line).
    forwarded_for: list[str]


def parse_head(head: bytes) -> RequestHead | None:
    """`head` is everything before the blank line, without it."""
    if not head.isascii() or _CONTROL.search(head.replace(b"\r\n", b"")):
        return None
    lines = head.split(b"\r\n")
    if len(lines) > _MAX_FIELDS + 1:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST":
        return None
    version = parts[2]
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    else:
        return None
    target = _TARGET.fullmatch(parts[1])
    if target is None:
        return None
    fields: dict[str, str] = {}
    forwarded: list[str] = []
    length: str | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # A missing colon, or whitespace before it (also a folded line): refuse.
        if not colon or not _TOKEN.fullmatch(name):
            return None
        key = name.decode().lower()
        text = value.strip(b" \t").decode()
        if key == "content-length":
            if length is not None or not text.isdigit() or len(text) > _MAX_LENGTH_DIGITS:
                return None
            length = text
        elif key == "x-forwarded-for":
            forwarded.append(text)
        elif key.encode() in _HAND_OVER:
            return None
        fields.setdefault(key, text)
    connection = fields.get("connection")
    if connection is not None:
        tokens = {token.strip().lower() for token in connection.split(",")}
        if "close" in tokens:
            keep_alive = False
        elif "keep-alive" in tokens:
            keep_alive = True
        if "upgrade" in tokens:
            return None
    query = target[2]
    return RequestHead(
        path=target[1].decode(),
        query_string=query.decode() if query is not None else "",
        keep_alive=keep_alive,
        content_length=int(length) if length is not None else 0,
        fields=fields,
        forwarded_for=forwarded,
    )
