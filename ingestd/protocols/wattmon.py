"""Wattmon custom data export: a form with `key` (MAC), `md5sum` and `data` (CSV).

The device resends the same block until it reads exactly `OK`, so every
answer other than `OK` must mean "nothing of this block was stored".
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import hmac
import re
from dataclasses import dataclass

from ingestd.errors import (
    BadDeviceKey,
    BlockTooLarge,
    Forbidden,
    IngestError,
    MalformedBlock,
    Md5Mismatch,
    MissingMd5,
)
from ingestd.protocols.base import DeviceProtocol, Route, StoredAs
from ingestd.protocols.forms import parse_form
from ingestd.records import Quarantined, Record
from ingestd.settings import (
    RESERVED_PATHS,
    RESERVED_PREFIXES,
    ConfigError,
    RouteAccess,
    check_positive,
    is_reserved,
    read_setting_file,
)

PROTOCOL = "wattmon"
FIELDS = frozenset({"key", "md5sum", "data"})

_MAC = re.compile(rb"[0-9A-Fa-f]{12}|[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}")


def normalise_mac(raw: bytes) -> str:
    """`00:1A:2b-..` forms to 12 lowercase hex digits, or BadDeviceKey."""
    if not _MAC.fullmatch(raw):
        raise BadDeviceKey("key is not a MAC address (12 hex digits)")
    return raw.decode("ascii").replace(":", "").replace("-", "").lower()


def parse(
    body: bytes,
    content_type: str,
    *,
    received_at: float,
    require_md5: bool,
    max_rows: int = 100_000,
    max_columns: int = 1_000,
    allowed_macs: frozenset[str] | None = None,
) -> Record | Quarantined | None:
    """One POST to a block to store, a block to quarantine, or None (no data).

    A MAC not in `allowed_macs` (normalised; None allows all) is refused
    before anything else of the post is looked at: a post without rows, which
    a known device gets OK for, or a bad MD5 tells an unknown device nothing.
    """
    fields = parse_form(body, content_type, FIELDS)
    if "key" not in fields:
        raise BadDeviceKey("key missing")
    mac = normalise_mac(fields["key"].strip())
    try:
        if allowed_macs is not None and mac not in allowed_macs:
            raise Forbidden("device not allowed")
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
    skeleton = data.translate(None, _NOT_SKELETON)
    lf = skeleton.count(b"\n")
    cr = skeleton.count(b"\r")
    if lf > max_rows + 1 or cr > max_rows + 1:
        raise BlockTooLarge(f"block has more than {max_rows} rows")
    try:
        header, rows, count = _plain_block(data, skeleton, lf, cr, max_columns) or _any_block(
            data, max_columns
        )
    except MalformedBlock as exc:
        return Quarantined(PROTOCOL, mac, received_at, data, exc.reason, md5)
    if not count:
        return None
    return Record(PROTOCOL, mac, received_at, rows, header=header, dedup_key=md5, count=count)


def split_block(data: bytes, max_columns: int = 1_000) -> tuple[bytes, bytes, int]:
    """CSV block to (header line, row lines, row count), line endings as `\n`.

    Rows are kept byte for byte; only their column counts are checked against
    the header's. Blank lines and lines of only whitespace are dropped. A
    quoted field may hold line breaks (valid CSV): its row keeps them, so
    the count is of CSV rows, not of lines.
    """
    skeleton = data.translate(None, _NOT_SKELETON)
    lf = skeleton.count(b"\n")
    cr = skeleton.count(b"\r")
    return _plain_block(data, skeleton, lf, cr, max_columns) or _any_block(data, max_columns)


# What the shape of a block depends on: commas and line ends, and the quotes
# and NULs that send a block down the general road.
_NOT_SKELETON = bytes(set(range(256)) - set(b',\r\n"\x00'))
_LONE_CR = re.compile(rb"\r(?!\n)")


def _plain_block(
    data: bytes, skeleton: bytes, lf: int, cr: int, max_columns: int
) -> tuple[bytes, bytes, int] | None:
    """`_any_block`'s answer for the common block, in C, or None for any other.

    Common: UTF-8 without quotes or NULs, at least two columns and one line
    end, every line end `\n` or every one `\r\n`, no blank line. Then the
    skeleton (the block's commas, CRs, LFs, quotes and NULs, in order) is
    exactly the header's commas and line end, once per line: that one
    comparison proves every row is as wide as the header and no line is empty
    (each holds a comma). Anything else is left to `_any_block`. `lf` and
    `cr` count the skeleton's LFs and CRs.
    """
    if cr == 0:
        end = b"\n"
    elif cr == lf and not _LONE_CR.search(data):
        end = b"\r\n"  # every CR is in a CRLF, so every LF is too
    else:
        return None
    commas = skeleton.find(end)  # the header's; -1 without a line end
    if commas < 1 or commas >= max_columns or data[:1].isdigit():
        return None
    line = b"," * commas + end
    ended = data[-1] == 0x0A  # \n: the last line has its line end
    # Lengths first: a hostile skeleton must not make us build a huge `line * lf`.
    if len(skeleton) != len(line) * lf + (0 if ended else commas):
        return None
    if skeleton != (line * lf if ended else line * lf + b"," * commas):
        return None
    count = lf - 1 if ended else lf
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    start = data.index(b"\n") + 1
    if cr:
        header, rows = data[: start - 2] + b"\n", data[start:].replace(b"\r", b"")
    else:
        header, rows = data[:start], data[start:]
    if not ended:
        rows += b"\n"
    return header, rows, count


def _any_block(data: bytes, max_columns: int) -> tuple[bytes, bytes, int]:
    """`split_block` for any block: the general road."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBlock(f"not UTF-8 at byte {exc.start}") from exc
    if b"\x00" in data:
        raise MalformedBlock("NUL byte in block")
    if b'"' in data:
        lines, widths = _csv_rows(data.split(b"\n"))
    else:
        # Without quotes a comma always separates and a line is a row (the
        # common case, counted in C). A line of only spaces or tabs is a
        # blank line with a device's padding.
        lines = [line for line in data.split(b"\n") if line and not line.isspace()]
        widths = [line.count(b",") + 1 for line in lines]
    if not lines:
        return b"", b"", 0
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


def _csv_rows(lines: list[bytes]) -> tuple[list[bytes], list[int]]:
    """The rows of a block with quotes, as the csv module reads them (a
    quoted field may span lines), each with its column count; blank and
    whitespace-only rows dropped."""
    reader = csv.reader([line.decode("utf-8") + "\n" for line in lines], strict=True)
    rows: list[bytes] = []
    widths: list[int] = []
    start = 0
    try:
        for fields in reader:
            end = reader.line_num  # lines read so far: this row's are lines[start:end]
            row = b"\n".join(lines[start:end])
            start = end
            if row and not row.isspace():
                rows.append(row)
                widths.append(len(fields))
    except csv.Error as exc:
        raise MalformedBlock(f"not CSV: {exc}") from exc
    return rows, widths


# -- as one of ingestd's protocols (ingestd.protocols.registry) ----------------------


@dataclass(frozen=True, slots=True)
class WattmonConfig(RouteAccess):
    """The `[wattmon]` section."""

    # /export-script.php lets a fleet pointed at the PHP sample move by
    # changing only the host.
    paths: tuple[str, ...] = ("/wattmon", "/export-script.php")
    require_md5: bool = False
    allowed_macs: tuple[str, ...] = ()  # any spelling; empty: every device
    allowed_macs_file: str = ""  # one MAC a line, `#` comments; re-read on SIGHUP
    max_rows: int = 100_000
    max_columns: int = 1_000


def _validate(section: WattmonConfig) -> None:
    for mac in section.allowed_macs:
        try:
            normalise_mac(mac.encode())
        except BadDeviceKey:
            raise ConfigError(f"wattmon.allowed_macs: {mac!r} is not a MAC address") from None
    check_positive("wattmon.max_rows", section.max_rows)
    check_positive("wattmon.max_columns", section.max_columns)
    for path in section.paths:
        if not path.startswith("/") or is_reserved(path):
            raise ConfigError(
                f"wattmon.paths: {path!r} must start with / and not be one of "
                f"{RESERVED_PATHS} nor under {' or '.join(RESERVED_PREFIXES)}"
            )


def _read_files(section: WattmonConfig) -> WattmonConfig:
    """`allowed_macs_file` folded into `allowed_macs`."""
    if not section.allowed_macs_file:
        return section
    text = read_setting_file("wattmon.allowed_macs_file", section.allowed_macs_file)
    listed = [line.split("#")[0].strip() for line in text.splitlines()]
    macs = section.allowed_macs + tuple(mac for mac in listed if mac)
    return dataclasses.replace(section, allowed_macs=macs)


def _mac_named(text: str) -> str | None:
    with contextlib.suppress(BadDeviceKey):
        return normalise_mac(text.encode("utf-8", "replace"))
    return None


class WattmonRoute(Route):
    """Posts to the configured paths; the device is the form's `key`."""

    __slots__ = ("_allowed_macs", "_max_columns", "_max_rows", "_paths", "_require_md5")

    def __init__(self, section: WattmonConfig) -> None:
        # `/wattmon/` too: a device URL typed with a slash must not become a stream.
        self._paths = frozenset(section.paths) | {path + "/" for path in section.paths}
        self._require_md5 = section.require_md5
        self._max_rows = section.max_rows
        self._max_columns = section.max_columns
        macs = frozenset(normalise_mac(mac.encode()) for mac in section.allowed_macs)
        self._allowed_macs = macs or None

    def matches(self, path: str) -> bool:
        return path in self._paths

    def parse(
        self,
        body: bytes,
        content_type: str,
        path: str,
        remote: str,
        idempotency_key: str | None,
        now: float,
    ) -> Record | Quarantined | None:
        return parse(
            body,
            content_type,
            received_at=now,
            require_md5=self._require_md5,
            max_rows=self._max_rows,
            max_columns=self._max_columns,
            allowed_macs=self._allowed_macs,
        )

    def refused_device(self, exc: IngestError, path: str) -> str | None:
        mac = exc.device  # set once the form's key was a MAC
        allowed = self._allowed_macs
        return mac if mac is not None and (allowed is None or mac in allowed) else None


WATTMON = DeviceProtocol(
    name=PROTOCOL,
    ext="csv",
    device_id=re.compile(r"[0-9a-f]{12}"),  # as normalise_mac gives it
    stored_as=StoredAs.CSV,
    content_type="text/csv; charset=utf-8",
    id_description="a MAC",
    section=WattmonConfig,
    route=WattmonRoute,
    validate=_validate,
    read_files=_read_files,
    normalise_id=_mac_named,
    quarantines=True,
)
