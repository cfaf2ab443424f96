"""Defect Spectrum adapter: class-index masks (value v = class v-1), MVTec-derived and flat objects."""
import numpy as np
import pytest
from PIL import Image

from fdsbench.datasets import _testing as T
from fdsbench.episodes import generate, resolve_protocol
from fdsbench.registry import get_dataset


@pytest.fixture
def tree(tmp_path):
    return T.make_defect_spectrum(tmp_path / "ds")


def open_ds(root, tmp_path):
    return get_dataset("defect_spectrum")(root, cache_dir=tmp_path / "cache")


def test_class_index_values_and_multi_class_images(tree, tmp_path):
    ds = open_ds(tree, tmp_path)
    assert ds.index.classes == ["DS-Cotton-Fabric/0", "DS-Cotton-Fabric/1", "grid/0", "grid/1"]
    assert len(ds.index.images_of["grid/0"]) == 4  # 3 bent (value 1) + the glue image that also holds value 1
    two = "grid/image/glue/000.png"
    rec = ds.record(two)
    assert rec.classes == ["0", "1"] and rec.masks["1"] == {"png": "grid/mask/glue/000_mask.png", "value": 2, "indices": True}
    m0, m1 = ds.load_mask(two, "0"), ds.load_mask(two, "1")
    assert m0.sum() == 16 and m1.sum() == 25 and not (m0 & m1).any()
    assert ds.index.normals == {"grid": ["grid/image/good/000.png"]}
    assert ds.record("DS-Cotton-Fabric/image/1.jpg").classes == ["1"]
    # episodes: the two-class image is a query of both classes, never with the other's pixels
    man = generate(ds, 0, 1, 0, resolve_protocol("fss", 1, {"crop_size": 8}))
    assert sorted(e["class"] for e in man["episodes"] if two in e["queries"]) == ["grid/0", "grid/1"]
    assert ds.test_objects(0) == ["grid"] and ds.test_objects(2) == ["DS-Cotton-Fabric"]
    assert ds.test_objects(3) == ["grid", "DS-Cotton-Fabric"]  # the domain-shift set: non-VISION objects
    assert not [p for p in ds.check() if p.severity == "error" and "named in fold" not in p.message]


def test_unknown_value_rgb_mask_missing_mask_and_size_mismatch(tree, tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[1:3, 1:3] = 3  # grid has 2 defect types -> values 1..2 only
    m[5:7, 5:7] = 1
    T.write_mask(tree / "grid" / "mask" / "bent" / "001_mask.png", m)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8) + 1).save(tree / "grid" / "mask" / "bent" / "002_mask.png")
    (tree / "DS-Cotton-Fabric" / "mask" / "2_mask.png").unlink()
    T.write_mask(tree / "grid" / "mask" / "glue" / "001_mask.png", T.box_mask(10, 20, 1, 1, 3, 2))
    ds = open_ds(tree, tmp_path)
    probs = [p for p in ds.check() if "named in fold" not in p.message]
    errs = {p.path: p.message for p in probs if p.severity == "error"}
    assert "unknown category id: value 3" in errs["grid/mask/bent/001_mask.png"]
    assert ds.record("grid/image/bent/001.png").classes == ["0"]  # the known class is kept
    assert "single-channel" in errs["grid/mask/bent/002_mask.png"]
    assert "mask not found" in errs["DS-Cotton-Fabric/image/2.jpg"]
    assert "20x10" in errs["grid/mask/glue/001_mask.png"] and "20x20" in errs["grid/mask/glue/001_mask.png"]
    assert "grid/image/bent/002.png" not in ds.index.records


def test_toothbrush_and_flat_class_counts_follow_the_official_loader(tmp_path):
    root = tmp_path / "ds"
    for k in range(2):
        T.write_image(root / "toothbrush" / "image" / "defective" / f"{k:03d}.png", 8, 8)
        T.write_mask(root / "toothbrush" / "mask" / "defective" / f"{k:03d}_mask.png", T.box_mask(8, 8, 1, 1, 2, 3))
        T.write_image(root / "DS-DAGM" / "image" / f"{k}.png", 8, 8)
        T.write_mask(root / "DS-DAGM" / "mask" / f"{k}_mask.png", T.box_mask(8, 8, 1, 1, 2, 5 + k))
    ds = open_ds(root, tmp_path)
    assert "toothbrush/2" in ds.index.classes  # 3 classes hard-coded although one folder
    assert "DS-DAGM/4" in ds.index.classes and "DS-DAGM/5" not in ds.index.classes  # DS-DAGM has 5
    assert any("value 6" in p.message for p in ds.scan_problems)


def test_publisher_download_is_read_in_place(tree, tmp_path):
    pub = tmp_path / "Defect_Spectrum"
    (pub / "DS-MVTec").mkdir(parents=True)
    (tree / "grid").rename(pub / "DS-MVTec" / "grid")
    (tree / "DS-Cotton-Fabric").rename(pub / "DS-Cotton-Fabric")
    for k in range(2):
        T.write_image(pub / "DS-VISION" / "Ring" / "image" / f"{k}.png", 12, 12)
        T.write_mask(pub / "DS-VISION" / "Ring" / "mask" / f"{k}_mask.png", T.box_mask(12, 12, 1, 1, 3, 4))
        T.write_mask(pub / "DS-VISION" / "Ring" / "rbg_mask" / f"{k}_rbg_mask.png", T.box_mask(12, 12, 1, 1, 3))
    T.write_image(pub / "synthetic_MVTec" / "grid" / "image" / "x" / "0.png")
    ds = open_ds(pub, tmp_path)
    assert ds.index.objects == ["DS-Cotton-Fabric", "Ring_VISION", "grid"]
    assert "Ring_VISION/3" in ds.index.classes and "grid/1" in ds.index.classes
    assert ds.test_objects(0) == ["Ring_VISION", "grid"]
    assert ds.load_mask("DS-MVTec/grid/image/glue/000.png", "1").sum() == 25
