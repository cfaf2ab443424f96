"""Writers of tiny dataset trees in each publisher's exact layout (file names, JSON/CSV fields, mask
encodings). Used by the tests (``tests/test_datasets_*.py``) and by the index-cache benchmark; not a
dataset of its own. Every writer returns the root and is deterministic."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, h: int = 24, w: int = 32, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # distinct content per file (the last path parts), so fixtures have no duplicate files
    rng = np.random.default_rng([zlib.crc32("/".join(path.parts[-6:]).encode()), seed])
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def write_mask(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def box_mask(h: int, w: int, top: int, left: int, size: int, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[top:top + size, left:left + size] = value
    return m


# ---- VISION V1 ------------------------------------------------------------------------------------
def coco(images: list[dict], annotations: list[dict], n_categories: int = 3) -> dict:
    """A Roboflow-style COCO export: categories 0..n-1 (0 = the super-category), info/licenses."""
    return {"info": {"description": "fixture"}, "licenses": [],
            "categories": [{"id": i, "name": f"cat{i}", "supercategory": "defect" if i else "none"}
                           for i in range(n_categories)],
            "images": images, "annotations": annotations}


def square(x: float, y: float, s: float, points: int = 4) -> list[float]:
    """A flat polygon (x1, y1, ...) approximating a square of side s at (x, y), ``points`` vertices."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False) + np.pi / 4
    r = s / np.sqrt(2)
    cx, cy = x + s / 2, y + s / 2
    return [round(float(v), 2) for p in zip(cx + r * np.cos(t), cy + r * np.sin(t)) for v in p]


def make_vision_v1(root: Path, objects=("PCB_1", "Casting", "Groove"), per_subset: int = 3, h: int = 24,
                   w: int = 32, anns_per_image: int = 2, points: int = 4, write_images: bool = True) -> Path:
    """<Object>/{train,val}/_annotations.coco.json + images. Image k gets ``anns_per_image``
    annotations: category 1 + (k % 2), and a second annotation of category 1 (so that some images
    hold two classes and some two polygons of one class)."""
    root = Path(root)
    for oi, obj in enumerate(objects):
        for subset in ("train", "val"):
            images, anns = [], []
            for k in range(per_subset):
                name = f"img_{k:04d}_jpg.rf.{oi}{k}.jpg"
                if write_images:
                    write_image(root / obj / subset / name, h, w, seed=k)
                images.append({"id": k, "license": 1, "file_name": name, "height": h, "width": w,
                               "date_captured": "2023-01-01T00:00:00+00:00"})
                for a in range(anns_per_image):
                    cat = 1 + (k % 2) if a == 0 else 1
                    x, y = 2 + 5 * a, 3 + 3 * a
                    anns.append({"id": len(anns), "image_id": k, "category_id": cat, "bbox": [x, y, 6, 6],
                                 "area": 36, "segmentation": [square(x, y, 6, points)], "iscrowd": 0})
            p = root / obj / subset / "_annotations.coco.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(coco(images, anns)))
    return root


# ---- Defect Spectrum -------------------------------------------------------------------------------
def make_defect_spectrum(root: Path) -> Path:
    """MVTec-derived ``grid`` (defect types glue, bent + good) and flat ``DS-Cotton-Fabric`` (2 classes),
    class-index masks <name>_mask.png (value v = class v-1)."""
    root = Path(root)
    h, w = 20, 20
    for t, value in (("bent", 1), ("glue", 2)):
        for k in range(3):
            write_image(root / "grid" / "image" / t / f"{k:03d}.png", h, w, seed=k + value)
            m = box_mask(h, w, 2, 2, 5, value)
            if t == "glue" and k == 0:  # an image with two classes
                m[12:16, 12:16] = 1
            write_mask(root / "grid" / "mask" / t / f"{k:03d}_mask.png", m)
    write_image(root / "grid" / "image" / "good" / "000.png", h, w, seed=9)
    for k in range(3):
        write_image(root / "DS-Cotton-Fabric" / "image" / f"{k}.jpg", h, w, seed=20 + k)
        write_mask(root / "DS-Cotton-Fabric" / "mask" / f"{k}_mask.png", box_mask(h, w, 5, 5, 4, 1 + k % 2))
    return root


