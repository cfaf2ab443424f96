import json

from synthetic_records import make_record

from fdsbench.leaderboard import (fold_table, format_run_table, leaderboard_markdown, statistics_section,
                                  write_leaderboards)
from fdsbench.results import results_frame


def record(method, fold, shot, seed, miou, per_class, random=True, preset="cpu"):
    """A record written before complete/aggregation/method_label existed (legacy reader path)."""
    return {"run_id": f"{method}_{fold}_{shot}_{seed}", "method": method, "preset": preset, "dataset": "synthetic",
            "protocol": {"name": "fss"}, "fold": fold, "shot": shot, "seed": seed,
            "manifest_hash": f"m{fold}{shot}{seed}",
            "weights": {"bb": "random-init" if random else "abc"}, "device": "cpu", "precision": "fp32",
            "environment": {"device_name": "cpu"}, "timing": {"fps": 10.0, "predict": {"p50_s": 0.1}},
            "metrics": {"miou": miou, "fbiou": 0.5, "per_class": {c: {"iou": v} for c, v in per_class.items()}}}


def markdown(records):
    """The leaderboard text of one (dataset, protocol), without drawing its plots."""
    return leaderboard_markdown(results_frame(records), "runs")


def write(runs, records):
    runs.mkdir(parents=True, exist_ok=True)
    for r in records:
        (runs / f"{r['run_id']}.json").write_text(json.dumps(r))


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


def test_shots_are_never_averaged():
    table = fold_table([make_record("a", shot=1, per_class={"o/1": 0.1}),
                        make_record("a", shot=5, per_class={"o/1": 0.5})])
    row = table.splitlines()[2]
    assert "10.0" in row and "50.0" in row and "30.0" not in row


def test_paired_comparison_on_shared_manifests():
    classes = {f"o/{k}": 0.1 * k for k in range(1, 6)}
    better = {c: v + 0.1 for c, v in classes.items()}
    recs = [record("a", 0, 1, s, 0.3, better, random=False) for s in range(2)] + \
           [record("b", 0, 1, s, 0.2, classes, random=False) for s in range(2)]
    text = statistics_section(recs)
    assert "a [cpu] − b [cpu]" in text and "+10.0" in text and "5/0/0" in text
    assert "Built from 4 run records" in text


def test_write_leaderboards(tmp_path):
    runs = tmp_path / "runs"
    write(runs, [record("a", 0, 1, 0, 0.3, {"o/1": 0.3}), record("b", 0, 1, 0, 0.2, {"o/1": 0.2})])
    (runs / "x.partial.pkl").write_bytes(b"junk")
    paths = write_leaderboards(runs, tmp_path / "lb")
    md = (tmp_path / "lb" / "synthetic_fss.md").read_text()
    assert "## mIoU" in md and "## Timing" in md and "† = random-init" in md
    assert "Built from 2 run records: `a_0_1_0`, `b_0_1_0`" in md
    assert (tmp_path / "lb" / "synthetic_fss.png").exists()
    assert {p.name for p in paths} == {"synthetic_fss.md", "synthetic_fss.png", "synthetic_fss_by_size.png",
                                       "synthetic_fss_per_class.png", "paper_tables.md", "results.csv",
                                       "results.jsonl"}
    papers = (tmp_path / "lb" / "paper_tables.md").read_text()
    assert "## SOFS Table 1: FSS on VISION V1" in papers and "| SOFS (DINOv2-B)" in papers
    assert "![synthetic_fss.png](synthetic_fss.png)" in md


def test_two_datasets_with_one_name_are_two_groups():
    """Three folder trees were once one cell '20.6 ± 17.2': the dataset identity (hash) separates them."""
    recs = [make_record("proto", "folder", per_class={"o/1": 0.1}, dataset_hash="1111aaaa00000000"),
            make_record("proto", "folder", per_class={"o/1": 0.4}, dataset_hash="2222bbbb00000000")]
    md = markdown(recs)
    assert "2 different datasets share the name `folder`" in md
    assert md.count("## Dataset identity") == 2 and "1111aaaa" in md and "2222bbbb" in md
    assert "| 10.0 " in md and "| 40.0 " in md and "25.0" not in md and " ± 2" not in md


def test_incomplete_runs_are_listed_apart():
    full = make_record("proto", per_class={"o/1": 0.3, "o/2": 0.1})
    cut = make_record("sofs", per_class={"o/1": 0.9}, episodes=3, episodes_total=120)
    legacy_cut = make_record("sam2", per_class={"o/1": 0.8}, episodes=2, episodes_total=20, legacy=True)
    md = markdown([full, cut, legacy_cut])
    tables, apart = md.split("## Incomplete runs")
    assert "sofs" not in tables and "sam2" not in tables and "90.0" not in tables
    assert "sofs [cpu]† ⚠" in apart and "3/120" in apart and "sam2 [cpu]† ⚠" in apart and "2/20" in apart
    assert "⚠" in format_run_table([cut]) and "⚠" not in format_run_table([full])


def test_fad_shows_fad_metrics_with_pooled_secondary():
    fad = {"image_auroc": (0.91, 0.81), "pixel_auroc": (0.95, 0.9), "pixel_f1_max": (0.5, 0.4), "aupro": (0.7, 0.6)}
    md = markdown([make_record("sofs", "mvtec_ad", "fad", per_class={"bottle/*": None}, fad=fad)])
    assert "mIoU" not in md and "## FAD: mean over categories" in md
    assert "1-shot image AUROC (pooled)" in md and "91.0" in md and "81.0" in md


def test_timing_table_has_dataset_shot_and_prepare():
    md = markdown([make_record("nbr_cap", "synthetic", "per_support", per_class={"o/*": 0.2})])
    timing = md.split("## Timing")[1]
    for col in ("dataset", "shot", "prepare p50 ms", "prepare 1st ms", "prepare calls"):
        assert col in timing.splitlines()[4]
    assert "| 50.0 " in timing and "| 80.0 " in timing
    assert md.index("## per-image IoU") < md.index("## mIoU")  # per_support is judged by per-image IoU


def test_rows_use_the_method_label_and_split_configs():
    recs = [make_record("sofs", label="sofs (heat)", per_class={"o/1": 0.2}, config_hash="aaaaaa0000000000"),
            make_record("sofs", label="sofs (binary)", per_class={"o/1": 0.3}, config_hash="bbbbbb0000000000"),
            make_record("proto", per_class={"o/1": 0.15}, config_hash="cccccc0000000000", seed=0),
            make_record("proto", per_class={"o/1": 0.55}, config_hash="dddddd0000000000", seed=1)]
    table = fold_table(recs)
    assert "sofs (heat) [cpu]†" in table and "sofs (binary) [cpu]†" in table
    assert "proto [cpu]† #cccccc" in table and "proto [cpu]† #dddddd" in table and "35.0" not in table
