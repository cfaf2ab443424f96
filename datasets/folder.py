"""Own data in a plain folder layout (the SOFS open-domain layout, extended
with optional query masks and a normal pool)::

    <root>/<object>/support/image/<stem>.png|jpg      support images (fixed by the user)
    <root>/<object>/support/mask/<stem>_mask.png      their masks (<stem>.png is accepted too)
    <root>/<object>/query/image/<name>.png|jpg        query images
    <root>/<object>/query/mask/<stem>_mask.png        optional: with it a query is scored,
                                                      without it the query is predict-only
                                                      (``query/true_label/`` as in the SOFS
                                                      repository's examples is read the same way)
    <root>/<object>/query/normal/<name>.png|jpg       optional defect-free queries: scored with an
                                                      all-background ground truth, never supports
    <root>/<object>/normal/<name>.png|jpg             optional defect-free images (normal pool,
                                                      e.g. FAD supports; never queries)

One defect class per object, named ``defect`` (class key ``<object>/defect``). Records carry
split "support" or "query", so that supports are drawn only from support/ and queries only from
query/ (see the README for the episode rule). Masks: foreground = value == 255 (SOFS open domain:
target pixels are exactly 255); option ``mask_threshold=t`` uses value > t instead (e.g. 0 for 0/1
masks). No folds: every object is a test object.
"""
from __future__ import annotations

from pathlib import Path

from fdsbench.data import DatasetAdapter, ImageRecord, image_files
from fdsbench.errors import DataError
from fdsbench.registry import register_dataset

CLASS = "defect"


@register_dataset("folder")
class Folder(DatasetAdapter):
    """User data in the support/query folder layout (module docstring)."""

    folds: list = []
    option_names = ("mask_threshold",)
    layout = ("<object>/support/{image,mask}/, <object>/query/image/ [+ query/mask/ or query/true_label/], "
              "optional <object>/query/normal/ (defect-free queries) and <object>/normal/ (normal pool); "
              "masks <stem>_mask.png")
    #: where query masks may live: our name and the SOFS repository's
    QUERY_MASK_DIRS = ("mask", "true_label")

    def __init__(self, root, cache_dir=None, mask_threshold: int | None = None, **options):
        if mask_threshold is not None:
            options["mask_threshold"] = int(mask_threshold)
        super().__init__(root, cache_dir, **options)
        t = self.options.get("mask_threshold")
        self.mask_rule = "foreground = value == 255" if t is None else f"foreground = value > {t}"

    def _spec(self, mask: Path) -> dict:
        rel = str(mask.relative_to(self.root))
        t = self.options.get("mask_threshold")
        return {"png": rel, "value": 255} if t is None else {"png": rel, "threshold": t}

    @staticmethod
    def _mask_of(folder: Path, img: Path) -> Path | None:
        for cand in (folder / f"{img.stem}_mask.png", folder / f"{img.stem}.png"):
            if cand.is_file():
                return cand
        return None

    def scan(self) -> list[ImageRecord]:
        objs = [p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        objs = [p for p in objs if (p / "support").is_dir() or (p / "query").is_dir()]
        if not objs:
            raise DataError(f"no <object>/support or <object>/query folder under {self.root}; dataset 'folder' "
                            f"expects: {self.layout}")
        records = []
        for o in objs:
            sup = image_files(o / "support" / "image")
            if not sup:
                self.note("error", o / "support" / "image", "no support images: the object cannot be evaluated")
            for img in sup:
                rel = str(img.relative_to(self.root))
                mask = self._mask_of(o / "support" / "mask", img)
                if mask is None:
                    self.note("error", rel, f"support image has no mask support/mask/{img.stem}_mask.png")
                    continue
                records.append(ImageRecord(rel, rel, o.name, {CLASS: self._spec(mask)}, split="support"))
            queries = image_files(o / "query" / "image")
            if not queries:
                self.note("warning", o / "query" / "image", "no query images")
            mask_dirs = [o / "query" / d for d in self.QUERY_MASK_DIRS if (o / "query" / d).is_dir()]
            if len(mask_dirs) > 1:
                self.note("error", o / "query", "both query/mask/ and query/true_label/ exist: keep one "
                                                "(they would disagree about which mask a query has)")
            n_scored = 0
            for img in queries:
                rel = str(img.relative_to(self.root))
                mask = self._mask_of(mask_dirs[0], img) if mask_dirs else None
                n_scored += mask is not None
                records.append(ImageRecord(rel, rel, o.name, {CLASS: self._spec(mask)} if mask else {},
                                           split="query"))
            if queries and mask_dirs and not n_scored:
                self.note("warning", mask_dirs[0], f"no query mask matches a query image (expected "
                                                   f"<stem>_mask.png or <stem>.png): every query is predict-only")
            for img in image_files(o / "query" / "normal"):
                rel = str(img.relative_to(self.root))
                records.append(ImageRecord(rel, rel, o.name, normal=True, split="query"))
            for img in image_files(o / "normal"):
                rel = str(img.relative_to(self.root))
                records.append(ImageRecord(rel, rel, o.name, normal=True, split="train"))
        return records
