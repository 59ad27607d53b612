"""ingestd with its storage skipped: the ceiling of the request path.

    python3 bench/ceiling_server.py serve [ingestd serve options]

Runs the real daemon (fast path, access checks, parsing, de-duplication
keys, the queue and its batches, the answers) but the file sink's commit
answers every record as stored without touching the disk. Nothing here is
a product mode: it tells how fast ingestd could be if storing cost nothing,
so a throughput target can be checked against what the HTTP and parsing
work alone allow.
"""

from __future__ import annotations

import sys

from ingestd.cli import main
from ingestd.records import Outcome
from ingestd.sinks.file.sink import FileSink


async def commit_nothing(self: FileSink, items: list[object]) -> list[Outcome]:
    return [Outcome.STORED] * len(items)


if __name__ == "__main__":
    FileSink.commit = commit_nothing  # type: ignore[method-assign]
    sys.exit(main())
