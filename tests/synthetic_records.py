"""Run records shaped like the runner's, with chosen numbers, for the results/leaderboard/report tests."""
from __future__ import annotations

import numpy as np

DATASET_HASH = {"synthetic": "651463fa1333cbdb", "vision_v1": "aa11bb22cc33dd44", "defect_spectrum": "de5bec7700000000",
                "gfds": "9f0d5000aaaa0000", "mvtec_ad": "3c7ec0ad00000000", "visa": "715a000000000000",
                "folder": "f01de00000000000"}
PROTOCOL = {"fss": {"name": "fss", "crops": True, "crop_size": 256}, "fad": {"name": "fad", "resize": None},
            "per_support": {"name": "per_support", "scope": "object", "resize": None}}


def make_record(method="a", dataset="synthetic", protocol="fss", fold=0, shot=1, seed=0, per_class=None, *,
                preset="cpu", random=True, fps=10.0, dataset_hash=None, episodes=None, episodes_total=20,
                complete=None, legacy=False, label=None, config_hash=None, fad=None, manifest_hash=None):
    """One record. ``per_class``: {class: IoU}; the run's mIoU is their mean. ``fad``: {metric: (class
    mean, pooled)}. ``legacy``: a record written before complete/aggregation/method_label existed."""
    per_class = {"o/1": 0.2, "o/2": 0.4} if per_class is None else per_class
    dhash = dataset_hash or DATASET_HASH.get(dataset, "0000000000000000")
    mhash = manifest_hash or f"m{dataset[:3]}{dhash[:4]}{fold}{shot}{seed}{protocol[:2]}"
    ious = [v for v in per_class.values() if v is not None]
    episodes = episodes_total if episodes is None else episodes
    metrics = {"miou": float(np.mean(ious)) if ious else None, "fbiou": 0.5 + float(np.mean(ious or [0])) / 2,
               "per_image_iou": 0.9 * float(np.mean(ious or [0])), "per_image_dice": 0.95 * float(np.mean(ious or [0])),
               "pixel_auroc": 0.8, "image_auroc": None, "score_mode": "exact", "threshold": 0.5,
               "n_classes": len(per_class),
               "per_class": {c: {"iou": v, "per_image_iou": None if v is None else 0.9 * v,
                                 "per_image_dice": None if v is None else 0.95 * v, "defective_images": 3 + k,
                                 "image_auroc": None}
                             for k, (c, v) in enumerate(sorted(per_class.items()))},
               "by_size": {"area_ratio": {"<0.3%": {"images": 12, "iou": 0.5 * metrics_mean(ious),
                                                    "per_image_iou": 0.1, "per_image_dice": 0.2},
                                          "0.3%-2%": {"images": 6, "iou": metrics_mean(ious), "per_image_iou": 0.2,
                                                      "per_image_dice": 0.3},
                                          ">=2%": {"images": 0, "iou": None, "per_image_iou": None,
                                                   "per_image_dice": None}}}}
    for m, (mean, pooled) in (fad or {}).items():
        metrics[m], metrics[f"{m}_pooled"] = mean, pooled
    name = f"{method}_{dataset}_fold{fold}_{shot}shot_seed{seed}_{config_hash or 'c0ffee00'}_{mhash[:8]}"
    rec = {"run_id": name, "method": method, "preset": preset, "config_hash": config_hash or "c0ffee0012345678",
           "dataset": dataset, "dataset_hash": dhash, "protocol": PROTOCOL[protocol], "fold": fold, "shot": shot,
           "seed": seed, "manifest_hash": mhash, "episodes": episodes, "episodes_total": episodes_total,
           "weights": {"bb": "random-init" if random else "abc123"}, "device": "cpu", "precision": "fp32",
           "environment": {"device_name": "AMD EPYC", "torch": "2.14.1", "fdsbench": "0.1.0", "python": "3.11.7"},
           "timing": {"fps": fps, "predict": {"p50_s": 1 / fps, "p95_s": 1.5 / fps},
                      "prepare": {"p50_s": 0.05, "n": episodes_total, "first_ms": 80.0},
                      "peak_memory_bytes": 2 ** 30},
           "metrics": metrics}
    if not legacy:
        rec.update({"complete": episodes == episodes_total if complete is None else complete,
                    "max_episodes": None if episodes == episodes_total else episodes,
                    "aggregation": "class_mean" if protocol in ("fad", "per_support") else "pooled",
                    "method_label": label or method, "dataset_options": {}, "score_mode": "exact", "threshold": 0.5})
    return rec


def metrics_mean(values):
    return float(np.mean(values)) if values else 0.0
