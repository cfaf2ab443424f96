"""Episode manifests: generated ONCE from (dataset, fold, shot, seed, protocol), written to a JSON
file with a content hash, and read by every method of a comparison — so results are paired and do
not depend on worker count, batch size or number of processes.

Protocols (``protocol["name"]``):

* ``fss`` — few-shot defect segmentation as in SOFS: every image of every test
  class is a query once; ``shot`` support images of the same class (never the query); with
  ``crops: true`` (non-resizing, the default) each small-defect support carries ``crops_per_shot``
  defect-centred crop boxes of ``crop_size`` (1-shot: 4 crops, 5-shot: 1 crop each) and a support
  whose defect area exceeds ``area_resize_ratio`` is used whole.
* ``fad`` — few-shot anomaly detection (SOFS paper §4.1, Table 3): per test object, ``shot`` defect-free
  supports (train split if the dataset has one) and every other image of the object as a query;
  ground truth = union of all defects.
* ``per_support`` — fit-per-support methods (NBR+CaP paper §IV-B): per test class and seed, ``shot``
  support images and all other images of the class as queries; ``scope: object`` draws the supports
  per product (class ``"<object>/*"``, defective test images and test-split normals as queries).

Datasets whose records carry the split ``support``/``query`` (the ``folder`` adapter: the user fixed
them) take supports only from ``support/`` and queries only from ``query/``. ``resize: [h, w]``
(e.g. GFDS's 256x256) makes the harness decode images and masks at that size. ``draw: gfds`` (with
``crops: false``) replays the GFDS script's support pairing instead of fdsbench's own draw.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from .crops import is_large, sample_crop
from .data import DatasetAdapter
from .errors import FdsError
from .io import atomic_write_json, content_hash
from .types import Episode, SupportRef

MANIFEST_VERSION = 1

PROTOCOLS: dict[str, dict[str, Any]] = {
    "fss": {"crops": True, "crop_size": 518, "crops_per_shot": None, "area_resize_ratio": 0.01, "resize": None},
    "fad": {"resize": None},
    "per_support": {"scope": "class", "resize": None},
}
#: options kept in a protocol only when they differ from their default (so adding one does not
#: change the hash, hence the manifests, of every existing run)
OPTIONAL: dict[str, dict[str, Any]] = {"fss": {"draw": "fdsbench"}}


def protocol_for(ds, name: str, shot: int, fold: int, overrides: dict | None = None) -> dict:
    """The protocol of a run on fold ``fold`` of ``ds``: the dataset's per-fold defaults (e.g.
    SOFS's area_resize_ratio on VISION V1 fold 1) under the user's overrides. ``bench``, ``fps``
    and ``episodes make`` all resolve protocols here, so they make the same manifests."""
    return resolve_protocol(name, shot, overrides, ds.protocol_defaults_for(fold))


def resolve_protocol(name: str, shot: int, overrides: dict | None = None, dataset_defaults: dict | None = None):
    if name not in PROTOCOLS:
        raise FdsError(f"unknown protocol '{name}'; known: {', '.join(PROTOCOLS)}")
    proto = {"name": name, **PROTOCOLS[name]}
    optional = OPTIONAL.get(name, {})
    for key, value in {**(dataset_defaults or {}).get(name, {}), **(overrides or {})}.items():
        if key not in proto and key not in optional:
            raise FdsError(f"protocol '{name}' has no option '{key}'; options: "
                           f"{', '.join(sorted({*proto, *optional} - {'name'})) or 'none'}")
        proto[key] = value
    for key, default in optional.items():
        if proto.get(key, default) == default:
            proto.pop(key, None)
    _check_protocol_values(proto)
    if name == "per_support" and proto["scope"] not in ("class", "object"):
        raise FdsError(f"per_support scope must be 'class' or 'object', got '{proto['scope']}'")
    if name == "fss" and proto.get("draw", "fdsbench") not in ("fdsbench", "gfds"):
        raise FdsError(f"fss option draw must be 'fdsbench' or 'gfds' (the official GFDS pairing), got '{proto['draw']}'")
    if name == "fss" and proto.get("draw") == "gfds" and proto["crops"]:
        raise FdsError("fss draw=gfds replays the GFDS script, which uses whole images: set crops=false")
    if name == "fss" and proto["crops_per_shot"] is None:
        proto["crops_per_shot"] = 4 if shot == 1 else 1  # SOFS: 1-shot = 4 crops, 5-shot = 1 crop each
    return proto


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_protocol_values(proto: dict) -> None:
    """Types and ranges of the protocol options, each refused in one line that names the valid
    values; ``resize`` is normalised to [h, w] (images and masks decoded at that size, GFDS 256x256)."""
    name = proto["name"]

    def bad(key, want):
        raise FdsError(f"protocol '{name}' option {key}={proto[key]!r} is not {want}")

    if "crops" in proto and not isinstance(proto["crops"], bool):
        bad("crops", "true or false")
    for key in ("crop_size", "crops_per_shot"):
        if proto.get(key) is not None and not (_is_int(proto[key]) and proto[key] >= 1):
            bad(key, "a positive integer")
    if "area_resize_ratio" in proto:
        v = proto["area_resize_ratio"]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
            bad("area_resize_ratio", "a number in [0, 1]")
    r = proto.get("resize")
    if r is not None:
        hw = [r, r] if _is_int(r) else list(r) if isinstance(r, (list, tuple)) else []
        if len(hw) != 2 or not all(_is_int(v) and v >= 1 for v in hw):
            bad("resize", "a positive integer or [height, width] (e.g. resize=256)")
        proto["resize"] = [int(v) for v in hw]
        if proto.get("crops"):
            raise FdsError(f"protocol '{name}': resize={proto['resize']} with crop boxes — the boxes are drawn at "
                           f"the original size and would fall outside the resized image; add crops=false "
                           f"(resizing protocols such as GFDS use whole images)")


def _rng(seed: int, *keys) -> np.random.Generator:
    """Independent stream per (seed, class, ...): one class's episodes never shift another's."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _draw(pool: list[str], k: int, rng: np.random.Generator) -> list[str]:
    """k ids from pool: without replacement if enough, else with replacement."""
    if len(pool) >= k:
        return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
    return [pool[i] for i in rng.integers(0, len(pool), size=k)]


