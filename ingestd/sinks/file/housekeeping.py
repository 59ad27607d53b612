"""Closed files: gzip them, and delete the oldest when retention says so.

Runs in a thread of its own, never the writer's: compressing 64 MiB takes
seconds. A closed file is one the writer has rotated away from (it is never
appended to again), i.e. any data file in a device folder but the newest.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ingestd.protocols.registry import PROTOCOLS
from ingestd.sinks.file.device import FILE_MODE, fsync_dir
from ingestd.sinks.file.rotation import parse_file_name

log = logging.getLogger("ingestd.housekeeping")

# A closed file is left alone this long after its last write, so it is
# surely covered by a checkpoint before it is compressed or deleted.
SETTLE_SECS = 60.0


@dataclass(frozen=True, slots=True)
class Retention:
    compress: bool
    max_age_days: float  # 0: keep forever
    max_total_bytes: int  # 0: no limit


@dataclass(slots=True)
class SweepReport:
    compressed: int = 0
    deleted: int = 0
    bytes_deleted: int = 0


def compress_file(path: Path) -> Path:
    """`x.csv` to `x.csv.gz`, atomically: the .gz appears whole or not at all,
    and the original goes only once the .gz is synced."""
    target = path.with_name(path.name + ".gz")
    tmp = path.with_name(path.name + ".gz.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as raw:
        # mtime=0: the same input always gives the same bytes
        with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1024 * 1024)
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, target)
    fsync_dir(path.parent)
    path.unlink()
    fsync_dir(path.parent)
    return target


def sweep(data_dir: Path, retention: Retention, now: float | None = None) -> SweepReport:
    """One pass over every device folder. Blocking."""
    now = time.time() if now is None else now
    report = SweepReport()
    closed: list[tuple[float, Path, int]] = []  # (mtime, path, size), for retention
    for folder in _device_folders(data_dir):
        for path, stat in _closed_files(folder, now):
            if retention.compress and not path.name.endswith(".gz"):
                try:
                    path = compress_file(path)
                    stat = path.stat()
                    report.compressed += 1
                except OSError as exc:
                    log.error("compress_failed file=%s error=%s", ascii(str(path)), exc.strerror)
                    continue
            closed.append((stat.st_mtime, path, stat.st_size))
    _apply_retention(closed, retention, now, report)
    if report.compressed or report.deleted:
        log.info(
            "housekeeping compressed=%d deleted=%d bytes_deleted=%d",
            report.compressed,
            report.deleted,
            report.bytes_deleted,
        )
    return report


def _device_folders(data_dir: Path) -> list[Path]:
    folders = []
    for protocol in PROTOCOLS:
        with contextlib.suppress(FileNotFoundError):
            folders += [p for p in (data_dir / protocol).iterdir() if p.is_dir()]
    return folders


def _closed_files(folder: Path, now: float) -> list[tuple[Path, os.stat_result]]:
    """Every data file of the folder but the newest, settled ones only."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(".gz.tmp"):  # a compression cut short by a crash
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
    files = []
    for name in names:
        plain = name.removesuffix(".gz")
        parsed = parse_file_name(plain)
        if parsed is None:
            continue
        if name != plain and plain in names:
            # Crash between rename and unlink: the .gz is whole and synced.
            with contextlib.suppress(FileNotFoundError):
                (folder / plain).unlink()
            continue
        files.append((parsed.sort_key, folder / name))
    files.sort()
    result = []
    for _, path in files[:-1]:  # the newest is (or may become) the current file
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if now - stat.st_mtime >= SETTLE_SECS:
            result.append((path, stat))
    return result


def _apply_retention(
    closed: list[tuple[float, Path, int]], retention: Retention, now: float, report: SweepReport
) -> None:
    closed.sort()
    total = sum(size for _, _, size in closed)
    for mtime, path, size in closed:
        too_old = retention.max_age_days > 0 and now - mtime > retention.max_age_days * 86400
        too_much = retention.max_total_bytes > 0 and total > retention.max_total_bytes
        if not (too_old or too_much):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("retention_delete_failed file=%s error=%s", ascii(str(path)), exc.strerror)
            continue
        total -= size
        report.deleted += 1
        report.bytes_deleted += size
