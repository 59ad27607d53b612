"""JSON documents POSTed to a path that names their stream (Allegro multimeters
and any other JSON pusher). Each document becomes one JSON Lines record."""

from __future__ import annotations

import hashlib
import json
import re
import time

from ingestd.errors import BadJson, BadStreamName
from ingestd.records import Record

PROTOCOL = "json"
MAX_STREAM_CHARS = 128
_STREAM = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")


def stream_name(path: str) -> str:
    """`/a/b` to `a_b`; only letters, digits, `.`, `_`, `-`, never a leading `.`.

    `path` is the decoded request path, so `%2e%2e%2f` arrives as `../` and
    fails here: a stream name can never leave its folder.
    """
    name = path[1:].replace("/", "_") if path.startswith("/") else ""
    if not name or len(name) > MAX_STREAM_CHARS or not _STREAM.fullmatch(name):
        raise BadStreamName(
            "stream name (the path) must be 1-128 of A-Z a-z 0-9 . _ - and not start with ."
        )
    return name


def rfc3339(ts: float) -> str:
    """Unix seconds to `2026-11-21T19:46:00.123Z`."""
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse(
    body: bytes,
    *,
    path: str,
    remote: str,
    received_at: float,
    idempotency_key: str | None = None,
    max_depth: int = 64,
) -> Record:
    stream = stream_name(path)
    try:
        text = body.decode("utf-8")
        # The C parser first: it refuses absurd nesting (RecursionError) fast.
        json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BadJson(f"body is not UTF-8 (byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise BadJson("body is not a JSON document") from exc
    if body.count(b"[") + body.count(b"{") > max_depth and nesting_depth(body) > max_depth:
        raise BadJson(f"JSON nested deeper than {max_depth} levels")
    # Valid JSON holds raw CR/LF only as whitespace between tokens, so turning
    # them into spaces keeps the document as sent, on one line.
    document = text.replace("\r", " ").replace("\n", " ").strip()
    line = (
        '{"received_at":"%s","remote":%s,"path":%s,"body":%s}\n'
        % (rfc3339(received_at), json.dumps(remote), json.dumps(path), document)
    ).encode()
    dedup_key = None
    if idempotency_key:
        # surrogatepass: keys with bytes that are not UTF-8 (aiohttp decodes
        # headers with surrogateescape) stay distinct.
        raw_key = idempotency_key.encode("utf-8", "surrogatepass")
        dedup_key = hashlib.sha256(raw_key).hexdigest()[:32]
    return Record(PROTOCOL, stream, received_at, line, dedup_key=dedup_key)
