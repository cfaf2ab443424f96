"""The synthetic dataset: the offline default of ``make bench``.

Nine objects (five textures, four parts) in three folds; two to four defect classes per object
(scratch, crack, spot, stain, hole, missing part, contamination); defect area proportions mostly
under 1 % and down to ~0.01 %; defect-free images per object; image sizes from 256 to 1024 px.
Generated deterministically (same bytes for the same version and seed) in a few seconds into the
cache dir, written atomically (a temporary folder renamed into place).

Layout (also readable as a model for own data)::

    <root>/synthetic.json                         version, seed, folds
    <root>/<object>/images/<name>.png              RGB
    <root>/<object>/masks/<class>/<name>.png       0/255, one file per class present
    <root>/<object>/normal/<name>.png              defect-free images
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fdsbench.data import DatasetAdapter, ImageRecord, default_cache_dir
from fdsbench.errors import DataError
from fdsbench.registry import register_dataset

VERSION = 1
FOLDS = [["weave", "washer", "grain"], ["brushed", "board", "tiles"], ["mesh", "bolt", "leather"]]
#: object -> (kind, (min side, max side), defect classes)
OBJECTS = {
    "weave": ("texture", (256, 512), ["scratch", "spot", "stain"]),
    "grain": ("texture", (384, 768), ["crack", "hole"]),
    "brushed": ("texture", (512, 1024), ["scratch", "spot", "contamination", "crack"]),
    "tiles": ("texture", (384, 768), ["crack", "stain", "spot"]),
    "mesh": ("texture", (256, 640), ["hole", "scratch"]),
    "leather": ("texture", (320, 640), ["stain", "crack", "spot"]),
    "washer": ("part", (384, 768), ["scratch", "missing", "spot"]),
    "board": ("part", (512, 1024), ["missing", "contamination", "scratch", "spot"]),
    "bolt": ("part", (256, 512), ["crack", "missing"]),
}
IMAGES_PER_CLASS = 6
NORMALS_PER_OBJECT = 6


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(abs(hash_str("/".join(map(str, keys)))))


def hash_str(s: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") >> 1


# ---- backgrounds ----------------------------------------------------------------------------------
def _texture(obj: str, h: int, w: int, rng) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 1, (h, w)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if obj == "weave":
        base = 0.5 + 0.18 * np.sin(x / 3.0 + phase) * np.sin(y / 3.0) + 0.04 * noise
        tint = (0.75, 0.65, 0.5)
    elif obj == "grain":
        base = 0.55 + 0.2 * np.sin((y + 12 * np.sin(x / 40.0 + phase)) / 6.0) + 0.05 * noise
        tint = (0.8, 0.55, 0.35)
    elif obj == "brushed":
        streak = np.cumsum(rng.normal(0, 1, (h, 1)).astype(np.float32), axis=0) * 0.01
        base = 0.6 + 0.05 * np.sin(y / 1.7 + phase) + streak * 0 + 0.06 * np.repeat(
            rng.normal(0, 1, (h, 1)).astype(np.float32), w, axis=1) + 0.02 * noise
        tint = (0.75, 0.77, 0.8)
    elif obj == "tiles":
        period = int(rng.integers(48, 80))
        grout = ((x.astype(int) % period) < 3) | ((y.astype(int) % period) < 3)
        base = np.where(grout, 0.3, 0.7) + 0.03 * noise
        tint = (0.85, 0.85, 0.8)
    elif obj == "mesh":
        period = int(rng.integers(10, 16))
        wire = ((x.astype(int) % period) < 3) | ((y.astype(int) % period) < 3)
        base = np.where(wire, 0.75, 0.25) + 0.03 * noise
        tint = (0.7, 0.72, 0.75)
    else:  # leather
        small = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
        big = np.kron(small, np.ones((8, 8), np.float32))[:h, :w]
        base = 0.45 + 0.06 * big + 0.05 * noise
        tint = (0.55, 0.35, 0.25)
    img = np.clip(base, 0, 1)[..., None] * np.asarray(tint, np.float32)[None, None]
    return img


def _part(obj: str, h: int, w: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A part on a dark background; returns (image float [h,w,3], part-region bool mask)."""
    canvas = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(canvas)
    cx, cy = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h
    r = min(h, w) * rng.uniform(0.3, 0.4)
    if obj == "washer":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r / 2.2, cy - r / 2.2, cx + r / 2.2, cy + r / 2.2], fill=0)
    elif obj == "bolt":
        ang = rng.uniform(0, np.pi / 3)
        pts = [(cx + r * np.cos(ang + k * np.pi / 3), cy + r * np.sin(ang + k * np.pi / 3)) for k in range(6)]
        d.polygon(pts, fill=255)
        d.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=160)
    else:  # board
        d.rectangle([w * 0.1, h * 0.1, w * 0.9, h * 0.9], fill=255)
    region = np.asarray(canvas) > 0
    noise = rng.normal(0, 0.02, (h, w)).astype(np.float32)
    lum = np.asarray(canvas, np.float32) / 255.0
    if obj == "board":
        img = np.stack([0.1 + 0.0 * lum, 0.35 * lum + 0.1, 0.15 * lum + 0.05], -1)
        traces = Image.new("L", (w, h), 0)
        td = ImageDraw.Draw(traces)
        for _ in range(int(rng.integers(8, 16))):
            y0 = rng.uniform(0.15, 0.85) * h
            td.line([(w * 0.12, y0), (w * rng.uniform(0.3, 0.88), y0)], fill=255, width=int(rng.integers(2, 5)))
        for _ in range(int(rng.integers(3, 6))):
            x0, y0 = rng.uniform(0.2, 0.75) * w, rng.uniform(0.2, 0.75) * h
            td.rectangle([x0, y0, x0 + w * 0.08, y0 + h * 0.05], fill=200)
        t = np.asarray(traces, np.float32)[..., None] / 255.0
        img = img * (1 - t) + t * np.asarray([0.8, 0.7, 0.3], np.float32)
    else:
        img = np.stack([lum * 0.7, lum * 0.7, lum * 0.72], -1) + 0.08
    return img + noise[..., None], region


