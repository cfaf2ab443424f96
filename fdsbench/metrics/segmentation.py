"""Segmentation metrics from per-query confusion counts (binary prediction vs ground truth).

Every query contributes one row: tp, fp, fn, tn of its binarised prediction (``p > threshold``;
ties go to background, as the argmax of [1-p, p] in the papers' code) against its ground truth.
Everything below is a pure function of the rows, so merged or resumed runs give the same numbers.

* **mIoU** (SOFS paper §4.1, GFDS paper §6.2): per class c, IoU_c = sum TP / sum (TP+FP+FN)
  over ALL queries of all episodes of c; mIoU = mean of IoU_c over the classes whose summed union
  is > 0 (a class with an empty union everywhere has no defined IoU and is left out; it still
  appears in ``per_class`` with ``iou: None``). Class-level pooling, NOT a mean of episode IoUs.
* **FB-IoU** (GFDS paper §6.2): 1/2 (sum I_bg / sum U_bg + sum I_fg / sum U_fg) pooled over every
  query of the run. ``fbiou_classmean`` is FM-FastSAM's code variant 1/2 (mIoU + IoU_bg).
* **episode_miou**: mean over episodes of the episode's pooled IoU (sum over its queries);
  episodes with an empty union are skipped. Reported under its own name, never as "mIoU".
* **per_image_iou / per_image_dice** (NBR+CaP paper §IV-D): IoU = TP/(TP+FP+FN), Dice =
  2TP/(2TP+FP+FN) per query, averaged over the queries whose ground truth is NOT empty (the
  NBR+CaP protocol scores defective images only). Queries with an empty ground truth (normal
  images) are excluded there; ``per_image_iou_all`` / ``per_image_dice_all`` average over all
  queries with the convention that an empty union (empty GT and empty prediction) scores 1 and an
  empty GT with any false positive scores 0.
* **image_acc_area / image_auroc_area** (NBR+CaP paper §IV-G): image score = predicted defect area
  (pixels with p > threshold); predicted anomalous iff area >= 1; accuracy and ROC AUC against
  "GT not empty".
* **by_size**: defective queries bucketed by GT area proportion (< 0.3 %, 0.3-2 %, >= 2 %) and
  by GT pixel area (< 900 px = 30², 900-8100 px, >= 8100 px = 90²); per bucket the pooled IoU,
  per-image IoU/Dice and image count. Buckets are half-open [lo, hi).
"""
from __future__ import annotations

import numpy as np

RATIO_EDGES = (0.003, 0.02)
AREA_EDGES = (900, 8100)


