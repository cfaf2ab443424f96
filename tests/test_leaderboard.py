import json

from fdsbench.leaderboard import fold_table, statistics_section, write_leaderboards


def record(method, fold, shot, seed, miou, per_class, random=True, preset="cpu"):
    return {"run_id": f"{method}_{fold}_{shot}_{seed}", "method": method, "preset": preset, "dataset": "synthetic",
            "protocol": {"name": "fss"}, "fold": fold, "shot": shot, "seed": seed, "manifest_hash": f"m{fold}{shot}{seed}",
            "weights": {"bb": "random-init" if random else "abc"}, "device": "cpu", "precision": "fp32",
            "environment": {"device_name": "cpu"}, "timing": {"fps": 10.0, "predict": {"p50_s": 0.1}},
            "metrics": {"miou": miou, "fbiou": 0.5, "per_class": {c: {"iou": v} for c, v in per_class.items()}}}


def test_fold_table_has_the_papers_shape():
    recs = [record("a", f, s, seed, 0.1 * (f + 1) + 0.01 * seed, {"x/1": 0.2}) for f in range(3) for s in (1, 5)
            for seed in range(2)]
    table = fold_table(recs)
    header = table.splitlines()[0]
    for col in ("1-shot F0", "1-shot F1", "1-shot F2", "5-shot F2", "1-shot Mean", "5-shot Mean"):
        assert col in header
    row = table.splitlines()[2]
    assert row.startswith("| a [cpu]†")
    assert "10.5 ± 0.7" in row  # fold 0: runs 0.10, 0.11 -> mean ± sample std in %
    assert "20.5" in row and "30.5" in row  # mean over folds = (10.5 + 20.5 + 30.5) / 3 = 20.5


def test_mean_needs_every_fold():
    table = fold_table([record("a", 0, 1, 0, 0.1, {}), record("b", 0, 1, 0, 0.2, {}), record("b", 1, 1, 0, 0.4, {})])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["a [cpu]†"].rstrip(" |").endswith("–") and "30.0" in rows["b [cpu]†"]


def test_paired_comparison_on_shared_manifests():
    classes = {f"o/{k}": 0.1 * k for k in range(1, 6)}
    better = {c: v + 0.1 for c, v in classes.items()}
    recs = [record("a", 0, 1, s, 0.3, better, random=False) for s in range(2)] + \
           [record("b", 0, 1, s, 0.2, classes, random=False) for s in range(2)]
    text = statistics_section(recs)
    assert "a [cpu] − b [cpu]" in text and "+10.0" in text and "5/0/0" in text


def test_write_leaderboards(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, r in enumerate([record("a", 0, 1, 0, 0.3, {"o/1": 0.3}), record("b", 0, 1, 0, 0.2, {"o/1": 0.2})]):
        (runs / f"{i}.json").write_text(json.dumps(r))
    (runs / "x.partial.pkl").write_bytes(b"junk")
    paths = write_leaderboards(runs, tmp_path / "lb")
    md = (tmp_path / "lb" / "synthetic_fss.md").read_text()
    assert "## mIoU" in md and "## Timing" in md and "† = random-init" in md
    assert (tmp_path / "lb" / "synthetic_fss.png").exists() and len(paths) == 2
