"""Crash-safe storage of the emulated chip: one lock, atomic files, an append-only launch log.

The real PSP executes one command at a time and keeps its persistent state (OCA, PEK, PDH, ownership)
in SPI flash that a command updates whole or not at all. The emulator gets the same two properties
across processes with
* an exclusive `fcntl.flock` on `<state dir>/.lock`, held for the whole of each command; and
* every state change written to a temporary file in the same directory, fsync'ed, renamed over the
  old file, and the directory fsync'ed, so a crash leaves either the old or the new file, never a mix.

Launch data (LAUNCH_UPDATE_DATA/VMSA plaintexts) is too large to rewrite per command, so each guest has
an append-only log whose committed length lives in the atomically written state: bytes past that length
are the residue of a crashed command and are cut off before the next append.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


def fsync_dir(directory: Path) -> None:
    """Makes a rename or creation in `directory` durable (POSIX needs the directory fsync'ed too)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replaces `path` with `data` atomically and durably; the file is created with `mode` (never wider
    for an instant: mkstemp makes it 0600, then the mode is set before the rename)."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def remove_stale_temporaries(directory: Path) -> None:
    """Deletes temporaries that a crashed `atomic_write` left behind (call under the lock)."""
    for leftover in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


@contextlib.contextmanager
def chip_lock(directory: Path) -> Iterator[None]:
    """Holds the chip's exclusive lock: one command at a time, in this process and every other.

    A fresh descriptor per call, so threads of one process serialise too (flock locks belong to the
    open file description). The kernel drops the lock when its holder dies, even by SIGKILL.
    """
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class LaunchLog:
    """The plaintexts a guest's launch fed to LAUNCH_UPDATE_DATA/VMSA, in order: exactly the bytes the
    launch digest covers (PROTOCOL.md section 5). Only `committed` bytes count."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, committed: int, data: bytes) -> int:
        """Writes `data` after the first `committed` bytes (dropping any crash residue past them),
        fsyncs, and returns the new length for the caller to commit in the chip state."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, committed)
            os.lseek(fd, committed, os.SEEK_SET)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        return committed + len(data)

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise RuntimeError(f"launch log {self.path.name} is shorter than its committed length")
        return data

    def chunks(self, committed: int, size: int = 1 << 20) -> Iterator[bytes]:
        """The committed bytes in chunks, for hashing without loading a whole firmware image."""
        if committed == 0:
            return
        with open(self.path, "rb") as handle:
            remaining = committed
            while remaining:
                chunk = handle.read(min(size, remaining))
                if not chunk:
                    raise RuntimeError(f"launch log {self.path.name} is shorter than its committed length")
                remaining -= len(chunk)
                yield chunk

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
