"""The tidy results frame: one row per (run, class, metric), documented columns, legacy records."""
import json

import pandas as pd
from synthetic_records import make_record

from fdsbench.results import ALL, COLUMNS, results_frame, runs_of, write_frame


def expected_rows(rec):
    m = rec["metrics"]
    run = sum(1 for k, v in m.items() if k not in ("per_class", "by_size")
              and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))))
    per_class = sum(len(v) for v in m["per_class"].values())
    by_size = sum(len(v) for b in m["by_size"].values() for v in b.values())
    return run + per_class + by_size


def test_one_row_per_run_class_metric():
    recs = [make_record("a", seed=s, per_class={"o/1": 0.2, "o/2": None}) for s in range(2)] + \
           [make_record("b", "mvtec_ad", "fad", per_class={"bottle/*": None}, fad={"image_auroc": (0.9, 0.8)})]
    f = results_frame(recs)
    assert list(f.columns) == COLUMNS
    assert len(f) == sum(expected_rows(r) for r in recs)
    assert not f.duplicated(["run_id", "class", "size_kind", "size_bucket", "metric"]).any()
    row = f[(f["run_id"] == recs[0]["run_id"]) & (f["class"] == "o/1") & (f["metric"] == "iou")]
    assert len(row) == 1 and row["value"].iloc[0] == 0.2
    undefined = f[(f["class"] == "o/2") & (f["metric"] == "iou")]
    assert undefined["value"].isna().all()  # None in the record -> NaN, the row kept
    run = f[(f["class"] == ALL) & (f["metric"] == "miou") & (f["run_id"] == recs[0]["run_id"])].iloc[0]
    assert run["dataset_hash"] == "651463fa1333cbdb" and run["weights"] == "bb=random-init" and run["random_init"]
    assert run["fps"] == 10.0 and run["prepare_first_ms"] == 80.0 and run["complete"]
    buckets = f[(f["size_kind"] == "area_ratio") & (f["metric"] == "iou")]
    assert set(buckets["size_bucket"]) == {"<0.3%", "0.3%-2%", ">=2%"} and (buckets["class"] == ALL).all()
    fad = f[(f["protocol"] == "fad") & (f["class"] == ALL)].set_index("metric")["value"]
    assert fad["image_auroc"] == 0.9 and fad["image_auroc_pooled"] == 0.8
    assert runs_of(f).set_index("run_id").loc[recs[2]["run_id"], "aggregation"] == "class_mean"


def test_legacy_records_read_gracefully():
    full = make_record("a", legacy=True)
    cut = make_record("b", legacy=True, episodes=3, episodes_total=20)
    runs = runs_of(results_frame([full, cut])).set_index("method")
    assert runs.loc["a", "complete"] and not runs.loc["b", "complete"]
    assert runs.loc["a", "method_label"] == "a" and runs.loc["a", "aggregation"] == "pooled"
    assert runs.loc["a", "label"] == "a [cpu]†"


def test_identity_separates_datasets_and_protocol_options():
    a = make_record("p", "folder", dataset_hash="1" * 16)
    b = make_record("p", "folder", dataset_hash="2" * 16)
    c = make_record("p", "folder", dataset_hash="1" * 16, seed=1)
    c["protocol"] = {**c["protocol"], "crop_size": 518}
    assert runs_of(results_frame([a, b, c]))["benchmark"].nunique() == 3


def test_export_csv_and_jsonl(tmp_path):
    f = results_frame([make_record("a"), make_record("b")])
    csv, jsonl = write_frame(f, tmp_path)
    back = pd.read_csv(csv)
    assert len(back) == len(f) and list(back.columns) == COLUMNS
    lines = jsonl.read_text().splitlines()
    assert len(lines) == len(f) and set(json.loads(lines[0])) == set(COLUMNS)


def test_frame_from_a_folder(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(make_record("a")))
    (tmp_path / "junk.json").write_text("{not json")
    assert results_frame(tmp_path)["run_id"].nunique() == 1


def test_runs_that_read_cached_features_show_no_speed():
    """A run whose frozen features came from the shared cache (an earlier method or seed encoded
    them) has no FPS or latency in the frame, the timing table or the bench table."""
    from fdsbench.leaderboard import format_run_table
    from fdsbench.results import timing_frame

    plain, cached = make_record("a"), make_record("b")
    cached["speed_options"] = {"feature_cache": {"used": True, "encoders": ["resnet18"]}}
    runs = runs_of(results_frame([plain, cached])).set_index("method")
    assert runs.loc["a", "fps"] == 10.0 and not runs.loc["a", "feature_cache"]
    assert pd.isna(runs.loc["b", "fps"]) and pd.isna(runs.loc["b", "predict_p50_ms"]) and runs.loc["b", "feature_cache"]
    table = timing_frame([plain, cached])
    assert list(table["FPS"]) == ["10.00", "–"]
    bench = format_run_table([plain, cached]).splitlines()
    assert bench[2].split("|")[-3].strip() == "10.00" and bench[3].split("|")[-3].strip() == "–"
    assert "read frozen features from the cache" in bench[-1]  # the table says why
    assert "frozen features" not in format_run_table([plain])
