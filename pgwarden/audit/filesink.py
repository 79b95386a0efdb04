"""The audit log file: append, fsync, rotate by size. Synchronous; runs on the audit writer thread.

Rotation renames PATH -> PATH.1 -> PATH.2 ... and keeps `keep` rotated files. The chain's `seq`
and `prev` continue into the new file (the writer holds them), so `pgwarden audit verify PATH`
checks PATH.keep ... PATH.1, PATH as one chain. The writer starts every file after the first with
a rotation marker that records `rotated_files()`, so the verifier can tell files that rotation
deleted from files that someone deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pgwarden.audit.chain import chain_files, last_link


class RotatingFile:
    def __init__(self, path: str | Path, *, rotate_bytes: int, keep: int,
                 fsync: Callable[[int], None] = os.fsync) -> None:
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self._fsync = fsync
        self._fd: int | None = None
        self.size = 0
        self.fsyncs = 0
        self.rotations = 0
        self.recovered_bytes = 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> tuple[int, str] | None:
        """Open for appending; returns the chain's last (seq, hash) to continue from, if any.

        A torn last line (the process died inside a write) is cut off: it was never fsynced
        to completion, so no caller was told it was durable and nothing was forwarded for it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size:
                with self.path.open("rb") as fh:
                    fh.seek(max(0, size - 1))
                    if fh.read(1) != b"\n":
                        fh.seek(0)
                        data = fh.read()
                        keep_to = data.rfind(b"\n") + 1
                        os.ftruncate(fd, keep_to)
                        self.recovered_bytes = size - keep_to
                        size = keep_to
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self.size = size
        return last_link(chain_files(self.path))

    def rotated_files(self) -> int:
        """How many rotated files (PATH.1, PATH.2, ... without a gap) exist now."""
        n = 0
        while self.path.with_name(f"{self.path.name}.{n + 1}").exists():
            n += 1
        return n

    def make_room(self, n: int) -> None:
        """Rotate first if `n` more bytes would pass the size limit (a batch never spans files)."""
        if self._fd is not None and self.size and self.size + n > self.rotate_bytes:
            self.rotate()

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise OSError("audit file is not open")
        n = os.write(self._fd, data)
        self.size += n
        if n < len(data):  # a short write (a full disk, a signal): the rest, as the kernel takes it
            view = memoryview(data)[n:]
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n

    def sync(self) -> None:
        if self._fd is None:
            raise OSError("audit file is not open")
        self._fsync(self._fd)
        self.fsyncs += 1

    def truncate(self, size: int) -> None:
        """Undo a partial batch after a failed write, so the file holds only acknowledged records."""
        if self._fd is not None:
            os.ftruncate(self._fd, size)
            self.size = size

    def rotate(self) -> None:
        assert self._fd is not None
        self.sync()
        os.close(self._fd)
        self._fd = None
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        if self.keep <= 0:
            self.path.unlink()
        else:
            if oldest.exists():
                oldest.unlink()
            for k in range(self.keep - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{k}")
                if src.exists():
                    src.rename(self.path.with_name(f"{self.path.name}.{k + 1}"))
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = 0
        self.rotations += 1
        _sync_dir(self.path.parent)

    def close(self) -> None:
        if self._fd is not None:
            try:
                self._fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def _sync_dir(path: Path) -> None:
    """Make renames durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
