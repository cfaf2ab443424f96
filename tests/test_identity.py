"""Numbers you can trust: dataset and run identity are content, class-mean scoring where the papers
report per category, warm-up never hides a per-support fit, metric edge cases, one protocol path."""
import json
import shutil
import time
from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fdsbench.datasets import _testing as T
from fdsbench.episodes import get_manifest, protocol_for
from fdsbench.errors import FdsError
from fdsbench.method import Method
from fdsbench.metrics import MeterSet
from fdsbench.registry import get_dataset, register_method
from fdsbench.runner import BenchSpec, report_metrics, run
from fdsbench.types import Requirements

FIT_SLEEP = 0.05


@register_method("mean_colour_id")
class MeanColour(Method):
    """Test method: similarity to the supports' mean defect colour (FAD: distance to normal colour)."""

    requires = Requirements(fad=True)

    @dataclass
    class Config:
        scale: float = 60.0

    def prepare(self, support):
        time.sleep(FIT_SLEEP)  # a per-support "fit" whose time must reach the record
        px = [s.image[s.mask] for s in support.shots if s.mask.any()]
        ref = np.concatenate(px).mean(0) if px else np.concatenate([s.image.reshape(-1, 3) for s in support.shots]).mean(0)
        return ref, not px

    def predict(self, state, query):
        ref, normal = state
        d = np.sqrt(((query.image.astype(np.float32) - ref) ** 2).sum(-1))
        p = 1 - np.exp(-d / self.config.scale) if normal else np.exp(-d / self.config.scale)
        return p.astype(np.float32)


def bench(workdir, **kw):
    base = dict(method="mean_colour_id", dataset="folder", workdir=str(workdir), progress=False, runs=1)
    return run(BenchSpec(**{**base, **kw}), log=lambda m: None)[0]


def open_ds(name, root, tmp_path, **kw):
    return get_dataset(name)(root, cache_dir=tmp_path / "cache", **kw)


# ---- dataset identity -------------------------------------------------------------------------------
def test_same_names_other_masks_never_share_identity_or_records(tmp_path):
    a = T.make_folder(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    T.write_mask(b / "severstal_steel" / "query" / "mask" / "q0_mask.png", T.box_mask(20, 20, 10, 10, 6))
    c = tmp_path / "c"
    shutil.copytree(a, c)  # the same content elsewhere: the same dataset
    ha, hb, hc = (open_ds("folder", r, tmp_path).dataset_hash for r in (a, b, c))
    assert ha != hb and ha == hc
    assert open_ds("folder", a, tmp_path, mask_threshold=0).dataset_hash != ha  # options are identity
    ra = bench(tmp_path / "w", data_root=str(a))
    rb = bench(tmp_path / "w", data_root=str(b))
    assert ra["dataset_hash"] == ha and rb["dataset_hash"] == hb
    assert ra["run_id"] != rb["run_id"] and ra["manifest_hash"] != rb["manifest_hash"]
    assert ra["metrics"]["per_class"] != rb["metrics"]["per_class"]
    assert len(list((tmp_path / "w" / "runs").glob("*.json"))) == 2


def test_threshold_score_mode_and_max_episodes_are_run_identity(synthetic, tmp_path):
    kw = dict(dataset="synthetic", fold=1, max_episodes=2)
    r1 = bench(tmp_path, **kw)
    r2 = bench(tmp_path, threshold=0.2, **kw)
    r3 = bench(tmp_path, score_mode="binned", **kw)
    r4 = bench(tmp_path, dataset="synthetic", fold=1, max_episodes=3)
    assert len({r["run_id"] for r in (r1, r2, r3, r4)}) == 4
    assert r2["threshold"] == 0.2 and r2["metrics"]["threshold"] == 0.2
    assert r3["score_mode"] == "binned" and r3["identity"]["score_mode"] == "binned"
    assert r1["complete"] is False and r1["max_episodes"] == 2
    assert r1["metrics"]["miou"] != r2["metrics"]["miou"]
    assert bench(tmp_path, **kw)["created"] == r1["created"]  # the identical run is reused


# ---- FAD: per category, then the mean ---------------------------------------------------------------
def test_class_mean_scores_equal_sklearn_per_category_averaged():
    rng = np.random.default_rng(0)
    meters = MeterSet(per_class_scores=True)
    pix, img = {}, {}
    for c, scale in (("a/*", 1.0), ("b/*", 0.3)):  # the two categories' scores live on other scales
        for q in range(6):
            gt = np.zeros((12, 12), bool)
            if q % 2:
                gt[2:6, 3:8] = True
            p = (rng.random((12, 12)) * 0.6 + 0.4 * gt * rng.random((12, 12))) * scale
            meters.update(p.astype(np.float32), gt, c, 0 if c == "a/*" else 1, f"{c}{q}")
            pix.setdefault(c, []).append((p.astype(np.float32).ravel(), gt.ravel()))
            img.setdefault(c, []).append((float(p.astype(np.float32).max()), gt.any()))

    class M:  # the manifest's classes
        episodes = [type("E", (), {"class_key": "a/*"}), type("E", (), {"class_key": "b/*"})]

    r = report_metrics(meters.compute(), {"name": "fad"}, M)
    per_pixel = [roc_auc_score(np.concatenate([g for _, g in v]), np.concatenate([s for s, _ in v])) for v in pix.values()]
    per_image = [roc_auc_score([g for _, g in v], [s for s, _ in v]) for v in img.values()]
    assert r["aggregation"] == "class_mean" and r["n_classes"] == 2
    assert r["pixel_auroc"] == pytest.approx(np.mean(per_pixel), abs=1e-12)
    assert r["image_auroc"] == pytest.approx(np.mean(per_image), abs=1e-12)
    pooled = roc_auc_score(np.concatenate([g for v in pix.values() for _, g in v]),
                           np.concatenate([s for v in pix.values() for s, _ in v]))
    assert r["pixel_auroc_pooled"] == pytest.approx(pooled, abs=1e-12) and r["pixel_auroc_pooled"] != r["pixel_auroc"]


def test_fad_run_reports_the_category_mean_and_the_fit_time(tmp_path):
    root = T.make_mvtec(tmp_path / "mvtec")
    rec = bench(tmp_path / "w", dataset="mvtec_ad", data_root=str(root), protocol="fad", shot=2)
    m = rec["metrics"]
    assert rec["aggregation"] == "class_mean" and m["n_classes"] == 2
    per = [d["pixel_auroc"] for d in m["per_class"].values()]
    assert m["pixel_auroc"] == pytest.approx(np.mean(per)) and "pixel_auroc_pooled" in m
    # one prepare per object, warm-up 1: the first fit is still in the record, flagged
    prep = rec["timing"]["prepare"]
    assert prep["n"] >= 1 and prep["total_s"] >= FIT_SLEEP
    assert rec["timing"]["warmup_calls"]["prepare"] == 1


# ---- metric edge cases --------------------------------------------------------------------------------
def test_logits_rank_as_sklearn_on_raw_logits():
    rng = np.random.default_rng(1)
    gt = rng.random((40, 40)) < 0.3
    logits = (18 + 4 * rng.random((40, 40)) + 0.8 * gt).astype(np.float32)  # all above ~17
    m = MeterSet(logits=True)
    m.update(logits, gt, "o/c", 0, "q")
    r = m.compute()
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(gt.ravel(), logits.ravel()), abs=1e-12)
    assert 0.5 < r["pixel_f1_threshold"] <= 1.0  # reported as a probability


