"""The metrics benchmark's workers agree with each other (smoke test on a tiny pixel count)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fdsbench.metrics import MeterSet


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_metrics.py"
    spec = importlib.util.spec_from_file_location("bench_metrics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_workers_agree():
    b = load_bench()
    res = {k: b.worker(k, 40_000, 100, 1000) for k in ("binned", "histograms", "exact", "sklearn")}
    sk = res["sklearn"]
    assert res["exact"]["pixel_auroc"] == pytest.approx(sk["pixel_auroc"], abs=1e-9)
    assert res["exact"]["pixel_f1_max"] == pytest.approx(sk["pixel_f1_max"], abs=1e-9)
    for k in ("binned", "histograms"):
        assert res[k]["pixels"] == sk["pixels"] == 40_000 and res[k]["pixels_per_s"] > 0
        assert abs(res[k]["pixel_auroc"] - sk["pixel_auroc"]) < 1e-3


def test_binned_state_size_is_independent_of_pixel_count():
    rng = np.random.default_rng(0)
    sizes = []
    for n_img in (1, 20):
        m = MeterSet(score_mode="binned", bins=500)
        for i in range(n_img):
            g = np.zeros((64, 64), bool)
            g[10:20, 10:30] = True
            m.update(rng.random((64, 64)), g, "o/c", i, f"q{i}")
        px = m.state_dict()["pixels"]
        sizes.append(sum(v.nbytes for v in px.values() if isinstance(v, np.ndarray)))
    assert sizes[0] == sizes[1] == 3 * 500 * 8
