"""The fast parsers against frozen copies of the parsers they replaced.

`_reference_parsers` holds the forms, Wattmon and JSON parsers exactly as they
were before the fast paths were added. For generated inputs, ordinary and
hostile, the live parsers must give the same outcome: the same result, field
by field and type by type, or the same exception (type, code, message, reason,
device). The bench bodies are compared too, every one of them.

One stated exception (issue 12): the reference quarantined two kinds of
valid Wattmon block, one with a quoted field across a line break (valid CSV)
and one with a line of only whitespace. The live parser stores the first as
sent and drops such lines like blank lines. Only blocks of these kinds may
differ, and there the live answer must be what the stdlib's csv module reads
(see `INTENDED DIFFERENCES`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import random
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _reference_parsers as ref
import pytest
from _mutations import mutated
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from ingestd.errors import BlockTooLarge, MalformedBlock
from ingestd.protocols import forms, jsonpost, wattmon

EQUIVALENCE = settings(
    deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow]
)
URLENCODED = "application/x-www-form-urlencoded"
RECEIVED_AT = 1_795_262_400.25
BODIES = Path(__file__).parent.parent / "bench" / "results" / "bodies"


# --------------------------------------------------------------------------
# Outcomes: what a call returned or raised, comparable with ==
# --------------------------------------------------------------------------


def snapshot(value: Any) -> Any:
    """`value` with the type of every part: b"x" and bytearray(b"x") differ."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value),
            tuple((f.name, snapshot(getattr(value, f.name))) for f in dataclasses.fields(value)),
        )
    if isinstance(value, dict):
        return (dict, sorted((k, snapshot(v)) for k, v in value.items()))
    if isinstance(value, tuple | list):
        return (type(value), tuple(snapshot(item) for item in value))
    return (type(value), value)


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        result = call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any exception must match too
        return (
            "raised",
            type(exc),
            str(exc),
            *(getattr(exc, attr, None) for attr in ("message", "code", "status", "device")),
            getattr(exc, "reason", None),
            type(exc.__cause__),
        )
    return ("returned", snapshot(result))


def same(new: Callable[..., Any], old: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    expected = outcome(old, *args, **kwargs)
    assert outcome(new, *args, **kwargs) == expected
    if currently_in_test_context():  # --hypothesis-show-statistics counts the outcomes
        event(expected[1][0].__name__ if expected[0] == "returned" else expected[1].__name__)
    return expected


# --------------------------------------------------------------------------
# INTENDED DIFFERENCES (Wattmon blocks): where, and what the answer must be
# --------------------------------------------------------------------------


def _lines(data: bytes) -> list[bytes]:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


def differs_on_purpose(data: bytes) -> bool:
    """A block the live parser reads otherwise than the reference, on
    purpose: a line of only whitespace, or a line with an odd number of
    quotes (a quoted field opened or closed across a line break)."""
    return any((line and line.isspace()) or line.count(b'"') % 2 for line in _lines(data))


def _blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and row[0].encode().isspace())


def csv_answer(data: bytes, max_columns: int) -> list[list[str]] | None:
    """What the csv module reads in a block: its rows (blank and
    whitespace-only ones dropped), or None where a block is refused."""
    text = b"\n".join(_lines(data))
    if b"\x00" in text:
        return None
    try:
        rows = list(csv.reader(io.StringIO(text.decode(), newline=""), strict=True))
    except (UnicodeDecodeError, csv.Error):
        return None
    rows = [row for row in rows if not _blank(row)]
    if not rows:
        return rows
    width = len(rows[0])
    if width > max_columns or any(len(row) != width for row in rows):
        return None
    first = next(line for line in _lines(data) if line and not line.isspace())
    if first[:1].isdigit():
        return None  # no header row
    return rows


def check_split_block(data: bytes, max_columns: int) -> Any:
    expected = outcome(ref.split_block, data, max_columns=max_columns)
    got = outcome(wattmon.split_block, data, max_columns=max_columns)
    if got == expected:
        return expected
    assert differs_on_purpose(data), (got, expected)
    answer = csv_answer(data, max_columns)
    if answer is None:
        assert got[0] == "raised" and got[1] in (MalformedBlock, BlockTooLarge), got
    else:
        assert got[0] == "returned", got
        header, rows, count = wattmon.split_block(data, max_columns=max_columns)
        stored = list(csv.reader(io.StringIO((header + rows).decode(), newline="")))
        assert [row for row in stored if not _blank(row)] == answer
        assert count == max(len(answer) - 1, 0)
    if currently_in_test_context():
        event("differs on purpose")
    return got