def _support_ref(ds: DatasetAdapter, image_id: str, cls: str, proto: dict, rng) -> SupportRef:
    if proto.get("name") != "fss" or not proto.get("crops"):
        return SupportRef(image_id)
    mask = ds.load_mask(image_id, cls)
    if is_large(mask, proto["area_resize_ratio"]):
        return SupportRef(image_id, None)
    return SupportRef(image_id, tuple(sample_crop(mask, proto["crop_size"], rng)
                                      for _ in range(proto["crops_per_shot"])))


def _gfds_draw(ds: DatasetAdapter, objects: list[str], shot: int, seed: int) -> tuple[list[Episode], list[str]]:
    """The GFDS evaluation's pairing (official GFDS ``main.py``), replayed: per product, Python ``random``
    seeded 2 (+ ``seed``: seed 0 is the official pairing); every image of every class is a query once,
    classes in the script's order, images sorted; supports = ``random.sample`` of min(shot, n) from the
    sorted other images of the class (fewer than ``shot`` when the class is that small)."""
    episodes: list[Episode] = []
    skipped: list[str] = []
    for obj in objects:
        draw = random.Random(2 + seed)
        for cls in ds.class_order(obj):
            ids = sorted(ds.index.images_of[cls])
            for q in ids:
                pool = [i for i in ids if i != q]
                if not pool:
                    skipped.append(f"{cls}: only 1 image, a query needs a different support image")
                    continue
                sup = draw.sample(pool, min(shot, len(pool)))
                episodes.append(Episode(len(episodes), cls, tuple(SupportRef(s) for s in sup), (q,)))
    return episodes, skipped


