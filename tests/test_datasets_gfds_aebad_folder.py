"""GFDS collection, AeBAD-S and own-data folder adapters on fixture trees."""
import numpy as np
import pytest

from fdsbench.datasets import _testing as T
from fdsbench.episodes import generate, resolve_protocol
from fdsbench.errors import DataError, FdsError
from fdsbench.registry import get_dataset


def open_ds(name, root, tmp_path, **kw):
    return get_dataset(name)(root, cache_dir=tmp_path / "cache", **kw)


# ---- GFDS -------------------------------------------------------------------------------------------
def test_gfds_products_loader_keys_threshold_and_folds(tmp_path):
    root = T.make_gfds(tmp_path / "gfds")
    ds = open_ds("gfds", root, tmp_path)
    assert ds.index.classes == ["DAGM/Class1_bad", "DAGM/Class2_bad", "Steel/Steel_Am", "tile/tile_crack",
                                "tile/tile_oil"]
    m = ds.load_mask("Class2/images/bad/0001.png", "Class2_bad")
    expect = np.zeros((16, 16), bool)
    expect[4:7, 3:7] = True  # row 3 holds value 20: not > 30
    assert np.array_equal(m, expect)
    assert ds.record("Class1/images/bad/0000.png").masks["Class1_bad"]["png"] == "Class1/ground_truth/bad/0000.PNG"
    assert len(ds.index.normals["tile"]) == 2
    assert ds.test_objects(0) == ["DAGM", "tile"] and ds.test_objects(1) == ["Steel"]
    assert ds.train_objects(0) == ["Steel"]
    assert set(ds.test_objects(2)) == {"DAGM", "tile", "Steel"}
    assert ds.protocol_defaults["fss"]["crops"] is False
    man = generate(ds, 0, 1, 0, resolve_protocol("fss", 1, {}, ds.protocol_defaults))
    assert len(man["episodes"]) == 3 * 4 and all(s["crops"] is None for e in man["episodes"] for s in e["supports"])
    probs = [p for p in ds.check() if "named in fold" not in p.message]
    assert probs == []


def _official_pairing(root, products, shot, seed=2):
    """Independent replay of the GFDS evaluation loop (official main.py) on full paths: per product the
    ``random`` stream is seeded, classes follow main.py's list, (image, mask) path pairs are sorted and
    the supports drawn from the sorted pairs minus the query."""
    import glob
    import random
    out = []
    for product, keys in products:
        rng = random.Random(seed)  # the script's random.seed(2): same stream, no global side effect
        for key in keys:
            folder, defect = key.split("_", 1)
            imgs = sorted(glob.glob(f"{root}/{folder}/images/{defect}/*"))
            gts = sorted(glob.glob(f"{root}/{folder}/ground_truth/{defect}/*"))
            pairs = list(zip(imgs, gts))
            for q in pairs:
                rest = sorted(set(pairs) - {q})
                out.append((key, q[0], [p[0] for p in rng.sample(rest, min(shot, len(rest)))]))
    return out


@pytest.mark.parametrize("shot", [1, 2])
def test_gfds_official_pairing_is_replayed(tmp_path, shot):
    root = tmp_path / "gfds"
    counts = {("Class1", "bad"): 5, ("Class2", "bad"): 4, ("Class10", "bad"): 6, ("Side", "holes"): 5,
              ("Side", "boundary"): 3}
    for (prod, d), n in counts.items():
        for k in range(n):
            T.write_image(root / prod / "images" / d / f"{k:03d}.png", 8, 8, seed=k)
            T.write_mask(root / prod / "ground_truth" / d / f"{k:03d}.png", T.box_mask(8, 8, 2, 2, 3, 255))
    ds = open_ds("gfds", root, tmp_path)
    assert ds.class_order("DAGM") == ["DAGM/Class1_bad", "DAGM/Class2_bad", "DAGM/Class10_bad"]  # not sorted
    assert ds.class_order("Side") == ["Side/Side_holes", "Side/Side_boundary"]
    proto = resolve_protocol("fss", shot, {"draw": "gfds", "resize": 256}, ds.protocol_defaults)
    body = generate(ds, 2, shot, 0, proto)
    got = [(e["class"].split("/", 1)[1], str(root / e["queries"][0]), [str(root / s["id"]) for s in e["supports"]])
           for e in body["episodes"]]
    want = _official_pairing(root, [("DAGM", ["Class1_bad", "Class2_bad", "Class10_bad"]),
                                    ("Side", ["Side_holes", "Side_boundary"])], shot)
    assert sorted(got) == sorted(want) and len(got) == sum(counts.values())
    assert generate(ds, 2, shot, 1, proto)["hash"] != body["hash"]  # seed 1 = another replay seed
    assert "draw" not in resolve_protocol("fss", 1, {"draw": "fdsbench"})  # default keeps old manifest hashes
    with pytest.raises(FdsError, match="crops=false"):
        resolve_protocol("fss", 1, {"draw": "gfds"})
    with pytest.raises(FdsError, match="draw must be"):
        resolve_protocol("fss", 1, {"draw": "official", "crops": False})