@contextlib.contextmanager
def reference_with_live_split_block() -> Iterator[None]:
    """The reference's form handling around the live block splitting."""
    frozen = ref.split_block
    ref.split_block = wattmon.split_block
    try:
        yield
    finally:
        ref.split_block = frozen


# --------------------------------------------------------------------------
# Strategies: Wattmon forms
# --------------------------------------------------------------------------


def one_in(times: int) -> st.SearchStrategy[bool]:
    """True about once in `times`. (Hypothesis favours small integers, so
    `integers(0, n) == 0` would be True far more often.)"""
    return st.sampled_from([False] * (times - 1) + [True])


def sometimes_mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """`base` as it is, or once in five `mutated`."""
    return one_in(5).flatmap(
        lambda mutate: mutated(base, CSV_CHUNKS, max_edits=3) if mutate else st.just(base)
    )


# What breaks a CSV block or a form most often, besides random bytes.
CSV_CHUNKS = st.binary(min_size=1, max_size=3) | st.sampled_from(
    [b",", b"\r", b"\n", b"\r\n", b'"', b"\x00", b"\xff", b"%", b"+"]
)


cell_text = st.text(
    st.sampled_from([*"abcXYZ0129 .:-_/=&%+\t", "é", "€", "\u2028", "\U0001f600"]),
    max_size=6,
)
odd_cells = st.sampled_from(
    ['"a,b"', '"a""b"', '""', '"', 'a"b', '"x\ny"', '"x\r\ny"', "\x00", "\ufeff", " "]
)
endings = st.sampled_from(["\n", "\r\n", "\r", "\n\r", "\r\r\n", "\n\n", "\r\n\r\n"])


@st.composite
def csv_blocks(draw: st.DrawFn) -> bytes:
    """Wattmon CSV blocks: mostly well formed, often with one thing odd."""
    width = 1 if draw(one_in(5)) else draw(st.integers(2, 6))
    rows = draw(st.integers(2, 12) | st.integers(0, 1))
    first = draw(st.sampled_from(["Time", "T", "1Time", "", " Time", "é"]))
    header = [first] + [draw(cell_text) or "c" for _ in range(width - 1)]
    lines = [header]
    for _ in range(rows):
        row_width = draw(st.integers(1, width + 1)) if draw(one_in(20)) else width
        row = [draw(cell_text) for _ in range(row_width)]
        if draw(one_in(20)):
            row[draw(st.integers(0, row_width - 1))] = draw(odd_cells)
        lines.append(row)
    uniform = draw(st.sampled_from(["\n", "\r\n", "\r\n", "\r", None]))
    ends = [uniform if uniform is not None else draw(endings) for _ in lines]
    if draw(st.booleans()):
        ends[-1] = ""  # no line end after the last line
    text = "".join(",".join(row) + end for row, end in zip(lines, ends, strict=True))
    encoding = draw(st.sampled_from(["latin-1", "utf-16"])) if draw(one_in(10)) else "utf-8"
    data = text.encode(encoding, "replace")
    return draw(sometimes_mutated(data))


hex_case = st.sampled_from([str.lower, str.upper, lambda s: s])


