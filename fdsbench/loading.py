"""The episode data pipeline: decoding that overlaps with the method, a bounded decoded-image
cache, and an ordered background worker for scoring.

* :func:`decode_image` is OpenCV's decoder (``cv2.imdecode``, libpng / libjpeg-turbo) wherever it
  gives the same pixels as Pillow's ``Image.open(...).convert("RGB")`` (8-bit PNG of every colour
  type, palette and 1-bit PNG, grey and colour JPEG; tested pixel for pixel), decided from the file
  header; anything else (16-bit PNG, CMYK JPEG, other formats) goes through Pillow, the reference
  decoder of :func:`fdsbench.io.read_image`.
* :class:`DecodedCache` keeps decoded images and ground-truth masks up to a byte budget (least
  recently used out first): supports and queries recur across episodes of a manifest. Behind it,
  :func:`decoded_dir` keeps them on disk (raw ``.npy``, read without pickle) for the next process:
  every method benchmarked on a dataset decodes each file once, not once per run. An entry's key
  is the dataset's content hash (the bytes of every file and the mask specs), what was decoded at
  which size, and the decoders' versions, so an edited file or a new OpenCV is a miss, never a
  stale image.
* :class:`EpisodeLoader` decodes an episode's support set and queries; :meth:`EpisodeLoader.iterate`
  does it ahead of the method on ``workers`` threads (decoding releases the GIL), handing episodes
  and queries out in manifest order, so results do not depend on the number of workers. Nothing
  here draws random numbers: the episode's seed is set by the runner just before ``prepare``.
* :class:`OrderedWorker` runs callables one after the other on a background thread (the runner adds
  the measured queries to the meters there, in order), so scoring overlaps with the next ``predict``.
"""
from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import queue
import re
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from .data import DatasetAdapter, default_cache_dir, resize_bilinear
from .diskcache import BoundedDir
from .errors import DataError, FdsError
from .episodes import Manifest
from .io import content_hash, read_image
from .seeding import derive_seed
from .timing import background_priority
from .types import Episode, NormalPool, Query, Shot, SupportSet

DEFAULT_CACHE_MB = 512
DEFAULT_DISK_CACHE_BYTES = 8 << 30
DISK_FORMAT = 1  # bump when decoding or resizing changes pixels
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _opencv_decodes_like_pillow(data: bytes) -> bool:
    """From the file header alone (no Python-heavy parsing in the decoding threads): an 8-bit PNG
    (any colour type), a palette or 1-bit grey PNG, or a JPEG with 1 or 3 components — the cases
    where OpenCV's pixels equal Pillow's ``convert("RGB")`` (tests/test_loading.py)."""
    if data[:8] == _PNG and data[12:16] == b"IHDR" and len(data) > 26:
        depth, colour = data[24], data[25]
        return depth == 8 or colour == 3 or (colour == 0 and depth == 1)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker in _JPEG_SOF:
                return data[i + 9] in (1, 3)  # grey or YCbCr/RGB; CMYK/YCCK differ
            if marker == 0xFF:
                i += 1
                continue
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def decode_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3], writable; pixel-identical to :func:`fdsbench.io.read_image`, faster."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    if _opencv_decodes_like_pillow(data):
        # RGB straight from the decoder (grey replicated, palette expanded, alpha dropped, as
        # Pillow's convert("RGB")); no EXIF rotation, which Pillow does not apply either
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is not None:
            return arr
    return read_image(path)  # the reference decoder names a damaged file


_NPY_HEADER = re.compile(r"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': False, 'shape': \(((?:\d+, )*(?:\d+,?)?)\), \}")


def _read_npy(f) -> np.ndarray:
    """A ``.npy`` file's array as :func:`numpy.save` writes a plain C-order array, read from the file
    straight into its own (read-only) buffer; anything else raises ValueError. The header is matched
    here, not by numpy's reader: that one calls ``ast.literal_eval``, which is not thread-safe in
    CPython 3.11 ("AST constructor recursion depth mismatch" when loading threads parse at once)."""
    major, _ = np.lib.format.read_magic(f)
    size = int.from_bytes(f.read(2 if major == 1 else 4), "little")
    m = _NPY_HEADER.fullmatch(f.read(size).decode("latin1").rstrip(" \n"))
    if m is None:
        raise ValueError("not a plain C-order array")
    dtype, shape = np.dtype(m.group(1)), tuple(int(v) for v in m.group(2).split(",") if v)
    if math.prod(shape) * dtype.itemsize != os.fstat(f.fileno()).st_size - f.tell():
        raise ValueError("cut short or padded")
    arr = np.empty(math.prod(shape), dtype)
    if f.readinto(arr.view(np.uint8)) != arr.nbytes:
        raise ValueError("cut short")
    arr.setflags(write=False)  # the cache shares it: nobody may change it (the view below neither)
    return arr.reshape(shape)