def confusion(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of two bool arrays of the same shape."""
    n = int(pred.size)
    tp = int(np.count_nonzero(pred & gt))
    npred = int(np.count_nonzero(pred))
    ngt = int(np.count_nonzero(gt))
    fp, fn = npred - tp, ngt - tp
    return tp, fp, fn, n - tp - fp - fn


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else int(num) / int(den)


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return None if not v else float(np.mean(np.asarray(v, np.float64)))


def _bucket_names(edges, fmt) -> list[str]:
    lo = [None, *edges]
    hi = [*edges, None]
    names = []
    for a, b in zip(lo, hi):
        if a is None:
            names.append(f"<{fmt(b)}")
        elif b is None:
            names.append(f">={fmt(a)}")
        else:
            names.append(f"{fmt(a)}-{fmt(b)}")
    return names


def _pct(x):
    return f"{x * 100:g}%"


def _px(x):
    return f"{int(x)}px"


def segmentation_metrics(rows: dict, ratio_edges=RATIO_EDGES, area_edges=AREA_EDGES) -> dict:
    """Aggregate rows (columns of equal length, sorted canonically) into the segmentation metrics.

    Required columns: ``class_key`` (list[str]), ``episode`` (int), ``tp fp fn tn`` (int)."""
    ck = list(rows["class_key"])
    ep = np.asarray(rows["episode"], np.int64)
    tp = np.asarray(rows["tp"], np.int64)
    fp = np.asarray(rows["fp"], np.int64)
    fn = np.asarray(rows["fn"], np.int64)
    tn = np.asarray(rows["tn"], np.int64)
    n = len(ck)
    out: dict = {"n_queries": n}
    uni = tp + fp + fn
    gt_area = tp + fn
    hw = tp + fp + fn + tn

    # per class pooled I/U, distinct episodes, images
    classes = sorted(set(ck))
    ck_arr = np.asarray(ck, dtype=object)
    per_class = {}
    ious = []
    for c in classes:
        m = ck_arr == c
        I, U = int(tp[m].sum()), int(uni[m].sum())
        iou = _ratio(I, U)
        d = m & (gt_area > 0)
        per_class[c] = {
            "iou": iou, "intersection": I, "union": U,
            "episodes": int(np.unique(ep[m]).size), "images": int(m.sum()),
            "defective_images": int(d.sum()),
            "per_image_iou": _mean([_ratio(a, b) for a, b in zip(tp[d].tolist(), uni[d].tolist())]),
            "per_image_dice": _mean([_ratio(2 * a, a + b)
                                     for a, b in zip(tp[d].tolist(), uni[d].tolist())]),
        }
        if iou is not None:
            ious.append(iou)
    out["per_class"] = per_class
    out["miou"] = _mean(ious)
    # a class whose union is empty in every episode (no ground truth and no false positive) has no
    # IoU: it is left out of the mean and named, and n_classes still counts every class scored
    # (official SOFS turns the whole mIoU into NaN there, HSNet counts the class as 0)
    out["n_classes"] = len(classes)
    out["empty_union"] = "excluded from the mean"
    out["empty_union_classes"] = [c for c in classes if per_class[c]["iou"] is None]

    I_fg, U_fg = int(tp.sum()), int(uni.sum())
    I_bg, U_bg = int(tn.sum()), int((tn + fp + fn).sum())
    iou_fg, iou_bg = _ratio(I_fg, U_fg), _ratio(I_bg, U_bg)
    out["iou_fg"], out["iou_bg"] = iou_fg, iou_bg
    out["fbiou"] = None if iou_fg is None or iou_bg is None else (iou_fg + iou_bg) / 2.0
    out["fbiou_classmean"] = (None if out["miou"] is None or iou_bg is None
                              else (out["miou"] + iou_bg) / 2.0)

    # episodes: key (episode, class_key)
    ep_keys = sorted(set(zip(ep.tolist(), ck)))
    out["n_episodes"] = len(ep_keys)
    ep_iou = []
    if n:
        index = {k: i for i, k in enumerate(ep_keys)}
        g = np.fromiter((index[k] for k in zip(ep.tolist(), ck)), np.int64, n)
        I_e = np.zeros(len(ep_keys), np.int64)
        U_e = np.zeros(len(ep_keys), np.int64)
        np.add.at(I_e, g, tp)
        np.add.at(U_e, g, uni)
        ep_iou = [_ratio(a, b) for a, b in zip(I_e.tolist(), U_e.tolist())]
    out["episode_miou"] = _mean(ep_iou)

    # per image (defective queries) and all queries
    d = gt_area > 0
    iou_img = [_ratio(a, b) for a, b in zip(tp[d].tolist(), uni[d].tolist())]
    dice_img = [_ratio(2 * a, a + b) for a, b in zip(tp[d].tolist(), uni[d].tolist())]
    out["per_image_iou"] = _mean(iou_img)
    out["per_image_dice"] = _mean(dice_img)
    out["n_defective_images"] = int(d.sum())
    iou_all = [1.0 if b == 0 else a / b for a, b in zip(tp.tolist(), uni.tolist())]
    dice_all = [1.0 if b == 0 else 2 * a / (a + b) for a, b in zip(tp.tolist(), uni.tolist())]
    out["per_image_iou_all"] = _mean(iou_all)
    out["per_image_dice_all"] = _mean(dice_all)

    # detection by predicted area (NBR+CaP §IV-G)
    area = (tp + fp).astype(np.float64)
    labels = d
    out["image_acc_area"] = None if n == 0 else float(np.mean((area >= 1) == labels))
    from .scores import auroc_exact
    out["image_auroc_area"] = auroc_exact(area[labels], area[~labels])

    # size breakdown over defective queries
    ratio = np.where(hw > 0, gt_area / np.maximum(hw, 1), 0.0)
    by_size = {}
    for kind, val, edges, fmt in (("area_ratio", ratio, ratio_edges, _pct),
                                  ("area_px", gt_area, area_edges, _px)):
        names = _bucket_names(edges, fmt)
        bidx = np.searchsorted(np.asarray(edges, np.float64), val, side="right")
        buckets = {}
        for j, name in enumerate(names):
            m = d & (bidx == j)
            buckets[name] = {
                "images": int(m.sum()),
                "iou": _ratio(int(tp[m].sum()), int(uni[m].sum())),
                "per_image_iou": _mean([_ratio(a, b) for a, b in zip(tp[m].tolist(), uni[m].tolist())]),
                "per_image_dice": _mean([_ratio(2 * a, a + b)
                                         for a, b in zip(tp[m].tolist(), uni[m].tolist())]),
            }
        by_size[kind] = buckets
    out["by_size"] = by_size
    return out