def generate(ds: DatasetAdapter, fold: int, shot: int, seed: int, proto: dict, progress=None) -> dict:
    """Build the manifest dict (episodes + provenance). Deterministic in its arguments."""
    if shot < 1:
        raise FdsError(f"shot must be >= 1, got {shot}")
    test_objects = ds.test_objects(fold)
    if not test_objects:
        raise FdsError(f"fold {fold} of dataset '{ds.name}' has no objects under {ds.root} "
                       f"(expected one of: {', '.join(ds.folds[fold]) if ds.folds else 'any'})")
    episodes: list[Episode] = []
    skipped: list[str] = []
    name = proto["name"]
    if name == "fss" and proto.get("draw") == "gfds":
        episodes, skipped = _gfds_draw(ds, test_objects, shot, seed)
    elif name in ("fss", "per_support"):
        classes = ds.test_classes(fold)
        if not classes:
            raise FdsError(f"fold {fold} of dataset '{ds.name}' has no defect classes under {ds.root}")
        if name == "per_support" and proto.get("scope") == "object":
            classes = []  # NBR+CaP per category (paper Table I)
            for obj in test_objects:
                recs = [r for r in ds.index.records.values() if r.object == obj]
                has_split = any(r.split == "train" for r in recs)
                defective = sorted(r.id for r in recs if r.masks and (r.split != "train" if has_split else True))
                if len(defective) <= shot:
                    skipped.append(f"{obj}: {len(defective)} defective images, needs more than shot={shot}")
                    continue
                sup = _draw(defective, shot, _rng(seed, name, obj))
                normals = sorted(r.id for r in recs if r.normal and r.split in ("test", "query"))
                queries = tuple(i for i in defective if i not in set(sup)) + tuple(normals)
                episodes.append(Episode(len(episodes), f"{obj}/*", tuple(SupportRef(s) for s in sup), queries))
        for cls in classes:
            ids = ds.index.images_of[cls]
            cname = cls.split("/", 1)[1]
            fixed = [i for i in ids if ds.record(i).split == "support"]
            if fixed:  # the user fixed supports and queries (folder adapter)
                obj = cls.split("/", 1)[0]
                queries = sorted(r.id for r in ds.index.records.values() if r.object == obj and r.split == "query")
                if not queries:
                    skipped.append(f"{cls}: no query image")
                    continue
                rng = _rng(seed, name, cls)
                if name == "fss":
                    for q in queries:
                        refs = tuple(_support_ref(ds, s, cname, proto, rng) for s in _draw(fixed, shot, rng))
                        episodes.append(Episode(len(episodes), cls, refs, (q,)))
                else:
                    sup = _draw(fixed, shot, rng)
                    episodes.append(Episode(len(episodes), cls, tuple(SupportRef(s) for s in sup), tuple(queries)))
                continue
            if len(ids) < 2:
                skipped.append(f"{cls}: only {len(ids)} image(s), a query needs a different support image")
                continue
            rng = _rng(seed, name, cls)
            if name == "fss":
                for q in ids:
                    pool = [i for i in ids if i != q]
                    sup = _draw(pool, shot, rng)
                    refs = tuple(_support_ref(ds, s, cname, proto, rng) for s in sup)
                    episodes.append(Episode(len(episodes), cls, refs, (q,)))
                    if progress:
                        progress()
            else:
                if len(ids) <= shot:
                    skipped.append(f"{cls}: {len(ids)} images, needs more than shot={shot}")
                    continue
                sup = _draw(ids, shot, rng)
                queries = tuple(i for i in ids if i not in set(sup))
                episodes.append(Episode(len(episodes), cls, tuple(SupportRef(s) for s in sup), queries))
    elif name == "fad":
        for obj in test_objects:
            recs = [r for r in ds.index.records.values() if r.object == obj]
            has_split = any(r.split == "train" for r in recs)
            normals = sorted(r.id for r in recs if r.normal and (r.split == "train" or not has_split))
            if not normals:
                skipped.append(f"{obj}: no defect-free images for the support")
                continue
            sup = _draw(normals, shot, _rng(seed, name, obj))
            queries = tuple(sorted(r.id for r in recs if r.id not in set(sup)
                                   and (r.split != "train" if has_split else True)))
            if not any(ds.record(q).masks for q in queries):
                skipped.append(f"{obj}: no defective query images")
                continue
            episodes.append(Episode(len(episodes), f"{obj}/*", tuple(SupportRef(s) for s in sup), queries))
    if not episodes:
        raise FdsError(f"fold {fold} of dataset '{ds.name}' yields no episodes for protocol '{name}' "
                       f"with shot={shot}: " + "; ".join(skipped[:5]))
    body = {
        "version": MANIFEST_VERSION, "dataset": ds.name, "dataset_hash": ds.dataset_hash, "fold": fold,
        "shot": shot, "seed": seed, "protocol": proto, "skipped": skipped,
        "episodes": [e.to_json() for e in episodes],
    }
    body["hash"] = content_hash(body)
    return body


