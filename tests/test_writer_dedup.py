"""The dedup window's filter changes how fast it answers, never what."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from ingestd.sinks.file.dedup import FILTER_AFTER_ADDS, FILTER_FROM, DedupWindow, parse_key_lines
from ingestd.sinks.file.device import KEYS_NAME, DeviceFiles, Settings


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


@pytest.mark.parametrize(
    ("seed", "max_blocks"), [(s, b) for s in range(4) for b in (1, 20, 40, 100, 1000)]
)
def test_a_window_loaded_from_key_lines_answers_as_a_plain_list(seed, max_blocks):
    """Loaded lines are searched as they are, then parsed once the device
    is busy, then pushed out by newer keys: the answers never change."""
    rng = random.Random(seed)
    count = rng.choice([0, 1, max_blocks // 2, max_blocks - 1, max_blocks, max_blocks + 7])
    loaded = [(hashlib.md5(b"%d-%d" % (seed, i)).digest(), float(i)) for i in range(count)]
    if count > 3 and rng.random() < 0.5:
        loaded[-1] = (loaded[1][0], loaded[-1][1])  # a key stored twice: the newest decides
    window, plain = DedupWindow(max_blocks, 500.0), PlainWindow(max_blocks, 500.0)
    window.load(b"".join(b"%s %.3f\n" % (key.hex().encode(), at) for key, at in loaded))
    for key, at in loaded:
        plain.add(key, at)
    now = float(count) + rng.choice([0.0, 400.0])  # some loaded keys near their age limit
    for i in range(3 * max_blocks + 2 * FILTER_AFTER_ADDS + 50):
        now += rng.choice([0.0, 1.0, 40.0])
        fresh = hashlib.md5(b"new %d-%d" % (seed, i)).digest()
        key = fresh if not loaded or rng.random() < 0.5 else rng.choice(loaded)[0]
        assert window.seen(key, now) == plain.seen(key, now), i
        if rng.random() < 0.8:
            window.add(key, now)
            plain.add(key, now)
        assert len(window) <= 2 * max_blocks + 7


def test_parsed_key_lines_leave_out_what_is_not_one_key_and_one_time():
    good = [hashlib.md5(b"%d" % i).hexdigest().encode() for i in range(3)]
    lines = b"%s 1.500\n%s\n%s 2.000 extra\n%s 3.250\n" % (good[0], good[1], good[2], good[2])
    digests, times = parse_key_lines(lines)
    assert digests == bytes.fromhex((good[0] + good[2]).decode())
    assert times == [1.5, 3.25]


def key_line(i: int, at: float) -> bytes:
    return b"%s %.3f\n" % (hashlib.md5(b"%d" % i).hexdigest().encode(), at)


def load_device(folder: Path, keys_file: bytes, window_blocks: int) -> DeviceFiles:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEYS_NAME).write_bytes(keys_file)
    settings = Settings("day", 1 << 20, window_blocks, 3600.0)
    return DeviceFiles.load(folder, "wattmon/x", "csv", settings)


@pytest.mark.parametrize("window_blocks", [1, 10])
@pytest.mark.parametrize("first_stamp", [100.0, 1_795_248_000.0])  # 41- and 48-byte lines
def test_the_key_file_tail_is_the_window(tmp_path, window_blocks, first_stamp):
    count = 5 * window_blocks + 1
    lines = [key_line(i, first_stamp + i) for i in range(count)]
    device = load_device(tmp_path / "d", b"".join(lines), window_blocks=window_blocks)
    now = first_stamp + count
    for i in range(count):
        digest = hashlib.md5(b"%d" % i).digest()
        # The last keys, as many as the window holds, are remembered; no older one.
        assert device.window.seen(digest, now) == (i >= count - window_blocks), i


def test_a_torn_or_foreign_line_in_the_key_file_costs_only_itself(tmp_path):
    lines = [key_line(i, 100.0 + i) for i in range(6)]
    torn = lines[5][:40]  # a crash cut the last write, in its time
    glued = lines[2][:10] + lines[3]  # a torn line and the next one, run together
    keys_file = lines[0] + b"not a key line\n" + lines[1] + glued + lines[4] + torn
    device = load_device(tmp_path / "d", keys_file, window_blocks=100)
    answers = [device.window.seen(hashlib.md5(b"%d" % i).digest(), 200.0) for i in range(6)]
    assert answers == [True, True, False, False, True, False]