# ---- MVTec AD / AeBAD-S / VisA ----------------------------------------------------------------------
def make_mvtec(root: Path, categories=("bottle", "tile"), h: int = 16, w: int = 16) -> Path:
    root = Path(root)
    for c in categories:
        for k in range(4):
            write_image(root / c / "train" / "good" / f"{k:03d}.png", h, w, seed=k)
        for k in range(2):
            write_image(root / c / "test" / "good" / f"{k:03d}.png", h, w, seed=10 + k)
        for t in ("crack", "combined"):
            for k in range(3):
                write_image(root / c / "test" / t / f"{k:03d}.png", h, w, seed=20 + k)
                write_mask(root / c / "ground_truth" / t / f"{k:03d}_mask.png", box_mask(h, w, 4, 4, 3 + k))
    return root


def make_aebad(root: Path, h: int = 16, w: int = 16) -> Path:
    base = Path(root) / "AeBAD_S"
    for sub in ("background", "view"):
        for k in range(2):
            write_image(base / "train" / "good" / sub / f"{sub}_{k}.png", h, w, seed=k)
    for dom in ("same", "view"):
        write_image(base / "test" / "good" / dom / f"g_{dom}.png", h, w, seed=3)
        for t in ("ablation", "groove"):
            for k in range(2):
                name = f"{t}_{dom}_{k}.png"
                write_image(base / "test" / t / dom / name, h, w, seed=k)
                write_mask(base / "ground_truth" / t / dom / name, box_mask(h, w, 2, 2, 4))
    return Path(root)


def make_visa(root: Path, objects=("candle", "pcb1"), h: int = 16, w: int = 16, anno: bool = True) -> Path:
    """split_csv/1cls.csv + <obj>/Data/{Images/{Normal,Anomaly},Masks/Anomaly} + <obj>/image_anno.csv.
    Masks hold instance values (1, 2) as the published ones do (foreground = non-zero)."""
    root = Path(root)
    rows = ["object,split,label,image,mask"]
    for obj in objects:
        annos = ["image,label,mask"]
        for k in range(4):
            rel = f"{obj}/Data/Images/Normal/{k:04d}.JPG"
            write_image(root / rel, h, w, seed=k)
            rows.append(f"{obj},{'train' if k < 3 else 'test'},normal,{rel},")
            annos.append(f"{rel},normal,")
        for k in range(4):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{k:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{k:03d}.png"
            write_image(root / rel, h, w, seed=10 + k)
            m = box_mask(h, w, 2, 2, 3, 1)
            m[8:10, 8:10] = 2
            write_mask(root / mrel, m)
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
            label = "scratch" if k < 2 else ("bent" if k == 2 else '"melt, scratch"')
            annos.append(f"{rel},{label},{mrel}")
        if anno:
            (root / obj / "image_anno.csv").write_text("\n".join(annos) + "\n")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


# ---- GFDS --------------------------------------------------------------------------------------------
def make_gfds(root: Path, h: int = 16, w: int = 16) -> Path:
    """tile (2 defect folders + good), Class1 and Class2 (DAGM, masks in .PNG), Steel."""
    root = Path(root)
    spec = {"tile": ["crack", "oil"], "Class1": ["bad"], "Class2": ["bad"], "Steel": ["Am"]}
    for prod, defects in spec.items():
        for d in defects:
            for k in range(3):
                write_image(root / prod / "images" / d / f"{k:04d}.png", h, w, seed=k)
                ext = ".PNG" if prod.startswith("Class") else "_mask.png"
                m = box_mask(h, w, 3, 3, 4, 255)
                m[3, 3:7] = 20  # anti-aliased edge below the > 30 rule
                write_mask(root / prod / "ground_truth" / d / f"{k:04d}{ext}", m)
    for k in range(2):
        write_image(root / "tile" / "images" / "good" / f"{k:04d}.png", h, w, seed=50 + k)
    return root


# ---- own data --------------------------------------------------------------------------------------
def make_folder(root: Path, h: int = 20, w: int = 20) -> Path:
    root = Path(root)
    o = root / "severstal_steel"
    for k in range(2):
        write_image(o / "support" / "image" / f"s{k}.jpg", h, w, seed=k)
        write_mask(o / "support" / "mask" / f"s{k}_mask.png", box_mask(h, w, 2, 2, 5))
    for k in range(3):
        write_image(o / "query" / "image" / f"q{k}.png", h, w, seed=10 + k)
    write_mask(o / "query" / "mask" / "q0_mask.png", box_mask(h, w, 5, 5, 4))
    write_image(o / "normal" / "n0.png", h, w, seed=30)
    return root