class Manifest:
    """A loaded manifest: provenance fields plus the episode list."""

    def __init__(self, body: dict, path: Path | None = None):
        self.body, self.path = body, path
        self.episodes = [Episode.from_json(e) for e in body["episodes"]]

    def __getattr__(self, key):
        try:
            return self.__dict__["body"][key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def n_queries(self) -> int:
        return sum(len(e.queries) for e in self.episodes)

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FdsError(f"cannot read manifest {path}: {e}") from None
        if not isinstance(body, dict) or "episodes" not in body:
            raise FdsError(f"{path} is not an episode manifest (a JSON object with 'episodes'; this is a JSON "
                           f"{type(body).__name__}); make one with `fdsbench episodes make`")
        stored = body.pop("hash", None)
        if stored != content_hash(body):
            raise FdsError(f"manifest {path} does not match its content hash (edited or truncated); delete it "
                           f"and it will be regenerated")
        body["hash"] = stored
        try:
            return cls(body, path)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FdsError(f"manifest {path} has malformed episodes ({type(e).__name__}: {e}); delete it and "
                           f"it will be regenerated") from None


def manifest_path(workdir: Path, ds: DatasetAdapter, fold: int, shot: int, seed: int, proto: dict) -> Path:
    key = content_hash([ds.dataset_hash, proto], 10)
    return Path(workdir) / "manifests" / f"{ds.name}_fold{fold}_{shot}shot_seed{seed}_{proto['name']}_{key}.json"


def get_manifest(workdir: Path, ds: DatasetAdapter, fold: int, shot: int, seed: int, proto: dict,
                 progress=None) -> Manifest:
    """Load the manifest for these parameters, generating and writing it the first time."""
    path = manifest_path(workdir, ds, fold, shot, seed, proto)
    if path.is_file():
        m = Manifest.load(path)
        if m.dataset_hash == ds.dataset_hash:
            return m
    body = generate(ds, fold, shot, seed, proto, progress)
    atomic_write_json(path, body)
    return Manifest(body, path)


def episode_mask_problems(ds: DatasetAdapter, episodes, protocol: dict) -> list:
    """The problems ``fdsbench datasets check`` would report (mask unreadable, of another size than
    its image, or empty under the adapter's rule) for every mask the given episodes use: the masks of
    the episode's class on its supports and queries (all classes for ``"<object>/*"`` episodes;
    defect-free FAD supports have none)."""
    seen: dict[tuple[str, str], list] = {}
    for ep in episodes:
        fad = ep.defect_class == "*" and protocol.get("name") == "fad"
        for image_id in (*([] if fad else [s.id for s in ep.supports]), *ep.queries):
            rec = ds.record(image_id)
            classes = sorted(rec.masks) if ep.defect_class == "*" else \
                [ep.defect_class] if ep.defect_class in rec.masks else []
            for cls in classes:
                if (image_id, cls) not in seen:
                    seen[(image_id, cls)] = ds.mask_problems(image_id, [cls])
    return [p for ps in seen.values() for p in ps]


def check_episode_masks(ds: DatasetAdapter, episodes, protocol: dict) -> None:
    """Stop with one error naming the files when a mask the episodes use fails the checks of
    ``datasets check`` — an empty support mask or an empty labelled query is never scored silently."""
    problems = episode_mask_problems(ds, episodes, protocol)
    if problems:
        shown = "; ".join(f"{p.path}: {p.message}" for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        opts = (f", or read them another way with --dataset-opt KEY=VALUE (options of '{ds.name}': "
                f"{', '.join(ds.option_names)})") if ds.option_names else ""
        raise FdsError(f"{len(problems)} mask(s) used by these episodes fail `fdsbench datasets check {ds.name} "
                       f"{ds.root}`: {shown}{more}; fix or remove these files{opts} (masks: {ds.mask_rule})")
