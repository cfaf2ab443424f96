"""VisA (Visual Anomaly, Zou et al. ECCV 2022): 12 objects, anomaly types as classes.

Publisher's layout (amazon-science/spot-diff README; VisA.tar)::

    <root>/split_csv/1cls.csv                  header object,split,label,image,mask
                                               (split train|test, label normal|anomaly,
                                               paths relative to <root>, mask empty for normal rows)
    <root>/<object>/Data/Images/{Normal,Anomaly}/<name>.JPG
    <root>/<object>/Data/Masks/Anomaly/<name>.png
    <root>/<object>/image_anno.csv             header image,label,mask (label: anomaly type(s))

Records follow ``1cls.csv``: normal rows -> normal pool with the csv's split ("train"/"test");
anomaly rows -> one class per image. The class is the anomaly type of ``image_anno.csv`` (matched
on the path from ``Data/`` on); an image listing several types ("melt, scratch") gets the class
"melt+scratch", because VisA masks do not separate the types (our choice, so that an episode's
ground truth is never another class's defect). Without ``image_anno.csv`` the class is "anomaly".
Masks: foreground = value != 0 (the publisher's prepare_data.py binarises ``mask != 0``).
"""
from __future__ import annotations

import csv

from fdsbench.data import DatasetAdapter, ImageRecord
from fdsbench.datasets.folds import load as load_folds
from fdsbench.errors import DataError
from fdsbench.registry import register_dataset

SPLIT_CSV = "split_csv/1cls.csv"
COLUMNS = ["object", "split", "label", "image", "mask"]


def _tail(path: str) -> str:
    """Path from the ``Data`` folder on (how image_anno.csv rows are matched to 1cls.csv rows)."""
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[parts.index("Data"):]) if "Data" in parts else "/".join(parts[-3:])


def class_name(label: str) -> str:
    types = sorted({t.strip().replace("/", "-") for t in label.split(",") if t.strip()})
    return "+".join(types) or "anomaly"


@register_dataset("visa")
class VisA(DatasetAdapter):
    """VisA in the publisher's layout (module docstring)."""

    folds = load_folds("visa")
    absent_fold_object = "warning"
    mask_rule = "PNG masks, foreground = value != 0"
    layout = "split_csv/1cls.csv + <object>/Data/Images/{Normal,Anomaly}/*.JPG + <object>/Data/Masks/Anomaly/*.png"

    def _anno(self, obj: str) -> dict[str, str]:
        path = self.root / obj / "image_anno.csv"
        if not path.is_file():
            self.note("warning", path, "no image_anno.csv: the anomaly type is unknown, class 'anomaly' is used")
            return {}
        out = {}
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: expected the header image,label,mask")
            for row in reader:
                if row["image"] and (row.get("label") or "").strip().lower() != "normal":
                    out[_tail(row["image"])] = row["label"] or ""
        return out

    def scan(self) -> list[ImageRecord]:
        path = self.root / SPLIT_CSV
        if not path.is_file():
            raise DataError(f"{path} not found; dataset 'visa' expects the publisher's tree: {self.layout}")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header != COLUMNS:
                raise DataError(f"{path}: header is {','.join(header) or '(empty)'}, expected {','.join(COLUMNS)}")
            rows = [r for r in reader if r]
        annos: dict[str, dict[str, str]] = {}
        records, seen = [], set()
        for n, row in enumerate(rows, start=2):
            if len(row) != 5:
                self.note("error", SPLIT_CSV, f"line {n}: {len(row)} fields, expected 5 ({','.join(COLUMNS)})")
                continue
            obj, split, label, image, mask = (v.strip() for v in row)
            if label not in ("normal", "anomaly") or split not in ("train", "test"):
                self.note("error", SPLIT_CSV, f"line {n}: label '{label}' / split '{split}' not in "
                                              f"normal|anomaly / train|test")
                continue
            if image in seen:
                self.note("error", image, f"listed twice in {SPLIT_CSV} (line {n})")
                continue
            seen.add(image)
            if not (self.root / image).is_file():
                self.note("error", image, f"image listed in {SPLIT_CSV} (line {n}) but missing")
                continue
            if label == "normal":
                records.append(ImageRecord(image, image, obj, normal=True, split=split))
                continue
            if not mask or not (self.root / mask).is_file():
                self.note("error", image, f"anomaly image without its mask ({mask or 'empty mask column'}, "
                                          f"{SPLIT_CSV} line {n})")
                continue
            if obj not in annos:
                annos[obj] = self._anno(obj)
            cls = class_name(annos[obj].get(_tail(image), "")) if annos[obj] else "anomaly"
            records.append(ImageRecord(image, image, obj, {cls: {"png": mask, "threshold": 0}}, split=split))
        return records
