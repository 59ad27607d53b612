"""What the devices sent and what was answered `OK`, and the check of a data
directory against it: lost, duplicated and corrupt records, counted."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HEADER = "Time,Device,Seq,Row,Value"
CSV_NAME = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2})?(_\d{4})?\.csv(\.gz)?")
JSONL_NAME = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2})?(_\d{4})?\.jsonl(\.gz)?")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass(frozen=True)
class Block:
    mac: str
    seq: int
    rows: tuple[str, ...]

    @property
    def form(self) -> bytes:
        data = "\n".join((HEADER, *self.rows)) + "\n"
        md5 = hashlib.md5(data.encode()).hexdigest()
        return urllib.parse.urlencode({"key": self.mac, "md5sum": md5, "data": data}).encode()


@dataclass
class Device:
    """A Wattmon logger: numbered blocks, the next only once the last got `OK`."""

    index: int
    rng: random.Random
    blocks: dict[int, Block] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    pending: Block | None = None

    @property
    def mac(self) -> str:
        low = f"{self.index:04x}"
        return f"02:00:00:00:{low[:2]}:{low[2:]}"

    @property
    def folder(self) -> str:
        return self.mac.replace(":", "")

    def next_block(self) -> Block:
        if self.pending is None:
            seq = len(self.blocks)
            rows = tuple(
                f"2026-11-21 08:{seq // 60 % 60:02d}:{seq % 60:02d},{self.folder},{seq},{i},"
                f"{self.rng.randrange(10**6)}"
                for i in range(self.rng.randint(1, 6))
            )
            self.pending = self.blocks[seq] = Block(self.mac, seq, rows)
        return self.pending

    def acknowledge(self, block: Block) -> None:
        self.acked.add(block.seq)
        if self.pending is block:
            self.pending = None


@dataclass
class Stream:
    """A JSON pusher whose documents carry an Idempotency-Key (safe to resend)."""

    name: str
    docs: dict[int, dict[str, object]] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    pending: int | None = None

    def next_doc(self) -> int:
        if self.pending is None:
            n = len(self.docs)
            self.docs[n] = {"stream": self.name, "n": n, "v": [n * 0.5, None, True], "s": "é"}
            self.pending = n
        return self.pending

    def acknowledge(self, n: int) -> None:
        self.acked.add(n)
        if self.pending == n:
            self.pending = None


class Refused(Exception):
    """Not answered `OK`: the sender keeps the record and resends it."""


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            text = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Refused(repr(exc)) from exc
    if status != 200 or text != b"OK":
        if status == 200 or not text.startswith(b"ERROR"):
            raise AssertionError(f"answer {status} {text[:200]!r}")
        raise Refused(f"{status} {text[:200]!r}")


async def post_block(session: aiohttp.ClientSession, base: str, block: Block) -> None:
    await post(session, f"{base}/wattmon", block.form, FORM)


async def post_doc(session: aiohttp.ClientSession, base: str, stream: Stream, n: int) -> None:
    headers = {"Content-Type": "application/json", "Idempotency-Key": f"{stream.name}-{n}"}
    await post(session, f"{base}/{stream.name}", json.dumps(stream.docs[n]).encode(), headers)


@dataclass
class Tally:
    """Problems by record (or file), so checks repeated over a run count each once."""

    lost: set[str] = field(default_factory=set)
    duplicated: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def add(self, other: Tally, where: str = "") -> None:
        self.lost |= other.lost
        self.duplicated |= other.duplicated
        self.corrupt |= other.corrupt
        self.problems += [f"{where}{p}" for p in other.problems]

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupt)

    def counts(self) -> str:
        return (
            f"lost={len(self.lost)} duplicated={len(self.duplicated)} corrupt={len(self.corrupt)}"
        )


def _read_files(
    folder: Path, pattern: re.Pattern[str], tally: Tally
) -> list[tuple[str, list[str]]]:
    """(file name, lines) in byte-sorted name order; a `.csv` left beside its
    `.csv.gz` by a cut between rename and unlink counts once, if equal."""
    out = []
    names = sorted((p.name for p in folder.iterdir()), key=str.encode)
    for name in names:
        where = f"{folder.name}/{name}"
        if name.startswith(".") or name.endswith(".gz.tmp"):
            continue
        if not pattern.fullmatch(name):
            tally.corrupt.add(f"{where}: unexpected file")
            continue
        try:
            blob = (folder / name).read_bytes()
            if name.endswith(".gz"):
                blob = gzip.decompress(blob)
        except FileNotFoundError:
            raise  # gzipped meanwhile: the caller looks again
        except (OSError, EOFError, zlib.error) as exc:
            tally.corrupt.add(f"{where}: unreadable: {exc}")
            continue
        if name + ".gz" in names:
            try:
                same = gzip.decompress((folder / (name + ".gz")).read_bytes()) == blob
            except FileNotFoundError:
                raise
            except (OSError, EOFError, zlib.error):
                same = False
            if not same:
                tally.corrupt.add(f"{where}: differs from its .gz")
            continue
        if not blob:
            tally.problems.append(f"{where}: empty file (noted, not counted)")
            continue
        if not blob.endswith(b"\n") or b"\0" in blob:
            tally.corrupt.add(f"{where}: torn or zero-filled: ...{blob[-60:]!r}")
        lines = blob.decode("utf-8", "replace").split("\n")
        if lines[-1] == "":
            lines.pop()
        out.append((name, lines))
    return out


def check_device(folder: Path, device: Device, *, complete: bool) -> Tally:
    tally = Tally()
    stored: list[int] = []
    runs: list[list[str]] = []
    if folder.is_dir():
        for name, lines in _read_files(folder, CSV_NAME, tally):
            if not lines or lines[0] != HEADER or lines.count(HEADER) != 1:
                tally.corrupt.add(f"{device.folder}/{name}: not exactly one header first")
            last: tuple[int, str] | None = None
            for line in lines:
                if line == HEADER:
                    continue
                cells = line.split(",")
                if len(cells) != 5 or cells[1] != device.folder or not cells[2].isdigit():
                    tally.corrupt.add(f"{device.folder}/{name}: foreign line {line[:80]!r}")
                    continue
                seq = int(cells[2])
                if cells[3] == "0" or last != (seq, name):
                    stored.append(seq)
                    runs.append([])
                runs[-1].append(line)
                last = (seq, name)
    for seq, rows in zip(stored, runs, strict=True):
        block = device.blocks.get(seq)
        if block is None or tuple(rows) != block.rows:
            tally.corrupt.add(f"{device.folder}: block {seq} partial or altered: {rows[:3]}")
    counts: dict[int, int] = {}
    for seq in stored:
        counts[seq] = counts.get(seq, 0) + 1
    twice = sorted(seq for seq, n in counts.items() if n > 1)
    tally.duplicated |= {f"{device.folder}#{seq}" for seq in twice}
    if twice:
        tally.problems.append(f"{device.folder}: blocks stored more than once: {twice}")
    must = set(device.blocks) if complete else device.acked
    missing = sorted(must - set(counts))
    tally.lost |= {f"{device.folder}#{seq}" for seq in missing}
    if missing:
        tally.problems.append(f"{device.folder}: acknowledged blocks missing: {missing}")
    return tally


def check_stream(folder: Path, stream: Stream, *, complete: bool) -> Tally:
    tally = Tally()
    seen: dict[int, int] = {}
    if folder.is_dir():
        for name, lines in _read_files(folder, JSONL_NAME, tally):
            for line in lines:
                try:
                    record = json.loads(line)
                    n = record["body"]["n"]
                    assert record["body"] == stream.docs[n]
                except (ValueError, KeyError, TypeError, AssertionError):
                    tally.corrupt.add(f"json/{stream.name}/{name}: bad line {line[:80]!r}")
                    continue
                seen[n] = seen.get(n, 0) + 1
    twice = sorted(n for n, c in seen.items() if c > 1)
    tally.duplicated |= {f"json/{stream.name}#{n}" for n in twice}
    if twice:
        tally.problems.append(f"json/{stream.name}: documents stored more than once: {twice}")
    must = set(stream.docs) if complete else stream.acked
    missing = sorted(must - set(seen))
    tally.lost |= {f"json/{stream.name}#{n}" for n in missing}
    if missing:
        tally.problems.append(f"json/{stream.name}: acknowledged documents missing: {missing}")
    return tally


def check_store(
    data_dir: Path, devices: list[Device], streams: list[Stream], *, complete: bool = False
) -> Tally:
    """Every acknowledged record once (with `complete`: every record sent);
    any other at most once; whole lines only."""
    tally = Tally()
    for device in devices:
        tally.add(_settled(check_device, data_dir / "wattmon" / device.folder, device, complete))
    for stream in streams:
        tally.add(_settled(check_stream, data_dir / "json" / stream.name, stream, complete))
    return tally


def _settled(check: Callable[..., Tally], folder: Path, sender: object, complete: bool) -> Tally:
    """The check of a folder that housekeeping did not change meanwhile (a
    file gzipped between listing and reading): tried again."""
    for _ in range(20):
        try:
            return check(folder, sender, complete=complete)
        except FileNotFoundError:
            time.sleep(0.05)
    return check(folder, sender, complete=complete)
