"""Hypothesis properties of the sans-I/O parsers (forms, wattmon, jsonpost).

Round trips build device input from generated readings and check that the
parser hands back exactly those readings; fuzz tests check that any input
yields a result or one of our typed errors, never anything else.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import re
import string
import urllib.parse
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _mutations import mutated
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from ingestd.errors import (
    BadDeviceKey,
    BadForm,
    BadJson,
    BadStreamName,
    IngestError,
    MalformedBlock,
    Md5Mismatch,
    MissingMd5,
    UnsupportedMediaType,
)
from ingestd.protocols import jsonpost, wattmon
from ingestd.protocols.forms import MAX_FIELDS, parse_form
from ingestd.records import Quarantined, Record

# No deadline: a slow CI box must not turn a correct parser into a flaky test.
settings.register_profile(
    "parsers", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
)
PARSERS = settings.get_profile("parsers")

URLENCODED = "application/x-www-form-urlencoded"
RECEIVED_AT = 1_795_262_400.25  # 2026-11-21T08:00:00.250Z


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

HEX_DIGITS = "0123456789abcdefABCDEF"


@st.composite
def macs(draw: st.DrawFn) -> tuple[str, str]:
    """(a MAC in one of the accepted spellings, its 12 lowercase hex digits)."""
    digits = draw(st.text(HEX_DIGITS, min_size=12, max_size=12))
    sep = draw(st.sampled_from(["", ":", "-"]))
    pairs = [digits[i : i + 2] for i in range(0, 12, 2)]
    return sep.join(pairs), digits.lower()


# CSV cell text: anything printable or not, except what CSV or our line
# splitting give a meaning to (and NUL, which blocks are refused for).
cell_chars = st.characters(codec="utf-8", exclude_characters=',"\r\n\x00')
column_names = st.builds(
    str.__add__,
    # A first character that is not a digit, else the line reads as a row.
    st.characters(
        codec="utf-8", exclude_characters=',"\r\n\x00', exclude_categories=("Nd", "No")
    ).filter(lambda char: not char.isdigit()),
    st.text(cell_chars, max_size=9),
)
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2099, 12, 31),  # noqa: DTZ001
).map(lambda moment: moment.strftime("%Y-%m-%d %H:%M:%S"))
readings = st.one_of(
    st.integers(-(10**9), 10**9).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(cell_chars, max_size=8),
)
line_endings = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def csv_blocks(draw: st.DrawFn, min_rows: int = 1) -> tuple[list[str], bytes]:
    """(the lines of a Wattmon CSV block, the block as the device sends it)."""
    # A header line of only whitespace would be a blank line, dropped.
    header = draw(
        st.lists(column_names, min_size=1, max_size=6).filter(
            lambda names: not ",".join(names).encode().isspace()
        )
    )
    width = len(header)
    rows = draw(
        st.lists(
            st.tuples(timestamps, st.lists(readings, min_size=width - 1, max_size=width - 1)),
            min_size=min_rows,
            max_size=8,
        )
    )
    lines = [",".join(header)] + [",".join([stamp, *values]) for stamp, values in rows]
    endings = draw(st.lists(line_endings, min_size=len(lines), max_size=len(lines)))
    if not draw(st.booleans()):
        endings[-1] = ""  # no newline after the last line
    text = "".join(line + ending for line, ending in zip(lines, endings, strict=True))
    return lines, text.encode()


boundaries = st.text(
    string.ascii_letters + string.digits + "'()+_,-./:=? ", min_size=1, max_size=70
).filter(lambda b: not b.endswith(" "))


def multipart_content_type(boundary: str) -> str:
    return f'multipart/form-data; boundary="{boundary}"'


def multipart_body(boundary: str, parts: list[tuple[str, bytes, str | None]]) -> bytes:
    """A multipart/form-data body from (name, value, filename or None) parts."""
    delimiter = b"--" + boundary.encode()
    out = []
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.append(delimiter + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n")
        if filename is not None:
            out.append(b"Content-Type: text/csv\r\n")
        out.append(b"\r\n" + value + b"\r\n")
    out.append(delimiter + b"--\r\n")
    return b"".join(out)


def boundary_fits(boundary: str, values: list[bytes]) -> bool:
    """True if no value holds its own end delimiter (CRLF -- boundary)."""
    delimiter = b"\r\n--" + boundary.encode()
    return all((value + delimiter).find(delimiter) == len(value) for value in values)


@st.composite
def wattmon_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """(body, content type): valid-looking Wattmon posts, often slightly broken."""
    mac, _ = draw(macs())
    _, data = draw(csv_blocks(min_rows=0))
    data = draw(st.one_of(st.just(data), mutated(data), st.binary(max_size=64)))
    md5 = draw(st.sampled_from([md5_hex(data), md5_hex(data).upper(), "", "0" * 32]))
    if draw(st.booleans()):
        body = urllib.parse.urlencode({"key": mac, "md5sum": md5, "data": data}).encode()
        content_type = draw(st.sampled_from([URLENCODED, ""]))
    else:
        boundary = draw(boundaries)
        parts = [("key", mac.encode(), None), ("md5sum", md5.encode(), None)]
        parts.append(("data", data, draw(st.none() | st.just("log.csv"))))
        body = multipart_body(boundary, parts)
        content_type = multipart_content_type(boundary)
    return draw(st.one_of(st.just(body), mutated(body))), content_type


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**128), 2**128)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
valid_paths = (
    st.text(string.ascii_letters + string.digits + "._-/", min_size=1, max_size=60)
    .filter(lambda rest: not rest.startswith("."))
    .map(lambda rest: "/" + rest)
)


# Header values as aiohttp hands them over: bytes decoded as UTF-8 with
# surrogateescape, so lone surrogates are possible.
header_texts = st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
any_chars = st.characters() | st.characters(categories=["Cs"])  # surrogates too
content_types = st.one_of(
    st.sampled_from([URLENCODED, "", "Application/X-WWW-Form-Urlencoded; charset=utf-8"]),
    boundaries.map(multipart_content_type),
    st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=", "text/csv"]),
    st.text(max_size=40),
)


# --------------------------------------------------------------------------
# 1. Wattmon round trip
# --------------------------------------------------------------------------


def check_round_trip(
    result: Record | Quarantined | None, lines: list[str], data: bytes, device_id: str
) -> None:
    assert isinstance(result, Record), result
    assert result.protocol == "wattmon"
    assert result.device_id == device_id
    assert re.fullmatch(r"[0-9a-f]{12}", result.device_id)
    assert result.received_at == RECEIVED_AT
    assert result.header == (lines[0] + "\n").encode()
    assert result.payload == "".join(line + "\n" for line in lines[1:]).encode()
    assert result.count == len(lines) - 1
    assert result.dedup_key == md5_hex(data)


@PARSERS
@given(mac=macs(), block=csv_blocks(), upper_md5=st.booleans(), data=st.data())
@example(
    mac=("00:1A:2b:3C:4d:5E", "001a2b3c4d5e"),
    block=(["Time,V", "2026-11-21 08:00:00,230"], b"Time,V\r2026-11-21 08:00:00,230\r"),
    upper_md5=True,
    data=None,
).via("mixed-case MAC, CR-only line endings")
@example(
    mac=("001A2B3C4D5E", "001a2b3c4d5e"),
    block=(["T,a+b=c&d%", "2026-11-21 08:00:00,1%2B2"], b"T,a+b=c&d%\r\n2026-11-21 08:00:00,1%2B2"),
    upper_md5=False,
    data=None,
).via("form metacharacters in the CSV, no trailing newline")
def test_wattmon_urlencoded_round_trip(
    mac: tuple[str, str], block: tuple[list[str], bytes], upper_md5: bool, data: Any
) -> None:
    spelled, device_id = mac
    lines, raw = block
    md5 = md5_hex(raw).upper() if upper_md5 else md5_hex(raw)
    fields = [("key", spelled), ("md5sum", md5), ("data", raw)]
    if data is not None:
        fields = data.draw(st.permutations(fields))
    content_type = data.draw(st.sampled_from([URLENCODED, ""])) if data else URLENCODED
    body = urllib.parse.urlencode(fields).encode()
    result = wattmon.parse(body, content_type, received_at=RECEIVED_AT, require_md5=True)
    check_round_trip(result, lines, raw, device_id)


@PARSERS
@given(
    mac=macs(),
    block=csv_blocks(),
    boundary=boundaries,
    filename=st.none() | st.sampled_from(["data.csv", "export 2026.csv", ""]),
    extra=st.lists(st.tuples(st.sampled_from(["note", "Key", "data2"]), st.binary(max_size=20))),
    data=st.data(),
)
@example(
    mac=("00-11-22-33-44-55", "001122334455"),
    block=(["Time,V", "2026-11-21 08:00:00,230"], b"Time,V\r\n2026-11-21 08:00:00,230\r"),
    boundary="x",
    filename="data.csv",
    extra=[],
    data=None,
).via("data part ends in CR right before the CRLF delimiter")
@example(
    mac=("001122334455", "001122334455"),
    block=(["--b", "2026-11-21 08:00:00"], b"--b\r\n2026-11-21 08:00:00\r\n"),
    boundary="bo",
    filename=None,
    extra=[("note", b"\r\n--b")],
    data=None,
).via("data and another part hold a prefix of the delimiter")
def test_wattmon_multipart_round_trip(
    mac: tuple[str, str],
    block: tuple[list[str], bytes],
    boundary: str,
    filename: str | None,
    extra: list[tuple[str, bytes]],
    data: Any,
) -> None:
    spelled, device_id = mac
    lines, raw = block
    parts: list[tuple[str, bytes, str | None]] = [
        ("key", spelled.encode(), None),
        ("md5sum", md5_hex(raw).encode(), None),
        ("data", raw, filename),
        *((name, value, None) for name, value in extra),
    ]
    if data is not None:
        parts = data.draw(st.permutations(parts))
    assume(boundary_fits(boundary, [value for _, value, _ in parts]))
    body = multipart_body(boundary, parts)
    result = wattmon.parse(
        body, multipart_content_type(boundary), received_at=RECEIVED_AT, require_md5=True
    )
    check_round_trip(result, lines, raw, device_id)


@PARSERS
@given(mac=macs(), header=st.lists(column_names, min_size=1, max_size=4), ending=line_endings)
def test_wattmon_header_only_block_stores_nothing(
    mac: tuple[str, str], header: list[str], ending: str
) -> None:
    raw = (",".join(header) + ending).encode()
    body = urllib.parse.urlencode({"key": mac[0], "md5sum": md5_hex(raw), "data": raw}).encode()
    assert wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True) is None


# --------------------------------------------------------------------------
# 2. Fuzz: a result or one of our errors, nothing else
# --------------------------------------------------------------------------

FORM_WANTED = st.just(wattmon.FIELDS) | st.sets(
    st.sampled_from(["key", "md5sum", "data", "", "a b", "é"])
).map(frozenset)


@PARSERS
@given(
    body=st.one_of(st.binary(max_size=300), wattmon_bodies().map(lambda pair: pair[0])),
    content_type=content_types,
    wanted=FORM_WANTED,
)
@example(body=b"", content_type="multipart/form-data; boundary=x", wanted=frozenset({"a"}))
@example(body=b"--x\r\n", content_type="multipart/form-data; boundary=x", wanted=frozenset())
@example(body=b"&" * (MAX_FIELDS + 1), content_type="", wanted=frozenset({"a"}))
@example(body=b"a=%ff%&a", content_type=URLENCODED, wanted=frozenset({"a"}))
def test_parse_form_fuzz(body: bytes, content_type: str, wanted: frozenset[str]) -> None:
    try:
        fields = parse_form(body, content_type, wanted)
    except (BadForm, UnsupportedMediaType) as exc:
        event(type(exc).__name__)
        return
    event(f"{len(fields)} fields")
    assert isinstance(fields, dict)
    assert set(fields) <= wanted
    assert all(isinstance(value, bytes) for value in fields.values())


@PARSERS
@given(
    content_type=header_texts
    | st.binary(max_size=10).map(
        lambda raw: (b'multipart/form-data; boundary="' + raw + b'"').decode(
            "utf-8", "surrogateescape"
        )
    ),
    body=st.binary(max_size=50),
)
@example(content_type='multipart/form-data; boundary="\udcff"', body=b"x")
def test_parse_form_fuzz_raw_header_bytes(content_type: str, body: bytes) -> None:
    with contextlib.suppress(BadForm, UnsupportedMediaType):
        parse_form(body, content_type, frozenset({"data"}))


@PARSERS
@given(pair=wattmon_bodies(), require_md5=st.booleans())
@example(pair=(b"key=001122334455&data=", URLENCODED), require_md5=False)
@example(pair=(b"key=%20001122334455%0A&data=%0D%0A", URLENCODED), require_md5=False)
@example(pair=(b"key=00112233445&data=x", ""), require_md5=False)
@example(pair=(b"key=001122334455&data=T%2CV%0At%2C%22a%0Ab%22%0A", ""), require_md5=False)
def test_wattmon_parse_fuzz(pair: tuple[bytes, str], require_md5: bool) -> None:
    body, content_type = pair
    try:
        result = wattmon.parse(body, content_type, received_at=RECEIVED_AT, require_md5=require_md5)
    except IngestError as exc:
        event(type(exc).__name__)
        return
    event(type(result).__name__)
    if result is None:
        return
    assert re.fullmatch(r"[0-9a-f]{12}", result.device_id)
    assert result.received_at == RECEIVED_AT
    if isinstance(result, Record):
        assert result.count >= 1
        # Rows, not lines: a quoted field may hold line breaks.
        assert len(csv_rows(result.payload)) == result.count
        assert result.payload.endswith(b"\n")
        assert result.header.endswith(b"\n") and result.header.count(b"\n") == 1
        assert b"\r" not in result.payload + result.header
    else:
        assert isinstance(result, Quarantined)
        assert result.dedup_key == md5_hex(result.raw)
        assert result.raw


@PARSERS
@given(body=st.binary(max_size=300), content_type=content_types, require_md5=st.booleans())
def test_wattmon_parse_fuzz_any_bytes(body: bytes, content_type: str, require_md5: bool) -> None:
    try:
        result = wattmon.parse(body, content_type, received_at=RECEIVED_AT, require_md5=require_md5)
    except IngestError:
        return
    assert result is None or isinstance(result, Record | Quarantined)


@PARSERS
@given(
    data=st.one_of(
        st.binary(max_size=200), csv_blocks(min_rows=0).flatmap(lambda block: mutated(block[1]))
    )
)
@example(data=b'a,"b\n"c",d\n')
@example(data=b'a,"b\n\nc"\n \n')
@example(data=b"\n\r\n\r")
@example(data=b"T\n\x00")
def test_split_block_fuzz(data: bytes) -> None:
    try:
        header, rows, count = wattmon.split_block(data)
    except MalformedBlock as exc:
        event("MalformedBlock")
        assert exc.reason
        return
    event(f"{min(count, 2)}+ rows")
    assert len(csv_rows(rows)) == count
    if count == 0:
        assert rows == b""
    else:
        assert header.endswith(b"\n") and header.count(b"\n") == 1
    assert b"\r" not in header + rows


@PARSERS
@given(
    body=st.one_of(
        json_values.map(lambda value: json.dumps(value).encode()).flatmap(mutated),
        st.binary(max_size=200),
        st.text(max_size=50).map(str.encode),
        st.sampled_from([b"[" * 100_000, b"1" * 5000, b"\xef\xbb\xbf{}", b"1e400"]),
    ),
    path=st.one_of(valid_paths, st.text(any_chars, max_size=20)),
    remote=st.text(any_chars, max_size=20),
    idempotency_key=st.none() | st.text(any_chars, max_size=10),
)
def test_jsonpost_parse_fuzz(
    body: bytes, path: str, remote: str, idempotency_key: str | None
) -> None:
    try:
        record = jsonpost.parse(
            body,
            path=path,
            remote=remote,
            received_at=RECEIVED_AT,
            idempotency_key=idempotency_key,
        )
    except IngestError as exc:
        event(type(exc).__name__)
        return
    event("Record")
    assert record.payload.endswith(b"\n") and record.payload.count(b"\n") == 1
    json.loads(record.payload)


# --------------------------------------------------------------------------
# 3. urlencoding keeps arbitrary bytes
# --------------------------------------------------------------------------

awkward_bytes = st.binary(max_size=40) | st.lists(
    st.sampled_from([b"+", b"%", b"&", b"=", b"%2", b"\xff", b"\x00", b" ", b"%zz", b"\xc3\xa9"]),
    max_size=10,
).map(b"".join)


@PARSERS
@given(values=st.dictionaries(st.sampled_from(["key", "md5sum", "data"]), awkward_bytes))
@example(values={"data": b"+%&=\xff"})
def test_urlencode_round_trip(values: dict[str, bytes]) -> None:
    wanted = frozenset({"key", "md5sum", "data"})
    plus = urllib.parse.urlencode(values).encode()
    assert parse_form(plus, URLENCODED, wanted) == values
    # quote_from_bytes: spaces as %20, and with safe="" every reserved byte escaped.
    for safe in ("/", ""):
        body = "&".join(
            f"{name}={urllib.parse.quote_from_bytes(value, safe=safe)}"
            for name, value in values.items()
        ).encode()
        assert parse_form(body, URLENCODED, wanted) == values


@PARSERS
@given(value=awkward_bytes)
def test_urlencoded_names_are_unquoted(value: bytes) -> None:
    body = b"%6B%65%79=" + urllib.parse.quote_from_bytes(value).encode() + b"&k+e=ignored"
    assert parse_form(body, URLENCODED, frozenset({"key", "k e"})) == {
        "key": value,
        "k e": b"ignored",
    }


# Raw (not necessarily well-formed) escapes: lots of '%', hex digits and '+'.
raw_escapes = st.lists(
    st.sampled_from([b"%", b"+", b"2", b"5", b"a", b"F", b"g", b"0", b"%25", b"%2", b"\xff", b"="]),
    max_size=16,
).map(b"".join) | st.binary(max_size=30).filter(lambda raw: b"&" not in raw)


@settings(PARSERS, max_examples=300)
@given(raw=raw_escapes)
@example(raw=b"%2541")  # a literal '%' then '41': not 'A'
@example(raw=b"%2541%41")  # ... even when '%41' is decoded elsewhere in the value
@example(raw=b"%252541")
@example(raw=b"%%41")
@example(raw=b"%2%41")
@example(raw=b"%4a%4A+%2B")
@example(raw=b"%25%")
def test_urlencoded_value_decodes_like_unquote_to_bytes(raw: bytes) -> None:
    """Any value, escapes well-formed or not, decodes as the stdlib does."""
    expected = urllib.parse.unquote_to_bytes(raw.replace(b"+", b" "))
    assert parse_form(b"data=" + raw, URLENCODED, frozenset({"data"})) == {"data": expected}


# --------------------------------------------------------------------------
# 4. Duplicated wanted fields are refused; unwanted fields are ignored
# --------------------------------------------------------------------------

unwanted_names = st.text(max_size=8).filter(lambda name: name not in {"key", "md5sum", "data"})


@PARSERS
@given(
    name=st.sampled_from(["key", "md5sum", "data"]),
    first=st.binary(max_size=20),
    second=st.binary(max_size=20),
    noise=st.lists(st.tuples(unwanted_names, st.binary(max_size=10)), max_size=5),
    boundary=boundaries,
    multipart=st.booleans(),
)
def test_duplicated_wanted_field_is_refused(
    name: str,
    first: bytes,
    second: bytes,
    noise: list[tuple[str, bytes]],
    boundary: str,
    multipart: bool,
) -> None:
    fields = [(name, first), *noise, (name, second)]
    if multipart:
        assume(boundary_fits(boundary, [value for _, value in fields]))
        assume(all('"' not in n and "\r" not in n and "\n" not in n for n, _ in noise))
        body = multipart_body(boundary, [(n, v, None) for n, v in fields])
        content_type = multipart_content_type(boundary)
    else:
        body = urllib.parse.urlencode(fields).encode()
        content_type = URLENCODED
    with pytest.raises(BadForm, match="more than once"):
        parse_form(body, content_type, frozenset({"key", "md5sum", "data"}))


@PARSERS
@given(
    values=st.dictionaries(st.sampled_from(["key", "md5sum", "data"]), st.binary(max_size=20)),
    noise=st.lists(st.tuples(unwanted_names, st.binary(max_size=10)), max_size=8),
    boundary=boundaries,
    multipart=st.booleans(),
    data=st.data(),
)
def test_unwanted_fields_are_ignored(
    values: dict[str, bytes],
    noise: list[tuple[str, bytes]],
    boundary: str,
    multipart: bool,
    data: Any,
) -> None:
    fields = data.draw(st.permutations([*values.items(), *noise, *noise]))  # noise twice
    if multipart:
        assume(boundary_fits(boundary, [value for _, value in fields]))
        assume(all('"' not in n and "\r" not in n and "\n" not in n for n, _ in noise))
        body = multipart_body(boundary, [(n, v, None) for n, v in fields])
        content_type = multipart_content_type(boundary)
    else:
        body = urllib.parse.urlencode(fields).encode()
        content_type = URLENCODED
    assert parse_form(body, content_type, frozenset({"key", "md5sum", "data"})) == values


@pytest.mark.parametrize("multipart", [False, True], ids=["urlencoded", "multipart"])
def test_field_count_limit(multipart: bool) -> None:
    def body(count: int) -> tuple[bytes, str]:
        fields = [("key", b"001122334455")] + [("n", b"")] * (count - 1)
        if multipart:
            return multipart_body("b", [(n, v, None) for n, v in fields]), (
                multipart_content_type("b")
            )
        return urllib.parse.urlencode(fields).encode(), URLENCODED

    wanted = frozenset({"key"})
    assert parse_form(*body(MAX_FIELDS), wanted) == {"key": b"001122334455"}
    with pytest.raises(BadForm, match="too many"):
        parse_form(*body(MAX_FIELDS + 1), wanted)


# --------------------------------------------------------------------------
# 5. MD5
# --------------------------------------------------------------------------

SAMPLE = b"Time,V\n2026-11-21 08:00:00,230\n"


def form(**fields: str | bytes) -> bytes:
    return urllib.parse.urlencode(fields).encode()


@PARSERS
@given(block=csv_blocks(), wrong=st.binary(min_size=1, max_size=40), multipart=st.booleans())
@example(block=([], SAMPLE), wrong=md5_hex(SAMPLE)[:-1].encode(), multipart=False)
@example(block=([], SAMPLE), wrong=md5_hex(SAMPLE).encode() + b"0", multipart=False)
@example(block=([], SAMPLE), wrong=md5_hex(b"").encode(), multipart=False)
def test_wrong_md5_is_refused(
    block: tuple[list[str], bytes], wrong: bytes, multipart: bool
) -> None:
    _, raw = block
    assume(wrong.strip() and wrong.strip().lower() != md5_hex(raw).encode())
    if multipart:
        assume(boundary_fits("B", [wrong, raw]))
        body = multipart_body(
            "B", [("key", b"001122334455", None), ("md5sum", wrong, None), ("data", raw, None)]
        )
        content_type = multipart_content_type("B")
    else:
        body = form(key="001122334455", md5sum=wrong, data=raw)
        content_type = URLENCODED
    with pytest.raises(Md5Mismatch) as caught:
        wattmon.parse(body, content_type, received_at=RECEIVED_AT, require_md5=False)
    assert str(caught.value) == caught.value.message == "MD5 sum mismatch"


@PARSERS
@given(block=csv_blocks(), spelling=st.sampled_from([str.upper, str.lower, str.swapcase]))
def test_md5_hex_in_any_case_is_accepted(block: tuple[list[str], bytes], spelling: Any) -> None:
    lines, raw = block
    body = form(key="001122334455", md5sum=spelling(md5_hex(raw)), data=raw)
    result = wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True)
    check_round_trip(result, lines, raw, "001122334455")


@PARSERS
@given(block=csv_blocks(), empty=st.sampled_from([None, "", " "]))
def test_missing_md5(block: tuple[list[str], bytes], empty: str | None) -> None:
    lines, raw = block
    fields: dict[str, str | bytes] = {"key": "001122334455", "data": raw}
    if empty is not None:
        fields["md5sum"] = empty
    body = form(**fields)
    result = wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=False)
    check_round_trip(result, lines, raw, "001122334455")
    with pytest.raises(MissingMd5):
        wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True)


def test_md5_is_checked_before_an_empty_block_is_accepted() -> None:
    assert (
        wattmon.parse(
            form(key="001122334455", md5sum=md5_hex(b""), data=b""),
            URLENCODED,
            received_at=RECEIVED_AT,
            require_md5=True,
        )
        is None
    )
    with pytest.raises(Md5Mismatch):
        wattmon.parse(
            form(key="001122334455", md5sum="0" * 32, data=b""),
            URLENCODED,
            received_at=RECEIVED_AT,
            require_md5=True,
        )


@pytest.mark.parametrize("body", [b"", b"md5sum=x&data=y", b"key=&data=y", b"KEY=001122334455"])
def test_missing_key_is_refused(body: bytes) -> None:
    with pytest.raises(BadDeviceKey):
        wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=False)


# --------------------------------------------------------------------------
# 6. MAC spellings
# --------------------------------------------------------------------------


def is_mac(raw: bytes) -> bool:
    """Reference: 12 hex digits, or 6 pairs joined by one of ':' or '-'."""
    hex_bytes = set(HEX_DIGITS.encode())
    if len(raw) == 12:
        return all(byte in hex_bytes for byte in raw)
    if len(raw) == 17 and raw[2:3] in (b":", b"-"):
        pairs = raw.split(raw[2:3])
        return len(pairs) == 6 and all(
            len(pair) == 2 and all(byte in hex_bytes for byte in pair) for pair in pairs
        )
    return False


@PARSERS
@given(mac=macs())
def test_normalise_mac_accepts_every_spelling(mac: tuple[str, str]) -> None:
    spelled, digits = mac
    assert wattmon.normalise_mac(spelled.encode()) == digits


@st.composite
def near_macs(draw: st.DrawFn) -> bytes:
    """Valid MACs and small corruptions of them."""
    spelled, _ = draw(macs())
    raw = spelled.encode()
    fix = draw(
        st.sampled_from(["none", "newline", "mix", "drop", "add", "nonhex", "space", "mutate"])
    )
    if fix == "newline":
        raw += draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    elif fix == "mix" and b":" in raw:
        at = draw(st.sampled_from([i for i, byte in enumerate(raw) if byte == ord(":")]))
        raw = raw[:at] + b"-" + raw[at + 1 :]
    elif fix == "drop":
        at = draw(st.sampled_from([i for i, byte in enumerate(raw) if chr(byte) in HEX_DIGITS]))
        raw = raw[:at] + raw[at + 1 :]
    elif fix == "add":
        raw += draw(st.sampled_from([b"0", b"F", b":00", b"-0"]))
    elif fix == "nonhex":
        at = draw(st.integers(0, len(raw) - 1))
        raw = (
            raw[:at]
            + draw(st.sampled_from([b"g", b"G", b"x", b"\xff", b"\xd9\xa1"]))
            + raw[at + 1 :]
        )
    elif fix == "space":
        raw = draw(st.sampled_from([b" ", b"\t"])) + raw
    elif fix == "mutate":
        raw = draw(mutated(raw))
    return raw


@PARSERS
@given(raw=st.one_of(near_macs(), st.binary(max_size=20)))
@example(raw=b"001122334455\n")
@example(raw=b"00:11:22:33:44:55\n")
@example(raw=b"00:11-22:33:44:55")
@example(raw=b"00-11-22-33-44:55")
@example(raw=b"00112233445")
@example(raw=b"0011223344556")
@example(raw=b"00:11:22:33:44:5")
@example(raw=b"00:11:22:33:44:55:66")
@example(raw=b"00112233445g")
@example(raw=b"0011.2233.4455")
@example(raw=b"00 11 22 33 44 55")
@example(raw=b"0011:2233:4455")
@example(raw="00112233445\u0661".encode())  # an Arabic-Indic digit is not hex
def test_normalise_mac_accepts_exactly_valid_spellings(raw: bytes) -> None:
    if is_mac(raw):
        digits = wattmon.normalise_mac(raw)
        assert re.fullmatch(r"[0-9a-f]{12}", digits)
        assert digits == raw.decode().replace(":", "").replace("-", "").lower()
    else:
        with pytest.raises(BadDeviceKey):
            wattmon.normalise_mac(raw)


@pytest.mark.parametrize(
    "key", [b" 001122334455", b"00:11:22:33:44:55\r\n", b"\t00-11-22-33-44-55 "]
)
def test_parse_strips_whitespace_around_key(key: bytes) -> None:
    body = form(key=key, md5sum=md5_hex(SAMPLE), data=SAMPLE)
    result = wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True)
    assert isinstance(result, Record)
    assert result.device_id == "001122334455"


# --------------------------------------------------------------------------
# 6b. Valid CSV that is not one row a line; lines of only whitespace
# --------------------------------------------------------------------------


def csv_rows(text: bytes) -> list[list[str]]:
    """The CSV records of `text` as the stdlib reads them."""
    return list(csv.reader(io.StringIO(text.decode(), newline=""), strict=True))


@pytest.mark.parametrize(
    ("data", "rows", "count"),
    [
        (
            b'Time,Note\n2026-11-21 08:00:00,"one\ntwo"\n2026-11-21 08:01:00,x\n',
            b'2026-11-21 08:00:00,"one\ntwo"\n2026-11-21 08:01:00,x\n',
            2,
        ),
        # a blank line inside the quotes is the field's, not a blank line
        (b'T,N\nt,"a\n\nb"\n', b't,"a\n\nb"\n', 1),
        # line ends become \n, also inside quotes (as everywhere in a block)
        (b'T,N\r\nt,"a\r\nb"\r\nu,"c,d"', b't,"a\nb"\nu,"c,d"\n', 2),
        (b'T,N\rt,"a\r"\r', b't,"a\n"\n', 1),
        # the header's fields may hold line breaks too
        (b'T,"N\n(kWh)"\nt,1\n', b"t,1\n", 1),
    ],
)
def test_split_block_keeps_a_quoted_field_across_line_breaks(
    data: bytes, rows: bytes, count: int
) -> None:
    header, got_rows, got_count = wattmon.split_block(data)
    assert (got_rows, got_count) == (rows, count)
    assert len(csv_rows(header)) == 1
    assert len(csv_rows(got_rows)) == count


@pytest.mark.parametrize(
    "data",
    [
        b"T,V\nt1,2\n\t\nt3,4\n",
        b"T,V\r\nt1,2\r\n \t \r\nt3,4\r\n\t",
        b"\t\nT,V\n\nt1,2\n\x0b\x0c\nt3,4",
    ],
)
def test_split_block_drops_lines_of_only_whitespace_like_blank_lines(data: bytes) -> None:
    assert wattmon.split_block(data) == (b"T,V\n", b"t1,2\nt3,4\n", 2)


def test_header_and_whitespace_only_lines_store_nothing() -> None:
    data = b"Time,V\n\t\n  \n"
    body = form(key="001122334455", md5sum=md5_hex(data), data=data)
    assert wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True) is None


@pytest.mark.parametrize(
    "data", [b'T,N\nt,"a\nb\n', b'T,N\nt,"a\n', b'T,N\nt,"a"b\n', b'T,N\nt,"a\nb",c\n']
)
def test_split_block_refuses_a_quote_left_open_or_a_wider_row(data: bytes) -> None:
    with pytest.raises(MalformedBlock):
        wattmon.split_block(data)


# A quoted reading with at least one line break (a quote inside is doubled).
multi_line_cells = st.lists(
    st.lists(cell_chars | st.sampled_from(["\r\n", ",", '""']), max_size=8).map("".join),
    min_size=2,
    max_size=3,
).map(lambda parts: '"' + "\n".join(parts) + '"')


@PARSERS
@given(block=csv_blocks(), cell=multi_line_cells, data=st.data())
def test_wattmon_round_trip_with_a_quoted_multi_line_field(
    block: tuple[list[str], bytes], cell: str, data: Any
) -> None:
    lines, _ = block
    width = lines[0].count(",") + 1
    assume(width > 1)
    at = data.draw(st.integers(1, len(lines) - 1))
    fields = lines[at].split(",")
    fields[-1] = cell  # a reading that holds line breaks, quoted
    lines[at] = ",".join(fields)
    ending = data.draw(line_endings.filter(lambda e: e != "\r"))
    raw = "".join(line + ending for line in lines).encode()
    body = form(key="001122334455", md5sum=md5_hex(raw), data=raw)
    result = wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True)
    assert isinstance(result, Record), result
    assert result.count == len(lines) - 1
    expected = raw.replace(b"\r\n", b"\n")
    assert result.header + result.payload == expected
    assert csv_rows(result.payload) == csv_rows(expected)[1:]


# --------------------------------------------------------------------------
# 7. split_block refuses what is not a CSV block
# --------------------------------------------------------------------------


@st.composite
def wrong_width_blocks(draw: st.DrawFn) -> bytes:
    lines, _ = draw(csv_blocks())
    at = draw(st.integers(1, len(lines) - 1))
    width = lines[0].count(",") + 1
    if width > 1 and draw(st.booleans()):
        lines[at] = lines[at].rsplit(",", 1)[0]  # one column short
    else:
        lines[at] += "," + draw(st.text(cell_chars, max_size=5))  # one column extra
    return "".join(line + draw(line_endings) for line in lines).encode()


@PARSERS
@given(data=wrong_width_blocks())
@example(data=b"Time,V\n2026-11-21 08:00:00,230,\n")
@example(data=b"Time,V\n2026-11-21 08:00:00\n")
def test_split_block_refuses_a_row_of_another_width(data: bytes) -> None:
    with pytest.raises(MalformedBlock, match="columns"):
        wattmon.split_block(data)


@PARSERS
@given(
    block=csv_blocks(min_rows=0),
    bad=st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"\xf8\x88\x80\x80\x80"]),
    data=st.data(),
)
@example(block=([], SAMPLE), bad=b"\xe9", data=None)  # Latin-1 é
def test_split_block_refuses_non_utf8(
    block: tuple[list[str], bytes], bad: bytes, data: Any
) -> None:
    _, raw = block
    at = data.draw(st.integers(0, len(raw))) if data else len(raw) - 2
    with pytest.raises(MalformedBlock, match="UTF-8"):
        wattmon.split_block(raw[:at] + bad + raw[at:])


@PARSERS
@given(block=csv_blocks(min_rows=0), digit=st.sampled_from(string.digits))
@example(block=(["Time,V"], b"Time,V"), digit="2")
def test_split_block_refuses_a_first_line_that_starts_with_a_digit(
    block: tuple[list[str], bytes], digit: str
) -> None:
    _, raw = block
    with pytest.raises(MalformedBlock, match="no header"):
        wattmon.split_block(digit.encode() + raw)


@PARSERS
@given(block=csv_blocks(), data=st.data())
def test_split_block_refuses_nul(block: tuple[list[str], bytes], data: Any) -> None:
    _, raw = block
    text = raw.decode()
    at = data.draw(st.integers(0, len(text)))  # between characters: the block stays UTF-8
    with pytest.raises(MalformedBlock, match="NUL"):
        wattmon.split_block((text[:at] + "\x00" + text[at:]).encode())


@PARSERS
@given(data=st.one_of(wrong_width_blocks(), csv_blocks().map(lambda b: b"\xff" + b[1])))
def test_malformed_block_with_good_md5_is_quarantined(data: bytes) -> None:
    body = form(key="00:11:22:33:44:55", md5sum=md5_hex(data), data=data)
    result = wattmon.parse(body, URLENCODED, received_at=RECEIVED_AT, require_md5=True)
    assert isinstance(result, Quarantined)
    assert result.protocol == "wattmon"
    assert result.device_id == "001122334455"
    assert result.received_at == RECEIVED_AT
    assert result.raw == data
    assert result.dedup_key == md5_hex(data)
    assert result.reason


# --------------------------------------------------------------------------
# 8. Stream names from paths
# --------------------------------------------------------------------------

STREAM_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
JSON_DIR = Path("/data/json")

stream_paths = st.one_of(
    st.text(any_chars, max_size=140),
    st.text("/._-aZ09", max_size=140).map(lambda path: "/" + path),
    st.text("/._-aZ09\n%\\é ", max_size=20),
)


def is_stream_path(path: str) -> bool:
    """Reference: '/' then 1-128 of [A-Za-z0-9._-/], not starting with '.'."""
    allowed = set(string.ascii_letters + string.digits + "._-/")
    rest = path[1:]
    return (
        path.startswith("/")
        and 1 <= len(rest) <= 128
        and not rest.startswith(".")
        and all(char in allowed for char in rest)
    )


@PARSERS
@given(path=stream_paths)
@example(path="/..")
@example(path="/../etc/passwd")
@example(path="/./x")
@example(path="/.hidden")
@example(path="/a/../b")
@example(path="//x")
@example(path="/")
@example(path="")
@example(path="x")
@example(path="/a\n")
@example(path="/a\\b")
@example(path="/a%2Fb")
@example(path="/" + "a" * 128)
@example(path="/" + "a" * 129)
@example(path="/\u0661")  # a non-ASCII digit
@example(path="/K\u212a")  # KELVIN SIGN: matches [A-Za-z] under re.IGNORECASE only
def test_stream_name(path: str) -> None:
    try:
        name = jsonpost.stream_name(path)
    except BadStreamName:
        assert not is_stream_path(path)
        return
    assert is_stream_path(path)
    assert name == path[1:].replace("/", "_")
    assert STREAM_NAME.fullmatch(name)
    assert "/" not in name
    assert not name.startswith("..")
    target = (JSON_DIR / name).resolve()
    assert target.parent == JSON_DIR.resolve()


# --------------------------------------------------------------------------
# 9. JSON documents
# --------------------------------------------------------------------------


@st.composite
def json_documents(draw: st.DrawFn, value: Any) -> bytes:
    """`value` serialised as a pusher might: any indent, CRLF, padding."""
    indent = draw(st.none() | st.integers(0, 4) | st.sampled_from(["\t", " \t"]))
    text = json.dumps(value, indent=indent, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")  # only whitespace holds raw newlines
    padding = st.text(" \t\r\n", max_size=3)
    return (draw(padding) + text + draw(padding)).encode()


@PARSERS
@given(
    value=json_values,
    data=st.data(),
    path=valid_paths,
    # Not any_chars: JSON reads the escapes of a split surrogate pair back as one
    # character, and request.remote is an address anyway.
    remote=st.text(max_size=20),
    received_at=st.floats(0, 2**33, allow_nan=False),
    idempotency_key=st.none() | st.text(max_size=10),
)
@example(
    value={"a\u2028b": ["\n", "\r"], "x": -0.0, "y": 1e308},
    data=None,
    path="/allegro/meter-1.v2",
    remote="192.0.2.1",
    received_at=RECEIVED_AT,
    idempotency_key="k",
)
def test_jsonpost_round_trip(
    value: Any,
    data: Any,
    path: str,
    remote: str,
    received_at: float,
    idempotency_key: str | None,
) -> None:
    if data is None:
        body = json.dumps(value, indent=2, ensure_ascii=False).encode()
    else:
        body = data.draw(json_documents(value))
    record = jsonpost.parse(
        body,
        path=path,
        remote=remote,
        received_at=received_at,
        idempotency_key=idempotency_key,
    )
    assert record.protocol == "json"
    assert record.device_id == jsonpost.stream_name(path)
    assert record.received_at == received_at
    assert record.count == 1
    assert record.payload.endswith(b"\n")
    assert record.payload.count(b"\n") == 1
    assert b"\r" not in record.payload
    line = json.loads(record.payload)
    assert list(line) == ["received_at", "remote", "path", "body"]
    assert line["body"] == value
    assert line["received_at"] == jsonpost.rfc3339(received_at)
    assert line["path"] == path
    assert line["remote"] == remote
    as_sent = body.decode().replace("\r", " ").replace("\n", " ").strip()
    assert record.payload.endswith(b',"body":' + as_sent.encode() + b"}\n")
    if idempotency_key:
        assert (
            record.dedup_key
            == hashlib.sha256(idempotency_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        )
    else:
        assert record.dedup_key is None


@PARSERS
@given(
    value=json_values,
    constant=st.sampled_from([math.nan, math.inf, -math.inf]),
    wrap=st.sampled_from(["bare", "list", "dict"]),
    indent=st.none() | st.integers(0, 2),
)
@example(value=None, constant=math.nan, wrap="bare", indent=None)
@example(value=None, constant=-math.inf, wrap="dict", indent=2)
def test_jsonpost_refuses_nan_and_infinity(
    value: Any, constant: float, wrap: str, indent: int | None
) -> None:
    document: Any = {
        "bare": constant,
        "list": [value, constant],
        "dict": {"v": value, "x": [constant]},
    }[wrap]
    body = json.dumps(document, indent=indent).encode()
    assert re.search(rb"NaN|Infinity", body)
    with pytest.raises(BadJson):
        jsonpost.parse(body, path="/s", remote="", received_at=RECEIVED_AT)


@PARSERS
@given(keys=st.lists(header_texts.map(str.strip).filter(bool), min_size=2, max_size=2, unique=True))
@example(keys=["abc\udcff", "abc\udcfe"])
def test_distinct_idempotency_keys_give_distinct_dedup_keys(keys: list[str]) -> None:
    first, second = (
        jsonpost.parse(
            b"{}", path="/s", remote="", received_at=RECEIVED_AT, idempotency_key=key
        ).dedup_key
        for key in keys
    )
    assert first != second


@PARSERS
@given(keys=st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=2, unique=True))
def test_distinct_text_idempotency_keys_give_distinct_dedup_keys(keys: list[str]) -> None:
    first, second = (
        jsonpost.parse(
            b"{}", path="/s", remote="", received_at=RECEIVED_AT, idempotency_key=key
        ).dedup_key
        for key in keys
    )
    assert first != second


RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z")


@PARSERS
@given(ts=st.floats(0, 2**33, allow_nan=False))
@example(ts=0.0)
@example(ts=RECEIVED_AT)
@example(ts=0.9999999999999999)
@example(ts=1.001)
def test_rfc3339(ts: float) -> None:
    match = RFC3339.fullmatch(jsonpost.rfc3339(ts))
    assert match
    seconds = datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert match[1] == seconds
    exact_millis = int((Decimal(ts) - int(ts)) * 1000)  # truncated, as the parser means to
    assert abs(int(match[2]) - exact_millis) <= 1
