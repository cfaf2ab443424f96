"""AeBAD-S (Aero-engine Blade Anomaly Detection, single-blade part; Zhang et al., Computers in
Industry 2023): 4 defect types under domain shift; the SOFS domain-shift test set (Table 4).

Layout read by the publisher's loader (zhangzilongc/MMR ``datasets/aebad_S.py``)::

    <root>/AeBAD_S/train/good/<sub>/*.png                   defect-free training images
    <root>/AeBAD_S/test/good/<domain>/*.png                 defect-free test images
    <root>/AeBAD_S/test/<type>/<domain>/*.png               type: ablation, breakdown, fracture, groove
    <root>/AeBAD_S/ground_truth/<type>/<domain>/<same file name>.png
    domain: same, background, illumination, view

``<root>`` may also be the AeBAD_S folder itself. One object ``AeBAD_S``; class = defect type; the
domain is kept in the image id; option ``domain=<name>`` keeps only that domain's test images (the
publisher evaluates per domain). Masks: foreground = value > 127 (our assumption: 0/255 masks; the
publisher's loader divides by the mask maximum). AeBAD-V (video frames without pixel masks) is not
read: its anomaly frames have image-level labels only.
"""
from __future__ import annotations

from fdsbench.data import DatasetAdapter, ImageRecord, image_files
from fdsbench.datasets.folds import load as load_folds
from fdsbench.errors import DataError, FdsError
from fdsbench.registry import register_dataset

DOMAINS = ("same", "background", "illumination", "view")
OBJECT = "AeBAD_S"


@register_dataset("aebad")
class AeBAD(DatasetAdapter):
    """AeBAD-S in the publisher's layout (module docstring)."""

    folds = load_folds("aebad")
    mask_rule = "PNG mask with the image's file name, foreground = value > 127"
    option_names = ("domain",)
    layout = "AeBAD_S/{train/good/<sub>,test/<type>/<domain>,ground_truth/<type>/<domain>}/*.png"

    def __init__(self, root, cache_dir=None, domain: str | None = None, **options):
        if domain is not None and domain not in DOMAINS:
            raise FdsError(f"aebad: unknown domain '{domain}'; known: {', '.join(DOMAINS)}")
        super().__init__(root, cache_dir, **({"domain": domain} if domain else {}), **options)
        self.domain = domain

    def scan(self) -> list[ImageRecord]:
        base = self.root / OBJECT if (self.root / OBJECT).is_dir() else self.root
        if not (base / "test").is_dir():
            raise DataError(f"no AeBAD_S/test folder under {self.root}; dataset 'aebad' expects: {self.layout}")
        records = []
        for img in sorted(p for p in (base / "train" / "good").rglob("*.png")) if (base / "train" / "good").is_dir() else []:
            rel = str(img.relative_to(self.root))
            records.append(ImageRecord(rel, rel, OBJECT, normal=True, split="train"))
        for t in sorted(p for p in (base / "test").iterdir() if p.is_dir() and not p.name.startswith(".")):
            for dom in sorted(p for p in t.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if dom.name not in DOMAINS:
                    self.note("warning", dom, f"unknown domain folder (known: {', '.join(DOMAINS)}): read anyway")
                if self.domain and dom.name != self.domain:
                    continue
                for img in image_files(dom):
                    rel = str(img.relative_to(self.root))
                    if t.name == "good":
                        records.append(ImageRecord(rel, rel, OBJECT, normal=True, split="test"))
                        continue
                    mask = base / "ground_truth" / t.name / dom.name / img.name
                    if not mask.is_file():
                        self.note("error", rel, f"defective test image has no mask "
                                                f"{mask.relative_to(self.root)}")
                        continue
                    records.append(ImageRecord(rel, rel, OBJECT, {t.name: {"png": str(mask.relative_to(self.root)),
                                                                          "threshold": 127}}, split="test"))
        return records
