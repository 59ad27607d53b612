"""The dedup window's filter changes how fast it answers, never what."""

from __future__ import annotations

import hashlib
import random

import pytest

from ingestd.sinks.dedup import FILTER_FROM, DedupWindow


class PlainWindow:
    """The window as a list, newest last: what DedupWindow must answer."""

    def __init__(self, max_blocks: int, max_age: float) -> None:
        self.entries: list[tuple[bytes, float]] = []
        self.max_blocks, self.max_age = max_blocks, max_age

    def seen(self, key: bytes, now: float) -> bool:
        for held, at in reversed(self.entries[-self.max_blocks :]):
            if held == key:
                return now - at <= self.max_age
        return False

    def add(self, key: bytes, at: float) -> None:
        self.entries.append((key, at))


@pytest.mark.parametrize(
    ("seed", "max_blocks"), [(s, b) for s in range(4) for b in (1, 20, 40, 100, 1000)]
)
def test_same_answers_as_a_plain_list(seed, max_blocks):
    rng = random.Random(seed)
    window, plain = DedupWindow(max_blocks, 50.0), PlainWindow(max_blocks, 50.0)
    keys: list[bytes] = []
    now = 0.0
    for i in range(6 * max_blocks + 200):
        now += rng.choice([0.0, 0.5, 3.0])
        if keys and rng.random() < 0.3:
            # A resend: recent, from far back (aged out or beyond the window)
            key = rng.choice(keys[-3:] if rng.random() < 0.5 else keys)
        else:
            key = hashlib.md5(b"%d-%d" % (seed, i)).digest()
        assert window.seen(key, now) == plain.seen(key, now), i
        if rng.random() < 0.9:
            window.add(key, now)
            plain.add(key, now)
            keys.append(key)
        assert len(window) <= 2 * max_blocks


def test_a_key_that_shares_its_filter_bit_is_still_new():
    window = DedupWindow(1000, 3600.0)
    held = [hashlib.md5(b"%d" % i).digest() for i in range(FILTER_FROM + 500)]
    for key in held:
        window.add(key, 0.0)
    fresh = [hashlib.md5(b"new %d" % i).digest() for i in range(20_000)]
    # Some of these hit a set bit (about 1 in 60 here) and are scanned for.
    assert not any(window.seen(key, 1.0) for key in fresh)
    assert all(window.seen(key, 1.0) for key in held)
