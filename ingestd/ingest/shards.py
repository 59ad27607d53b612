"""Storage sharded by device over the worker processes.

Each worker owns the devices whose `shard_of` is its id: it alone stores
them (its own log, group commit, files, resend keys), so a resend that
reaches another worker is still a duplicate where it matters, and no file
gets lines from two writers. A worker's `ShardRouter` sends a post of its
own devices to its pipeline, and hands any other to the owner (over the
socket of ingestd.runtime.handoff), which answers once it has stored it.

Per-device limits are applied by the owner, where every post of a device
meets, whichever worker took it; a post whose path names a device this
worker owns (a JSON stream) is also checked before its body is read.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

from ingestd.errors import IngestError
from ingestd.ingest.pipeline import Item, Pipeline
from ingestd.records import Outcome

# Hand an item to the owner shard: the future of its answer.
Forward = Callable[[int, Item], "asyncio.Future[Outcome]"]


def shard_of(protocol: str, device_id: str, shards: int) -> int:
    """The shard (worker id) that stores a device. Stable across restarts
    for one shard count; CRC32 rather than hash(), which differs per process."""
    if shards == 1:
        return 0
    return zlib.crc32(f"{protocol}/{device_id}".encode()) % shards


class ShardRouter:
    """Where the ingest service submits in a worker: the local pipeline for
    the shard's own devices, the owner's socket for the others."""

    def __init__(
        self,
        shard: int,
        shards: int,
        local: Pipeline,
        forward: Forward,
        admit: Callable[[Item], None],
    ) -> None:
        self.shard = shard
        self.shards = shards
        self._local = local
        self._forward = forward
        self._admit = admit  # the per-device limits: raises the refusal

    def owns(self, protocol: str, device_id: str) -> bool:
        """Whether this shard stores the device (and holds its limits)."""
        return shard_of(protocol, device_id, self.shards) == self.shard

    def try_submit(self, item: Item) -> asyncio.Future[Outcome]:
        """As `Pipeline.try_submit`, but never None: an item of another shard
        is handed over, one for a full local queue waits for room in a task
        (admitted once, here). Raises the refusal of a limit."""
        owner = shard_of(item.protocol, item.device_id, self.shards)
        if owner != self.shard:
            return self._forward(owner, item)
        self._admit(item)
        future = self._local.try_submit(item)
        if future is None:
            return asyncio.ensure_future(self._local.submit(item))
        return future

    async def submit(self, item: Item) -> Outcome:
        return await self.try_submit(item)

    def accept(self, item: Item) -> asyncio.Future[Outcome]:
        """An item another worker handed over: admitted and queued here; a
        refusal comes back in the future."""
        try:
            return self.try_submit(item)
        except IngestError as exc:
            refused: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            refused.set_exception(exc)
            return refused
