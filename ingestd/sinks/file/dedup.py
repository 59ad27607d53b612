"""The recent block keys of one device, in a compact form.

Keys are 16-byte digests stored back to back in one bytearray, with their
receive times in an array: about 24 bytes a key, against ~150 for a dict.
A lookup is one memory scan of at most 16 KiB (1,000 keys), a few us for
every new block once a device's window is full; so a busy device holding at
least `FILTER_FROM` keys also gets a one-hash filter (4 KiB for 1,000
blocks), a bit per hash value, set for every key held. A clear bit proves a
key new without the scan; a set one (a resend, or a 3-6% chance) goes on to
the scan, which alone decides, so answers are the scan's.

A window loaded from a key file keeps the file's lines as they are ("cold")
and searches them for a key's hex digits: in a fleet larger than
`max_open_files`, a device is loaded for a post or two and closed again,
and parsing 1,000 lines each time cost more than the post. After
`FILTER_AFTER_ADDS` adds the device is busy: the lines are parsed once.
"""

from __future__ import annotations

import re
from array import array

import orjson

KEY_BYTES = 16
KEY_HEX = 2 * KEY_BYTES
FILTER_FROM = 64  # keys held: below, the scan is about as quick as the filter
# Adds before a loaded window parses its lines and gets its filter.
FILTER_AFTER_ADDS = 16
_FILTER_BITS_PER_KEY = 16  # of the most held (twice the window, see add)
# A key file line: the key's hex digits, a space, the receive time, "\n".
_KEY_LINE = re.compile(rb"^([0-9a-f]{32}) ([0-9]+(?:\.[0-9]*)?)\n", re.MULTILINE)


def key_bytes(key: str) -> bytes:
    """A hex key (MD5 or a hashed idempotency key) as 16 bytes."""
    return bytes.fromhex(key[:KEY_HEX])


def parse_key_lines(lines: bytes) -> tuple[bytes, list[float]]:
    """Whole key-file lines to (digests back to back, times), oldest first.
    A line that is not one key and one time is left out."""
    tokens = lines.split()
    keys, stamps = tokens[::2], tokens[1::2]
    try:
        # The usual file, every line "key stamp": read at C speed.
        if len(keys) != len(stamps) or len(keys) != lines.count(b"\n"):
            raise ValueError("not one key and one stamp a line")
        if keys and set(map(len, keys)) != {KEY_HEX}:
            raise ValueError("a key of another length")
        digests = bytes.fromhex(b"".join(keys).decode("ascii"))
        # One JSON array: orjson reads 1,000 stamps in a fraction of what
        # float() a stamp costs. A stamp that is no JSON number goes below.
        times = orjson.loads(b"[%b]" % b",".join(stamps))
    except ValueError:
        # A line garbled (two run together by a short write): line by line.
        found = _KEY_LINE.findall(lines)
        digests = bytes.fromhex(b"".join(key for key, _ in found).decode("ascii"))
        times = [float(ts) for _, ts in found]
    return digests, times


