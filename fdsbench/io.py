"""Small file helpers: atomic writes, stable hashing of JSON-able objects, image reading with
errors that name the file, and pickle-free array files (``.npz`` read with ``allow_pickle=False``).

Files we write are mode 0644 (records, manifests and leaderboards are read by others on a shared
machine); a full disk or an unwritable folder is one :class:`FdsError` naming the file."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import DataError, FdsError, WriteError


#: what :func:`atomic_write_bytes` writes: bytes-like (a list or tuple of them: one after the other)
Buffer = Union[bytes, bytearray, memoryview]

#: mode of every file fdsbench writes: readable by the group and others (mkstemp would give 0600)
FILE_MODE = 0o644

#: errors of the environment (not of fdsbench) that a write can meet, with the fix to print
_WRITE_FIXES = {
    errno.ENOSPC: "free some space or pass --workdir on another disk",
    errno.EDQUOT: "free some space (disk quota) or pass --workdir on another disk",
    errno.EROFS: "the file system is read-only: pass a writable --workdir",
    errno.EACCES: "no permission: pass a writable --workdir",
    errno.EPERM: "no permission: pass a writable --workdir",
    errno.ENOTDIR: "a parent of it is a file, not a folder: pass another --workdir",
    errno.EEXIST: "a parent of it is a file, not a folder: pass another --workdir",
}


def write_error(path: str | os.PathLike, e: OSError) -> WriteError:
    """The user-facing error for an OSError met while writing ``path``."""
    if isinstance(e, WriteError):
        return e
    fix = _WRITE_FIXES.get(e.errno, "check the path and the disk")
    return WriteError(e.errno, f"cannot write {path}: {e.strerror or e}; {fix}")


def atomic_write_bytes(path: str | os.PathLike, data: Buffer | list[Buffer] | tuple[Buffer, ...],
                       durable: bool = True) -> None:
    """Write ``data`` (bytes-like, or a list or tuple of them written one after the other, without
    joining them) to ``path`` (mode 0644) so that readers see either the old file or the whole new one;
    ``durable=False`` skips the fsync (a cache entry lost in a crash is recomputed). A full disk or
    an unwritable folder raises :class:`FdsError` naming the file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            for part in (data if isinstance(data, (list, tuple)) else (data,)):
                f.write(part)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise write_error(path, e) from None
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable_dir(folder: str | os.PathLike, what: str = "workdir") -> Path:
    """Create ``folder`` if needed and prove a file can be written in it — before any long work
    (indexing a dataset can take minutes). Raises :class:`FdsError` naming the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FdsError(f"{what} {folder} is a file, not a folder; pass a folder (e.g. --workdir runs)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fdsbench-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fix = _WRITE_FIXES.get(e.errno, "pass a writable folder")
        raise FdsError(f"{what} {folder} is not writable ({e.strerror or e}); {fix}") from None
    return folder


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Arrays to an uncompressed ``.npz`` (atomically, mode 0644); no object arrays (no pickles)."""
    for k, v in arrays.items():
        if np.asarray(v).dtype.hasobject:
            raise TypeError(f"array '{k}' has dtype object; only plain numeric/string arrays are written")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read with ``allow_pickle=False`` (a pickled object array
    raises instead of running code). Raises :class:`DataError` naming the file when damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, pickled arrays, not an npz at all
        raise DataError(f"cannot read {path} as plain arrays ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def read_json(path: str | os.PathLike, what: str = "file", expect: type = dict) -> Any:
    """Parse a JSON file we wrote; a truncated or foreign file raises :class:`DataError` naming it."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{what} {path} is damaged or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(obj, expect):
        raise DataError(f"{what} {path} holds a JSON {type(obj).__name__}, not a JSON "
                        f"{'object' if expect is dict else expect.__name__}")
    return obj


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged file or folder to ``<name>.damaged`` (``.damaged-2``, ... if taken) so it
    is kept for inspection and never read again; returns the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{n}")
        n += 1
    os.replace(path, target)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def content_hash(obj: Any, length: int = 16) -> str:
    """sha256 (hex, truncated) of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 array [H, W, 3]; a missing or corrupt file raises DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))  # writable: torch.from_numpy needs it
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - not an image, truncated, or a PIL.Image.open patched by a library
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); re-export or remove the file") from None


def read_gray(path: str | os.PathLike, indices: bool = False) -> np.ndarray:
    """Single-channel array [H, W] (uint8/uint16) of a mask file.

    Grey levels as OpenCV's ``IMREAD_GRAYSCALE`` and PIL's ``convert("L")`` read them: a palette
    (``P``) image gives the grey level of each pixel's colour and a 1-bit image gives 0/255, so a
    0/255 mask saved as 1-bit or 2-colour palette thresholds like its 8-bit twin. ``indices=True``
    keeps a palette image's indices (class-index masks, where the index is the class)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "I;16", "I") or (indices and im.mode == "P"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise DataError(f"mask not found: {path}") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read mask {path} ({type(e).__name__}: {e}); re-export or remove the file") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr.astype(np.uint16) if arr.dtype not in (np.uint8, np.uint16) else arr
