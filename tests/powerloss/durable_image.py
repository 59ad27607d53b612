"""What a power cut leaves: the durable directory entries, and per file the
unsynced writes that a cut takes back.

Pure bookkeeping, no FUSE: `durable_fs` calls it on every operation it passes
through to the live directory, and `materialise` writes the durable image.

Identity is the live (backing) inode number; `durable_fs` pins every inode
in a graveyard directory so that no number is reused while it runs.

Modes:
- "strict" (POSIX, no promise beyond the letter): a file's data (and size)
  is durable up to its last fsync/fdatasync; a directory entry (create,
  mkdir, rename, link, unlink, rmdir) only once that directory is fsynced.
  A rename across directories is two changes, each made durable by its own
  directory's fsync.
- "journal" (ext4 data=ordered with delayed allocation, simplified): every
  namespace change goes into one ordered journal; an fsync of any file or
  directory, or an fdatasync that has to persist a new size, commits all of
  it. File data stays as in strict mode: durable only by its own file's sync
  (stricter than ext4, which may write it back earlier; never laxer).
- `torn`: at the cut, besides the above, a random prefix (in issue order) of
  the operations still unsynced survives: some writes and namespace changes
  reached the disk before the power went, later ones did not.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Mode = Literal["strict", "journal"]
MODES: tuple[Mode, ...] = ("strict", "journal")
FILE, DIR = "f", "d"


@dataclass(frozen=True, slots=True)
class Undo:
    """How to take one unsynced write or truncate back: put `old` at
    `offset`, then cut or extend the file to `old_size`."""

    seq: int
    offset: int
    old: bytes
    old_size: int

    def revert(self, blob: bytearray) -> None:
        blob[self.offset : self.offset + len(self.old)] = self.old
        if len(blob) > self.old_size:
            del blob[self.old_size :]
        else:
            blob.extend(bytes(self.old_size - len(blob)))


# One directory change: (directory inode, name, inode now there or None).
Change = tuple[int, str, int | None]


@dataclass(slots=True)
class NamespaceOp:
    seq: int
    changes: list[Change]


@dataclass(slots=True)
class CutReport:
    kept_ops: int = 0  # unsynced operations a torn cut kept
    lost_ops: int = 0
    files: int = 0
    dirs: int = 0


@dataclass
class DurableImage:
    mode: Mode
    root: int
    torn: bool = False
    # Durable entries of each directory; a new directory starts empty here.
    entries: dict[int, dict[str, int]] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    undo: dict[int, list[Undo]] = field(default_factory=dict)
    pending: list[NamespaceOp] = field(default_factory=list)
    seq: int = 0
    syncs: int = 0

    def __post_init__(self) -> None:
        self.entries.setdefault(self.root, {})
        self.kinds[self.root] = DIR

    # -- what exists when the filesystem starts: all durable -------------------

    def known(self, parent: int, name: str, ino: int, kind: str) -> None:
        self.entries[parent][name] = ino
        self.kinds[ino] = kind
        if kind == DIR:
            self.entries.setdefault(ino, {})

    # -- operations, as they happen ------------------------------------------------

    def created(self, ino: int, kind: str) -> None:
        """A new inode: empty, and in no durable directory yet."""
        self.kinds[ino] = kind
        if kind == DIR:
            self.entries[ino] = {}
        self.undo.pop(ino, None)

    def wrote(self, ino: int, offset: int, old: bytes, old_size: int) -> None:
        """A write or truncate of file `ino`; `old` is what it overwrote."""
        self.seq += 1
        self.undo.setdefault(ino, []).append(Undo(self.seq, offset, old, old_size))

    def changed(self, changes: list[Change]) -> None:
        """Directory entries changed together (a rename's two are one op)."""
        self.seq += 1
        self.pending.append(NamespaceOp(self.seq, changes))

    def synced_file(self, ino: int, size: int, *, datasync: bool) -> None:
        self.syncs += 1
        undos = self.undo.pop(ino, [])
        size_changed = bool(undos) and undos[0].old_size != size
        if self.mode == "journal" and (not datasync or size_changed):
            self._commit(lambda _dir: True)

    def synced_dir(self, ino: int) -> None:
        self.syncs += 1
        if self.mode == "journal":
            self._commit(lambda _dir: True)
        else:
            self._commit(lambda directory: directory == ino)

    def _commit(self, which: Callable[[int], bool]) -> None:
        still = []
        for op in self.pending:
            rest = []
            for change in op.changes:
                if which(change[0]):
                    _apply(self.entries, change)
                else:
                    rest.append(change)
            if rest:
                op.changes = rest
                still.append(op)
        self.pending = still

    # -- the cut ----------------------------------------------------------------

    def materialise(self, target: Path, live_file: Path, rng: random.Random) -> CutReport:
        """Write the durable image under `target` (which must not exist).

        `live_file` is the graveyard folder: `<live_file>/<ino>` is each file
        inode's live content, which the unsynced writes are taken back from.
        """
        report = CutReport()
        seqs = sorted(
            [u.seq for undos in self.undo.values() for u in undos] + [op.seq for op in self.pending]
        )
        keep = rng.randint(0, len(seqs)) if self.torn else 0
        cutoff = seqs[keep - 1] if keep else 0
        report.kept_ops, report.lost_ops = keep, len(seqs) - keep
        entries = {ino: dict(names) for ino, names in self.entries.items()}
        for op in self.pending:
            if op.seq <= cutoff:
                for change in op.changes:
                    _apply(entries, change)

        written: dict[int, Path] = {}
        visited_dirs: set[int] = set()

        def content(ino: int) -> bytes:
            blob = bytearray((live_file / str(ino)).read_bytes())
            for undo in reversed(self.undo.get(ino, [])):
                if undo.seq > cutoff:
                    undo.revert(blob)
            return bytes(blob)

        def mode_of(ino: int, kind: str) -> os.stat_result | None:
            path = live_file / (str(ino) if kind == FILE else f"d{ino}")
            try:
                return path.stat()
            except FileNotFoundError:
                return None

        def walk(ino: int, where: Path) -> None:
            visited_dirs.add(ino)
            for name, child in sorted(entries.get(ino, {}).items()):
                path = where / name
                kind = self.kinds[child]
                if kind == DIR:
                    if child in visited_dirs:
                        continue  # a directory renamed across unsynced parents
                    path.mkdir()
                    report.dirs += 1
                    walk(child, path)
                elif child in written:
                    os.link(written[child], path)
                else:
                    path.write_bytes(content(child))
                    written[child] = path
                    report.files += 1
                    st = mode_of(child, FILE)
                    if st is not None:
                        os.chmod(path, st.st_mode & 0o7777)
                        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

        target.mkdir(parents=True)
        walk(self.root, target)
        return report


def _apply(entries: dict[int, dict[str, int]], change: Change) -> None:
    directory, name, ino = change
    names = entries.setdefault(directory, {})
    if ino is None:
        names.pop(name, None)
    else:
        names[name] = ino
