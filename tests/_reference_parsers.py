"""Frozen copies of the protocol parsers as they were before the speed-ups.

Copied verbatim from ingestd/protocols/{forms,wattmon,jsonpost}.py at commit
c568a01; only names that collide were changed (`parse` became `wattmon_parse`
and `json_parse`, `PROTOCOL` became `WATTMON` and `JSON`). The equivalence
tests compare the live parsers with these: never edit them to make a test
pass.
"""

# ruff: noqa

from __future__ import annotations

import binascii
import csv
import hashlib
import hmac
import json
import re
import time
from urllib.parse import unquote_to_bytes

import multipart

from ingestd.errors import (
    BadDeviceKey,
    BadForm,
    BadJson,
    BadStreamName,
    BlockTooLarge,
    IngestError,
    MalformedBlock,
    Md5Mismatch,
    MissingMd5,
    UnsupportedMediaType,
)
from ingestd.records import Quarantined, Record


# ---- forms.py ------------------------------------------------------------

MAX_FIELDS = 256


def parse_form(body: bytes, content_type: str, wanted: frozenset[str]) -> dict[str, bytes]:
    """Return the `wanted` fields of a form body.

    A wanted field given twice is an error (which copy would be right?);
    other fields are ignored but counted against MAX_FIELDS.
    """
    mime, _, _ = content_type.partition(";")
    mime = mime.strip().lower()
    # Some HTTP stacks on small devices send no Content-Type for a form post.
    if mime in ("application/x-www-form-urlencoded", ""):
        return _urlencoded(body, wanted)
    if mime == "multipart/form-data":
        _, options = multipart.parse_options_header(content_type)
        boundary = options.get("boundary")
        if not boundary:
            raise BadForm("multipart body without a boundary")
        return _multipart(body, boundary, wanted)
    raise UnsupportedMediaType("expected a form (application/x-www-form-urlencoded)")


def _urlencoded(body: bytes, wanted: frozenset[str]) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    pieces = body.split(b"&")
    if len(pieces) > MAX_FIELDS:
        raise BadForm("too many form fields")
    for piece in pieces:
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition(b"=")
        name = _unquote(raw_name).decode("utf-8", "replace")
        if name not in wanted:
            continue
        if name in fields:
            raise BadForm(f"field {name} given more than once")
        fields[name] = _unquote(raw_value)
    return fields


def _unquote(raw: bytes) -> bytes:
    """`unquote_to_bytes` after `+` to space, at C speed.

    Percent-escapes are quoted-printable escapes with `%` for `=`, so
    `binascii.a2b_qp` decodes them ten times faster than the stdlib's loop.
    QP gives `=`, CR and LF meanings of their own, and a `%` that starts no
    valid escape must stay as it is: those are escaped first (`%3D`, `%0D`,
    `%0A`, `%25`), which decodes them back to themselves. The output length
    (3 bytes become 1 per escape) proves the decoding was exact; should it
    not be, the stdlib decodes.
    """
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    if b"=" in raw or b"\r" in raw or b"\n" in raw:
        raw = raw.replace(b"=", b"%3D").replace(b"\r", b"%0D").replace(b"\n", b"%0A")
    decoded = binascii.a2b_qp(raw.replace(b"%", b"="))
    if len(decoded) != len(raw) - 2 * raw.count(b"%"):
        raw = _LONE_PERCENT.sub(b"%25", raw)
        decoded = binascii.a2b_qp(raw.replace(b"%", b"="))
    if len(decoded) != len(raw) - 2 * raw.count(b"%"):
        return unquote_to_bytes(raw)  # pragma: no cover - the proof failed
    return decoded


_LONE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _multipart(body: bytes, boundary: str, wanted: frozenset[str]) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    name: str | None = None  # the wanted field whose chunks are arriving
    chunks: list[bytes] = []
    try:
        with multipart.PushMultipartParser(
            boundary, content_length=len(body), max_segment_count=MAX_FIELDS
        ) as parser:
            for event in (*parser.parse(body), *parser.parse(b"")):
                if isinstance(event, multipart.MultipartSegment):
                    name = event.name if event.name in wanted else None
                    if name in fields:
                        raise BadForm(f"field {name} given more than once")
                    chunks = []
                elif event is None:
                    if name is not None:
                        fields[name] = b"".join(chunks)
                    name = None
                elif name is not None:
                    chunks.append(event)
    except multipart.ParserLimitReached as exc:
        raise BadForm("too many form fields") from exc
    except (multipart.MultipartError, UnicodeError) as exc:
        # UnicodeError: a boundary with bytes that are not UTF-8.
        raise BadForm("malformed or truncated multipart body") from exc
    return fields