def test_exact_mode_is_exact_for_float64_maps():
    base = np.full((4, 4), 0.5)
    gt = np.zeros((4, 4), bool)
    gt[0] = True
    p = base + np.where(gt, 1e-12, 0.0)  # differences far below float32 resolution
    m = MeterSet()
    m.update(p, gt, "o/c", 0, "q")
    r = m.compute()
    assert r["pixel_auroc"] == roc_auc_score(gt.ravel(), p.ravel()) == 1.0
    assert r["pixel_auroc_error_bound"] == 0.0


# ---- one protocol path, no train/test leak ------------------------------------------------------------
def test_episodes_make_and_bench_share_vision_v1_fold_defaults(tmp_path):
    from fdsbench.cli import main

    root = T.make_vision_v1(tmp_path / "v1", per_subset=6, h=48, w=64)
    work = tmp_path / "w"
    assert main(["episodes", "make", "--dataset", "vision_v1", "--data-root", str(root), "--fold", "1",
                 "--workdir", str(work)]) == 0
    made = [json.loads(p.read_text()) for p in (work / "manifests").glob("*.json")]
    ds = get_dataset("vision_v1")(root)
    proto = protocol_for(ds, "fss", 1, 1)
    assert proto["area_resize_ratio"] == 0.005  # SOFS train.sh, fold 1
    m = get_manifest(tmp_path / "w2", ds, 1, 1, 0, proto)
    assert [d["hash"] for d in made] == [m.hash]


def test_normal_pool_never_falls_back_to_test_normals(tmp_path):
    root = T.make_mvtec(tmp_path / "mvtec", categories=("tile",))
    shutil.rmtree(root / "tile" / "train" / "good")
    (root / "tile" / "train" / "good").mkdir()
    T.write_image(root / "tile" / "train" / "good.png")  # keeps the layout valid, not a normal
    ds = open_ds("mvtec_ad", root, tmp_path)
    assert ds.index.normals["tile"] and ds.normal_pool("tile").ids == []


