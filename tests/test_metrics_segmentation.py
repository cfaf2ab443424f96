"""Segmentation metrics against a brute-force per-class accumulation written independently here."""
import numpy as np
import pytest
from collections import defaultdict

from fdsbench.metrics import MeterSet


def random_queries(seed, n_ep=7, q_per=3, classes=("a/x", "a/y", "b/z")):
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n_ep):
        c = classes[e % len(classes)]
        for q in range(q_per):
            h, w = rng.integers(20, 40), rng.integers(20, 40)
            g = np.zeros((h, w), bool)
            kind = rng.integers(0, 4)
            if kind == 1:  # tiny defect
                g[rng.integers(0, h), rng.integers(0, w)] = True
            elif kind >= 2:
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                g[y:y + rng.integers(2, h // 2), x:x + rng.integers(2, w // 2)] = True
            p = np.clip(0.6 * g + rng.random((h, w)) * 0.7 - 0.1, 0, 1)
            if rng.random() < 0.15:
                p[:] = 0.0  # empty prediction
            p[0, 0] = 0.5  # exactly at the threshold: background (p > 0.5 is foreground)
            out.append((p, g, c, e, f"{c.split('/')[0]}/img{e}_{q}"))
    return out


def brute(queries, thr=0.5):
    I, U = defaultdict(int), defaultdict(int)
    Ib = Ub = If = Uf = 0
    ep = defaultdict(lambda: [0, 0])
    img_iou, img_dice = [], []
    for p, g, c, e, q in queries:
        pr = p > thr
        i = np.logical_and(pr, g).sum()
        u = np.logical_or(pr, g).sum()
        I[c] += i
        U[c] += u
        If += i
        Uf += u
        Ib += np.logical_and(~pr, ~g).sum()
        Ub += np.logical_or(~pr, ~g).sum()
        ep[(e, c)][0] += i
        ep[(e, c)][1] += u
        if g.any():
            img_iou.append(i / u)
            img_dice.append(2 * i / (pr.sum() + g.sum()))
    ious = [I[c] / U[c] for c in sorted(I) if U[c] > 0]
    return {"miou": np.mean(ious), "fbiou": (Ib / Ub + If / Uf) / 2,
            "episode_miou": np.mean([a / b for a, b in ep.values() if b > 0]),
            "per_image_iou": np.mean(img_iou), "per_image_dice": np.mean(img_dice),
            "per_class": {c: I[c] / U[c] if U[c] else None for c in I}}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [0.5, 0.3])
def test_against_brute_force(seed, thr):
    qs = random_queries(seed)
    m = MeterSet(threshold=thr, score_mode="off")
    for p, g, c, e, q in qs:
        m.update(p, g, class_key=c, episode=e, query_id=q)
    r = m.compute()
    b = brute(qs, thr)
    for k in ("miou", "fbiou", "episode_miou", "per_image_iou", "per_image_dice"):
        assert abs(r[k] - b[k]) < 1e-9, k
    for c, v in b["per_class"].items():
        assert abs(r["per_class"][c]["iou"] - v) < 1e-9
    assert r["n_queries"] == len(qs) and r["n_episodes"] == 7
    assert r["per_class"]["a/x"]["episodes"] == 3 and r["per_class"]["a/x"]["images"] == 9
    assert r["threshold"] == thr


def test_miou_is_class_pooled_not_episode_mean():
    m = MeterSet(score_mode="off")
    g1 = np.zeros((10, 10), bool)
    g1[:5] = True                       # 50 px, fully predicted
    g2 = np.zeros((10, 10), bool)
    g2[0, 0] = True                     # 1 px, missed
    m.update(g1.astype(float), g1, "o/c", 0, "q1")
    m.update(np.zeros((10, 10)), g2, "o/c", 1, "q2")
    r = m.compute()
    assert r["miou"] == pytest.approx(50 / 51)
    assert r["episode_miou"] == pytest.approx(0.5)
    assert r["per_image_iou"] == pytest.approx(0.5)


def test_empty_masks_conventions():
    m = MeterSet(score_mode="off")
    z = np.zeros((6, 6), bool)
    m.update(np.zeros((6, 6)), z, "o/c", 0, "normal_clean")       # empty union
    fp = np.zeros((6, 6))
    fp[0, 0] = 0.9
    m.update(fp, z, "o/c", 0, "normal_fp")                          # false positive on normal
    g = z.copy()
    g[2:4, 2:4] = True
    m.update(g.astype(float), g, "o/c", 1, "defect")                # perfect
    r = m.compute()
    assert r["per_image_iou"] == 1.0 and r["n_defective_images"] == 1   # defective only
    assert r["per_image_iou_all"] == pytest.approx((1 + 0 + 1) / 3)     # empty union = 1, FP = 0
    assert r["per_image_dice_all"] == pytest.approx((1 + 0 + 1) / 3)
    assert r["image_acc_area"] == pytest.approx(2 / 3)                 # normal_fp is misjudged
    assert r["image_auroc_area"] == 1.0  # areas 0, 1 (normal) vs 4 (defective)
    assert r["miou"] == pytest.approx(4 / 5)
    # a class whose union is empty everywhere has no IoU and is left out of the mean, named, and
    # still counted in n_classes (so n_classes equals the classes of the manifest)
    m2 = MeterSet(score_mode="off")
    m2.update(np.zeros((6, 6)), z, "o/empty", 0, "q")
    m2.update(g.astype(float), g, "o/c", 1, "q")
    r2 = m2.compute()
    assert r2["per_class"]["o/empty"]["iou"] is None and r2["miou"] == 1.0 and r2["n_classes"] == 2
    assert r2["empty_union_classes"] == ["o/empty"] and r2["empty_union"] == "excluded from the mean"
    assert r2["episode_miou"] == 1.0


def test_size_buckets():
    m = MeterSet(score_mode="off")
    H = W = 100  # 10_000 px: 0.3 % = 30 px, 2 % = 200 px
    sizes = {"tiny": 10, "edge_small": 30, "mid": 199, "edge_big": 200, "big": 5000}
    for i, (name, a) in enumerate(sizes.items()):
        g = np.zeros((H, W), bool)
        g.ravel()[:a] = True
        p = np.zeros((H, W))
        p.ravel()[: a // 2] = 1.0  # half detected
        m.update(p, g, "o/c", i, name)
    m.update(np.zeros((H, W)), np.zeros((H, W), bool), "o/c", 9, "normal")
    r = m.compute()["by_size"]
    assert {k: v["images"] for k, v in r["area_ratio"].items()} == {"<0.3%": 1, "0.3%-2%": 2, ">=2%": 2}
    assert {k: v["images"] for k, v in r["area_px"].items()} == {"<900px": 4, "900px-8100px": 1,
                                                                  ">=8100px": 0}
    assert r["area_ratio"]["<0.3%"]["iou"] == pytest.approx(5 / 10)
    assert r["area_ratio"][">=2%"]["iou"] == pytest.approx((100 + 2500) / (200 + 5000))
    assert r["area_px"][">=8100px"]["iou"] is None
    custom = MeterSet(score_mode="off", area_edges=(50, 1000))
    g = np.zeros((10, 10), bool)
    g[:6] = True
    custom.update(g.astype(float), g, "o/c", 0, "q")
    assert custom.compute()["by_size"]["area_px"]["50px-1000px"]["images"] == 1
