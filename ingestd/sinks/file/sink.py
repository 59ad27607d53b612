"""The file sink: per-device files under the data directory, group commit.

One writer thread does all disk work, a batch at a time:
1. plan every record (dedup, rotation, offsets) in memory;
2. append the whole batch to the write-ahead log and fdatasync it once;
3. append each device's bytes to its file (no fsync: the log has them);
4. every `checkpoint_secs`, or when the log grows large, fsync the files
   written since the last checkpoint and empty the log.
A record is acknowledged after step 3. After a crash, `recover()` replays
the log, which restores every acknowledged block at its offset and cuts
whatever followed it (never acknowledged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import BinaryIO, TypeVar, TypeVarTuple

from ingestd.config import StorageConfig
from ingestd.errors import IngestError, StorageFailed
from ingestd.protocols.jsonpost import rfc3339
from ingestd.protocols.registry import PROTOCOLS
from ingestd.records import Outcome, Quarantined, Record
from ingestd.runtime.logs import Throttle
from ingestd.sinks.file import quarantine
from ingestd.sinks.file.device import (
    FILE_MODE,
    KEYS_NAME,
    DeviceFiles,
    PlannedWrite,
    Settings,
    fsync_dir,
    make_dirs_durably,
    sync_paths,
)
from ingestd.sinks.file.lock import DataDirLock
from ingestd.sinks.file.rotation import parse_file_name, period_of
from ingestd.sinks.file.wal import WriteAheadLog, all_log_names, log_names, read_log

log = logging.getLogger("ingestd.storage")

T = TypeVar("T")
Args = TypeVarTuple("Args")

CHECKPOINT_WAL_BYTES = 64 * 1024 * 1024
MAX_UNSYNCED_PATHS = 65536
PROBE_BYTES = 64 * 1024

Result = Outcome | IngestError


class FileSink:
    """The files of a data dir (`shard` None), or of one storage shard.

    A shard is a worker process's part of the devices (see
    ingestd/ingest/shards.py): its own log pair, under a data dir whose lock
    the main process holds and whose logs it replayed before the workers
    started; the shard replays its own only, after its worker died.
    """

    def __init__(self, data_dir: Path, config: StorageConfig, *, shard: int | None = None) -> None:
        self.data_dir = data_dir
        self.shard = shard
        self._log_names = log_names(shard)
        self._config = config
        self._settings = Settings(
            rotate_period=config.rotate_period,
            max_file_bytes=config.max_file_bytes,
            dedup_window_blocks=config.dedup_window_blocks,
            dedup_window_secs=config.dedup_window_secs,
        )
        self._sync = config.fsync == "always"
        self._devices: OrderedDict[tuple[str, str], DeviceFiles] = OrderedDict()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingestd-writer")
        self._wal: WriteAheadLog | None = None
        self._last_checkpoint = time.monotonic()
        self._new_dirs: set[Path] = set()
        # Paths a checkpoint must fsync (files closed since the last one).
        self._unsynced: set[str] = set()
        self._orphan_keys: list[tuple[Path, list[str]]] = []
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="ingestd-checkpoint")
        self._checkpointing: tuple[int, list[str], Future[None]] | None = None
        self._retry_index: int | None = None
        # Called with ("log_sync" | "write", seconds) from the writer thread,
        # ("checkpoint_sync", seconds) from the checkpoint thread.
        self.observe: Callable[[str, float], None] | None = None
        self._lock = DataDirLock(data_dir)
        # A full disk refuses every post: one log line per refusal would
        # flood the journal (the metrics still count each one).
        self._failure_log = Throttle(per_sec=1.0, burst=5)

    @property
    def open_devices(self) -> int:
        return len(self._devices)

    def current_file(self, protocol: str, device_id: str) -> str | None:
        """The file an open device is writing, relative to the data dir."""
        device = self._devices.get((protocol, device_id))
        current = device.current if device is not None else None
        if current is None:
            return None
        return f"{protocol}/{device_id}/{current.name.name}"

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_blocking)

    def _open_blocking(self) -> None:
        if self.shard is not None:
            epoch = self.recover(self._log_names)
            self._wal = WriteAheadLog(
                self.data_dir, sync=self._sync, epoch=epoch, names=self._log_names
            )
            fsync_dir(self.data_dir)
            return
        make_dirs_durably(self.data_dir)
        # Before anything in the folder is read: a second instance must not
        # replay (and cut) the live daemon's files.
        self._lock.acquire()
        try:
            epoch = self.recover()
            # Logs a worker-mode run left: replayed above, gone before
            # anything new is logged, or a later replay would cut it.
            remove_logs(self.data_dir, keep=self._log_names)
            self._wal = WriteAheadLog(self.data_dir, sync=self._sync, epoch=epoch)
            # The log files' entries: acknowledged blocks live only in them
            # until the first checkpoint.
            fsync_dir(self.data_dir)
        except BaseException:
            self._lock.release()
            raise

    def take_over(self) -> DataDirLock:
        """Worker mode, in the main process before any worker starts: lock
        the data dir, replay every log any earlier run left (of any shard
        count) and remove them, so each shard starts on a log of its own.
        The lock is the caller's to hold while the workers run."""
        make_dirs_durably(self.data_dir)
        self._lock.acquire()
        try:
            self.recover()
            remove_logs(self.data_dir, keep=())
        except BaseException:
            self._lock.release()
            raise
        return self._lock

    async def close(self) -> None:
        """Sync and close everything; the log ends empty (a clean stop)."""
        try:
            await self._run(self._close_blocking)
        finally:
            # The close job has finished, so the thread is idle: no need to
            # block the loop joining it.
            self._executor.shutdown(wait=False)

    def _close_blocking(self) -> None:
        if self._wal is None:
            return
        for ident in list(self._devices):
            self._drop(ident)
        # A clean stop: everything synced here, both logs left empty.
        if self._checkpointing is not None:
            _, paths, future = self._checkpointing
            if future.exception() is not None:
                self._unsynced.update(paths)
        try:
            self._sync_now(self._take_paths_to_sync())
        except OSError as exc:
            log.error("final_sync_failed error=%s: the log keeps the writes", exc.strerror)
        else:
            self._wal.checkpointed(0)
            self._wal.checkpointed(1)
        self._syncer.shutdown(wait=True)
        self._wal.close()
        self._wal = None
        if self.shard is None:
            self._lock.release()

    async def reopen(self) -> None:
        """Close every device's handles; the next write opens them again, so
        files moved away by an external tool are started afresh."""
        await self._run(self._reopen_blocking)

    def _reopen_blocking(self) -> None:
        for ident in list(self._devices):
            self._drop(ident)

    async def _run(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def probe(self) -> None:
        """Raise OSError unless storage takes a write of a batch's size again."""
        await self._run(self._probe_blocking)

    def _probe_blocking(self) -> None:
        # One per shard: the shards probe at once when the disk fills.
        suffix = "" if self.shard is None else f".s{self.shard}"
        path = self.data_dir / f".ingestd-probe{suffix}"
        try:
            write_durably(path, bytes(PROBE_BYTES))
        finally:
            path.unlink(missing_ok=True)

    # -- the commit --------------------------------------------------------------

    async def commit(self, items: list[Record | Quarantined]) -> list[Result]:
        """Store a batch; one result per item, in order."""
        return await self._run(self._commit_blocking, items)

    def _commit_blocking(self, items: list[Record | Quarantined]) -> list[Result]:
        assert self._wal is not None, "sink is not open"
        results: list[Result | None] = [None] * len(items)
        # Per device, in the order devices first appear: the indexes of its
        # items and their planned writes (the log frames them in this order).
        plans: dict[tuple[str, str], tuple[list[int], list[PlannedWrite]]] = {}
        # Duplicates answer OK only if their device's writes in this batch
        # succeed: the copy they duplicate may be in this very batch.
        duplicates: dict[tuple[str, str], list[int]] = {}
        devices = self._devices
        rotate_period = self._settings.rotate_period
        hour, period = None, ""  # a batch's records mostly share their hour
        now = time.monotonic()
        for i, item in enumerate(items):
            if isinstance(item, Quarantined):
                results[i] = self._quarantine(item)
                continue
            ident = (item.protocol, item.device_id)
            device = devices.get(ident)
            # Check a device's files once, before this batch plans writes
            # that make its in-memory size run ahead of the disk. Inline when
            # it is open and was checked within the second (as in a burst).
            if device is not None and (
                now < device.recheck_at or ident in plans or ident in duplicates
            ):
                devices.move_to_end(ident)
            else:
                try:
                    device = self._device(
                        ident, verify=ident not in plans and ident not in duplicates
                    )
                except OSError as exc:
                    results[i] = self._failed(ident, exc)
                    continue
            if item.received_at // 3600 != hour:
                hour = item.received_at // 3600
                period = period_of(item.received_at, rotate_period)  # type: ignore[arg-type]
            write = device.plan(item, period)
            if write is None:
                duplicates.setdefault(ident, []).append(i)
            elif (planned := plans.get(ident)) is None:
                plans[ident] = ([i], [write])
            else:
                planned[0].append(i)
                planned[1].append(write)

        outcomes: dict[tuple[str, str], Result] = {}
        started = time.perf_counter()
        try:
            if plans:
                self._wal.append_writes(chain.from_iterable(w for _, w in plans.values()))
                self._observe("log_sync", started)
        except OSError as exc:
            for ident in plans:
                outcomes[ident] = self._failed(ident, exc)
        else:
            started = time.perf_counter()
            for ident, (_, writes) in plans.items():
                try:
                    devices[ident].apply(writes)
                    outcomes[ident] = Outcome.STORED
                except OSError as exc:
                    outcomes[ident] = self._failed(ident, exc)
                    self._void(ident, writes)
            if plans:
                self._observe("write", started)

        for ident, (indexes, _) in plans.items():
            outcome = outcomes[ident]
            for i in indexes:
                results[i] = outcome
        for ident, indexes in duplicates.items():
            outcome = outcomes.get(ident, Outcome.DUPLICATE)
            for i in indexes:
                results[i] = Outcome.DUPLICATE if outcome is Outcome.STORED else outcome

        if len(devices) > self._config.max_open_files:
            self._evict(keep=plans.keys() | duplicates.keys())
        self._checkpoint_if_due()
        return [r if r is not None else StorageFailed("internal error") for r in results]

    def _observe(self, what: str, started: float) -> None:
        if self.observe is not None:
            self.observe(what, time.perf_counter() - started)

    def _device(self, ident: tuple[str, str], *, verify: bool) -> DeviceFiles:
        device = self._devices.get(ident)
        if device is not None and verify and not device.intact(time.monotonic()):
            log.warning("file_moved_away protocol=%s device=%s: starting a new one", *ident)
            self._drop(ident)
            device = None
        if device is None:
            protocol, device_id = ident
            folder = self.data_dir / protocol / device_id
            if not folder.is_dir():
                self._new_dirs.update((folder.parent, self.data_dir))
            device = DeviceFiles.load(
                folder, f"{protocol}/{device_id}", PROTOCOLS[protocol].ext, self._settings
            )
            self._devices[ident] = device
        self._devices.move_to_end(ident)
        return device

    def _failed(self, ident: tuple[str, str], exc: OSError, *, drop: bool = True) -> StorageFailed:
        """Log a failed write; by default forget the device's state, so its
        files are loaded again from the disk (the truth after a roll-back)."""
        allowed, held = self._failure_log.allow("storage_failed")
        if allowed:
            log.error(
                "storage_failed protocol=%s device=%s error=%s held_back=%d",
                ident[0],
                ident[1],
                json.dumps(exc.strerror or str(exc)),
                held,
            )
        if drop:
            self._drop(ident)
        return StorageFailed(f"storage failed ({exc.strerror or 'I/O error'}); retry later")

    def _void(self, ident: tuple[str, str], writes: list[PlannedWrite]) -> None:
        """Tell a later replay that these logged writes were rolled back."""
        # A void frame is its write's frame without the data.
        voids = [(w[0], w[1], w[2], b"") for w in reversed(writes)]
        assert self._wal is not None
        try:
            self._wal.append_writes(voids)
        except OSError:
            log.error("void_failed protocol=%s device=%s", *ident)

    def _drop(self, ident: tuple[str, str]) -> None:
        device = self._devices.pop(ident, None)
        if device is None:
            return
        try:
            self._unsynced.update(device.close())
        except OSError:
            # Its keys could not be written: keep them for the next checkpoint,
            # which cannot succeed before they are on disk.
            self._orphan_keys.append((device.folder, device.take_pending_keys()))
            self._unsynced.update(device.unsynced)

    def _evict(self, keep: set[tuple[str, str]]) -> None:
        """Close the least recently used devices beyond `max_open_files`."""
        while len(self._devices) > self._config.max_open_files:
            ident = next(iter(self._devices))
            if ident in keep:
                break
            self._drop(ident)

    # -- checkpoint and recovery -----------------------------------------------------

    def _checkpoint_if_due(self) -> None:
        """Start a checkpoint in the background: sync what the log describes,
        then recycle it. The writer goes on meanwhile with the other log."""
        assert self._wal is not None
        if self._checkpointing is not None:
            synced_index, synced_paths, future = self._checkpointing
            if not future.done():
                return
            self._checkpointing = None
            if future.exception() is None:
                self._wal.checkpointed(synced_index)
            else:
                log.error("checkpoint_failed error=%s: retrying", future.exception())
                self._unsynced.update(synced_paths)
                self._retry_index = synced_index
        due = (
            time.monotonic() - self._last_checkpoint > self._config.checkpoint_interval_secs
            or self._wal.size > CHECKPOINT_WAL_BYTES
            or len(self._unsynced) > MAX_UNSYNCED_PATHS
        )
        if not due:
            return
        index = self._retry_index if self._retry_index is not None else self._wal.switch()
        if index is None:
            return
        self._retry_index = None
        try:
            ordered = self._take_paths_to_sync()
        except OSError:
            self._retry_index = index
            return
        # Spread over half the interval: done well before the next one is due.
        spread = self._config.checkpoint_interval_secs / 2
        job = self._syncer.submit(self._sync_now, ordered, spread)
        self._checkpointing = (index, ordered, job)
        self._last_checkpoint = time.monotonic()

    def _take_paths_to_sync(self) -> list[str]:
        """Every file and folder whose writes the log alone holds durable,
        files before the folders they are in, parents last; they count as
        synced from here (the caller puts them back if the sync fails).
        Raises OSError, taking nothing, if orphaned keys cannot be written."""
        # First: the checkpoint cannot succeed before these are on disk.
        orphan_key_files = self._write_orphan_keys()
        paths = set(self._unsynced)
        paths.update(orphan_key_files)
        self._unsynced.clear()
        for ident, device in list(self._devices.items()):
            try:
                paths.update(device.checkpoint_paths())
            except OSError as exc:
                self._failed(ident, exc)
        paths.update(f"{folder}/" for folder in self._new_dirs)
        self._new_dirs.clear()
        # (Folders end in "/": known without a stat, which would cost
        # 1,000s here.)
        return sorted(paths, key=lambda p: (p.endswith("/"), -p.count("/")))

    def _sync_now(self, paths: list[str], spread_secs: float = 0.0) -> None:
        if self._sync:
            busy = sync_paths(paths, spread_secs)
            # Whether checkpoints keep up: a large fleet's files take long
            # to sync, and the log grows until they are.
            if self.observe is not None:
                self.observe("checkpoint_sync", busy)

    def _write_orphan_keys(self) -> list[str]:
        written = []
        try:
            while self._orphan_keys:
                folder, lines = self._orphan_keys[0]
                with open(folder / KEYS_NAME, "a", encoding="ascii") as fh:
                    fh.write("".join(lines))
                written.append(str(folder / KEYS_NAME))
                self._orphan_keys.pop(0)
        except OSError:
            # Those already written still need their sync.
            self._unsynced.update(written)
            raise
        return written

    def recover(self, names: tuple[str, ...] | None = None) -> int:
        """Replay the log of an unclean stop: restore, cut torn tails, sync.
        `names`: the log files to replay; by default every one there is.

        Returns the log's epoch, so the next log is told apart from it.
        """
        ends: dict[Path, int] = {}
        keys: dict[Path, list[tuple[str, float]]] = {}
        epoch, frames = read_log(self.data_dir, names)
        for frame in frames:
            path = self._checked_path(frame.relpath)
            if path is None:
                log.error("wal_bad_path path=%s: skipped", json.dumps(frame.relpath))
                continue
            # Closed and compressed after it was written: the .gz is whole
            # (synced before the original went). Its blocks' keys may still
            # be only in this log, so they are replayed all the same.
            compressed = path.with_name(path.name + ".gz").exists()
            if not compressed:
                path.parent.mkdir(parents=True, exist_ok=True)
            folder_keys = keys.setdefault(path.parent, [])
            if frame.data:
                if not compressed:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
                    try:
                        os.pwrite(fd, frame.data, frame.offset)
                    finally:
                        os.close(fd)
                if frame.key is not None:
                    folder_keys.append((frame.key, frame.received_at))
            elif frame.key is not None and (frame.key, frame.received_at) in folder_keys:
                # A void frame: that write was rolled back, so was its key.
                folder_keys.remove((frame.key, frame.received_at))
            if not compressed:
                ends[path] = frame.offset + len(frame.data)
        for path, end in ends.items():
            size = path.stat().st_size if path.exists() else 0
            if size > end:
                log.warning(
                    "torn_tail_cut file=%s bytes=%d: never acknowledged",
                    json.dumps(str(path.relative_to(self.data_dir))),
                    size - end,
                )
            if end == 0:
                path.unlink(missing_ok=True)
                continue
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        for folder, folder_keys in keys.items():
            if folder_keys:
                with open(folder / KEYS_NAME, "a+b") as fh:
                    cut_torn_line(fh)
                    # A checkpoint may have written some of them already:
                    # lines written twice would shrink the dedup window.
                    present = _tail_lines(fh, len(folder_keys) + self._settings.dedup_window_blocks)
                    lines = [f"{key} {ts:.3f}\n".encode("ascii") for key, ts in folder_keys]
                    fh.write(b"".join(line for line in lines if line not in present))
                    # Flushed before the fsync: the log is reset next, and
                    # these keys alone then tell a resend from a new block.
                    fh.flush()
                    os.fsync(fh.fileno())
        # Deepest first, the data directory last: replay may have re-created
        # any level (a device folder, `wattmon/`).
        folders = {p.parent for p in ends} | {f for f, folder_keys in keys.items() if folder_keys}
        for folder in sorted(folders | {f.parent for f in folders}, key=lambda f: -len(f.parts)):
            fsync_dir(folder)
        if folders:
            fsync_dir(self.data_dir)
        if ends:
            log.warning("recovered_from_log files=%d", len(ends))
        return epoch

    def _checked_path(self, relpath: str) -> Path | None:
        """A logged path, only if it names a device file inside the data dir."""
        parts = relpath.split("/")
        if len(parts) != 3 or parts[0] not in PROTOCOLS:
            return None
        protocol, device_id, name = parts
        parsed = parse_file_name(name)
        form = PROTOCOLS[protocol]
        if not form.device_id.fullmatch(device_id) or parsed is None:
            return None
        if parsed.ext != form.ext:
            return None
        return self.data_dir / protocol / device_id / name

    # -- quarantine ------------------------------------------------------------------

    def _quarantine(self, block: Quarantined) -> Result:
        """Keep a bad block verbatim, named by its MD5, so a resend is a no-op."""
        try:
            folder = quarantine.folder(self.data_dir, block.device_id, block.protocol)
        except ValueError:
            # Parsers only quarantine checked ids; never build a path from another.
            log.error("quarantine_bad_device protocol=%s", block.protocol)
            return StorageFailed("internal error")
        name = quarantine.block_name(block)
        target = folder / f"{name}{quarantine.BLOCK_EXT}"
        if target.exists():
            return Outcome.DUPLICATE
        meta = {
            "device": block.device_id,
            "protocol": block.protocol,
            "md5": block.dedup_key,
            "received_at": rfc3339(block.received_at),
            "reason": block.reason,
        }
        try:
            make_dirs_durably(folder)
            write_durably(folder / f"{name}.json", json.dumps(meta).encode() + b"\n")
            write_durably(target, block.raw)
            fsync_dir(folder)
        except OSError as exc:
            # The device's own files were not touched: keep its state, which
            # this batch may already have planned writes against.
            return self._failed((block.protocol, block.device_id), exc, drop=False)
        log.warning(
            "quarantined protocol=%s device=%s md5=%s reason=%s",
            block.protocol,
            block.device_id,
            block.dedup_key,
            json.dumps(block.reason),
        )
        return Outcome.QUARANTINED


def cut_torn_line(fh: BinaryIO) -> None:
    """Cut a last line the crash left without its end, so the lines
    appended next start a line of their own (a key glued to a torn one
    would be unreadable, and that block stored again when resent)."""
    end = fh.seek(0, os.SEEK_END)
    if not end:
        return
    fh.seek(end - 1)
    if fh.read(1) == b"\n":
        return
    start = max(end - 4096, 0)  # key lines are 48 bytes; a key file, at most ~200 KB
    fh.seek(start)
    tail = fh.read()
    if b"\n" not in tail:
        start = 0
        fh.seek(0)
        tail = fh.read()
    fh.truncate(start + tail.rfind(b"\n") + 1)
    fh.seek(0, os.SEEK_END)


def _tail_lines(fh: BinaryIO, count: int) -> set[bytes]:
    """The key file's last `count` lines or so (48 bytes a line)."""
    end = fh.seek(0, os.SEEK_END)
    start = max(end - count * 48, 0)
    fh.seek(start)
    tail = fh.read()
    fh.seek(0, os.SEEK_END)
    return {line + b"\n" for line in tail.split(b"\n")}


def remove_logs(data_dir: Path, keep: tuple[str, ...]) -> None:
    """Remove every log file but `keep`, durably: before anything new is
    logged, or a later replay of a stale one would cut newer writes."""
    for name in all_log_names(data_dir):
        if name not in keep:
            (data_dir / name).unlink()
    fsync_dir(data_dir)


def write_durably(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
