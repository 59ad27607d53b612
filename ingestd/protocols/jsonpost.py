"""JSON documents POSTed to a path that names their stream (Allegro multimeters
and any other JSON pusher). Each document becomes one JSON Lines record."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from ingestd.errors import BadJson, BadStreamName, Forbidden, IngestError
from ingestd.protocols.base import DeviceProtocol, Route, StoredAs
from ingestd.records import Record
from ingestd.settings import RouteAccess, check_positive

try:
    import orjson
except ImportError:  # pragma: no cover - optional: the stdlib alone gives the same answers
    orjson = None  # type: ignore[assignment]  # None: not installed

PROTOCOL = "json"
MAX_STREAM_CHARS = 128
_STREAM = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")


@functools.lru_cache(maxsize=1024)  # a fleet posts to the same few paths
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
    # Both parts precomputed: the requests of one second share its text, and
    # strftime and formatting are most of the cost.
    if 0 <= millis < 1000:
        return _second(whole) + _MILLIS[millis]
    return _second(whole) + f".{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))


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
    if not _accepted_fast(body, max_depth):
        _check_slowly(body, max_depth)
    # Valid JSON holds raw CR/LF only as whitespace between tokens, so turning
    # them into spaces keeps the document as sent, on one line. Being valid,
    # it also starts and ends with JSON whitespace only: the bytes' strip()
    # takes off what the text's would.
    document = body.replace(b"\r", b" ").replace(b"\n", b" ").strip()
    # json.dumps(text) without its Python layers
    remote_json = encode_basestring_ascii(remote) if type(remote) is str else json.dumps(remote)
    path_json = encode_basestring_ascii(path) if type(path) is str else json.dumps(path)
    at = rfc3339(received_at)
    head = f'{{"received_at":"{at}","remote":{remote_json},"path":{path_json},"body":'
    line = b"".join((head.encode(), document, b"}\n"))
    dedup_key = None
    if idempotency_key:
        # surrogatepass: keys with bytes that are not UTF-8 (aiohttp decodes
        # headers with surrogateescape) stay distinct.
        raw_key = idempotency_key.encode("utf-8", "surrogatepass")
        dedup_key = hashlib.sha256(raw_key).hexdigest()[:32]
    return Record(PROTOCOL, stream, received_at, line, dedup_key=dedup_key)


# Deeper than real documents, and far shallower than the ~1,000 levels (the
# recursion limit, the caller's frames included) at which the stdlib's C
# parser gives up: a deeper document goes to the stdlib, which decides.
_SHALLOW = 100


def _accepted_fast(body: bytes, max_depth: int) -> bool:
    """True if `body` is a document `_check_slowly` would accept, proven fast.

    orjson (when installed) accepts a subset of what the stdlib accepts: it
    also refuses bytes that are not UTF-8 (by the same definition as Python's
    codec), NaN and Infinity, lone surrogates, a BOM, and numbers beyond
    a double (so integers of at most 309 digits, well inside int's digit
    limit, at least 640). Its own nesting limit (1,024) is deeper than the
    stdlib's, so depth is checked here. False means "not proven", never
    "refused": the stdlib then decides, with its messages.
    """
    if orjson is None:
        return False
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if body.count(b"[") + body.count(b"{") <= min(max_depth, _SHALLOW):
        return True  # as deep as it has brackets
    depth = _depth(value)
    if depth > _SHALLOW:
        return False
    if depth > max_depth:
        raise BadJson(f"JSON nested deeper than {max_depth} levels")
    return True


def _depth(value: Any) -> int:
    """How deeply a parsed document nests: `nesting_depth` of its text."""
    depth = 0
    level = [value]
    while level := [item for item in level if type(item) is list or type(item) is dict]:
        depth += 1
        level = [
            child for item in level for child in (item.values() if type(item) is dict else item)
        ]
    return depth


def _check_slowly(body: bytes, max_depth: int) -> None:
    """Accept `body` or raise BadJson, with the stdlib's C parser."""
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


# -- as one of ingestd's protocols (ingestd.protocols.registry) ----------------------


@dataclass(frozen=True, slots=True)
class JsonConfig(RouteAccess):
    """The `[json]` section."""

    # Any POST to a path that is not another protocol's is a JSON document.
    enabled: bool = True
    allowed_streams: tuple[str, ...] = ()  # empty: every stream
    max_depth: int = 64


def _validate(section: JsonConfig) -> None:
    check_positive("json.max_depth", section.max_depth)


class JsonRoute(Route):
    """Every path no other protocol takes (while enabled); the path names
    the stream, so it is checked, and rate limited, before the body."""

    __slots__ = ("_allowed_streams", "_enabled", "_max_depth")
    path_names_device = True

    def __init__(self, section: JsonConfig) -> None:
        self._enabled = section.enabled
        self._allowed_streams = frozenset(section.allowed_streams) or None
        self._max_depth = section.max_depth

    def matches(self, path: str) -> bool:
        return self._enabled

    def device_from_path(self, path: str) -> str:
        stream = stream_name(path)
        if self._allowed_streams is not None and stream not in self._allowed_streams:
            raise Forbidden("stream not allowed")
        return stream

    def parse(
        self,
        body: bytes,
        content_type: str,
        path: str,
        remote: str,
        idempotency_key: str | None,
        now: float,
    ) -> Record:
        return parse(
            body,
            path=path,
            remote=remote,
            received_at=now,
            idempotency_key=idempotency_key,
            max_depth=self._max_depth,
        )

    def refused_device(self, exc: IngestError, path: str) -> str | None:
        return stream_name(path)  # a name the post's checks let through


JSON = DeviceProtocol(
    name=PROTOCOL,
    ext="jsonl",
    device_id=re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}"),  # as stream_name gives it
    stored_as=StoredAs.JSON_LINES,
    content_type="application/x-ndjson",
    id_description="a stream name",
    section=JsonConfig,
    route=JsonRoute,
    catch_all=True,
    validate=_validate,
)