@st.composite
def encoded_values(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` as a form value, encoded the way some client might."""
    how = draw(st.sampled_from(["plus", "quote", "quote_some", "lower", "raw", "odd"]))
    if how == "plus":
        return urllib.parse.quote_plus(raw).encode()
    if how == "quote":
        return urllib.parse.quote_from_bytes(raw, safe="").encode()
    if how == "quote_some":
        return urllib.parse.quote_from_bytes(raw, safe=",:/= ").encode()
    if how == "lower":
        quoted = urllib.parse.quote_plus(raw)
        return re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quoted).encode()
    if how == "raw":
        return raw.replace(b"&", b"%26")
    quoted = urllib.parse.quote_plus(raw).encode()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(quoted)))
        junk = draw(
            st.sampled_from(
                [
                    b"%",
                    b"%2",
                    b"%zz",
                    b"%%",
                    b"%%41",
                    b"+",
                    b"%2B",
                    b"%3D",
                    b"=",
                    b"%0d%0a",
                    b"%0D",
                    b"%0A",
                    b"\r",
                    b"\n",
                    b"%25",
                    b"%g0",
                    b"%00",
                    b"%ff",
                    b"%C3%A9",
                ]
            )
        )
        quoted = quoted[:at] + junk + quoted[at:]
    return quoted


GOOD_MACS = ["0050c2000001", "00:1A:2b:3C:4d:5E", "00-11-22-33-44-55", " 001122334455\r\n"]
mac_spellings = st.sampled_from(
    [
        *GOOD_MACS,
        "00:11-22:33:44:55",
        "00112233445",
        "00112233445g",
        "",
        "0011.2233.4455",
        "\t00-11-22-33-44-55 ",
    ]
)


@st.composite
def wattmon_forms(draw: st.DrawFn) -> tuple[bytes, str]:
    """(body, content type) of a Wattmon post: urlencoded mostly, or multipart."""
    data = draw((st.binary(max_size=80) | st.just(b"")) if draw(one_in(8)) else csv_blocks())
    mac = draw(
        (mac_spellings | st.text(max_size=14)) if draw(one_in(8)) else st.sampled_from(GOOD_MACS)
    )
    multipart = draw(one_in(6))
    value = data if multipart else draw(encoded_values(data))
    decoded = data if multipart else ref._unquote(value)
    md5 = hashlib.md5(decoded).hexdigest()
    md5 = draw(
        st.sampled_from([md5] * 4 + [md5.upper(), f" {md5}\r\n", "", " ", "0" * 32, md5[:-1]])
    )
    fields: list[tuple[bytes, bytes]] = [(b"data", value)]
    if not draw(one_in(10)):
        fields.append((b"key", mac.encode("utf-8", "surrogatepass")))
    if not draw(one_in(6)):
        fields.append((b"md5sum", md5.encode()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        name = draw(
            st.sampled_from([b"note", b"k%65y", b"ke+y", b"data2", b"", b"Key", b"%ff", b"d%61ta"])
        )
        fields.append((name, draw(st.binary(max_size=8))))
    fields = draw(st.permutations(fields))
    if multipart:
        boundary = draw(st.sampled_from(["b", "XyZzy", "----x"]))
        body = (
            b"".join(
                b"--"
                + boundary.encode()
                + b'\r\nContent-Disposition: form-data; name="'
                + name
                + b'"\r\n\r\n'
                + value
                + b"\r\n"
                for name, value in fields
            )
            + b"--"
            + boundary.encode()
            + b"--\r\n"
        )
        content_type = f"multipart/form-data; boundary={boundary}"
    else:
        joiner = draw(st.sampled_from([b"&", b"&", b"&&"]))
        body = joiner.join(
            name if draw(one_in(20)) else name + b"=" + value for name, value in fields
        )
        content_type = draw(
            st.sampled_from(
                [URLENCODED] * 6
                + [
                    "",
                    "application/x-www-form-urlencoded; charset=utf-8",
                    " Application/X-WWW-Form-Urlencoded",
                    "text/plain",
                    "multipart/form-data",
                ]
            )
        )
    return draw(sometimes_mutated(body)), content_type


limits = st.fixed_dictionaries(
    {
        "require_md5": st.booleans(),
        "max_rows": one_in(4).flatmap(lambda low: st.integers(1, 5) if low else st.just(100_000)),
        "max_columns": one_in(4).flatmap(lambda low: st.integers(1, 4) if low else st.just(1_000)),
    }
)


# --------------------------------------------------------------------------
# Wattmon and forms
# --------------------------------------------------------------------------


def bench_lines(name: str, make: str, count: int = 3_000) -> Iterator[tuple[str, bytes]]:
    """The first `count` requests of bench/results/bodies/<name>.txt, or as
    many made like them (the same number either way: the suite's time does
    not depend on whether the bench has run)."""
    path = BODIES / f"{name}.txt"
    if path.exists():
        with open(path, "rb") as fh:
            for line in itertools.islice(fh, count):
                target, _, body = line.rstrip(b"\n").partition(b"\t")
                yield target.decode(), body
        return
    spec = importlib.util.spec_from_file_location("gen_bodies", BODIES.parents[1] / "gen_bodies.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = random.Random(42)
    for n in range(count):
        target, _, body = getattr(gen, make)(n, rng).partition("\t")
        yield target, body.encode()


KEY = b"key=001122334455&"
NO_MD5 = {"require_md5": False}


def check_wattmon(body: bytes, content_type: str, **kwargs: Any) -> Any:
    args = (body, content_type)
    expected = outcome(ref.wattmon_parse, *args, received_at=RECEIVED_AT, **kwargs)
    got = outcome(wattmon.parse, *args, received_at=RECEIVED_AT, **kwargs)
    if got != expected:
        # Only the block's splitting may differ, and only on purpose.
        data = ref.parse_form(body, content_type, wattmon.FIELDS).get("data", b"")
        check_split_block(data, kwargs.get("max_columns", 1_000))
        with reference_with_live_split_block():
            return same(wattmon.parse, ref.wattmon_parse, *args, received_at=RECEIVED_AT, **kwargs)
    return same(wattmon.parse, ref.wattmon_parse, *args, received_at=RECEIVED_AT, **kwargs)


@EQUIVALENCE
@given(form=wattmon_forms(), kwargs=limits)
@example(form=(KEY + b"data=%2541%41", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0D%0A1,2%", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0D1,2%0A", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0D%0Ax%0D%0A", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0Dx,y%0A1,2", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0Ax,y%0Ajunk", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T%0A%0Ax%0A", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=%3D%0A1", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=%=41", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=%%0A", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0A1,2%0A", URLENCODED), kwargs={"max_columns": 1})
@example(form=(KEY + b"data=T,V%0A1,2%0A3,4", URLENCODED), kwargs={"max_rows": 1})
@example(form=(KEY + b"data=T,V%0At,%22a%0Ab%22%0A%09%0A", URLENCODED), kwargs=NO_MD5)
@example(form=(KEY + b"data=T,V%0A%09%0A", URLENCODED), kwargs=NO_MD5)
def test_wattmon_parse_matches_reference(form: tuple[bytes, str], kwargs: dict[str, Any]) -> None:
    body, content_type = form
    check_wattmon(body, content_type, **{"require_md5": False, **kwargs})


@EQUIVALENCE
@given(body=st.binary(max_size=400), content_type=st.sampled_from([URLENCODED, ""]))
def test_wattmon_parse_matches_reference_on_any_bytes(body: bytes, content_type: str) -> None:
    check_wattmon(body, content_type, require_md5=False)


@EQUIVALENCE
@given(
    data=csv_blocks() | st.binary(max_size=200),
    max_columns=one_in(4).flatmap(lambda low: st.integers(1, 4) if low else st.just(1_000)),
)
@example(data=b"T,V\r\n1,2\r\n", max_columns=1000)
@example(data=b"T,V\r\n1,2\rx\n", max_columns=1000)
@example(data=b"T,V\n1,2\nx", max_columns=1000)
@example(data=b'T,V\n1,"2\n3"\n', max_columns=1000)
@example(data=b'T,V,W\r\n1,"2,3"\r\n', max_columns=1000)  # a quoted comma
@example(data=b"T\n\n1\n", max_columns=1000)
@example(data=b"T,V\n1,2\x00\n", max_columns=1000)
@example(data=b"T,V\n\xff,2\n", max_columns=1000)
@example(data=b"T,V", max_columns=1000)
@example(data=b"T,V\r", max_columns=1000)
@example(data=b"", max_columns=1000)
@example(data=b'T,V\n1,"2\n\n3"\n\t\n', max_columns=1000)  # differs on purpose
@example(data=b'T\n"a\nb\n', max_columns=1000)  # a quote left open
@example(data=b"T\n \nx\n", max_columns=1000)  # one column: whitespace is no row
def test_split_block_matches_reference(data: bytes, max_columns: int) -> None:
    check_split_block(data, max_columns)


@EQUIVALENCE
@given(
    value=st.binary(max_size=60)
    | st.builds(bytes.__add__, st.binary(max_size=10), st.binary(max_size=10)),
    data=st.data(),
)
@example(value=b"%2541%41", data=None)
@example(value=b"abc%", data=None)
@example(value=b"%4", data=None)
@example(value=b"%%41", data=None)
@example(value=b"%3D%41", data=None)
@example(value=b"=%41", data=None)
@example(value=b"%\r\n41", data=None)
@example(value=b"a+b%2Bc", data=None)
@example(value=b"=41%41", data=None)  # a bare `=` QP would read as an escape
@example(value=b"%\n41", data=None)  # QP would read `=` LF as a soft line break
@example(value=b"a%\r\nb", data=None)
def test_parse_form_matches_reference(value: bytes, data: Any) -> None:
    encoded = data.draw(encoded_values(value)) if data is not None else value
    body = b"note=1&data=" + encoded + b"&key=001122334455"
    wanted = frozenset({"key", "data", "note"})
    for content_type in (URLENCODED, "", "application/x-www-form-urlencoded;x=1"):
        same(forms.parse_form, ref.parse_form, body, content_type, wanted)


@EQUIVALENCE
@given(form=wattmon_forms(), wanted=st.sets(st.sampled_from(["key", "md5sum", "data", "", "k e"])))
def test_parse_form_matches_reference_on_forms(form: tuple[bytes, str], wanted: set[str]) -> None:
    body, content_type = form
    same(forms.parse_form, ref.parse_form, body, content_type, frozenset(wanted))


@EQUIVALENCE
@given(raw=st.binary(max_size=20) | mac_spellings.map(str.encode))
def test_normalise_mac_matches_reference(raw: bytes) -> None:
    same(wattmon.normalise_mac, ref.normalise_mac, raw)


def test_wattmon_bench_bodies_match_reference() -> None:
    seen = 0
    for _, body in bench_lines("wattmon", "wattmon_line"):
        expected = check_wattmon(body, URLENCODED, require_md5=True)
        assert expected[0] == "returned"
        seen += 1
    assert seen


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------

surrogates = st.characters(categories=["Cs"])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([10**300, -(10**308), 10**309, 10**400, 2**64])
    | st.floats()  # NaN and infinities too: json.dumps writes NaN, Infinity
    | st.text(max_size=6)
    | st.text(st.characters() | surrogates, max_size=4)
)
# Values that any parser accepts once written out: no NaN, no lone surrogate.
plain_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=25,
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=25,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """Documents as a pusher might send them, valid or not, in any encoding."""
    value = draw(json_values if draw(one_in(4)) else plain_json_values)
    text = json.dumps(
        value,
        indent=draw(st.none() | st.integers(0, 3) | st.just("\t")),
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.none() | st.just((",", ":"))),
    )
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    pad = st.one_of(
        *[st.text(st.sampled_from(" \t\r\n"), max_size=3)] * 9,
        st.text(st.sampled_from(" \t\r\n\f\v\x00\xa0\u2028"), max_size=3),
    )
    text = draw(pad) + text + draw(pad)
    encoding = (
        draw(st.sampled_from(["utf-8-sig", "utf-16", "utf-32", "latin-1"]))
        if draw(one_in(8))
        else "utf-8"
    )
    body = text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")
    return draw(sometimes_mutated(body))


@st.composite
def nested_bodies(draw: st.DrawFn) -> bytes:
    """Nesting around the limits: max_depth, the fast path's bound, the C stack."""
    depth = draw(
        st.integers(0, 6)
        | st.sampled_from([31, 32, 33, 63, 64, 65, 99, 100, 101, 200])
        | st.integers(990, 1030)
    )
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")]))
    inner = draw(st.sampled_from([b"1", b"[]", b"{}", b'"[{"', b"NaN", b"1e400"]))
    body = opener * depth + inner + closer * depth
    if draw(st.booleans()):
        body = b"[" + b",".join([body] * draw(st.integers(1, 40))) + b"]"
    return body


special_bodies = st.sampled_from(
    [b"1" * n for n in (309, 310, 4300, 4301)]
    + [b"-" + b"9" * 309, b"1e400", b"-1e400", b"1e-400", b"-0", b"[NaN]", b"Infinity"]
    + [b"-Infinity", b'{"a":NaN}']
    + [b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\ud83d\\ude00"', b'"\xed\xa0\x80"', b"\xef\xbb\xbf{}"]
    + [b'{"a":1,"a":2}', b"", b" ", b"\r\n{}\r\n", b'{"a":1}\n{"b":2}', b'"\\u0000"', b'"\x7f"']
    + [b'"\t"', b"\xc0\x80", b"{}\x00", b"[1,]", b"01", b"[" * 100_000, b"]" * 10]
)
paths = one_in(8).flatmap(
    lambda odd: (
        st.sampled_from(["/", "", "/.x", "/a\udcff"]) | st.text(max_size=10).map("/".__add__)
        if odd
        else st.sampled_from(["/s", "/interface-stats-for-mm-1", "/a/b.c"])
    )
)
text_or_surrogates = st.text(st.characters() | surrogates, max_size=12)


def check_json(body: bytes, **kwargs: Any) -> Any:
    return same(jsonpost.parse, ref.json_parse, body, **kwargs)


@EQUIVALENCE
@given(
    body=one_in(3).flatmap(
        lambda odd: (
            nested_bodies() | special_bodies | st.binary(max_size=100) if odd else json_bodies()
        )
    ),
    path=paths,
    remote=st.sampled_from(["127.0.0.1", "", "::1"]) | text_or_surrogates,
    received_at=st.floats(0, 2**33) | st.sampled_from([0.9999999999999999, -1.5, 1e300]),
    idempotency_key=st.none() | text_or_surrogates,
    max_depth=st.sampled_from([64, 32, 0, 1, 2, 5, 99, 100, 101, 150, 1_000, 5_000]),
)
@example(
    body=b"[" * 1024 + b"]" * 1024,
    path="/s",
    remote="",
    received_at=RECEIVED_AT,
    idempotency_key=None,
    max_depth=5_000,
)
@example(
    body=b"[" * 101 + b"]" * 101,
    path="/s",
    remote="",
    received_at=RECEIVED_AT,
    idempotency_key=None,
    max_depth=5_000,
)
@example(
    body=b"[" + b"[]," * 200 + b"1]",
    path="/s",
    remote="",
    received_at=RECEIVED_AT,
    idempotency_key=None,
    max_depth=2,
)
@example(
    body=b'{"a": "[[[["}',
    path="/s",
    remote="",
    received_at=RECEIVED_AT,
    idempotency_key=None,
    max_depth=1,
)
def test_json_parse_matches_reference(body: bytes, **kwargs: Any) -> None:
    check_json(body, **kwargs)


@EQUIVALENCE
@given(path=st.text(st.characters() | surrogates, max_size=140) | st.text("/._-aZ09", max_size=140))
@example(path="/" + "a" * 128)
@example(path="/" + "a" * 129)
@example(path="/K\u212a")
def test_stream_name_matches_reference(path: str) -> None:
    for _ in range(2):  # twice: a cached answer must be the same answer
        same(jsonpost.stream_name, ref.stream_name, path)


@EQUIVALENCE
@given(ts=st.floats() | st.integers(-(2**40), 2**40))
@example(ts=0.9999999999999999)
@example(ts=-0.5)
@example(ts=1e20)
def test_rfc3339_matches_reference(ts: float) -> None:
    for _ in range(2):
        same(jsonpost.rfc3339, ref.rfc3339, ts)


@EQUIVALENCE
@given(body=json_bodies() | nested_bodies() | st.binary(max_size=100))
def test_nesting_depth_matches_reference(body: bytes) -> None:
    same(jsonpost.nesting_depth, ref.nesting_depth, body)


@pytest.mark.parametrize("depth", [*range(960, 1030, 8), 1023, 1024, 1025])
def test_json_nesting_near_the_stack_limit_matches_reference(depth: int) -> None:
    """Outside Hypothesis, which raises the recursion limit: here the stdlib
    refuses nesting that orjson (up to 1,024 levels) would accept."""
    for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        check_json(body, path="/s", remote="", received_at=RECEIVED_AT, max_depth=5_000)


class Text(str):
    """A str subclass: json.dumps and our shortcut must agree on it too."""


@pytest.mark.parametrize("remote", [None, 5, Text("192.0.2.1"), "\udcff", 'é\n"'])
@pytest.mark.parametrize("path", ["/s", Text("/a/b")])
def test_json_remote_and_path_of_any_type_match_reference(remote: Any, path: str) -> None:
    check_json(b"{}", path=path, remote=remote, received_at=RECEIVED_AT)


def test_json_bench_bodies_match_reference() -> None:
    seen = 0
    for path, body in bench_lines("json", "json_line"):
        expected = check_json(
            body,
            path=path,
            remote="192.0.2.1",
            received_at=RECEIVED_AT + seen / 1000,
            idempotency_key="k" if seen % 2 else None,
            max_depth=32,
        )
        assert expected[0] == "returned"
        seen += 1
    assert seen


# The strategies must reach the shapes that matter, or the comparisons prove little.
@pytest.mark.parametrize(
    "outcome_of",
    [
        lambda: check_wattmon(
            b"key=001122334455&data=" + urllib.parse.quote_plus(b"T,V\r\n1,2\r\n").encode(),
            URLENCODED,
            require_md5=False,
        ),
        lambda: check_json(b'{"a":[1,2]}', path="/s", remote="", received_at=1.0),
    ],
    ids=["wattmon", "json"],
)
def test_reference_accepts_the_common_shape(outcome_of: Callable[[], Any]) -> None:
    assert outcome_of()[0] == "returned"
