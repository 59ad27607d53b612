"""The recent block keys of one device, in a compact form.

Keys are 16-byte digests stored back to back in one bytearray, with their
receive times in an array: about 24 bytes a key, against ~150 for a dict.
A lookup is one memory scan of at most a few KiB.
"""

from __future__ import annotations

from array import array

KEY_BYTES = 16


def key_bytes(key: str) -> bytes:
    """A hex key (MD5 or a hashed idempotency key) as 16 bytes."""
    return bytes.fromhex(key[: KEY_BYTES * 2])


class DedupWindow:
    __slots__ = ("_keys", "_max_age", "_max_blocks", "_times")

    def __init__(self, max_blocks: int, max_age_secs: float) -> None:
        self._keys = bytearray()
        self._times = array("d")
        self._max_blocks = max_blocks
        self._max_age = max_age_secs

    def __len__(self) -> int:
        return len(self._times)

    def seen(self, key: bytes, now: float) -> bool:
        """Was `key` stored within the window (last N blocks, not too old)?"""
        low = max(len(self._times) - self._max_blocks, 0) * KEY_BYTES
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
        if len(self._times) >= 2 * self._max_blocks:
            # Trim in bulk so adding stays O(1) on average.
            drop = len(self._times) - self._max_blocks
            del self._keys[: drop * KEY_BYTES]
            del self._times[:drop]