def _npy_parts(arr: np.ndarray) -> tuple[bytes, memoryview]:
    """A C-order array as the two parts of its ``.npy`` file (the header :func:`numpy.save` writes,
    and the array's own memory): written to disk without first copying the pixels into one buffer."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return head.getvalue(), memoryview(arr.reshape(-1).view(np.uint8))


class DecodedCache:
    """Thread-safe LRU of decoded arrays bounded by ``max_bytes`` (0 disables it). ``get`` returns
    the cached array itself: callers that hand it to a method copy it first. A key being decoded by
    one thread is waited for by the others, not decoded twice (the next episodes' supports are
    often queries already in flight)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._in_flight: dict = {}
        self.hits = self.misses = 0

    def get(self, key, make: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            pending = self._in_flight.get(key)
            if pending is None:
                self.misses += 1
                pending = self._in_flight[key] = Future()
                pending.set_running_or_notify_cancel()
                owner = True
            else:
                self.hits += 1
                owner = False
        if not owner:
            return pending.result()
        try:
            value = make()  # outside the lock: other threads keep decoding meanwhile
        except BaseException as e:
            with self._lock:
                del self._in_flight[key]
            pending.set_exception(e)
            raise
        if 0 < value.nbytes <= self.max_bytes:
            value.setflags(write=False)  # a cached array is shared: nobody may change it
        with self._lock:
            del self._in_flight[key]
            if 0 < value.nbytes <= self.max_bytes:
                self._items[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        pending.set_result(value)
        return value

    def __len__(self) -> int:
        return len(self._items)


_CACHES: "weakref.WeakKeyDictionary[DatasetAdapter, DecodedCache]" = weakref.WeakKeyDictionary()


def _shared_cache(ds: DatasetAdapter, max_bytes: int) -> DecodedCache:
    """One cache per adapter object, so the runs (seeds) of one benchmark share decoded images."""
    cache = _CACHES.get(ds)
    if cache is None or cache.max_bytes != max_bytes:
        cache = _CACHES[ds] = DecodedCache(max_bytes)
    return cache


_DIRS: dict[tuple[str, int], BoundedDir] = {}


def decoded_dir() -> BoundedDir | None:
    """The on-disk tier of decoded images and masks, shared by the processes of this machine:
    ``$FDSBENCH_DECODED_CACHE_DIR`` or ``$FDSBENCH_CACHE/decoded`` (default ``~/.cache/fdsbench/
    decoded``), at most ``$FDSBENCH_DECODED_CACHE_BYTES`` (default 8 GiB); None when
    ``FDSBENCH_DECODED_CACHE=off``."""
    if os.environ.get("FDSBENCH_DECODED_CACHE", "on").lower() in ("0", "off", "false", "no"):
        return None
    folder = os.environ.get("FDSBENCH_DECODED_CACHE_DIR") or str(default_cache_dir() / "decoded")
    raw = os.environ.get("FDSBENCH_DECODED_CACHE_BYTES", "")
    try:
        bound = int(float(raw)) if raw else DEFAULT_DISK_CACHE_BYTES
    except ValueError:
        raise FdsError(f"$FDSBENCH_DECODED_CACHE_BYTES={raw!r} is not a number of bytes (e.g. 8e9)") from None
    key = (folder, bound)
    if key not in _DIRS:
        _DIRS[key] = BoundedDir(folder, bound, ".npy")
    return _DIRS[key]


class EpisodeLoader:
    """Decodes an episode's support set and queries from the dataset. Ground truth = the episode's
    class only (the union of all defects for ``"<object>/*"`` episodes); a query without a mask of
    its class (user folders: predict-only queries) has ground truth ``None``. With the protocol's
    ``resize`` set, images and masks are decoded at that size. Images handed to the method are
    fresh writable copies; ground truth (read by the meters only) is shared with the cache.
    ``prepare_gt`` is called with each query's ground truth where it is loaded (the meters label
    its regions there, ahead of scoring)."""

    def __init__(self, ds: DatasetAdapter, method_cls: type, manifest: Manifest,
                 cache_mb: float = DEFAULT_CACHE_MB, prepare_gt: Callable[[np.ndarray], object] | None = None):
        self.ds, self.method_cls, self.manifest = ds, method_cls, manifest
        self.prepare_gt = prepare_gt
        resize = (manifest.protocol or {}).get("resize")
        self.size = tuple(resize) if resize else None
        self.cache = _shared_cache(ds, int(cache_mb * 2 ** 20))
        ds.index  # noqa: B018 - build the (cached) index before worker threads read it
        self.disk = decoded_dir()
        if self.disk is not None:  # what every disk key holds besides the item: content and decoders
            from PIL import __version__ as pillow

            self._disk_key = [DISK_FORMAT, ds.dataset_hash, cv2.__version__, pillow]

    # ---- decoding ----------------------------------------------------------------------------
    def _decoded(self, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()`` through the memory cache and the on-disk tier (module docstring)."""
        if self.disk is None:
            return self.cache.get(key, make)

        def through_disk() -> np.ndarray:
            name = content_hash([*self._disk_key, list(key)], length=32)
            f = self.disk.open(name)
            if f is not None:
                with f:
                    try:
                        arr = _read_npy(f)
                    except (ValueError, OSError, EOFError):  # cut short or damaged: decoded again
                        arr = None
                if arr is not None:
                    return arr
            arr = np.ascontiguousarray(make())
            self.disk.write(name, _npy_parts(arr))
            return arr
        return self.cache.get(key, through_disk)

    def _image(self, image_id: str, size: tuple[int, int] | None) -> np.ndarray:
        def make():
            img = decode_image(self.ds.root / self.ds.record(image_id).path)
            return img if size is None else resize_bilinear(img, size)
        return self._decoded(("image", image_id, size), make)

    def image(self, image_id: str) -> np.ndarray:
        """RGB uint8 [H, W, 3] at the protocol's size (a copy the caller owns)."""
        return self._image(image_id, self.size).copy()

    def normal_image(self, image_id: str) -> np.ndarray:
        """A normal-pool image at its original size, as ``DatasetAdapter.normal_pool`` gives it."""
        return self._image(image_id, None).copy()

    def _mask(self, image_id: str, cls: str) -> np.ndarray:
        if cls == "*" and not self.ds.record(image_id).masks:
            return np.zeros(self.size or self._image(image_id, None).shape[:2], bool)
        return self._decoded(("mask", image_id, cls, self.size),
                             lambda: self.ds.load_mask(image_id, cls, size=self.size))

    def gt(self, image_id: str, ep: Episode) -> np.ndarray | None:
        cls = ep.defect_class
        rec = self.ds.record(image_id)
        if cls != "*" and cls not in rec.masks:
            if rec.split == "query":  # a user's query: defect-free (scored, all background) or predict-only
                return self._mask(image_id, "*") if rec.normal else None
            raise FdsError(f"query {image_id} has no mask of class {cls}")
        return self._mask(image_id, cls)

    def support(self, ep: Episode) -> SupportSet:
        shots = []
        fad = ep.defect_class == "*" and self.manifest.protocol.get("name") == "fad"
        for ref in ep.supports:
            image = self.image(ref.id)
            mask = np.zeros(image.shape[:2], bool) if fad else self.gt(ref.id, ep).copy()
            if mask.shape != image.shape[:2]:
                raise FdsError(f"mask of {ref.id} is {mask.shape}, image is {image.shape[:2]}")
            shots.append(Shot(ref.id, image, mask, ref.crops))
        pool = None
        if self.method_cls.requires.normal_pool:
            ids = self.ds.normal_pool(ep.object).ids
            if len(ids) == 0:
                raise FdsError(f"method '{self.method_cls.name}' needs defect-free images of product "
                               f"'{ep.object}', and dataset '{self.ds.name}' has none: not applicable (N/A)")
            pool = NormalPool(ids, self.normal_image)
        proto = self.manifest.protocol or {}
        crop = int(proto.get("crop_size") or 0) if proto.get("crops", False) else 0
        return SupportSet(ep.class_key, shots, derive_seed(self.manifest.hash, ep.index), pool, ep.index, crop)

    def query(self, image_id: str) -> Query:
        return Query(image_id, self.image(image_id))

    def scored(self, image_id: str, ep: Episode) -> bool:
        """Whether query ``image_id`` of ``ep`` has ground truth (is scored), as :meth:`gt` decides."""
        rec = self.ds.record(image_id)
        return ep.defect_class == "*" or ep.defect_class in rec.masks or rec.split != "query"

    def scored_pixels(self, episodes: Iterable[Episode]) -> int:
        """Pixels of the scored queries of ``episodes``, as far as their size is known before
        decoding (the protocol's size, else the size the dataset scan recorded)."""
        total = 0
        for ep in episodes:
            for qid in ep.queries:
                size = self.size or self.ds.record(qid).size
                if size is not None and self.scored(qid, ep):
                    total += size[0] * size[1]
        return total

    # ---- prefetching -------------------------------------------------------------------------
    def iterate(self, episodes: Iterable[Episode], workers: int = 0, lookahead: int | None = None
                ) -> Iterator[tuple[Episode, SupportSet, Iterator[tuple[Query, np.ndarray | None]]]]:
        """(episode, support set, queries) in the given order; ``queries`` yields (query, ground
        truth) in the episode's order and must be consumed before the next episode is asked for.
        ``workers`` > 0 decodes up to ``lookahead`` items (supports and queries) ahead on that many
        threads; 0 decodes each item when it is needed."""
        episodes = list(episodes)
        items = []
        for ep in episodes:
            items.append((ep, None))
            items += [(ep, qid) for qid in ep.queries]

        def load(item):
            ep, qid = item
            if qid is None:
                return self.support(ep)
            gt = self.gt(qid, ep)
            if gt is not None and self.prepare_gt is not None:
                self.prepare_gt(gt)
            return self.query(qid), gt

        if workers <= 0:
            results: Iterator = map(load, items)
            pool = None
        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="fdsbench-load", initializer=background_priority)
            results = _ordered(pool, load, items, lookahead or 4 * workers + 2)
        try:
            for ep in episodes:
                support = next(results)
                yield ep, support, (next(results) for _ in ep.queries)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _ordered(pool: ThreadPoolExecutor, fn, items: list, depth: int) -> Iterator:
    """``map(fn, items)`` on ``pool`` with at most ``depth`` results pending, in input order."""
    pending: collections.deque = collections.deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


def _references_seen_by_a_callee() -> int:
    """``sys.getrefcount`` of an array that only its caller's variable holds, seen from inside the
    called function (3 on CPython 3.11: the variable, the parameter, getrefcount's argument):
    measured, not assumed, since interpreters differ in how they pass arguments."""
    def callee(a):
        return sys.getrefcount(a)
    fresh = np.empty(0)
    return callee(fresh)


_CALLER_ONLY = _references_seen_by_a_callee()


def host_array(pred):
    """A method's output as a host array that only the harness holds: it is scored in the background
    while the method computes the next query, so nothing the method does next may change it. Tensors
    are copied off the device or cloned (a compiled or graph-captured model may reuse its output
    buffer); an array is copied unless it is a fresh one that nothing else refers to — a view (a
    tensor's ``.numpy()`` too), or an array the method keeps (a buffer it fills again for the next
    query), is copied. Called as
    ``host_array(pred)`` on the variable that holds the output."""
    if hasattr(pred, "detach") and hasattr(pred, "cpu"):
        t = pred.detach().float()
        return (t.cpu() if t.device.type != "cpu" else t.clone()).numpy()
    if isinstance(pred, np.ndarray) and (pred.base is not None or sys.getrefcount(pred) > _CALLER_ONLY):
        return pred.copy()
    return pred


@contextlib.contextmanager
def responsive_gil(enabled: bool = True, interval_s: float = 0.0005):
    """While decoding and scoring threads run beside the method, let a thread hold the GIL at most
    ``interval_s`` before handing it over (Python's default is 5 ms): the method's thread, waking up
    from a GPU wait, gets it back within half a millisecond. Restored on exit."""
    if not enabled:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


class OrderedWorker:
    """Runs submitted callables in submission order on one background thread (``enabled=False``:
    right away, on the caller's thread). At most ``depth`` calls wait; ``submit`` blocks beyond
    that. The first exception is raised again by the next ``submit`` or ``join``."""

    def __init__(self, enabled: bool = True, depth: int = 8):
        self.enabled = enabled
        self._error: BaseException | None = None
        if enabled:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._loop, name="fdsbench-score", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        background_priority()
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job[0](*job[1])
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn: Callable, *args) -> None:
        if not self.enabled:
            fn(*args)
            return
        self._raise()
        self._queue.put((fn, args))

    def join(self) -> None:
        """Wait until every submitted call has run."""
        if self.enabled:
            self._queue.join()
            self._raise()

    def close(self) -> None:
        """Stop the thread after the calls already submitted (errors of those are dropped)."""
        if self.enabled and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
