"""Dataset adapters: turn a dataset root into an index of image records, decode images and masks
lazily, and say which objects each fold tests.

An adapter subclass implements :meth:`DatasetAdapter.scan` (walk the publisher's layout, return
:class:`ImageRecord` s whose ``masks`` describe *how* to decode each class mask) and declares its
``folds``. Everything else — the cached index, exact mask decoding, size checks, class lists, normal
pools, train/test splits per fold — is shared here.

Mask specs (``ImageRecord.masks[class_name]``), decoded by :func:`decode_mask`:

* ``{"png": rel_path, "threshold": t}`` — pixels with value > t (anti-aliased 0/255 masks: t=127);
* ``{"png": rel_path, "value": v}`` — pixels whose grey level equals v; with ``"indices": true``
  (class-index masks) the stored values, palette indices included, are compared instead. Grey levels
  are read as OpenCV reads them (:func:`fdsbench.io.read_gray`): a 1-bit or palette 0/255 mask gives 255;
* ``{"polygons": [[x1, y1, x2, y2, ...], ...]}`` — filled polygons (COCO ``segmentation``),
  coordinates truncated to int as the official loaders do; a polygon may also be the string
  ``"x1 y1 x2 y2 ..."`` (the compact form adapters store in the cached index: parsing strings keeps
  the second start of a VISION-V1-sized tree fast);
* several specs in a list are OR-ed (e.g. two annotations of one class).

Problems found while scanning (a file listed but missing, an unknown category id, an image labelled
defective with an empty mask...) are recorded with :meth:`DatasetAdapter.note`, cached with the
index and reported by ``fdsbench datasets check``; the entries concerned are left out of the index,
so a run never draws them.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from .errors import DataError, FdsError
from .io import atomic_write_text, canonical_json, content_hash, read_gray, read_image, sha256_file
from .types import NormalPool, TrainSource

INDEX_VERSION = 3

#: image file extensions the adapters accept (compared case-insensitively)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class ImageRecord:
    """One image of a dataset. ``id`` is unique within the dataset (a relative path works well);
    ``masks`` maps each defect class present to its mask spec; an image with no class and
    ``normal=True`` is a defect-free image of ``object`` (its product's normal pool)."""

    id: str
    path: str  # relative to the dataset root
    object: str
    masks: dict[str, Any] = field(default_factory=dict)
    normal: bool = False
    split: str = ""  # publisher's split where it matters ("train"/"test" for MVTec AD), else ""
    size: tuple[int, int] | None = None  # (H, W) when known from the scan

    @property
    def classes(self) -> list[str]:
        return sorted(self.masks)


@dataclass
class Problem:
    """A finding of ``datasets check``: severity "error" or "warning", the file, what is wrong."""

    severity: str
    path: str
    message: str

    def __str__(self):
        return f"{self.severity}: {self.path}: {self.message}"


class DatasetIndex:
    """All records of a dataset root, with lookups by class and by object."""

    def __init__(self, records: Sequence[ImageRecord]):
        self.records: dict[str, ImageRecord] = {}
        for r in records:
            if r.id in self.records:
                raise DataError(f"duplicate image id {r.id} ({r.path} and {self.records[r.id].path})")
            self.records[r.id] = r
        self.images_of: dict[str, list[str]] = {}
        self.normals: dict[str, list[str]] = {}
        for r in self.records.values():
            for c in r.masks:
                self.images_of.setdefault(f"{r.object}/{c}", []).append(r.id)
            if r.normal:
                self.normals.setdefault(r.object, []).append(r.id)
        for ids in (*self.images_of.values(), *self.normals.values()):
            ids.sort()

    @property
    def objects(self) -> list[str]:
        return sorted({r.object for r in self.records.values()})

    @property
    def classes(self) -> list[str]:
        return sorted(self.images_of)

    def classes_of(self, obj: str) -> list[str]:
        return [c for c in self.classes if c.split("/", 1)[0] == obj]


def decode_mask(spec, root: Path, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one mask spec (see module docstring) to a bool array [H, W]."""
    if isinstance(spec, list):
        out = None
        for s in spec:
            m = decode_mask(s, root, size)
            out = m if out is None else (out | m)
        return out
    if "png" in spec:
        path = root / spec["png"]
        arr = read_gray(path, indices=bool(spec.get("indices")))
        if "value" in spec:
            return arr == spec["value"]
        return arr > spec.get("threshold", 0)
    if "polygons" in spec:
        if size is None:
            raise DataError("polygon mask needs the image size")
        import cv2

        mask = np.zeros(tuple(size), np.uint8)
        for poly in spec["polygons"]:  # POLYGON_FILL: the SOFS loader's rule
            flat = poly.split() if isinstance(poly, str) else poly
            pts = np.asarray(flat, dtype=np.float64).astype(np.int32).reshape(1, -1, 2)
            if pts.shape[1]:
                cv2.fillPoly(mask, pts, 1)
        return mask.astype(bool)
    raise DataError(f"unknown mask spec {spec}")


POLYGON_FILL = "cv2.fillPoly per polygon, int32-truncated vertices, OR-ed"


def resize_bilinear(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize [H, W] or [H, W, C] to ``size`` = (h, w) with OpenCV's INTER_LINEAR (``cv2.resize``
    default, as the GFDS loader: half-pixel centres, no antialiasing, fixed-point rounding for uint8)."""
    import cv2

    h, w = int(size[0]), int(size[1])
    if arr.shape[:2] == (h, w):
        return arr.copy()
    out = cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, *arr.shape[2:])  # cv2 drops a trailing channel axis of size 1


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (OpenCV INTER_NEAREST: source index floor(dst * in / out))."""
    H, W = arr.shape[:2]
    ys = np.minimum((np.arange(size[0]) * (H / size[0])).astype(np.int64), H - 1)
    xs = np.minimum((np.arange(size[1]) * (W / size[1])).astype(np.int64), W - 1)
    return arr[ys][:, xs]


def decode_mask_resized(spec, root: Path, size: tuple[int, int], out_size: tuple[int, int]) -> np.ndarray:
    """The mask of ``spec`` at ``out_size`` for resizing protocols (see ``DatasetAdapter.load_mask``)."""
    if isinstance(spec, list):
        out = np.zeros(out_size, dtype=bool)
        for s in spec:
            out |= decode_mask_resized(s, root, size, out_size)
        return out
    if "png" in spec and "value" not in spec:
        raw = read_gray(root / spec["png"])
        return resize_bilinear(raw, out_size) > spec.get("threshold", 0)
    return resize_nearest(decode_mask(spec, root, size), out_size)


class DatasetAdapter:
    """Base class of every dataset format. Subclasses set ``name`` (via ``@register_dataset``),
    ``folds`` (test objects of each fold) and implement :meth:`scan`."""

    name: ClassVar[str] = ""
    folds: ClassVar[list[list[str]]] = []
    #: protocol defaults for this dataset (e.g. crop size); manifests record the values used
    protocol_defaults: ClassVar[dict[str, Any]] = {}
    #: how masks of this format are binarised, shown by ``datasets check``
    mask_rule: ClassVar[str] = ""
    #: layout summary used in error messages
    layout: ClassVar[str] = ""
    #: adapter options accepted as keyword arguments (they are part of the index cache key)
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None, **options):
        if root is None:
            raise FdsError(f"dataset '{self.name}' needs a data root: pass DATA_ROOT=/path/to/{self.name}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FdsError(f"data root {self.root} does not exist or is not a folder "
                           f"(dataset '{self.name}' expects: {self.layout})")
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise FdsError(f"dataset '{self.name}' has no option {', '.join(map(repr, unknown))}; options: "
                           f"{', '.join(self.option_names) or 'none'}")
        self.options = options
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "index"
        self._index: DatasetIndex | None = None
        self._problems: list[Problem] = []
        self._unfollowable: list[str] = []  # symlinks that cannot be followed (loops), seen by tree_signature

    # ---- to implement ------------------------------------------------------------------------
    def scan(self) -> list[ImageRecord]:
        raise NotImplementedError

    def note(self, severity: str, path: str | os.PathLike, message: str) -> None:
        """Record a problem found while scanning (``severity`` "error" or "warning"); ``path`` is
        made relative to the root when it lies under it."""
        try:
            path = os.path.relpath(path, self.root) if Path(path).is_absolute() else str(path)
        except ValueError:
            path = str(path)
        self._problems.append(Problem(severity, str(path), message))

    @property
    def scan_problems(self) -> list[Problem]:
        """Problems recorded by the (possibly cached) scan of this root."""
        self.index
        return list(self._problems)

    # ---- index -------------------------------------------------------------------------------
    def tree_signature(self) -> str:
        """Hash of (path, size, mtime) of every file under the root: changes when the tree does."""
        import hashlib

        h = hashlib.sha256(canonical_json([INDEX_VERSION, self.name, sorted(self.options.items(), key=str)]).encode())
        self._unfollowable = []
        stack = [""]
        seen_dirs: set[tuple[int, int]] = set()
        while stack:  # iterative walk with scandir: one stat per file, no path joins on the hot path
            rel = stack.pop()
            folder = self.root / rel if rel else self.root
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                name = f"{rel}/{e.name}" if rel else e.name
                try:
                    is_dir = e.is_dir(follow_symlinks=True)
                except OSError:  # a symlink loop: no file of the dataset (``check`` warns about it)
                    self._unfollowable.append(name)
                    h.update(f"{name}\0unfollowable\n".encode())
                    continue
                if is_dir:
                    stack.append(name)
                else:
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    @property
    def index(self) -> DatasetIndex:
        if self._index is None:
            self._index = DatasetIndex(self._cached_scan())
        return self._index

    def _cache_path(self, suffix: str = "") -> Path:
        key = content_hash([str(self.root.resolve()), self.name, sorted(self.options.items(), key=str)], 16)
        return self.cache_dir / f"{self.name}-{key}{suffix}.json"

    def _cached_scan(self) -> list[ImageRecord]:
        sig = self._signature = self.tree_signature()
        path = self._cache_path()
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
                if cached.get("signature") == sig:
                    self._problems = [Problem(**p) for p in cached.get("problems", [])]
                    return [ImageRecord(**{**r, "size": tuple(r["size"]) if r.get("size") else None})
                            for r in cached["records"]]
            except (OSError, ValueError, TypeError, KeyError):
                pass  # a damaged cache is rebuilt
        self._problems = []
        records = self.scan()
        if not records:
            raise DataError(f"no images found under {self.root}; dataset '{self.name}' expects: {self.layout}")
        try:  # compact JSON: the cache of a VISION-V1-sized tree loads in well under a second
            atomic_write_text(path, json.dumps({"signature": sig, "created": time.time(),
                                                "problems": [asdict(p) for p in self._problems],
                                                "records": [asdict(r) for r in records]},
                                               separators=(",", ":")))
        except OSError:
            pass  # read-only cache dir: the index is simply not cached
        return records

    @functools.cached_property
    def dataset_hash(self) -> str:
        """The dataset's identity: the index (ids, objects, full mask specs with their thresholds or
        values, normal/split flags), the adapter options, the polygon rasteriser where polygons are
        used, and the bytes of every image and mask file the index references. Two trees with the
        same file names but other masks (a label fix) get different hashes, so their manifests, fits
        and run records are never reused for each other; a copy of a tree elsewhere keeps its hash."""
        recs = sorted(self.index.records.values(), key=lambda r: r.id)
        body = [[r.id, r.object, canonical_json(r.masks), r.normal, r.split] for r in recs]
        if any("polygons" in spec for r in recs for spec in _specs(r.masks)):
            body.append(POLYGON_FILL)
        return content_hash([body, sorted(self.options.items(), key=str), self.file_digest()])

    def file_digest(self) -> str:
        """sha256 over the bytes of every image and PNG mask the index references (in id order),
        cached beside the index for the tree's current signature: computed once per tree state."""
        import hashlib

        self.index
        cache = self._cache_path(".files")
        try:
            cached = json.loads(cache.read_text())
            if cached.get("signature") == self._signature:
                return cached["digest"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        files = []
        for r in sorted(self.index.records.values(), key=lambda r: r.id):
            files.append(r.path)
            files += [spec["png"] for spec in _specs(r.masks) if "png" in spec]
        from tqdm.auto import tqdm

        h = hashlib.sha256()
        for rel in tqdm(files, desc=f"hashing {self.name} content", leave=False, disable=len(files) < 2000):
            try:
                h.update(f"{rel}\0{sha256_file(self.root / rel)}\n".encode())
            except OSError as e:
                raise DataError(f"cannot read {self.root / rel} while hashing the dataset: {e}") from None
        digest = h.hexdigest()
        try:
            atomic_write_text(cache, json.dumps({"signature": self._signature, "digest": digest}))
        except OSError:
            pass  # read-only cache dir: hashed again next time
        return digest

    # ---- decoding ----------------------------------------------------------------------------
    def record(self, image_id: str) -> ImageRecord:
        try:
            return self.index.records[image_id]
        except KeyError:
            raise DataError(f"image id '{image_id}' is not in dataset '{self.name}' at {self.root} "
                            f"(was the manifest made from another tree?)") from None

    def load_image(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """RGB uint8 [H, W, 3] at the original size; ``size=(h, w)`` resizes it as the official GFDS
        loader does (OpenCV bilinear, no antialiasing) — for protocols that resize, e.g. GFDS 256x256."""
        img = read_image(self.root / self.record(image_id).path)
        return img if size is None else resize_bilinear(img, size)

    def image_size(self, image_id: str) -> tuple[int, int]:
        rec = self.record(image_id)
        if rec.size is not None:
            return tuple(rec.size)
        from PIL import Image

        try:
            with Image.open(self.root / rec.path) as im:
                return im.size[1], im.size[0]
        except Exception as e:  # noqa: BLE001 - any failure to open an image is about the file
            raise DataError(f"cannot read image {self.root / rec.path} ({type(e).__name__}: {e}); re-export or "
                            f"remove the file") from None

    def load_mask(self, image_id: str, cls: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """Bool mask [H, W] of class ``cls`` (a class name, or ``"*"`` = union of all defects).

        ``size=(h, w)``: the mask of a resizing protocol (GFDS 256x256: the grey mask is resized
        bilinearly, OpenCV-style, then the adapter's threshold applies — the official GFDS loader); class-index
        and polygon masks are resized nearest. Without ``size`` the mask is exact, at the image size."""
        rec = self.record(image_id)
        if size is not None:
            if cls == "*":
                m = np.zeros(tuple(size), dtype=bool)
                for c in rec.masks:
                    m |= self.load_mask(image_id, c, size)
                return m
            if cls not in rec.masks:
                return self.load_mask(image_id, cls)  # raises the clear error
            return decode_mask_resized(rec.masks[cls], self.root, self.image_size(image_id), tuple(size))
        size = self.image_size(image_id)
        if cls == "*":
            m = np.zeros(size, dtype=bool)
            for c in rec.masks:
                m |= self.load_mask(image_id, c)
            return m
        if cls not in rec.masks:
            raise DataError(f"image {rec.path} has no mask of class '{cls}' "
                            f"(classes: {', '.join(rec.classes) or 'none'})")
        mask = decode_mask(rec.masks[cls], self.root, size)
        if mask.shape != tuple(size):
            where = _spec_path(rec.masks[cls])
            raise DataError(f"mask {where + ' ' if where else ''}of class '{cls}' for {rec.path} is "
                            f"{mask.shape[1]}x{mask.shape[0]} but the image is {size[1]}x{size[0]}; re-export the "
                            f"mask at the image size (`fdsbench datasets check` lists every such file)")
        return mask

    def protocol_defaults_for(self, fold: int) -> dict[str, Any]:
        """Protocol defaults of this dataset for ``fold`` (adapters override where a paper's settings
        differ per fold, e.g. SOFS's area_resize_ratio 0.01 / 0.005 / 0.01 on VISION V1)."""
        return self.protocol_defaults

    # ---- folds -------------------------------------------------------------------------------
    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def check_fold(self, fold: int) -> None:
        if not 0 <= fold < max(self.n_folds, 1):
            raise FdsError(f"fold {fold} does not exist for dataset '{self.name}' "
                           f"(folds: {', '.join(map(str, range(self.n_folds)))})")

    def test_objects(self, fold: int) -> list[str]:
        self.check_fold(fold)
        objs = self.index.objects
        if not self.folds:
            return objs
        return [o for o in self.folds[fold] if o in objs]

    def train_objects(self, fold: int) -> list[str]:
        test = set(self.test_objects(fold))
        return [o for o in self.index.objects if o not in test]

    def class_order(self, obj: str) -> list[str]:
        """The classes of ``obj`` in the order a replayed official protocol iterates them (sorted
        here; an adapter whose publisher's script uses another order overrides it)."""
        return sorted(c for c in self.index.classes if c.split("/", 1)[0] == obj)

    def test_classes(self, fold: int) -> list[str]:
        objs = set(self.test_objects(fold))
        return [c for c in self.index.classes if c.split("/", 1)[0] in objs]

    def normal_pool(self, obj: str) -> NormalPool:
        """Defect-free images of ``obj`` a method may fit on. Where the publisher splits the object
        (MVTec AD, VisA, AeBAD: split "train"/"test"), only the train-split normals: the test-split
        normals are queries of the FAD / NBR+CaP protocols and must never be in the pool: an object
        whose publisher split has no train normals gets an empty pool (methods that need one refuse)."""
        ids = self.index.normals.get(obj, [])
        if any(self.index.records[i].split for i in ids):
            ids = [i for i in ids if self.index.records[i].split == "train"]
        return NormalPool(ids, self.load_image)

    def train_source(self, fold: int, seed: int) -> TrainSource:
        """The base folds of test fold ``fold`` (its complement), or every object for ``fold = -1``
        (training on one dataset and testing on another: the SOFS domain-shift setting, Table 4)."""
        objs = set(self.index.objects if fold < 0 else self.train_objects(fold))
        if not objs:
            raise FdsError(f"dataset '{self.name}' has no training objects for fold {fold} "
                           f"(all objects are test objects); meta-trained methods cannot run here "
                           f"(train on another dataset with --train-dataset)")
        images_of = {c: ids for c, ids in self.index.images_of.items() if c.split("/", 1)[0] in objs}
        samples = sorted((i, c) for c, ids in images_of.items() for i in ids)
        return TrainSource(dataset=self.name, fold=fold, seed=seed, samples=samples, images_of=images_of,
                           load_image=self.load_image,
                           load_mask=lambda i, c: self.load_mask(i, c.split("/", 1)[1] if "/" in c else c),
                           normal_ids={o: ids for o, ids in self.index.normals.items() if o in objs})

    # ---- validation --------------------------------------------------------------------------
    #: severity of "object named in a fold but absent" (the paper's fold is then incomplete)
    absent_fold_object: ClassVar[str] = "error"

    def fold_problems(self) -> list[Problem]:
        """Fold file vs tree: objects named in a fold but absent, objects in no fold."""
        problems: list[Problem] = []
        if not self.folds:
            return problems
        present = set(self.index.objects)
        named = {o for fold in self.folds for o in fold}
        for k, fold in enumerate(self.folds):
            for obj in fold:
                if obj not in present:
                    problems.append(Problem(self.absent_fold_object, obj,
                                            f"object named in fold {k} of '{self.name}' but absent from {self.root}"))
        for obj in sorted(present - named):
            problems.append(Problem("warning", obj, "object is in no fold: it is only ever a training object"))
        return problems

    def check(self, progress=None) -> list[Problem]:
        """Decode every image and mask once and report problems (``fdsbench datasets check``):
        scan problems, fold problems, unreadable images, mask/image size mismatches, empty masks of
        a labelled class, and byte-identical duplicate images. ``progress`` is called per image."""
        problems: list[Problem] = list(self.scan_problems) + self.fold_problems()
        problems += [Problem("warning", name, "symbolic link that cannot be followed (a loop?): ignored")
                     for name in self._unfollowable]
        by_digest: dict[tuple[int, str], list[str]] = {}
        for rec in sorted(self.index.records.values(), key=lambda r: r.id):
            if progress:
                progress()
            path = self.root / rec.path
            try:
                size = read_image(path).shape[:2]
            except DataError as e:
                problems.append(Problem("error", rec.path, str(e)))
                continue
            if rec.size is not None and tuple(rec.size) != tuple(size):
                problems.append(Problem("error", rec.path, f"annotation says {rec.size[1]}x{rec.size[0]}, "
                                                           f"the image is {size[1]}x{size[0]}"))
            try:
                by_digest.setdefault((path.stat().st_size, sha256_file(path)), []).append(rec.path)
            except OSError:
                pass
            problems += self._mask_problems(rec, size, rec.masks)
        for paths in by_digest.values():
            if len(paths) > 1:
                for p in paths[1:]:
                    problems.append(Problem("warning", p, f"duplicate file: same bytes as {paths[0]}"))
        return problems

    def _mask_problems(self, rec: ImageRecord, size: tuple[int, int], classes) -> list[Problem]:
        """The mask rules of :meth:`check` for classes ``classes`` of one image of size ``size``:
        the mask decodes, has the image's size and is not empty under the adapter's rule."""
        problems = []
        for cls in classes:
            spec = rec.masks[cls]
            try:
                m = decode_mask(spec, self.root, size)
            except DataError as e:
                problems.append(Problem("error", rec.path, f"class {cls}: {e}"))
                continue
            if m.shape != tuple(size):
                problems.append(Problem("error", _spec_path(spec) or rec.path,
                                        f"mask of class {cls} is {m.shape[1]}x{m.shape[0]}, image {rec.path} "
                                        f"is {size[1]}x{size[0]}"))
            elif not m.any():
                problems.append(Problem("error", _spec_path(spec) or rec.path,
                                        f"mask of class {cls} is empty ({self.mask_rule or 'no foreground'}): "
                                        f"the image is labelled {cls} but has no {cls} pixel"))
        return problems

    def mask_problems(self, image_id: str, classes=None) -> list[Problem]:
        """What :meth:`check` reports about the masks of ``classes`` (default: all) of one image —
        the check ``bench`` and ``episodes make`` run on every image an episode uses."""
        rec = self.record(image_id)
        try:
            size = self.image_size(image_id)
        except DataError as e:
            return [Problem("error", rec.path, str(e))]
        if rec.size is not None and tuple(rec.size) != tuple(size):
            return [Problem("error", rec.path, f"annotation says {rec.size[1]}x{rec.size[0]}, "
                                               f"the image is {size[1]}x{size[0]}")]
        return self._mask_problems(rec, size, rec.masks if classes is None else classes)

    # ---- summaries ---------------------------------------------------------------------------
    def counts(self) -> dict[str, dict[str, int]]:
        """Per object: number of images of each class, ``normal`` images and all images."""
        out: dict[str, dict[str, int]] = {}
        for rec in self.index.records.values():
            d = out.setdefault(rec.object, {"images": 0, "normal": 0})
            d["images"] += 1
            d["normal"] += int(rec.normal)
            for c in rec.masks:
                d[c] = d.get(c, 0) + 1
        return dict(sorted(out.items()))

    def defect_areas(self, progress=None) -> list[tuple[str, str, int, int]]:
        """(class key, image id, defect pixels, image pixels) for every (image, class) pair: the
        data of the SOFS defect-size figure (paper Fig. 6/7)."""
        rows = []
        for cls in self.index.classes:
            for image_id in self.index.images_of[cls]:
                if progress:
                    progress()
                m = self.load_mask(image_id, cls.split("/", 1)[1])
                rows.append((cls, image_id, int(m.sum()), int(m.size)))
        return rows


def _specs(masks: dict) -> list[dict]:
    """Every single mask spec of a record's ``masks`` (lists of OR-ed specs flattened)."""
    return [s for spec in masks.values() for s in (spec if isinstance(spec, list) else [spec])]


def _spec_path(spec) -> str | None:
    if isinstance(spec, list):
        return next((p for p in map(_spec_path, spec) if p), None)
    return spec.get("png") if isinstance(spec, dict) else None


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (see ``IMAGE_EXTS``) directly in ``folder``, sorted by name; [] if absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())


def default_cache_dir() -> Path:
    return Path(os.environ.get("FDSBENCH_CACHE", Path.home() / ".cache" / "fdsbench")).expanduser()