def test_gfds_pairing_errors(tmp_path):
    root = T.make_gfds(tmp_path / "gfds")
    (root / "tile" / "ground_truth" / "oil" / "0002_mask.png").unlink()
    (root / "Steel" / "ground_truth" / "Am" / "0000_mask.png").rename(root / "Steel" / "ground_truth" / "Am" / "a.png")
    T.write_image(root / "Extra" / "images" / "x" / "1.png")
    T.write_mask(root / "Extra" / "ground_truth" / "x" / "1.png", T.box_mask(24, 32, 1, 1, 3))
    ds = open_ds("gfds", root, tmp_path)
    msgs = {(p.severity, p.path): p.message for p in ds.scan_problems}
    assert "2 masks for 3 images" in msgs[("error", "tile/ground_truth/oil")]
    assert "tile/tile_oil" not in ds.index.classes
    assert "different names" in msgs[("warning", "Steel/ground_truth/Am")]
    assert "not a GFDS product" in msgs[("warning", "Extra")]
    assert any(p.path == "Extra" and "in no fold" in p.message for p in ds.check())


def test_gfds_wrong_root(tmp_path):
    (tmp_path / "g" / "tile" / "img").mkdir(parents=True)
    with pytest.raises(DataError, match="ProductFolder"):
        open_ds("gfds", tmp_path / "g", tmp_path).index


# ---- AeBAD-S ----------------------------------------------------------------------------------------
def test_aebad_layout_domains_and_normals(tmp_path):
    root = T.make_aebad(tmp_path / "AeBAD")
    ds = open_ds("aebad", root, tmp_path)
    assert ds.index.classes == ["AeBAD_S/ablation", "AeBAD_S/groove"]
    assert len(ds.index.images_of["AeBAD_S/groove"]) == 4
    rec = ds.record("AeBAD_S/test/groove/view/groove_view_1.png")
    assert rec.masks["groove"]["png"] == "AeBAD_S/ground_truth/groove/view/groove_view_1.png"
    assert ds.load_mask(rec.id, "groove").sum() == 16
    splits = sorted(ds.record(i).split for i in ds.index.normals["AeBAD_S"])
    assert splits == ["test", "test", "train", "train", "train", "train"]
    assert [p for p in ds.check() if p.severity == "error"] == []
    view = open_ds("aebad", root, tmp_path, domain="view")
    assert all("/view/" in i for c in view.index.classes for i in view.index.images_of[c])
    assert len(view.index.images_of["AeBAD_S/groove"]) == 2
    # the AeBAD_S folder itself is accepted as the root
    inner = open_ds("aebad", root / "AeBAD_S", tmp_path)
    assert inner.index.classes == ds.index.classes
    with pytest.raises(FdsError, match="unknown domain 'night'"):
        open_ds("aebad", root, tmp_path, domain="night")


def test_aebad_missing_mask(tmp_path):
    root = T.make_aebad(tmp_path / "AeBAD")
    (root / "AeBAD_S" / "ground_truth" / "ablation" / "same" / "ablation_same_0.png").unlink()
    ds = open_ds("aebad", root, tmp_path)
    assert any(p.severity == "error" and p.path == "AeBAD_S/test/ablation/same/ablation_same_0.png"
               and "has no mask" in p.message for p in ds.scan_problems)


# ---- own data folder -----------------------------------------------------------------------------
def test_folder_support_query_split_and_predict_only_queries(tmp_path):
    root = T.make_folder(tmp_path / "own")
    ds = open_ds("folder", root, tmp_path)
    assert ds.index.classes == ["severstal_steel/defect"]
    recs = ds.index.records
    assert sorted(r.split for r in recs.values() if not r.normal) == ["query"] * 3 + ["support"] * 2
    assert recs["severstal_steel/query/image/q0.png"].classes == ["defect"]
    assert recs["severstal_steel/query/image/q1.png"].masks == {}  # predict-only
    assert ds.index.normals == {"severstal_steel": ["severstal_steel/normal/n0.png"]}
    assert ds.test_objects(0) == ["severstal_steel"]
    assert [p for p in ds.check() if p.severity == "error"] == []


def test_folder_mask_rule_exactly_255_or_threshold(tmp_path):
    root = T.make_folder(tmp_path / "own")
    m = T.box_mask(20, 20, 2, 2, 5)
    m[10:12, 10:12] = 128  # not target under the SOFS open-domain rule
    T.write_mask(root / "severstal_steel" / "support" / "mask" / "s0_mask.png", m)
    ds = open_ds("folder", root, tmp_path)
    assert ds.load_mask("severstal_steel/support/image/s0.jpg", "defect").sum() == 25
    ds2 = open_ds("folder", root, tmp_path, mask_threshold=0)
    assert ds2.load_mask("severstal_steel/support/image/s0.jpg", "defect").sum() == 29
    assert ds2.mask_rule == "foreground = value > 0"


def test_folder_missing_support_mask_and_empty_mask(tmp_path):
    root = T.make_folder(tmp_path / "own")
    (root / "severstal_steel" / "support" / "mask" / "s1_mask.png").unlink()
    T.write_mask(root / "severstal_steel" / "query" / "mask" / "q0_mask.png", np.ones((20, 20)))  # 0/1 mask
    ds = open_ds("folder", root, tmp_path)
    probs = ds.check()
    assert any(p.severity == "error" and p.path == "severstal_steel/support/image/s1.jpg" and "no mask" in p.message
               for p in probs)
    assert any(p.severity == "error" and p.path == "severstal_steel/query/mask/q0_mask.png" and "empty" in p.message
               for p in probs)
