"""MVTec AD and VisA adapters: publisher layouts, normal pools with their split, FAD episodes."""
import numpy as np
import pytest

from fdsbench.datasets import _testing as T
from fdsbench.episodes import generate, resolve_protocol
from fdsbench.errors import DataError
from fdsbench.registry import get_dataset


def open_ds(name, root, tmp_path, **kw):
    return get_dataset(name)(root, cache_dir=tmp_path / "cache", **kw)


def real_problems(ds):
    return [p for p in ds.check() if "named in fold" not in p.message]


# ---- MVTec AD ---------------------------------------------------------------------------------------
def test_mvtec_index_splits_and_fad_episodes(tmp_path):
    root = T.make_mvtec(tmp_path / "mvtec")
    ds = open_ds("mvtec_ad", root, tmp_path)
    assert ds.index.classes == ["bottle/combined", "bottle/crack", "tile/combined", "tile/crack"]
    rec = ds.record("bottle/test/crack/002.png")
    assert rec.split == "test" and rec.masks["crack"] == {"png": "bottle/ground_truth/crack/002_mask.png",
                                                          "threshold": 127}
    assert ds.load_mask("bottle/test/crack/002.png", "crack").sum() == 25
    normals = ds.index.normals["tile"]
    assert sum(ds.record(i).split == "train" for i in normals) == 4
    assert sum(ds.record(i).split == "test" for i in normals) == 2
    assert ds.test_objects(0) == ["bottle", "tile"]
    assert real_problems(ds) == []
    man = generate(ds, 0, 2, 0, resolve_protocol("fad", 2))
    ep = man["episodes"][0]
    assert ep["class"] == "bottle/*"
    assert all(ds.record(s["id"]).split == "train" for s in ep["supports"])
    assert len(ep["queries"]) == 2 + 6 and all(ds.record(q).split == "test" for q in ep["queries"])


def test_mvtec_missing_and_mismatched_masks(tmp_path):
    root = T.make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    T.write_mask(root / "bottle" / "ground_truth" / "combined" / "000_mask.png", np.zeros((8, 16)))
    T.write_mask(root / "bottle" / "ground_truth" / "combined" / "002_mask.png", np.zeros((16, 16)))
    T.write_mask(root / "bottle" / "ground_truth" / "crack" / "009_mask.png", np.zeros((16, 16)))
    (root / "bottle" / "test" / "good" / "001.png").write_bytes(b"not a png")
    ds = open_ds("mvtec_ad", root, tmp_path)
    errs = {p.path: p.message for p in real_problems(ds) if p.severity == "error"}
    assert "has no mask bottle/ground_truth/crack/001_mask.png" in errs["bottle/test/crack/001.png"]
    assert "16x8" in errs["bottle/ground_truth/combined/000_mask.png"]
    assert "is empty" in errs["bottle/ground_truth/combined/002_mask.png"]
    assert "cannot read image" in errs["bottle/test/good/001.png"]
    assert any(p.path == "bottle/ground_truth/crack/009_mask.png" and p.severity == "warning"
               for p in ds.scan_problems)


def test_mvtec_wrong_root(tmp_path):
    (tmp_path / "x" / "bottle" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="train/good"):
        open_ds("mvtec_ad", tmp_path / "x", tmp_path).index


# ---- VisA -------------------------------------------------------------------------------------------
def test_visa_csv_split_classes_from_image_anno_and_nonzero_masks(tmp_path):
    root = T.make_visa(tmp_path / "visa")
    ds = open_ds("visa", root, tmp_path)
    assert ds.index.classes == ["candle/bent", "candle/melt+scratch", "candle/scratch", "pcb1/bent",
                                "pcb1/melt+scratch", "pcb1/scratch"]
    img = "candle/Data/Images/Anomaly/000.JPG"
    assert ds.load_mask(img, "scratch").sum() == 9 + 4  # instance values 1 and 2 are both foreground
    normals = ds.index.normals["pcb1"]
    assert [ds.record(i).split for i in normals] == ["train", "train", "train", "test"]
    assert real_problems(ds) == []
    man = generate(ds, 0, 1, 0, resolve_protocol("fad", 1))
    assert [e["class"] for e in man["episodes"]] == ["candle/*", "pcb1/*"]
    assert all(ds.record(s["id"]).split == "train" for e in man["episodes"] for s in e["supports"])


def test_visa_without_image_anno_uses_one_class(tmp_path):
    root = T.make_visa(tmp_path / "visa", objects=("fryum",), anno=False)
    ds = open_ds("visa", root, tmp_path)
    assert ds.index.classes == ["fryum/anomaly"]
    assert any("image_anno.csv" in p.path and p.severity == "warning" for p in ds.scan_problems)


def test_visa_malformed(tmp_path):
    root = T.make_visa(tmp_path / "visa", objects=("candle",))
    csv = root / "split_csv" / "1cls.csv"
    lines = csv.read_text().splitlines()
    lines[4] = lines[4].replace("0003.JPG", "0099.JPG")  # listed but missing
    lines[5] = lines[5].rsplit(",", 1)[0] + ","  # anomaly row without mask
    lines.append(lines[7])  # listed twice
    lines.append("candle,test,weird,candle/Data/Images/Anomaly/003.JPG,")
    csv.write_text("\n".join(lines) + "\n")
    ds = open_ds("visa", root, tmp_path)
    errs = [(p.path, p.message) for p in ds.scan_problems if p.severity == "error"]
    assert any(path == "candle/Data/Images/Normal/0099.JPG" and "missing" in m for path, m in errs)
    assert any(path == "candle/Data/Images/Anomaly/000.JPG" and "without its mask" in m for path, m in errs)
    assert any("listed twice" in m for _, m in errs)
    assert any("label 'weird'" in m for _, m in errs)
    csv.write_text("obj,split,label,image\n")
    with pytest.raises(DataError, match="expected object,split,label,image,mask"):
        open_ds("visa", root, tmp_path).index
    csv.unlink()
    with pytest.raises(DataError, match="split_csv/1cls.csv not found"):
        open_ds("visa", root, tmp_path).index


def test_normal_pool_holds_only_train_split_normals_where_split(tmp_path):
    ds = open_ds("mvtec_ad", T.make_mvtec(tmp_path / "mvtec", categories=("tile",)), tmp_path)
    pool = ds.normal_pool("tile")
    assert pool.ids == [f"tile/train/good/{k:03d}.png" for k in range(4)]
    assert pool[0].shape == (16, 16, 3)
    folder = open_ds("folder", T.make_folder(tmp_path / "own"), tmp_path)
    assert folder.normal_pool("severstal_steel").ids == ["severstal_steel/normal/n0.png"]