# ---- defects --------------------------------------------------------------------------------------
def _defect(cls: str, img: np.ndarray, region: np.ndarray, rng) -> np.ndarray:
    """Draw one defect of class ``cls`` into ``img`` (in place); returns its mask (bool)."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    k = int(rng.integers(len(ys)))
    cy, cx = float(ys[k]), float(xs[k])
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    side = min(h, w)
    if cls == "scratch":
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.06, 0.25) * side
        d.line([(cx, cy), (cx + length * np.cos(ang), cy + length * np.sin(ang))], fill=255,
               width=int(rng.integers(1, 4)))
        color, alpha = np.array([0.95, 0.95, 0.95]), 0.85
    elif cls == "crack":
        pts, ang = [(cx, cy)], rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 14))):
            ang += rng.normal(0, 0.5)
            step = rng.uniform(0.01, 0.03) * side
            pts.append((pts[-1][0] + step * np.cos(ang), pts[-1][1] + step * np.sin(ang)))
        d.line(pts, fill=255, width=int(rng.integers(1, 3)))
        color, alpha = np.array([0.05, 0.05, 0.05]), 0.9
    elif cls in ("spot", "hole"):
        r = rng.uniform(1.5, 0.012 * side + 2)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        color = np.array([0.02, 0.02, 0.02]) if cls == "hole" else np.array([0.25, 0.2, 0.15])
        alpha = 0.95 if cls == "hole" else 0.8
    elif cls == "stain":
        r = rng.uniform(0.01, 0.05) * side
        pts = [(cx + r * rng.uniform(0.6, 1.3) * np.cos(t), cy + r * rng.uniform(0.6, 1.3) * np.sin(t))
               for t in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
        d.polygon(pts, fill=255)
        color, alpha = np.array([0.55, 0.45, 0.1]), 0.45
    elif cls == "contamination":
        for _ in range(int(rng.integers(2, 6))):
            ox, oy = cx + rng.normal(0, 0.02 * side), cy + rng.normal(0, 0.02 * side)
            r = rng.uniform(1, 0.006 * side + 1.5)
            d.ellipse([ox - r, oy - r, ox + r, oy + r], fill=255)
        color, alpha = np.array([0.1, 0.3, 0.9]), 0.75
    elif cls == "missing":
        r = rng.uniform(0.02, 0.06) * side
        d.rectangle([cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r * rng.uniform(0.5, 1.0)], fill=255)
        color, alpha = np.array([0.0, 0.0, 0.0]), 1.0
    else:
        raise ValueError(cls)
    mask = np.asarray(m) > 127
    if cls == "missing":
        mask &= region
    if not mask.any():
        mask[int(cy), int(cx)] = True
    a = alpha * mask[..., None]
    img *= 1 - a
    img += a * color[None, None].astype(np.float32)
    return mask


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _render(obj: str, name: str, classes: list[str], seed: int):
    kind, (lo, hi), _ = OBJECTS[obj]
    rng = _rng(VERSION, seed, obj, name)
    h = int(rng.integers(lo, hi + 1))
    w = int(np.clip(h * rng.uniform(0.75, 1.33), lo, hi))
    if kind == "texture":
        img, region = _texture(obj, h, w, rng), np.ones((h, w), bool)
    else:
        img, region = _part(obj, h, w, rng)
        img = np.ascontiguousarray(img, dtype=np.float32)
    masks = {c: _defect(c, img, region, rng) for c in classes}
    pil = Image.fromarray(_to_uint8(img)).filter(ImageFilter.GaussianBlur(0.6))
    return pil, masks


def generate(root: str | os.PathLike, seed: int = 0, objects: list[str] | None = None) -> Path:
    """Write the synthetic dataset to ``root`` (atomically: built beside it, then renamed)."""
    root = Path(root)
    objects = objects or list(OBJECTS)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        for obj in objects:
            classes = OBJECTS[obj][2]
            items = []
            for ci, cls in enumerate(classes):
                for i in range(IMAGES_PER_CLASS):
                    extra = [classes[(ci + 1) % len(classes)]] if i == IMAGES_PER_CLASS - 1 else []
                    items.append((f"{cls}_{i:02d}", [cls] + extra))
            for name, present in items:
                pil, masks = _render(obj, name, present, seed)
                (tmp / obj / "images").mkdir(parents=True, exist_ok=True)
                pil.save(tmp / obj / "images" / f"{name}.png", compress_level=1)
                for cls, m in masks.items():
                    (tmp / obj / "masks" / cls).mkdir(parents=True, exist_ok=True)
                    Image.fromarray((m * 255).astype(np.uint8)).save(tmp / obj / "masks" / cls / f"{name}.png")
            (tmp / obj / "normal").mkdir(parents=True, exist_ok=True)
            for i in range(NORMALS_PER_OBJECT):
                pil, _ = _render(obj, f"good_{i:02d}", [], seed)
                pil.save(tmp / obj / "normal" / f"good_{i:02d}.png", compress_level=1)
        (tmp / "synthetic.json").write_text(json.dumps({"version": VERSION, "seed": seed, "objects": objects,
                                                        "folds": FOLDS}, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def default_root(seed: int = 0) -> Path:
    return default_cache_dir() / f"synthetic-v{VERSION}-seed{seed}"


def ensure(root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The synthetic dataset's root, generated first if missing or of another version."""
    root = Path(root) if root else default_root(seed)
    meta = root / "synthetic.json"
    try:
        ok = json.loads(meta.read_text()).get("version") == VERSION
    except (OSError, ValueError):
        ok = False
    if not ok:
        generate(root, seed)
    return root


