"""MVTec AD: 15 categories, defect types as classes, ``good`` images as the normal pool.

Publisher's layout (mvtec.com, MVTec AD download; the same tree every public loader reads)::

    <root>/<category>/train/good/<name>.png                 defect-free training images
    <root>/<category>/test/good/<name>.png                  defect-free test images
    <root>/<category>/test/<defect_type>/<name>.png          defective test images
    <root>/<category>/ground_truth/<defect_type>/<name>_mask.png   0/255 masks

Records: ``train/good`` -> normal, split "train"; ``test/good`` -> normal, split "test"; each
``test/<defect_type>`` image -> class ``<category>/<defect_type>`` (``combined`` is a class of its
own, as published), split "test". Protocols: ``fad`` (K train/good supports, every test image a
query, ground truth = union of defects) and ``per_support`` / the NBR+CaP protocol (paper Table I;
K defect images per category for training, the rest for test — see the README for the episode
change it needs). One fold holding all 15 categories.
"""
from __future__ import annotations

from fdsbench.data import DatasetAdapter, ImageRecord, image_files
from fdsbench.datasets.folds import load as load_folds
from fdsbench.errors import DataError
from fdsbench.registry import register_dataset


def scan_mvtec_like(ad: DatasetAdapter, obj_dir, obj: str, threshold: int = 127) -> list[ImageRecord]:
    """Records of one MVTec-style category folder (shared with the AeBAD-S reader's conventions)."""
    root = ad.root
    records = []
    for img in image_files(obj_dir / "train" / "good"):
        rel = str(img.relative_to(root))
        records.append(ImageRecord(rel, rel, obj, normal=True, split="train"))
    test = obj_dir / "test"
    types = sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")) if test.is_dir() else []
    for t in types:
        used = set()
        for img in image_files(t):
            rel = str(img.relative_to(root))
            if t.name == "good":
                records.append(ImageRecord(rel, rel, obj, normal=True, split="test"))
                continue
            mask = obj_dir / "ground_truth" / t.name / f"{img.stem}_mask.png"
            mrel = str(mask.relative_to(root))
            if not mask.is_file():
                ad.note("error", rel, f"defective test image has no mask {mrel}")
                continue
            used.add(mask.name)
            records.append(ImageRecord(rel, rel, obj, {t.name: {"png": mrel, "threshold": threshold}}, split="test"))
        if t.name != "good":
            for m in image_files(obj_dir / "ground_truth" / t.name):
                if m.name not in used:
                    ad.note("warning", str(m.relative_to(root)), "mask without a test image: ignored")
    gt = obj_dir / "ground_truth"
    if gt.is_dir():
        for g in sorted(p for p in gt.iterdir() if p.is_dir()):
            if not (test / g.name).is_dir():
                ad.note("warning", str(g.relative_to(root)), f"ground_truth folder without test/{g.name}: ignored")
    return records


@register_dataset("mvtec_ad")
class MVTecAD(DatasetAdapter):
    """MVTec AD in the publisher's layout (module docstring)."""

    folds = load_folds("mvtec_ad")
    absent_fold_object = "warning"  # a subset of categories is a legitimate FAD run
    mask_rule = "0/255 PNG <name>_mask.png, foreground = value > 127"
    layout = ("<category>/train/good/*.png, <category>/test/{good,<defect>}/*.png, "
              "<category>/ground_truth/<defect>/<name>_mask.png")

    def scan(self) -> list[ImageRecord]:
        cats = [p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")
                and ((p / "train").is_dir() or (p / "test").is_dir())]
        if not cats:
            raise DataError(f"no <category>/train or <category>/test folder under {self.root}; dataset "
                            f"'{self.name}' expects: {self.layout}")
        records = []
        for c in cats:
            if not (c / "train" / "good").is_dir():
                self.note("warning", c, "no train/good folder: the FAD protocol falls back to test/good supports")
            records += scan_mvtec_like(self, c, c.name)
        return records
