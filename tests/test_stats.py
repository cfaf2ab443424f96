"""Run statistics, class bootstrap and paired comparison."""
import numpy as np
import pytest

from fdsbench.errors import FdsError
from fdsbench.stats import bootstrap_ci, mean_std, paired_comparison, per_class_values, runs_summary


def test_mean_std():
    r = mean_std([0.5, 0.7, None, 0.6])
    assert r["mean"] == pytest.approx(0.6) and r["std"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1))
    assert r["n"] == 3
    assert mean_std([0.3])["std"] is None and mean_std([])["mean"] is None
    s = runs_summary([{"miou": 0.5, "fbiou": 0.7}, {"miou": 0.7, "fbiou": None}], keys=("miou", "fbiou"))
    assert s["miou"]["mean"] == pytest.approx(0.6) and s["fbiou"]["n"] == 1


def test_bootstrap_ci_seeded_and_covers_mean():
    pc = {f"o/c{i}": {"iou": v} for i, v in enumerate([0.1, 0.5, 0.4, 0.9, 0.3, None])}
    a = bootstrap_ci(pc, n_boot=2000, seed=3)
    b = bootstrap_ci(pc, n_boot=2000, seed=3)
    assert a == b
    assert a["n_classes"] == 5 and a["excluded"] == ["o/c5"]
    assert a["mean"] == pytest.approx(np.mean([0.1, 0.5, 0.4, 0.9, 0.3]))
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    assert 0.1 <= a["ci_low"] and a["ci_high"] <= 0.9
    # a constant metric has a zero-width interval
    c = bootstrap_ci({"a": 0.4, "b": 0.4}, n_boot=100)
    assert c["ci_low"] == pytest.approx(0.4) and c["ci_high"] == pytest.approx(0.4)
    with pytest.raises(FdsError, match="metric"):
        bootstrap_ci({"a": {"dice": 1.0}})


def test_runs_are_averaged_per_class():
    runs = [{"a": {"iou": 0.2}, "b": {"iou": None}}, {"a": {"iou": 0.4}, "b": {"iou": 0.6}}]
    assert per_class_values(runs) == {"a": pytest.approx(0.3), "b": pytest.approx(0.6)}


def test_paired_comparison():
    rng = np.random.default_rng(0)
    base = {f"c{i}": float(v) for i, v in enumerate(rng.random(10))}
    better = {c: v + 0.05 for c, v in base.items()}
    r = paired_comparison(better, base, n_boot=1000)
    assert r["mean_diff"] == pytest.approx(0.05) and r["wins"] == 10
    assert r["ci_low"] == pytest.approx(0.05) and r["ci_high"] == pytest.approx(0.05)
    assert r["p_value"] == pytest.approx(2 / 2 ** 10)  # all-positive pattern and its mirror
    noisy = {c: v + rng.normal(0, 0.1) for c, v in base.items()}
    r2 = paired_comparison(noisy, base, n_boot=1000)
    assert r2["ci_low"] <= r2["mean_diff"] <= r2["ci_high"] and 0 < r2["p_value"] <= 1
    r3 = paired_comparison(noisy, base, n_boot=1000, max_exact=2)  # monte-carlo path
    assert r3["p_value_method"].startswith("monte") and abs(r3["p_value"] - r2["p_value"]) < 0.1
    with pytest.raises(FdsError, match="same classes"):
        paired_comparison({"a": 1.0}, {"b": 1.0})
