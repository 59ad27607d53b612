"""Log lines for journald: one event per line, `key=value` or JSON."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

MAX_QUEUED_RECORDS = 10_000


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " " + ascii(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never blocks the event loop.

    If stderr stalls (journald busy, a pipe nobody reads) and the queue
    fills, records are dropped and counted rather than stopping the daemon.
    """

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            DroppingQueueHandler.dropped += 1


class _Output:
    """The process's one log writer thread (logging is process-wide)."""

    stream: logging.StreamHandler[Any] | None = None
    listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr from a thread of its own; call again to change level or format."""
    formatter = JsonFormatter() if fmt == "json" else PlainFormatter()
    if _Output.stream is None:
        _Output.stream = logging.StreamHandler(sys.stderr)
        records: queue.Queue[logging.LogRecord] = queue.Queue(MAX_QUEUED_RECORDS)
        _Output.listener = logging.handlers.QueueListener(records, _Output.stream)
        _Output.listener.start()
        atexit.register(flush_logs)  # writes what is still queued
        logging.getLogger().handlers[:] = [DroppingQueueHandler(records)]
    _Output.stream.setFormatter(formatter)
    root = logging.getLogger()
    root.setLevel(level.upper())
    # aiohttp logs every bad request line at error level: that is a client's
    # problem, not ours, and would let anyone flood the journal.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def flush_logs() -> None:
    """Write every queued line now (before os._exit, which skips atexit)."""
    if _Output.listener is not None:
        _Output.listener.stop()
        _Output.listener = None


class Throttle:
    """At most `per_sec` lines a second per kind of event (bursts of
    `burst`); says how many were held back, so a flood of refusals cannot
    flood the journal while every one is still counted in the metrics."""

    def __init__(self, per_sec: float = 10.0, burst: int = 20) -> None:
        self._rate = per_sec
        self._burst = float(burst)
        self._state: dict[str, tuple[float, float, int]] = {}  # tokens, at, held

    def allow(self, kind: str) -> tuple[bool, int]:
        """(log it?, lines held back since the last one logged)."""
        now = time.monotonic()
        tokens, at, held = self._state.get(kind, (self._burst, now, 0))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._state[kind] = (tokens, now, held + 1)
            return False, 0
        self._state[kind] = (tokens - 1.0, now, 0)
        return True, held