# ---- own data in the SOFS repository's layout ----------------------------------------------------------
def test_sofs_open_domain_layout_is_scored(tmp_path):
    o = tmp_path / "Open_Domain_Data" / "severstal_steel"
    T.write_image(o / "support" / "image" / "56de9f0d1.jpg", 32, 64, seed=1)
    T.write_mask(o / "support" / "mask" / "56de9f0d1_mask.png", T.box_mask(32, 64, 4, 4, 8))
    for k in range(3):
        T.write_image(o / "query" / "image" / f"q{k}.jpg", 32, 64, seed=5 + k)
        T.write_mask(o / "query" / "true_label" / f"q{k}_mask.png", T.box_mask(32, 64, 6, 10 + 8 * k, 7))
    T.write_image(o / "query" / "normal" / "clean.jpg", 32, 64, seed=20)
    T.write_image(o / "query" / "prediction" / "ignored.jpg", 32, 64, seed=21)
    rec = bench(tmp_path / "w", data_root=str(tmp_path / "Open_Domain_Data"))
    m = rec["metrics"]
    assert m["n_queries"] == 4 and m["n_defective_images"] == 3 and m["miou"] is not None
    assert m["n_normal_images"] == 1  # the defect-free query is scored as all background
    ds = open_ds("folder", tmp_path / "Open_Domain_Data", tmp_path)
    assert ds.normal_pool("severstal_steel").ids == []  # a defect-free query is never a support


def test_both_query_mask_folders_is_an_error(tmp_path):
    root = T.make_folder(tmp_path / "own")
    T.write_mask(root / "severstal_steel" / "query" / "true_label" / "q1_mask.png", T.box_mask(20, 20, 1, 1, 3))
    ds = open_ds("folder", root, tmp_path)
    assert any(p.severity == "error" and "true_label" in p.message for p in ds.scan_problems)


# ---- SOFS protocol ------------------------------------------------------------------------------------
def test_sofs_one_crop_size_per_fold_constants_and_label():
    from fdsbench.methods.sofs.method import SOFSMethod
    from fdsbench.types import TrainSource

    m = SOFSMethod.from_preset("test", {"window": 64})
    with pytest.raises(FdsError, match="crop_size=64"):
        m.crop_side(96, "the manifest's support crop size")
    assert m.crop_side(64, "x") == 64 and SOFSMethod.from_preset("test").crop_side(96, "x") == 96

    def src(dataset, fold):
        return TrainSource(dataset, fold, 0, [], {}, None, None)

    v = SOFSMethod.from_preset("test")
    assert v.fold_value(0.0, (1.0, 1.0, 1e5), src("vision_v1", 0), 1e5) == 1.0
    assert v.fold_value(0.0, (1.0, 1.0, 1e5), src("synthetic", 0), 1e5) == 1e5  # not VISION V1
    assert v.label() == "sofs (heat)" and SOFSMethod.from_preset("test", {"output": "binary"}).label() == "sofs (binary)"


@register_method("shot_recorder_id")
class ShotRecorder(Method):
    """Trainable test method that remembers the shot and crop size it was trained for."""

    requires = Requirements(training=True)
    trained: list = []

    def fit(self, train, workdir):
        ShotRecorder.trained.append((train.shot, train.crop_size))

    def state_dict(self):
        import torch

        return {"w": torch.zeros(1)}

    def load_state_dict(self, state):
        pass

    def prepare(self, support):
        return None

    def predict(self, state, query):
        return np.zeros(query.image.shape[:2], np.float32)


def test_training_is_keyed_by_the_test_shot(synthetic, tmp_path):
    ShotRecorder.trained.clear()
    r1 = bench(tmp_path, method="shot_recorder_id", dataset="synthetic", fold=0, shot=1, max_episodes=1)
    r5 = bench(tmp_path, method="shot_recorder_id", dataset="synthetic", fold=0, shot=5, max_episodes=1)
    bench(tmp_path, method="shot_recorder_id", dataset="synthetic", fold=0, shot=1, max_episodes=1, seed=1)
    assert ShotRecorder.trained == [(1, 256), (5, 256)]  # the 1-shot model is reused, not retrained
    assert r1["checkpoint"] != r5["checkpoint"]
    assert r1["trained_on"]["shot"] == 1 and r5["trained_on"]["shot"] == 5


def test_cpu_thread_count_keys_training_and_records(synthetic, tmp_path):
    """torch's CPU sums depend on the thread count, so a model trained, or a record made, with one
    thread is never reused for a run with two."""
    import torch

    ShotRecorder.trained.clear()
    before = torch.get_num_threads()
    kw = dict(method="shot_recorder_id", dataset="synthetic", fold=0, shot=1, max_episodes=1)
    try:
        torch.set_num_threads(1)
        r1 = bench(tmp_path, **kw)
        torch.set_num_threads(2)
        r2 = bench(tmp_path, **kw)
        again = bench(tmp_path, **kw)
    finally:
        torch.set_num_threads(before)
    assert ShotRecorder.trained == [(1, 256), (1, 256)]  # trained once per thread count
    assert r1["checkpoint"] != r2["checkpoint"] and r1["run_id"] != r2["run_id"]
    assert r1["identity"]["torch_threads"] == 1 and r2["trained_on"]["torch_threads"] == 2
    assert again["created"] == r2["created"]  # the same thread count reuses the record
