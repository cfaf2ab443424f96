"""A directory of cache entries bounded in bytes, shared by the processes that use it.

One file per key (``<dir>/<key[0]>/<key><suffix>``: 16 folders, made once, not one for nearly every
entry of a new cache; entries of other folders are counted and aged out alike), written atomically
without fsync: an entry cut short by a crash fails to load and is recomputed. When the directory is
full, the oldest entries (by last use) that this process has not used are removed; when none can
be, new entries are not written for the rest of the session (methods run one after another in
separate processes keep reusing the first entries instead of evicting what the next one needs). A
full or read-only disk costs hits, never a run. The frozen-feature cache and the decoded-image cache store here.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

from .errors import FdsError
from .io import Buffer, atomic_write_bytes


class BoundedDir:
    """Bytes by key in ``folder``, at most ``max_bytes`` in all (module docstring). Thread-safe."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int, suffix: str):
        self.folder, self.max_bytes, self.suffix = Path(folder), int(max_bytes), suffix
        self._bytes: int | None = None  # scanned on the first write
        self._used: set[str] = set()  # keys this process read or wrote (never evicted by it)
        self._full = False  # nothing left to evict: no more writes in this session
        self._writing = 0  # bytes of entries being written by this process's threads
        self._lock = threading.Lock()
        self.skipped = 0

    def path(self, key: str) -> Path:
        return self.folder / key[0] / f"{key}{self.suffix}"

    def read(self, key: str) -> bytes | None:
        """The entry's bytes (and it becomes the most recently used), or None."""
        f = self.open(key)
        if f is None:
            return None
        with f:
            try:
                return f.read()
            except OSError:
                return None

    def open(self, key: str) -> BinaryIO | None:
        """The entry opened for reading (and it becomes the most recently used), or None: a reader
        that parses the file itself reads it into its own buffer once, without a bytes copy."""
        p = self.path(key)
        try:
            f = open(p, "rb")
        except OSError:
            return None
        try:
            os.utime(p)
        except OSError:  # removed by another process since: the open file still reads
            pass
        with self._lock:
            self._used.add(key)
        return f

    def write(self, key: str, data: Buffer | list[Buffer] | tuple[Buffer, ...]) -> bool:
        """Store ``data`` (bytes-like, or a list or tuple of them written one after the other) under
        ``key`` if it fits (after evicting old entries); False if it was not written. The room is
        taken under the lock, the file is written outside it: several threads write at once."""
        parts = data if isinstance(data, (list, tuple)) else (data,)
        n = sum(memoryview(p).nbytes for p in parts)
        with self._lock:
            if self._full or self._bytes is None or self._bytes + n > self.max_bytes:
                if self._full or not self._make_room(n):
                    self._full = True
                    self.skipped += 1
                    return False
            self._bytes += n
            self._writing += n
            self._used.add(key)  # not evicted by this process, even before it is written
        try:
            atomic_write_bytes(self.path(key), parts, durable=False)
            written = True
        except FdsError:
            written = False
        with self._lock:
            self._writing -= n
            if not written:
                self._bytes -= n
                self.skipped += 1
        return written

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.folder.iterdir() if self.folder.is_dir() else ():
            if sub.is_dir():
                for e in os.scandir(sub):
                    if e.name.endswith(self.suffix):
                        try:
                            st = e.stat()
                        except FileNotFoundError:  # removed by another process meanwhile
                            continue
                        out.append((st.st_mtime, st.st_size, Path(e.path)))
        return out

    def _make_room(self, n: int) -> bool:
        """Free the oldest entries this process has not used until ``n`` bytes fit (to 90 % of the bound)."""
        entries = self._entries()
        self._bytes = sum(s for _, s, _ in entries) + self._writing  # an entry just renamed counts twice: bound kept
        if self._bytes + n <= self.max_bytes:
            return True
        target = 0.9 * self.max_bytes - n
        for _, size, p in sorted(entries):
            if self._bytes <= target:
                break
            if p.name[: -len(self.suffix)] in self._used:
                continue
            p.unlink(missing_ok=True)
            self._bytes -= size
        return self._bytes + n <= self.max_bytes

    def clear(self) -> None:
        with self._lock:
            for p in self.folder.glob(f"*/*{self.suffix}"):
                p.unlink(missing_ok=True)
            self._bytes = 0
