"""Defect Spectrum (re-annotated MVTec AD, DAGM 2007, VISION V1 parts, Cotton-Fabric), SOFS folds.

Layout (official SOFS loader ``datasets/ds_spectrum_fsss_ND.py``)::

    MVTec-derived objects:  <root>/<obj>/image/<defect_type>/<name>.png|jpg
                            <root>/<obj>/mask/<defect_type>/<name>_mask.png
    flat objects (DS-Cotton-Fabric, DS-DAGM, <Object>_VISION):
                            <root>/<obj>/image/<name>.png|jpg
                            <root>/<obj>/mask/<name>_mask.png

Masks are class-index images: pixel value v in {1..N} marks class v-1, 0 is background. Every
distinct non-zero value of a mask is one (image, class) entry; the episode's ground truth is only
``mask == v`` (other defects of the same image are background). Class key ``<obj>/<v-1>``. The
number of classes per object is the official one (hard-coded for flat objects and toothbrush, else
the number of defect folders); a value beyond it is an unknown category id (error, left out).
Paths with a ``good`` folder are not defect images; ``image/good/*`` become the object's normal pool.
Masks must be single-channel (L, P or I;16): an RGB mask is reported, not converted; the
``rbg_mask`` colour previews of the release are not read.

The root is either the SOFS arrangement above (the VISION part renamed ``<Object>_VISION``, all
objects side by side, as the SOFS README asks) or the publisher's download itself
(``DS-MVTec/<obj>``, ``DS-VISION/<Object>``, ``DS-DAGM``, ``DS-Cotton-Fabric``; ``synthetic_*`` skipped),
which is read in place with the same object names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fdsbench.data import DatasetAdapter, ImageRecord, image_files
from fdsbench.datasets.folds import load as load_folds
from fdsbench.errors import DataError
from fdsbench.registry import register_dataset

#: objects stored flat, with their official number of classes (ds_spectrum_fsss_ND.py)
FLAT_CLASSES = {"DS-DAGM": 5, "DS-Cotton-Fabric": 2, "Capacitor_VISION": 3, "Console_VISION": 4,
                "Groove_VISION": 2, "Ring_VISION": 4, "Screw_VISION": 3, "Wood_VISION": 4}
FIXED_CLASSES = {"toothbrush": 3}
#: top folders of the publisher's release (HF DefectSpectrum/Defect_Spectrum)
PUBLISHED = ("DS-MVTec", "DS-VISION", "DS-DAGM", "DS-Cotton-Fabric")


def read_index_mask(path):
    """(values array, PIL mode) of a class-index mask, without any colour conversion."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im), im.mode
    except FileNotFoundError:
        raise DataError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None


@register_dataset("defect_spectrum")
class DefectSpectrum(DatasetAdapter):
    """Defect Spectrum in its published layout (module docstring)."""

    folds = load_folds("defect_spectrum")
    protocol_defaults = {"fss": {"crop_size": 518}}
    mask_rule = "class-index PNG: class c = pixels equal to c+1 (0 = background), no threshold"
    layout = ("<obj>/image/<defect_type>/<name>.png|jpg + <obj>/mask/<defect_type>/<name>_mask.png, or flat "
              "<obj>/image/<name>.png|jpg + <obj>/mask/<name>_mask.png (DS-DAGM, DS-Cotton-Fabric, <Object>_VISION)")

    def objects(self) -> list[tuple[str, Path]]:
        """(object name, folder): the SOFS arrangement (all objects side by side) or, when the root
        holds the publisher's DS-MVTec / DS-VISION / DS-DAGM / DS-Cotton-Fabric folders, those read in
        place (DS-MVTec/<obj> -> <obj>, DS-VISION/<Object> -> <Object>_VISION)."""
        dirs = lambda p: [d for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        if any((self.root / n).is_dir() for n in PUBLISHED):
            out = []
            for top in dirs(self.root):
                if top.name == "DS-MVTec":
                    out += [(d.name, d) for d in dirs(top)]
                elif top.name == "DS-VISION":
                    out += [(f"{d.name}_VISION", d) for d in dirs(top)]
                elif top.name in ("DS-DAGM", "DS-Cotton-Fabric"):
                    out.append((top.name, top))
                elif top.name.startswith("synthetic_"):
                    continue  # the generated images of the release are not part of the benchmark
                else:
                    out.append((top.name, top))
            return out
        return [(d.name, d) for d in dirs(self.root)]

    def scan(self) -> list[ImageRecord]:
        records: list[ImageRecord] = []
        objs = self.objects()
        if not any((p / "image").is_dir() for _, p in objs):
            raise DataError(f"no <obj>/image/ folder under {self.root}; dataset 'defect_spectrum' expects: "
                            f"{self.layout}")
        for obj, obj_dir in objs:
            if not (obj_dir / "image").is_dir():
                self.note("warning", obj_dir, "folder has no image/ subfolder: ignored")
                continue
            flat = obj in FLAT_CLASSES or (obj.endswith("_VISION") and image_files(obj_dir / "image"))
            if flat:
                n_cls = FLAT_CLASSES.get(obj, 255)
                if obj not in FLAT_CLASSES:
                    self.note("warning", obj_dir, f"{obj} is not an object of the SOFS Defect Spectrum split; its "
                                                  f"number of classes is not checked")
                items = [(img, obj_dir / "mask" / f"{img.stem}_mask.png") for img in image_files(obj_dir / "image")]
            else:
                types = sorted(p for p in (obj_dir / "image").iterdir() if p.is_dir() and not p.name.startswith("."))
                if not types:
                    self.note("error", obj_dir / "image", f"no defect-type folders; expected {self.layout}")
                    continue
                n_cls = FIXED_CLASSES.get(obj, len(types) - (1 if any(t.name == "good" for t in types) else 0))
                items = []
                for t in types:
                    for img in image_files(t):
                        if t.name == "good":
                            rel = str(img.relative_to(self.root))
                            records.append(ImageRecord(rel, rel, obj, normal=True))
                        else:
                            items.append((img, obj_dir / "mask" / t.name / f"{img.stem}_mask.png"))
            for img, mpath in items:
                rel, mrel = str(img.relative_to(self.root)), str(mpath.relative_to(self.root))
                if "good" in img.relative_to(obj_dir).parts:
                    continue
                try:
                    arr, mode = read_index_mask(mpath)
                except DataError as e:
                    self.note("error", mrel if mpath.exists() else rel, str(e))
                    continue
                if arr.ndim != 2:
                    self.note("error", mrel, f"class-index mask must be single-channel, got mode {mode}; "
                                             f"re-export it as 8-bit grey (values 0..N)")
                    continue
                masks = {}
                for v in np.unique(arr):
                    v = int(v)
                    if v == 0:
                        continue
                    if v - 1 >= n_cls:
                        self.note("error", mrel, f"unknown category id: value {v} = class {v - 1}, but {obj} has "
                                                 f"{n_cls} classes (values 1..{n_cls})")
                        continue
                    masks[str(v - 1)] = {"png": mrel, "value": v, "indices": True}
                if not masks:
                    self.note("warning", mrel, "mask has no defect pixel (all 0): image left out")
                    continue
                records.append(ImageRecord(rel, rel, obj, masks))
        return records