# ---- wattmon.py ----------------------------------------------------------

WATTMON = "wattmon"
FIELDS = frozenset({"key", "md5sum", "data"})

_MAC = re.compile(rb"[0-9A-Fa-f]{12}|[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}")


def normalise_mac(raw: bytes) -> str:
    """`00:1A:2b-..` forms to 12 lowercase hex digits, or BadDeviceKey."""
    if not _MAC.fullmatch(raw):
        raise BadDeviceKey("key is not a MAC address (12 hex digits)")
    return raw.decode("ascii").replace(":", "").replace("-", "").lower()


def wattmon_parse(
    body: bytes,
    content_type: str,
    *,
    received_at: float,
    require_md5: bool,
    max_rows: int = 100_000,
    max_columns: int = 1_000,
) -> Record | Quarantined | None:
    """One POST to a block to store, a block to quarantine, or None (no data)."""
    fields = parse_form(body, content_type, FIELDS)
    if "key" not in fields:
        raise BadDeviceKey("key missing")
    mac = normalise_mac(fields["key"].strip())
    try:
        return _block(mac, fields, received_at, require_md5, max_rows, max_columns)
    except IngestError as exc:
        exc.device = mac  # so the log line names the device
        raise


def _block(
    mac: str,
    fields: dict[str, bytes],
    received_at: float,
    require_md5: bool,
    max_rows: int,
    max_columns: int,
) -> Record | Quarantined | None:
    data = fields.get("data", b"")
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    given = fields.get("md5sum", b"").strip()
    if given:
        if not hmac.compare_digest(given.lower(), md5.encode()):
            raise Md5Mismatch()
    elif require_md5:
        raise MissingMd5("md5sum missing")
    if not data:
        return None  # what the sample receiver does: OK, nothing stored
    if data.count(b"\n") > max_rows + 1 or data.count(b"\r") > max_rows + 1:
        raise BlockTooLarge(f"block has more than {max_rows} rows")
    try:
        header, rows, count = split_block(data, max_columns=max_columns)
    except MalformedBlock as exc:
        return Quarantined(WATTMON, mac, received_at, data, exc.reason, md5)
    if not count:
        return None
    return Record(WATTMON, mac, received_at, rows, header=header, dedup_key=md5, count=count)


def split_block(data: bytes, max_columns: int = 1_000) -> tuple[bytes, bytes, int]:
    """CSV block to (header line, row lines, row count), line endings as `\n`.

    Rows are kept byte for byte; only their column counts are checked against
    the header's. Blank lines are dropped.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBlock(f"not UTF-8 at byte {exc.start}") from exc
    if b"\x00" in data:
        raise MalformedBlock("NUL byte in block")
    lines = data.split(b"\n")
    if b"\n\n" in data or not lines[0] or not lines[-1]:
        lines = [line for line in lines if line]
    if not lines:
        return b"", b"", 0
    widths = _column_counts(lines, quoted=b'"' in data)
    width = widths[0]
    if width > max_columns:
        raise BlockTooLarge(f"block has more than {max_columns} columns")
    if lines[0][:1].isdigit():
        raise MalformedBlock("no header row (first line starts with a value)")
    for number, row_width in enumerate(widths[1:], start=2):
        if row_width != width:
            raise MalformedBlock(f"line {number} has {row_width} columns, header has {width}")
    return (
        lines[0] + b"\n",
        b"\n".join(lines[1:]) + b"\n" if len(lines) > 1 else b"",
        len(lines) - 1,
    )


def _column_counts(lines: list[bytes], *, quoted: bool) -> list[int]:
    """Columns per line. Without quotes a comma always separates (the common
    case, counted in C); with quotes the csv module decides."""
    if not quoted:
        return [line.count(b",") + 1 for line in lines]
    try:
        parsed = list(csv.reader([line.decode("utf-8") for line in lines], strict=True))
    except csv.Error as exc:
        raise MalformedBlock(f"not CSV: {exc}") from exc
    if len(parsed) != len(lines):
        raise MalformedBlock("a quoted field spans lines")
    return [len(row) for row in parsed]


# ---- jsonpost.py ---------------------------------------------------------

JSON = "json"
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


def json_parse(
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
    return Record(JSON, stream, received_at, line, dedup_key=dedup_key)
