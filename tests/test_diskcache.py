"""The bounded on-disk cache shared by processes (decoded images, frozen features)."""
import io
import os
import threading

import numpy as np

from fdsbench.diskcache import BoundedDir
from fdsbench.loading import _npy_parts, _read_npy


def test_threads_write_at_once_within_the_bound_and_entries_read_back_whole(tmp_path):
    d = BoundedDir(tmp_path, max_bytes=40_000, suffix=".bin")
    d.write("f" * 8, b"seed")  # the first write scans the folder
    barrier = threading.Barrier(4)
    payload = {f"{t:x}{i:07x}": (bytes([t]) * 1000, bytes([i]) * 2000) for t in range(4) for i in range(10)}

    def writer(t):
        barrier.wait()
        for key, parts in payload.items():
            if key.startswith(f"{t:x}"):
                d.write(key, list(parts))  # parts written one after the other

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = [p for p in tmp_path.rglob("*.bin")]
    assert sum(p.stat().st_size for p in files) <= 40_000
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary file left behind
    written = {p.stem: p.read_bytes() for p in files}
    assert len(written) == 1 + 40 - d.skipped and d.skipped > 0  # full: later entries are not written
    for key, data in written.items():
        assert data == (b"seed" if key == "f" * 8 else b"".join(payload[key]))
        assert d.path(key).parent.name == key[0]  # 16 folders, by the key's first character


def test_entries_of_an_older_layout_are_counted_and_aged_out(tmp_path):
    old = tmp_path / "ab"  # a two-character folder of an earlier version
    old.mkdir()
    (old / "abcdef.bin").write_bytes(b"x" * 3000)
    os.utime(old / "abcdef.bin", (1, 1))  # the oldest entry
    d = BoundedDir(tmp_path, max_bytes=5000, suffix=".bin")
    assert d.write("0123", b"y" * 3000)  # room made by removing the old entry
    assert not (old / "abcdef.bin").exists() and d.path("0123").read_bytes() == b"y" * 3000


def test_npy_parts_are_the_bytes_numpy_writes(tmp_path):
    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 256, (37, 23, 3), dtype=np.uint8), rng.random((9, 11)) > 0.5,
              np.arange(7, dtype=np.uint16), np.zeros((0, 4), np.uint8)):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        head, pixels = _npy_parts(a)
        assert head + bytes(pixels) == buf.getvalue()
        (tmp_path / "a.npy").write_bytes(head + bytes(pixels))
        with open(tmp_path / "a.npy", "rb") as f:
            out = _read_npy(f)
        assert out.dtype == a.dtype and np.array_equal(out, a)

