"""Throughput and peak memory of fdsbench's pixel AUROC / F1-max against scikit-learn.

    python benchmarks/bench_metrics.py [--pixels 1e8] [--sklearn-pixels N] [--bins 10000]

The same synthetic data (seeded; images of --side x --side pixels, a few rectangular defects per
image, scores = noise + a shift on defect pixels, float32) is fed to

* ``MeterSet(score_mode="binned")`` — image by image, constant memory (all metrics: segmentation
  counts, image score, pixel AUROC, F1-max and AUPRO with connected components);
* ``BinnedScores`` alone — the pixel-score histograms only;
* ``MeterSet(score_mode="exact")`` — keeps float32 scores, exact AUROC / F1-max / AUPRO; fed as
  the runner feeds it (``reserve`` of the pixels to come, ``compute(consume=True)`` at the end);
* scikit-learn ``roc_auc_score`` + ``precision_recall_curve`` (+ F1 max) on the concatenated
  arrays (it needs all pixels in memory at once; building those arrays is not timed, their memory
  is counted).

Each runs in its own subprocess; peak memory = peak RSS of that process minus its RSS after
imports and before the data (``resource.getrusage``, Linux). Throughput = pixels / (time of all
updates + final compute); data generation is not timed. Ratios are relative to scikit-learn at the
same pixel count; if --sklearn-pixels is smaller (memory/time), its throughput is measured there
and the output says so (its memory grows linearly with the pixel count, ours stays flat).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def n_images(n_pixels: int, side: int) -> int:
    return max(1, int(round(n_pixels / (side * side))))


def images(n_pixels: int, side: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n_images(n_pixels, side)):
        g = np.zeros((side, side), bool)
        for _ in range(1 + i % 3):
            y, x = rng.integers(0, side - side // 8, 2)
            g[y:y + rng.integers(2, side // 8), x:x + rng.integers(2, side // 8)] = True
        p = rng.random((side, side), dtype=np.float32)
        p *= np.float32(0.7)
        p[g] += np.float32(0.3)
        yield i, p, g


def worker(kind: str, n_pixels: int, side: int, bins: int) -> dict:
    from fdsbench.metrics import BinnedScores, MeterSet
    from sklearn.metrics import precision_recall_curve, roc_auc_score
    base = rss_bytes()
    t_upd = 0.0
    n = 0
    if kind in ("binned", "exact"):
        m = MeterSet(score_mode=kind, bins=bins)
        m.reserve(n_images(n_pixels, side) * side * side)
        for i, p, g in images(n_pixels, side):
            t0 = time.perf_counter()
            m.update(p, g, class_key="o/c", episode=i, query_id=f"q{i}")
            t_upd += time.perf_counter() - t0
            n += p.size
        t0 = time.perf_counter()
        r = m.compute(consume=True)
        t_cmp = time.perf_counter() - t0
        res = {k: r[k] for k in ("pixel_auroc", "pixel_f1_max", "aupro")}
        res["pixel_auroc_error_bound"] = r.get("pixel_auroc_error_bound")
    elif kind == "histograms":
        b = BinnedScores(bins)
        for i, p, g in images(n_pixels, side):
            t0 = time.perf_counter()
            npos = int(np.count_nonzero(g))  # one region per image: PRO histogram cost included
            b.update(p.ravel(), g.ravel(), np.zeros(npos, np.int64), np.array([npos]))
            t_upd += time.perf_counter() - t0
            n += p.size
        t0 = time.perf_counter()
        r = b.compute()
        t_cmp = time.perf_counter() - t0
        res = {"pixel_auroc": r["pixel_auroc"], "pixel_f1_max": r["pixel_f1_max"]}
    elif kind == "sklearn":
        n_px = n_images(n_pixels, side) * side * side
        s = np.empty(n_px, np.float32)
        y = np.empty(n_px, bool)
        for i, p, g in images(n_pixels, side):
            s[i * p.size:(i + 1) * p.size] = p.ravel()
            y[i * p.size:(i + 1) * p.size] = g.ravel()
        n = s.size
        t0 = time.perf_counter()
        auc = roc_auc_score(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nanmax(2 * prec * rec / (prec + rec))
        t_cmp = time.perf_counter() - t0
        res = {"pixel_auroc": float(auc), "pixel_f1_max": float(f1)}
    else:
        raise SystemExit(f"unknown worker {kind}")
    return {"kind": kind, "pixels": n, "update_s": t_upd, "compute_s": t_cmp,
            "total_s": t_upd + t_cmp, "pixels_per_s": n / (t_upd + t_cmp),
            "peak_extra_bytes": max(0, peak_bytes() - base), **res}


def run_worker(kind, n_pixels, side, bins):
    cmd = [sys.executable, __file__, "--worker", kind, "--pixels", str(n_pixels), "--side", str(side),
           "--bins", str(bins)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"kind": kind, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixels", type=float, default=1e8)
    ap.add_argument("--sklearn-pixels", type=float, default=None,
                    help="pixels for scikit-learn and exact mode (default: --pixels)")
    ap.add_argument("--side", type=int, default=1000, help="image side in pixels")
    ap.add_argument("--bins", type=int, default=10000)
    ap.add_argument("--skip", default="", help="comma-separated workers to skip")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    n = int(a.pixels)
    if a.worker:
        print(json.dumps(worker(a.worker, n, a.side, a.bins)))
        return 0
    n_sk = int(a.sklearn_pixels) if a.sklearn_pixels else n
    skip = set(filter(None, a.skip.split(",")))
    print(f"bench-metrics: {n:.3g} pixels ({a.side}x{a.side} images), bins={a.bins}, "
          f"scikit-learn/exact on {n_sk:.3g} pixels; cpus={os.cpu_count()}")
    rows = []
    for kind, npx in (("binned", n), ("histograms", n), ("exact", n_sk), ("sklearn", n_sk)):
        if kind in skip:
            continue
        r = run_worker(kind, npx, a.side, a.bins)
        rows.append(r)
        print("  " + (f"{kind}: ERROR {r['error']}" if "error" in r else
                      f"{kind:10s} {r['pixels']:.3g} px  {r['total_s']:8.2f} s "
                      f"(update {r['update_s']:.2f} + compute {r['compute_s']:.2f})  "
                      f"{r['pixels_per_s'] / 1e6:9.2f} Mpx/s  peak +{r['peak_extra_bytes'] / 2**20:8.1f} MiB  "
                      f"AUROC {r['pixel_auroc']:.6f}  F1max {r['pixel_f1_max']:.6f}"), flush=True)
    sk = next((r for r in rows if r["kind"] == "sklearn" and "error" not in r), None)
    if sk:
        print(f"ratios vs scikit-learn ({sk['pixels']:.3g} px):")
        for r in rows:
            if r["kind"] == "sklearn" or "error" in r:
                continue
            note = "" if r["pixels"] == sk["pixels"] else \
                f" (ours on {r['pixels']:.3g} px; scikit-learn's memory grows linearly with pixels)"
            mem = (f"{sk['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):.1f}x less memory"
                   if r["peak_extra_bytes"] else "memory: no measurable growth")
            print(f"  {r['kind']:10s} {r['pixels_per_s'] / sk['pixels_per_s']:7.1f}x faster, {mem}, "
                  f"|dAUROC| {abs(r['pixel_auroc'] - sk['pixel_auroc']):.2e}, "
                  f"|dF1max| {abs(r['pixel_f1_max'] - sk['pixel_f1_max']):.2e}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
