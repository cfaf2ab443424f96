"""Magnetic-tile surface defects (Huang, Qiu, Yuan, The Visual Computer 2020; public repository
abin24/Magnetic-tile-defect-datasets.): one object, five defect classes, a defect-free pool.

Layout (as published)::

    <root>/MT_<Class>/Imgs/<name>.jpg      grey photo (every image has its own size)
    <root>/MT_<Class>/Imgs/<name>.png      its mask (same stem), 8-bit, 0/255 with anti-aliased edges

Classes Blowhole, Break, Crack, Fray, Uneven -> object ``tile``, class keys ``tile/<Class>``;
``MT_Free`` -> the tile's normal pool (its masks are ignored; ``check`` reports a non-empty one).
Masks: foreground = value > 127. An image of a defect folder whose mask has no foreground pixel
(four Uneven images in the published set) is not an example of its class, and not a verified
defect-free image either: it is left out of the index (no episode uses it, as support, query or
normal) and reported as a warning. One fold containing the tile (no cross-object split exists).
"""
from __future__ import annotations

from fdsbench.data import DatasetAdapter, ImageRecord, Problem
from fdsbench.datasets.folds import load as load_folds
from fdsbench.errors import DataError
from fdsbench.io import read_gray
from fdsbench.registry import register_dataset

CLASSES = ["Blowhole", "Break", "Crack", "Fray", "Uneven"]
OBJECT = "tile"
THRESHOLD = 127


@register_dataset("magnetic_tile")
class MagneticTile(DatasetAdapter):
    """The magnetic-tile dataset in its published layout (module docstring)."""

    folds = load_folds("magnetic_tile")
    mask_rule = f"8-bit PNG with the image's stem, foreground = value > {THRESHOLD}"
    layout = "MT_<Class>/Imgs/<name>.jpg + MT_<Class>/Imgs/<name>.png (Class: Blowhole Break Crack Fray Uneven Free)"

    def scan(self) -> list[ImageRecord]:
        folders = sorted(p for p in self.root.glob("MT_*") if p.is_dir())
        if not folders:
            raise DataError(f"no MT_<Class> folder under {self.root}; dataset 'magnetic_tile' expects: {self.layout}")
        records = []
        for folder in folders:
            cls = folder.name[3:]
            if cls != "Free" and cls not in CLASSES:
                self.note("warning", folder, f"unknown class folder (known: {', '.join(CLASSES)}, Free): ignored")
                continue
            imgs = sorted((folder / "Imgs").glob("*.jpg"))
            if not imgs:
                self.note("error", folder, "no Imgs/*.jpg")
            for img in imgs:
                rel = str(img.relative_to(self.root))
                if cls == "Free":
                    records.append(ImageRecord(rel, rel, OBJECT, normal=True))
                    continue
                mask = img.with_suffix(".png")
                mrel = str(mask.relative_to(self.root))
                try:
                    m = read_gray(mask)
                except DataError as e:
                    self.note("error", rel, str(e))
                    continue
                if not (m > THRESHOLD).any():
                    self.note("warning", mrel, f"mask of class {cls} is empty (no value > {THRESHOLD}): the image "
                                               f"is left out of every episode (neither a {cls} example nor a "
                                               f"verified defect-free image)")
                    continue
                records.append(ImageRecord(rel, rel, OBJECT, {cls: {"png": mrel, "threshold": THRESHOLD}}))
        return records

    def check(self, progress=None) -> list[Problem]:
        problems = super().check(progress)
        for image_id in self.index.normals.get(OBJECT, []):
            mask = (self.root / self.record(image_id).path).with_suffix(".png")
            if mask.is_file():
                try:
                    if (read_gray(mask) > THRESHOLD).any():
                        problems.append(Problem("warning", str(mask.relative_to(self.root)),
                                                "mask of a defect-free (MT_Free) image is not empty"))
                except DataError as e:
                    problems.append(Problem("warning", str(mask.relative_to(self.root)), str(e)))
        return problems
