"""Score metrics against independent references: scikit-learn for AUROC / F1-max, a brute-force
per-region computation (scipy.ndimage.label, every threshold) for AUPRO; binned mode within its
stated bound."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from fdsbench.errors import FdsError
from fdsbench.metrics import BinnedScores, MeterSet, aupro_exact, auroc_exact, f1max_exact
from fdsbench.metrics.meterset import ground_truth_pixels
from fdsbench.metrics.scores import SortedNegatives

TOL = 1e-9


def sk_f1max(labels, scores):
    prec, rec, thr = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)[:-1]
    i = int(np.argmax(f1))
    return float(f1[i]), float(thr[i])


def brute_aupro(maps, gts, limit=0.3):
    """Every distinct threshold, regions by ndimage.label (8-connectivity), trapezoid from (0,0)
    with linear interpolation at FPR = limit, divided by limit."""
    st = np.ones((3, 3), bool)
    regions = []
    for m, g in zip(maps, gts):
        lab, n = ndimage.label(g, structure=st)
        regions += [m[lab == k] for k in range(1, n + 1)]
    negs = np.concatenate([m[~g] for m, g in zip(maps, gts)])
    thr = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fpr, pro = [0.0], [0.0]
    for t in thr:
        fpr.append(np.mean(negs >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    area = 0.0
    for i in range(1, len(fpr)):
        if fpr[i] <= limit:
            area += (fpr[i] - fpr[i - 1]) * (pro[i] + pro[i - 1]) / 2
        else:
            p = pro[i - 1] + (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1]) * (pro[i] - pro[i - 1])
            area += (limit - fpr[i - 1]) * (pro[i - 1] + p) / 2
            break
    return area / limit


def make_case(rng, kind, n=4, h=14, w=15):
    maps, gts = [], []
    for i in range(n):
        g = np.zeros((h, w), bool)
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            g[y:y + rng.integers(1, 5), x:x + rng.integers(1, 6)] = True
        if kind == "ties":
            m = rng.integers(0, 5, (h, w)) / 4.0 + 0.0
            m = np.where(g, np.minimum(m + 0.25, 1.0), m)
        elif kind == "constant":
            m = np.full((h, w), 0.5)
        elif kind == "perfect":
            m = np.where(g, 0.9, 0.1)
        elif kind == "extremes":  # exact 0.0 / 1.0 values, on both classes
            m = rng.choice([0.0, 1.0, 0.5, 0.25], size=(h, w), p=[0.4, 0.3, 0.2, 0.1])
        else:
            m = rng.random((h, w)) * 0.8 + 0.2 * g
        maps.append(m.astype(np.float32).astype(np.float64))
        gts.append(g)
    if kind == "all_negative":
        gts = [np.zeros_like(g) for g in gts]
    if kind == "all_positive":
        gts = [np.ones_like(g) for g in gts]
    return maps, gts


def meter(maps, gts, **kw):
    m = MeterSet(**kw)
    for i, (p, g) in enumerate(zip(maps, gts)):
        m.update(p, g, class_key="o/c", episode=i // 2, query_id=f"q{i}")
    return m.compute()


@pytest.mark.parametrize("kind", ["random", "ties", "constant", "perfect", "extremes"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_pixel_metrics_match_references(kind, seed):
    rng = np.random.default_rng(seed)
    maps, gts = make_case(rng, kind)
    if not any(g.any() for g in gts):
        gts[0][3:5, 3:6] = True
    s = np.concatenate([m.ravel() for m in maps])
    y = np.concatenate([g.ravel() for g in gts])
    r = meter(maps, gts)
    assert abs(r["pixel_auroc"] - roc_auc_score(y, s)) < TOL
    f1, t = sk_f1max(y, s)
    assert abs(r["pixel_f1_max"] - f1) < TOL
    assert r["pixel_f1_threshold"] == pytest.approx(t, abs=1e-7)
    assert abs(r["aupro"] - brute_aupro(maps, gts)) < TOL
    assert 0.0 <= r["aupro"] <= 1.0


def test_image_auroc_and_scores():
    rng = np.random.default_rng(5)
    maps, gts = make_case(rng, "random", n=12)
    gts[0][:] = False
    gts[1][:] = False
    gts[2][2:4, 2:4] = True
    y = np.array([g.any() for g in gts])
    assert 0 < y.sum() < len(y)
    for spec, fn in [("max", lambda m: m.max()), ("mean", lambda m: m.mean()),
                     ("top10%", lambda m: np.sort(m.ravel())[-int(np.ceil(0.1 * m.size)):].mean()),
                     ("area", lambda m: (m > 0.5).sum())]:
        r = meter(maps, gts, image_score=spec)
        ref = roc_auc_score(y, [fn(m) for m in maps])
        assert abs(r["image_auroc"] - ref) < TOL, spec
    r = meter(maps, gts)
    assert abs(r["image_auroc_area"] - roc_auc_score(y, [(m > 0.5).sum() for m in maps])) < TOL
    assert r["image_acc_area"] == pytest.approx(np.mean([(m > 0.5).any() == l for m, l in zip(maps, y)]))


def test_undefined_metrics_are_none():
    rng = np.random.default_rng(0)
    maps, gts = make_case(rng, "all_negative")
    r = meter(maps, gts)
    assert r["pixel_auroc"] is None and r["pixel_f1_max"] is None and r["aupro"] is None
    assert r["image_auroc"] is None and r["per_image_iou"] is None
    maps, gts = make_case(rng, "all_positive")
    for mode in ("exact", "binned"):
        r = meter(maps, gts, score_mode=mode)
        assert r["pixel_auroc"] is None and r["aupro"] is None and r["image_auroc"] is None
        # F1-max is defined without negatives: threshold at the minimum score catches everything
        assert r["pixel_f1_max"] == pytest.approx(1.0)
    for mode in ("exact", "binned"):
        r = MeterSet(score_mode=mode).compute()
        assert r["n_queries"] == 0 and r["miou"] is None and r["pixel_auroc"] is None


@pytest.mark.parametrize("kind", ["random", "ties", "constant", "perfect", "extremes"])
@pytest.mark.parametrize("bins", [3, 4, 100, 10000])
def test_binned_within_stated_bound(kind, bins):
    rng = np.random.default_rng(bins)
    maps, gts = make_case(rng, kind, n=6)
    if not any(g.any() for g in gts):
        gts[0][3:5, 3:6] = True
    ex = meter(maps, gts)
    bi = meter(maps, gts, score_mode="binned", bins=bins)
    assert abs(bi["pixel_auroc"] - ex["pixel_auroc"]) <= bi["pixel_auroc_error_bound"] + 1e-12
    d = ex["pixel_f1_max"] - bi["pixel_f1_max"]
    assert -1e-12 <= d <= bi["pixel_f1_max_error_bound"] + 1e-12
    assert abs(bi["aupro"] - ex["aupro"]) <= bi["aupro_error_bound"] + 1e-12
    # segmentation metrics do not depend on the score mode
    for k in ("miou", "fbiou", "per_image_iou", "image_auroc"):
        assert bi[k] == ex[k]


def test_histograms_equal_with_and_without_torch_loaded(monkeypatch):
    """Binned counts come from torch where it is loaded and from numpy otherwise: the same integers."""
    import sys

    import torch  # noqa: F401  (loaded, as in every benchmark run)

    rng = np.random.default_rng(7)
    s = np.concatenate([rng.random(5000, dtype=np.float32), np.full(3000, 0.25, np.float32), [0.0, 1.0]])
    pos = np.sort(rng.choice(s.size, 400, replace=False))
    with_torch = BinnedScores.histogram(s, pos, 1000)
    monkeypatch.delitem(sys.modules, "torch")
    without = BinnedScores.histogram(s, pos, 1000)
    assert np.array_equal(with_torch[0], without[0]) and np.array_equal(with_torch[1], without[1])
    assert with_torch[0].sum() == s.size and with_torch[0][1001:].sum() == pos.size


def test_binned_bound_is_small_for_fine_bins_and_tight_for_grid_scores():
    rng = np.random.default_rng(3)
    maps, gts = make_case(rng, "random", n=8, h=40, w=40)
    bi = meter(maps, gts, score_mode="binned", bins=10000)
    assert bi["pixel_auroc_error_bound"] < 1e-3
    assert bi["aupro_error_bound"] < 2e-3
    # scores on the bin grid (k/4): no pair shares a bin with a different score -> binned == exact
    maps, gts = make_case(rng, "ties", n=6)
    ex = meter(maps, gts)
    bi = meter(maps, gts, score_mode="binned", bins=8)
    assert abs(bi["pixel_auroc"] - ex["pixel_auroc"]) < TOL
    assert abs(bi["pixel_f1_max"] - ex["pixel_f1_max"]) < TOL


def test_large_random_against_sklearn():
    rng = np.random.default_rng(11)
    n = 200_000
    y = rng.random(n) < 0.05
    s = np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0, 1).astype(np.float32)
    s[rng.random(n) < 0.1] = 0.5  # a big tie block
    pos, neg = s[y], s[~y]
    assert abs(auroc_exact(pos, neg) - roc_auc_score(y, s)) < TOL
    f1, t = f1max_exact(pos, neg)
    f1r, tr = sk_f1max(y, s)
    assert abs(f1 - f1r) < TOL and t == pytest.approx(tr)
    b = BinnedScores(10000)
    b.update(s, np.flatnonzero(y), np.zeros(int(y.sum()), np.int64), np.array([int(y.sum())]))
    r = b.compute()
    assert abs(r["pixel_auroc"] - auroc_exact(pos, neg)) <= r["pixel_auroc_error_bound"]
    assert r["pixel_auroc_error_bound"] < 0.01


def test_aupro_limit_and_regions():
    # two regions of very different size weigh equally (PRO), unlike pixel TPR
    g = np.zeros((20, 20), bool)
    g[0:10, 0:10] = True   # 100 px, detected
    g[15, 15] = True        # 1 px, missed
    m = np.where(g, 0.9, 0.2)
    m[15, 15] = 0.1
    r = meter([m], [g])
    assert abs(r["aupro"] - brute_aupro([m], [g])) < TOL
    assert r["aupro"] == pytest.approx(0.5, abs=1e-12)  # PRO is 0.5 until FPR = 1
    # fpr_limit is honoured and the value stays normalised
    r1 = meter([m], [g], fpr_limit=1.0)
    assert abs(r1["aupro"] - brute_aupro([m], [g], limit=1.0)) < TOL
    assert 0 <= r1["aupro"] <= 1
    # 4- vs 8-connectivity: a pixel touching a 2x2 block diagonally is one region or two
    g2 = np.zeros((6, 6), bool)
    g2[1, 1] = True
    g2[2:4, 2:4] = True
    m2 = np.full((6, 6), 0.1)
    m2[1, 1] = 0.9
    m2[2:4, 2:4] = 0.0  # missed, below every negative: PRO is flat at its FPR=0 value
    assert meter([m2], [g2], connectivity=8)["aupro"] == pytest.approx(1 / 5)
    assert meter([m2], [g2], connectivity=4)["aupro"] == pytest.approx(1 / 2)


def test_input_validation():
    m = MeterSet()
    g = np.zeros((4, 4), bool)
    with pytest.raises(FdsError, match="outside \\[0, 1\\]"):
        m.update(np.full((4, 4), 1.5), g, "o/c", 0, "q1")
    with pytest.raises(FdsError, match="q2"):
        m.update(np.zeros((4, 5)), g, "o/c", 0, "q2")
    with pytest.raises(FdsError, match="outside"):
        m.update(np.full((4, 4), np.nan), g, "o/c", 0, "q3")
    with pytest.raises(FdsError, match="bool"):
        m.update(np.zeros((4, 4)), np.full((4, 4), 255, np.uint8), "o/c", 0, "q4")
    with pytest.raises(FdsError, match="image_score"):
        MeterSet(image_score="median")
    m.update(np.zeros((4, 4)), g, "o/c", 0, "ok")
    with pytest.raises(FdsError, match="twice"):
        m.update(np.zeros((4, 4)), g, "o/c", 0, "ok")
    # logits declared: sigmoid applied explicitly and recorded
    lg = MeterSet(logits=True)
    x = np.array([[-3.0, 0.5], [2.0, -0.1]])
    gt = np.array([[False, True], [True, False]])
    lg.update(x, gt, "o/c", 0, "q")
    r = lg.compute()
    assert r["score_transform"] == "sigmoid" and r["miou"] == 1.0
    assert r["image_auroc"] is None and r["pixel_auroc"] == 1.0


def test_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = rng.random((8, 9)).astype(np.float32)
    g = rng.random((8, 9)) < 0.3
    a, b = MeterSet(), MeterSet()
    a.update(p, g, "o/c", 0, "q")
    b.update(torch.from_numpy(p), torch.from_numpy(g), "o/c", 0, "q")
    assert a.compute() == b.compute()
    c = MeterSet()
    c.update(torch.from_numpy(p).to(torch.bfloat16), g, "o/c", 0, "q")
    assert c.compute()["n_queries"] == 1


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_per_class_scores(mode):
    rng = np.random.default_rng(9)
    classes = {}
    m = MeterSet(score_mode=mode, per_class_scores=True, bins=50)
    for i in range(9):
        c = ["a/*", "b/*", "c/*"][i % 3]
        maps, gts = make_case(rng, "random", n=1)
        gts[0][1:4, 1:5] = True
        classes.setdefault(c, []).append((maps[0], gts[0]))
        m.update(maps[0], gts[0], c, i, f"q{i}")
    r = m.compute()
    vals = []
    for c, items in classes.items():
        single = meter([p for p, _ in items], [g for _, g in items], score_mode=mode, bins=50)
        for k in ("pixel_auroc", "pixel_f1_max", "aupro"):
            assert abs(r["per_class"][c][k] - single[k]) < TOL
        vals.append(single["pixel_auroc"])
    assert r["pixel_auroc_classmean"] == pytest.approx(np.mean(vals))
    # state round trip keeps the per-class scores
    m2 = MeterSet(score_mode=mode, per_class_scores=True, bins=50)
    m2.load_state_dict(m.state_dict())
    assert m2.compute() == r


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [0, 7, 50])  # 0: continuous scores; else many ties
def test_sorted_negatives_give_the_numbers_of_the_negatives_themselves(dtype, levels):
    """All scores sorted minus the positives (never separated) = the negative array itself, `==`."""
    rng = np.random.default_rng(levels)
    for trial in range(40):
        n = int(rng.integers(1, 3000))
        s = (rng.integers(0, levels, n) / max(levels - 1, 1) if levels else rng.random(n)).astype(dtype)
        y = rng.random(n) < rng.uniform(0, 0.7)
        pos = np.sort(s[y], kind="stable")
        w = rng.random(pos.size) + 0.1
        view = SortedNegatives(np.sort(s), pos)
        assert view.size == int((~y).sum())
        for k in {1, view.size // 2 + 1, view.size} - {0}:  # bisection over all scores minus the positives
            assert view.kth_largest(k) == np.sort(s[~y])[-k]
        assert auroc_exact(pos, view) == auroc_exact(pos, s[~y])
        assert f1max_exact(pos, view) == f1max_exact(pos, s[~y])
        for limit in (0.05, 0.3, 1.0):
            assert aupro_exact(pos, w, view, 3, limit) == aupro_exact(pos, w, s[~y], 3, limit)


def test_ground_truth_regions_of_a_shared_mask_are_labelled_once():
    g = np.zeros((40, 50), bool)
    g[2:6, 3:9] = True
    g[20:30, 30:31] = True
    g[29, 31:40] = True  # joins the second region
    fresh = ground_truth_pixels(g.copy(), 8)
    g.setflags(write=False)  # shared masks (the decoded-image cache) are read-only
    first = ground_truth_pixels(g, 8)
    assert ground_truth_pixels(g, 8) is first  # labelled once
    assert ground_truth_pixels(g, 4)[2].tolist() == fresh[2].tolist()  # 4-connectivity: same regions here
    for a, b in zip(first, fresh):
        assert np.array_equal(a, b)
    assert fresh[2].tolist() == [24, 19] and fresh[0].tolist() == np.flatnonzero(g).tolist()
    w = g.copy()  # a writable mask may change: labelled every time
    assert ground_truth_pixels(w, 8) is not ground_truth_pixels(w, 8)


def test_a_read_only_view_of_a_writable_mask_is_not_remembered():
    base = np.zeros((20, 20), bool)
    base[2:5, 2:5] = True
    view = base[:]
    view.setflags(write=False)
    first = ground_truth_pixels(view, 8)
    base[10:12, 10:12] = True  # the owner changes: the view's regions must be counted again
    assert ground_truth_pixels(view, 8)[2].tolist() == [9, 4] != first[2].tolist()
