"""How a record travels as a JetStream message, both ways: the sink frames
it (`message`), export and the `both` route read it back (`record_from`).

Subjects: `<prefix>.<protocol>.<device>`: `<prefix>.wattmon.<mac>`,
`<prefix>.json.<stream>` (every `.` of a device id becomes `_`, since `.`
separates subject tokens; the exact id is in the `Ingestd-Device` header),
and `<prefix>.quarantine.wattmon.<mac>` for blocks that passed MD5 but are
not CSV. Any registered protocol (ingestd.protocols.registry) travels so.

Body: exactly the bytes the file sink appends: the CSV rows of a Wattmon block
(its header line is in `Ingestd-Csv-Header`), or the JSON Lines line of a JSON
document (`{"received_at":...,"remote":...,"path":...,"body":<document>}`,
its remote and path in headers too), or the raw block of a quarantined one.
So a consumer can rebuild the files byte for byte
(`python -m ingestd.tools.export`).

`Nats-Msg-Id` is `<protocol>:<device>:<key>`, the key being the block's MD5, the
hash of a JSON post's Idempotency-Key, or else a hash of the stored JSON line
(received time, remote, path, document): the server stores a resend of the
same block or key once within the stream's duplicate window. A JSON post with
no Idempotency-Key is a new document every time, as in the file sink.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from collections.abc import Mapping
from urllib.parse import quote_from_bytes, unquote_to_bytes

from ingestd.errors import IngestError
from ingestd.protocols.base import StoredAs
from ingestd.protocols.registry import PROTOCOLS, valid_id
from ingestd.records import Outcome, Quarantined, Record

Item = Record | Quarantined
Result = Outcome | IngestError

# Message headers (besides Nats-Msg-Id and Nats-Expected-Stream).
PROTOCOL = "Ingestd-Protocol"
DEVICE = "Ingestd-Device"
RECEIVED_AT = "Ingestd-Received-At"  # RFC 3339, microseconds, UTC
KEY = "Ingestd-Key"  # 32 hex digits; the last part of Nats-Msg-Id
COUNT = "Ingestd-Count"  # CSV rows, or 1
CSV_HEADER = "Ingestd-Csv-Header"  # percent-escaped, see escape_header()
REMOTE = "Ingestd-Remote"  # JSON only: what the line's "remote" holds
PATH = "Ingestd-Path"  # JSON only
QUARANTINED = "Ingestd-Quarantined"  # the reason, percent-escaped


# -- messages ------------------------------------------------------------------------

# Printable ASCII but `%` stays as is; anything else is %XX, so the value
# survives any NATS client (which strip and may re-encode header values).
_HEADER_SAFE = b"".join(bytes([c]) for c in range(0x20, 0x7F) if c != 0x25)


def escape_header(raw: bytes) -> str:
    """Bytes to a header value that `unquote_to_bytes` turns back into them."""
    value = quote_from_bytes(raw, safe=_HEADER_SAFE)
    if value[:1] == " " or value[-1:] == " ":  # clients strip header values
        inner = value.strip(" ")
        if not inner:
            return "%20" * len(value)
        lead = len(value) - len(value.lstrip(" "))
        trail = len(value) - len(value.rstrip(" "))
        value = "%20" * lead + inner + "%20" * trail
    return value


def unescape_header(value: str) -> bytes:
    return unquote_to_bytes(value)


def format_time(ts: float) -> str:
    """Unix seconds to `2026-11-21T08:00:00.123456Z`, truncated, never rounded
    up across a second (so never into the next rotation period)."""
    micros = int(ts * 1_000_000)
    whole, frac = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac:06d}Z"


def subject_token(device_id: str) -> str:
    return device_id.replace(".", "_")


def line_key(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:32]


_DECODER = json.JSONDecoder()


def json_line_meta(line: bytes) -> tuple[str, str] | None:
    """The remote and path of a stored JSON line (they come before the body)."""
    head = line[:4096].decode("utf-8", "ignore")
    start = head.find(',"remote":')
    if start < 0:
        return None
    try:
        remote, end = _DECODER.raw_decode(head, start + len(',"remote":'))
        if not head.startswith(',"path":', end):
            return None
        path, _ = _DECODER.raw_decode(head, end + len(',"path":'))
    except ValueError:
        return None
    if not isinstance(remote, str) or not isinstance(path, str):
        return None
    return remote, path


def message(item: Item, prefix: str) -> tuple[str, dict[str, str], bytes]:
    """The subject, headers and body that carry one record."""
    headers = {
        PROTOCOL: item.protocol,
        DEVICE: item.device_id,
        RECEIVED_AT: format_time(item.received_at),
    }
    token = subject_token(item.device_id)
    if isinstance(item, Quarantined):
        key = item.dedup_key or line_key(item.raw)
        headers[QUARANTINED] = escape_header(item.reason.encode("utf-8", "replace"))
        headers[KEY] = key
        headers["Nats-Msg-Id"] = f"quarantine:{item.protocol}:{item.device_id}:{key}"
        return f"{prefix}.quarantine.{item.protocol}.{token}", headers, item.raw
    key = item.dedup_key or line_key(item.payload)
    headers[KEY] = key
    headers[COUNT] = str(item.count)
    headers["Nats-Msg-Id"] = f"{item.protocol}:{item.device_id}:{key}"
    if item.header:
        headers[CSV_HEADER] = escape_header(item.header.rstrip(b"\n"))
    if PROTOCOLS[item.protocol].stored_as is StoredAs.JSON_LINES:
        meta = json_line_meta(item.payload)
        if meta is not None:
            headers[REMOTE] = escape_header(meta[0].encode("utf-8", "replace"))
            headers[PATH] = escape_header(meta[1].encode("utf-8", "replace"))
    return f"{prefix}.{item.protocol}.{token}", headers, item.payload


_KEY = re.compile(r"[0-9a-f]{32}")


def record_from(headers: Mapping[str, str] | None, body: bytes) -> Item:
    """The record a stored message carries (`message()` read back): what
    export writes, and what `both` writes for a resend the stream had.
    ValueError if it is not one of ours."""
    headers = headers or {}
    protocol = headers.get(PROTOCOL)
    device = headers.get(DEVICE, "")
    if protocol not in PROTOCOLS:
        raise ValueError(f"no {PROTOCOL} header")
    if not valid_id(protocol, device):  # it becomes a folder name: never trust it unchecked
        raise ValueError("bad device id")
    received = headers.get(RECEIVED_AT, "")
    when = datetime.datetime.fromisoformat(received.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    received_at = when.timestamp()
    key = headers.get(KEY)
    if key is not None and not _KEY.fullmatch(key):
        key = None
    if QUARANTINED in headers:
        reason = unescape_header(headers[QUARANTINED]).decode("utf-8", "replace")
        return Quarantined(protocol, device, received_at, body, reason, key)
    header = b""
    if CSV_HEADER in headers:
        header = unescape_header(headers[CSV_HEADER])
        if b"\n" in header or b"\r" in header:
            raise ValueError("CSV header of more than one line")
        header += b"\n"
    count = int(headers.get(COUNT, "1"))
    return Record(protocol, device, received_at, body, header, key, count)


def wire_size(headers: Mapping[str, str], body: bytes, stream: str) -> int:
    """What the server counts against max_payload: headers block and body."""
    size = len(b"NATS/1.0\r\n\r\n") + len(body)
    size += len("Nats-Expected-Stream: \r\n") + len(stream)
    return size + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