@register_dataset("synthetic")
class Synthetic(DatasetAdapter):
    """Generated offline dataset (module docstring). ``DATA_ROOT`` is optional."""

    folds = FOLDS
    protocol_defaults = {"fss": {"crop_size": 256}}
    mask_rule = "PNG per class, 0/255, foreground = value > 127"
    layout = "<object>/images/<name>.png, <object>/masks/<class>/<name>.png, <object>/normal/<name>.png"

    def __init__(self, root=None, cache_dir=None, seed: int = 0, **options):
        if root is None or not (Path(root) / "synthetic.json").exists():
            root = ensure(root, seed)
        super().__init__(root, cache_dir, **options)

    def scan(self) -> list[ImageRecord]:
        records = []
        for obj_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            obj = obj_dir.name
            if not (obj_dir / "images").is_dir():
                raise DataError(f"{obj_dir} has no images/ folder; expected layout: {self.layout}")
            for img in sorted((obj_dir / "images").glob("*.png")):
                masks = {c.name: {"png": str((c / img.name).relative_to(self.root)), "threshold": 127}
                         for c in sorted((obj_dir / "masks").iterdir()) if (c / img.name).is_file()}
                records.append(ImageRecord(f"{obj}/{img.stem}", str(img.relative_to(self.root)), obj, masks))
            for img in sorted((obj_dir / "normal").glob("*.png")):
                records.append(ImageRecord(f"{obj}/normal/{img.stem}", str(img.relative_to(self.root)), obj,
                                           normal=True))
        return records


def montage(path: str | os.PathLike, seed: int = 0, tile: int = 200) -> Path:
    """A 3x3 picture of one defect image per object (defect pixels tinted red), fold by row."""
    ds = Synthetic(None, seed=seed)
    rows = []
    for fold in FOLDS:
        tiles = []
        for obj in fold:
            cls = ds.index.classes_of(obj)[0]
            image_id = ds.index.images_of[cls][0]
            img = ds.load_image(image_id)
            m = ds.load_mask(image_id, cls.split("/", 1)[1])
            img[m] = (0.4 * img[m] + 0.6 * np.array([255, 0, 0])).astype(np.uint8)
            tiles.append(np.asarray(Image.fromarray(img).resize((tile, tile), Image.BILINEAR)))
        rows.append(np.concatenate(tiles, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    return path


if __name__ == "__main__":
    import sys

    print(montage(sys.argv[1] if len(sys.argv) > 1 else "docs/synthetic.png"))
