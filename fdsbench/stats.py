"""Statistics beyond the papers: mean ± std over runs, bootstrap confidence
intervals over classes, and a paired comparison of two methods on the same manifest.

Pure functions on the ``per_class`` dicts of :meth:`fdsbench.metrics.MeterSet.compute`
(``{class_key: {"iou": ..., ...}}``) or on plain ``{class_key: value}`` dicts. A list of such dicts
(one per run) is first averaged per class over the runs. Classes whose value is ``None`` (metric
undefined) are left out and listed under ``excluded``. Bootstraps are seeded (numpy PCG64) and
percentile intervals; the resampled unit is the class, because mIoU is a mean over classes.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .errors import FdsError


def mean_std(values, ddof: int = 1) -> dict:
    """Mean and standard deviation (``ddof=1``: sample std, the usual "± std over N runs")
    of the non-None values."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ddof": ddof}
    mean = math.fsum(v.tolist()) / n
    std = math.sqrt(math.fsum(((v - mean) ** 2).tolist()) / (n - ddof)) if n > ddof else None
    return {"mean": mean, "std": std, "n": n, "ddof": ddof, "min": float(v.min()), "max": float(v.max())}


def runs_summary(results, keys=("miou", "fbiou", "episode_miou", "per_image_iou", "per_image_dice",
                                "image_auroc", "pixel_auroc", "pixel_f1_max", "aupro")) -> dict:
    """``{key: mean_std(...)}`` over a list of ``compute()`` results (one per run/seed)."""
    return {k: mean_std([r.get(k) for r in results]) for k in keys}


def per_class_values(per_class, metric: str = "iou") -> dict[str, float | None]:
    """``{class: value}`` from a per_class dict, a ``{class: value}`` dict, or a list of either
    (one per run; averaged per class over the runs where it is defined)."""
    if isinstance(per_class, (list, tuple)):
        runs = [per_class_values(p, metric) for p in per_class]
        classes = sorted(set().union(*runs)) if runs else []
        return {c: mean_std([r.get(c) for r in runs])["mean"] for c in classes}
    out = {}
    for c, v in per_class.items():
        if isinstance(v, dict):
            if metric not in v:
                raise FdsError(f"per-class entry '{c}' has no metric '{metric}'; "
                               f"known: {', '.join(sorted(v))}")
            v = v[metric]
        out[c] = None if v is None else float(v)
    return out


def _percentile_ci(boot: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    return float(np.quantile(boot, a)), float(np.quantile(boot, 1.0 - a))


def _check(level, n_boot):
    if not 0 < level < 1:
        raise FdsError(f"confidence level must be in (0, 1), not {level}")
    if int(n_boot) < 1:
        raise FdsError(f"n_boot must be >= 1, not {n_boot}")


def bootstrap_ci(per_class, metric: str = "iou", n_boot: int = 10000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Mean over classes (= mIoU for ``metric="iou"``) with a percentile bootstrap CI obtained by
    resampling classes with replacement ``n_boot`` times."""
    _check(level, n_boot)
    vals = per_class_values(per_class, metric)
    classes = sorted(c for c, v in vals.items() if v is not None)
    excluded = sorted(c for c, v in vals.items() if v is None)
    v = np.asarray([vals[c] for c in classes], np.float64)
    out = {"metric": metric, "n_classes": len(classes), "excluded": excluded, "n_boot": int(n_boot),
           "seed": seed, "level": level, "method": "percentile bootstrap over classes"}
    if v.size == 0:
        return {**out, "mean": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(int(n_boot), v.size))
    boot = v[idx].mean(axis=1)
    lo, hi = _percentile_ci(boot, level)
    return {**out, "mean": float(v.mean()), "ci_low": lo, "ci_high": hi}


def paired_comparison(per_class_a, per_class_b, metric: str = "iou", n_boot: int = 10000,
                      seed: int = 0, level: float = 0.95, max_exact: int = 16) -> dict:
    """Method A minus method B on the same classes (same manifest): per-class differences, their
    mean with a percentile bootstrap CI over classes, wins/losses/ties, and a two-sided paired
    sign-flip (permutation) test p-value — exact over all 2^n sign patterns for n <= ``max_exact``
    classes, otherwise ``n_boot`` seeded random patterns (+1 smoothing)."""
    _check(level, n_boot)
    a, b = per_class_values(per_class_a, metric), per_class_values(per_class_b, metric)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise FdsError(f"paired comparison needs the same classes (same manifest); only in A: "
                       f"{only_a[:5]}, only in B: {only_b[:5]}")
    classes = sorted(c for c in a if a[c] is not None and b[c] is not None)
    excluded = sorted(c for c in a if a[c] is None or b[c] is None)
    d = np.asarray([a[c] - b[c] for c in classes], np.float64)
    out = {"metric": metric, "n_classes": len(classes), "excluded": excluded,
           "per_class_diff": {c: float(x) for c, x in zip(classes, d)}, "n_boot": int(n_boot),
           "seed": seed, "level": level}
    if d.size == 0:
        return {**out, "mean_diff": None, "ci_low": None, "ci_high": None, "p_value": None,
                "wins": 0, "losses": 0, "ties": 0}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    lo, hi = _percentile_ci(boot, level)
    obs = abs(d.mean())
    n = d.size
    if n <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        null = np.abs((signs * d).mean(axis=1))
        p = float(np.mean(null >= obs - 1e-12))
        p_method = "exact sign-flip"
    else:
        signs = rng.choice((1.0, -1.0), size=(int(n_boot), n))
        null = np.abs((signs * d).mean(axis=1))
        p = float((1 + np.sum(null >= obs - 1e-12)) / (1 + int(n_boot)))
        p_method = "monte-carlo sign-flip"
    return {**out, "mean_a": float(np.mean([a[c] for c in classes])),
            "mean_b": float(np.mean([b[c] for c in classes])),
            "mean_diff": float(d.mean()), "ci_low": lo, "ci_high": hi,
            "p_value": p, "p_value_method": p_method,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}