class DedupWindow:
    __slots__ = (
        "_adds",
        "_cold",
        "_cold_lines",
        "_filter",
        "_keys",
        "_mask",
        "_max_age",
        "_max_blocks",
        "_times",
    )

    def __init__(self, max_blocks: int, max_age_secs: float) -> None:
        self._keys = bytearray()
        self._times = array("d")
        self._max_blocks = max_blocks
        self._max_age = max_age_secs
        self._filter: bytearray | None = None
        self._adds = 0  # since this window was made or loaded
        # Key-file lines older than every key in _keys, not parsed yet.
        # While there are any, fewer than max_blocks keys are held and there
        # is no filter (it would not know them): `add` keeps it so.
        self._cold = b""
        self._cold_lines = 0
        # A power of two of bits, minus one: hash(key) & mask picks a bit.
        self._mask = (1 << (2 * max_blocks * _FILTER_BITS_PER_KEY - 1).bit_length()) - 1

    def __len__(self) -> int:
        return len(self._times) + self._cold_lines

    def load(self, lines: bytes) -> None:
        """Start from a key file's whole lines, oldest first (before any add)."""
        assert not self._times and not self._cold, "load before adding"
        # Lines beyond the window may be among them: lookups count lines.
        self._cold = lines[: lines.rfind(b"\n") + 1]  # whole lines only
        self._cold_lines = self._cold.count(b"\n")

    def seen(self, key: bytes, now: float) -> bool:
        """Was `key` stored within the window (last N blocks, not too old)?"""
        bits = self._filter
        if bits is not None:
            # hash() of bytes is cached on the object: add() reuses it.
            h = hash(key) & self._mask
            if not bits[h >> 3] & (1 << (h & 7)):
                return False
        old = len(self._times) - self._max_blocks  # held but out of the window
        low = old * KEY_BYTES if old > 0 else 0
        # The newest copy decides: a key may come back after it aged out.
        pos = self._keys.rfind(key, low)
        while pos != -1:
            if pos % KEY_BYTES == 0:
                return now - self._times[pos // KEY_BYTES] <= self._max_age
            pos = self._keys.rfind(key, low, pos + KEY_BYTES - 1)
        return self._seen_cold(key, now) if self._cold else False

    def _seen_cold(self, key: bytes, now: float) -> bool:
        """`seen` among the unparsed lines, all older than the held keys."""
        cold = self._cold
        needle = key.hex().encode("ascii") + b" "
        end = len(cold)
        while True:  # the newest line that starts with the key
            pos = cold.rfind(needle, 0, end)
            if pos < 0:
                return False
            if pos == 0 or cold[pos - 1] == 0x0A:  # "\n"
                break
            end = pos + len(needle) - 1  # search before this match only
        line_end = cold.index(b"\n", pos)
        newer = len(self._times) + cold.count(b"\n", line_end + 1)
        if newer >= self._max_blocks:
            return False  # out of the window (counting any odd line too)
        try:
            received_at = float(cold[pos + len(needle) : line_end])
        except ValueError:
            return False  # not a key line after all
        return now - received_at <= self._max_age

    def add(self, key: bytes, received_at: float) -> None:
        self._keys += key
        self._times.append(received_at)
        self._adds += 1
        bits = self._filter
        if bits is not None:
            h = hash(key) & self._mask
            bits[h >> 3] |= 1 << (h & 7)
        held = len(self._times)
        if self._cold and held >= self._max_blocks:
            self._cold, self._cold_lines = b"", 0  # all out of the window now
        if held >= 2 * self._max_blocks:
            self._keep_window()  # in bulk, so adding stays O(1) on average
            self._build_filter()  # without the keys dropped
        elif bits is None and self._adds >= FILTER_AFTER_ADDS:
            if self._cold:
                self._parse_cold()  # a busy device: scans from now on
            if len(self._times) >= FILTER_FROM:
                self._build_filter()

    def _parse_cold(self) -> None:
        """The cold lines into the held keys (they are older: in front)."""
        digests, times = parse_key_lines(self._cold)
        self._keys[:0] = digests
        self._times = array("d", times) + self._times
        self._cold, self._cold_lines = b"", 0
        self._keep_window()

    def _keep_window(self) -> None:
        """Forget the keys older than the last max_blocks."""
        drop = len(self._times) - self._max_blocks
        if drop > 0:
            del self._keys[: drop * KEY_BYTES]
            del self._times[:drop]

    def _build_filter(self) -> None:
        if len(self._times) < FILTER_FROM:
            self._filter = None
            return
        bits = bytearray((self._mask >> 3) + 1)
        keys, mask = bytes(self._keys), self._mask
        for pos in range(0, len(keys), KEY_BYTES):
            h = hash(keys[pos : pos + KEY_BYTES]) & mask
            bits[h >> 3] |= 1 << (h & 7)
        self._filter = bits
