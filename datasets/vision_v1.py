"""VISION V1 (CVPR 2023 VISION workshop): 14 objects, COCO polygon annotations, SOFS folds.

Layout (the official SOFS loader ``datasets/utilis_data.py``)::

    <root>/<Object>/train/_annotations.coco.json   + the images it lists (file_name)
    <root>/<Object>/val/_annotations.coco.json     + the images it lists
    <root>/<Object>/inference/...                   unlabeled: ignored

``train`` and ``val`` are merged into one pool per object; image id = ``<Object>/<subset>/<file_name>``.
A class is (object, category_id) — class key ``<Object>/<category_id>``. For every annotation of an
image, every polygon of ``segmentation`` (flat x1,y1,x2,y2,...) is truncated to int32 and filled;
polygons and annotations sharing a category are OR-ed into one mask per (image, category). Bounding
boxes are ignored. Images keep their size (``height``/``width`` of the JSON, checked against the file).

Scan problems (reported by ``fdsbench datasets check``, the entries concerned left out): an annotation
whose ``category_id`` is not among ``categories`` (error), a category id outside 0..len(categories)-1
(the official loader's class slots; warning), a listed image file that is missing (error), an image
with no annotation (the official loader raises KeyError; left out, warning), a ``file_name`` listed
twice (error), an RLE or malformed polygon (error).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fdsbench.data import DatasetAdapter, ImageRecord
from fdsbench.datasets.folds import load as load_folds
from fdsbench.errors import DataError
from fdsbench.registry import register_dataset

OBJECTS = ["Cable", "Capacitor", "Casting", "Console", "Cylinder", "Electronics", "Groove", "Hemisphere", "Lens",
           "PCB_1", "PCB_2", "Ring", "Screw", "Wood"]
SUBSETS = ("train", "val")
ANNOTATIONS = "_annotations.coco.json"


def read_coco(path: Path) -> dict:
    """Load a COCO annotation file and check the fields the loader uses (one-line DataError)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-download the object's annotations") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: COCO field '{key}' is missing or not a list; expected the Roboflow COCO "
                            f"export of VISION V1")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            raise DataError(f"{path}: categories[{i}] lacks 'id'")
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not {"image_id", "category_id"} <= set(a):
            raise DataError(f"{path}: annotations[{i}] lacks 'image_id' or 'category_id'")
    return data


@register_dataset("vision_v1")
class VisionV1(DatasetAdapter):
    """VISION V1 in the layout of its public release (module docstring)."""

    folds = load_folds("vision_v1")
    protocol_defaults = {"fss": {"crop_size": 518, "area_resize_ratio": 0.01}}
    #: SOFS train.sh: area_resize_ratio per fold
    AREA_RESIZE_RATIO = (0.01, 0.005, 0.01)

    def protocol_defaults_for(self, fold: int) -> dict:
        fss = dict(self.protocol_defaults["fss"])
        if 0 <= fold < len(self.AREA_RESIZE_RATIO):
            fss["area_resize_ratio"] = self.AREA_RESIZE_RATIO[fold]
        return {**self.protocol_defaults, "fss": fss}
    mask_rule = ("COCO polygons, coordinates truncated to int32, each filled with cv2.fillPoly (boundary "
                 "included) as the SOFS loader does; polygons and annotations of one category OR-ed")
    layout = "<Object>/{train,val}/_annotations.coco.json + the images it lists"

    def scan(self) -> list[ImageRecord]:
        records: list[ImageRecord] = []
        found_any = False
        for obj_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            subsets = [s for s in SUBSETS if (obj_dir / s / ANNOTATIONS).is_file()]
            if not subsets:
                if obj_dir.name in OBJECTS:
                    self.note("error", obj_dir, f"object folder has no train/{ANNOTATIONS} nor val/{ANNOTATIONS}")
                continue
            found_any = True
            for subset in subsets:
                records += self._scan_subset(obj_dir.name, subset)
        if not found_any:
            raise DataError(f"no <Object>/train/{ANNOTATIONS} under {self.root}; dataset 'vision_v1' expects: "
                            f"{self.layout} (objects: {', '.join(OBJECTS)})")
        return records

    def _scan_subset(self, obj: str, subset: str) -> list[ImageRecord]:
        folder = self.root / obj / subset
        ann_path = folder / ANNOTATIONS
        data = read_coco(ann_path)
        ann_rel = f"{obj}/{subset}/{ANNOTATIONS}"
        cat_ids = [c["id"] for c in data["categories"]]
        n_slots = len(cat_ids)
        images: dict = {}
        seen_names: dict[str, object] = {}
        for im in data["images"]:
            if im["id"] in images:
                self.note("error", ann_rel, f"image id {im['id']} is listed twice in 'images'")
                continue
            name = str(im["file_name"])
            if name in seen_names:
                self.note("error", f"{obj}/{subset}/{name}",
                          f"file_name listed twice in {ann_rel} (image ids {seen_names[name]} and {im['id']}); "
                          f"the second entry is ignored")
                continue
            seen_names[name] = im["id"]
            images[im["id"]] = im
        polys: dict = {}  # image id -> category -> list of polygons
        warned_slots = set()
        for k, a in enumerate(data["annotations"]):
            iid, cat = a["image_id"], a["category_id"]
            where = f"{ann_rel} annotations[{k}] (id {a.get('id', '?')})"
            if iid not in images:
                self.note("error", ann_rel, f"{where} refers to image id {iid}, which is not in 'images'")
                continue
            if cat not in cat_ids:
                self.note("error", f"{obj}/{subset}/{images[iid]['file_name']}",
                          f"{where}: unknown category id {cat} (categories of {ann_rel}: "
                          f"{', '.join(map(str, cat_ids))})")
                continue
            if not (isinstance(cat, int) and 0 <= cat < n_slots) and cat not in warned_slots:
                warned_slots.add(cat)
                self.note("warning", ann_rel, f"category id {cat} is outside 0..{n_slots - 1}: the official SOFS "
                                              f"loader allocates class slots 0..len(categories)-1 and fails on it")
            seg = a.get("segmentation")
            if isinstance(seg, dict):
                self.note("error", f"{obj}/{subset}/{images[iid]['file_name']}",
                          f"{where}: RLE segmentation is not supported (VISION V1 uses polygons)")
                continue
            good = []
            for poly in seg or []:
                if (not isinstance(poly, list) or len(poly) % 2 or len(poly) < 2
                        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)):
                    self.note("error", f"{obj}/{subset}/{images[iid]['file_name']}",
                              f"{where}: malformed polygon (need a flat list x1,y1,x2,y2,... of numbers)")
                    continue
                good.append(" ".join(str(int(v)) for v in poly))  # truncated toward zero = int32 cast
            if not good:
                if not seg:
                    self.note("warning", f"{obj}/{subset}/{images[iid]['file_name']}",
                              f"{where} has no polygon (bounding box only): ignored")
                continue
            polys.setdefault(iid, {}).setdefault(cat, []).extend(good)
        records = []
        for iid, im in images.items():
            rel = f"{obj}/{subset}/{im['file_name']}"
            if not (self.root / rel).is_file():
                self.note("error", rel, f"image listed in {ann_rel} but missing")
                continue
            if iid not in polys:
                self.note("warning", rel, f"image has no usable annotation in {ann_rel}: left out (the official "
                                          f"loader requires at least one)")
                continue
            h, w = im.get("height"), im.get("width")
            size = (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None
            masks = {str(c): {"polygons": p} for c, p in sorted(polys[iid].items(), key=lambda t: str(t[0]))}
            records.append(ImageRecord(rel, rel, obj, masks, size=size))
        return records
