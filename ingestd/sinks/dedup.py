"""The recent block keys of one device, in a compact form.

Keys are 16-byte digests stored back to back in one bytearray, with their
receive times in an array: about 24 bytes a key, against ~150 for a dict.
A lookup is one memory scan of at most 16 KiB (1,000 keys), a few us for
every new block once a device's window is full; so a device holding at least
`FILTER_FROM` keys also gets a one-hash filter (4 KiB for 1,000 blocks), a
bit per hash value, set for every key held. A clear bit proves a key new
without the scan; a set one (a resend, or a 3-6% chance) goes on to the scan,
which alone decides, so answers are the scan's.
"""

from __future__ import annotations

from array import array

KEY_BYTES = 16
FILTER_FROM = 64  # keys held: below, the scan is about as quick as the filter
# Adds before a window gets its filter: a window loaded from a key file
# (1,000 keys) waits for that many, as a device of a fleet larger than
# `max_open_files` is mostly closed again after a post or two, and building
# the filter costs more than a few hundred scans.
FILTER_AFTER_ADDS = 16
_FILTER_BITS_PER_KEY = 16  # of the most held (twice the window, see add)


def key_bytes(key: str) -> bytes:
    """A hex key (MD5 or a hashed idempotency key) as 16 bytes."""
    return bytes.fromhex(key[: KEY_BYTES * 2])


class DedupWindow:
    __slots__ = ("_adds", "_filter", "_keys", "_mask", "_max_age", "_max_blocks", "_times")

    def __init__(self, max_blocks: int, max_age_secs: float) -> None:
        self._keys = bytearray()
        self._times = array("d")
        self._max_blocks = max_blocks
        self._max_age = max_age_secs
        self._filter: bytearray | None = None
        self._adds = 0  # one by one, since this window was made or loaded
        # A power of two of bits, minus one: hash(key) & mask picks a bit.
        self._mask = (1 << (2 * max_blocks * _FILTER_BITS_PER_KEY - 1).bit_length()) - 1

    def __len__(self) -> int:
        return len(self._times)

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
        return False

    def add(self, key: bytes, received_at: float) -> None:
        self._keys += key
        self._times.append(received_at)
        self._adds += 1
        bits = self._filter
        if bits is not None:
            h = hash(key) & self._mask
            bits[h >> 3] |= 1 << (h & 7)
        held = len(self._times)
        if held >= 2 * self._max_blocks:
            # Trim in bulk so adding stays O(1) on average.
            drop = held - self._max_blocks
            del self._keys[: drop * KEY_BYTES]
            del self._times[:drop]
            self._build_filter()  # without the keys dropped
        elif bits is None and held >= FILTER_FROM and self._adds >= FILTER_AFTER_ADDS:
            self._build_filter()

    def extend(self, keys: bytes, times: list[float]) -> None:
        """`add` for many keys at once, oldest first (a key file's tail):
        the same answers after, without a call per key. The filter waits
        for FILTER_AFTER_ADDS adds (the scan alone answers until then)."""
        assert len(keys) == KEY_BYTES * len(times)
        self._keys += keys
        self._times.extend(times)
        held = len(self._times)
        if held >= 2 * self._max_blocks:
            drop = held - self._max_blocks
            del self._keys[: drop * KEY_BYTES]
            del self._times[:drop]
        self._filter = None
        self._adds = 0

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
