"""Run records as one tidy pandas DataFrame; every table and plot is derived from it.

:func:`results_frame` turns run records into one row per (run, class, metric). The columns:

* provenance of the run, repeated on each of its rows (:data:`RUN_COLUMNS`): ``run_id``, ``method``,
  ``method_label``, ``label`` (the row name of the tables: method label, preset, "trained on X" and
  ``†`` for random-init weights), ``preset``, ``config_hash``, ``weights`` (``name=sha256|random-init``),
  ``random_init``, ``trained_on``, ``dataset``, ``dataset_hash``, ``dataset_options``, ``protocol``,
  ``protocol_hash`` (the protocol options), ``benchmark`` (dataset name + content hash + protocol +
  its options hash: the unit no table cell and no plot panel ever mixes), ``aggregation``
  (``class_mean`` or ``pooled``),
  ``score_mode``, ``threshold``, ``manifest_hash``, ``fold``, ``shot``, ``seed``, ``episodes``,
  ``episodes_total``, ``complete``, ``max_episodes``, ``device``, ``device_name``, ``precision``,
  ``torch``, ``fdsbench``, ``python`` and the timing (``fps``, ``predict_p50_ms``, ``predict_p95_ms``,
  ``prepare_p50_ms``, ``prepare_first_ms``, ``prepare_calls``, ``peak_mib``; NaN for runs whose frozen
  features came from the shared feature cache, ``feature_cache`` True: their calls skipped encoding,
  so their times are not the method's speed);
* ``class``: a class key of the manifest, or ``*`` for the run's reported (aggregate) value;
* ``size_kind`` / ``size_bucket``: the defect-size bucket of ``metrics.by_size`` (``area_ratio`` or
  ``area_px``), empty elsewhere;
* ``metric`` and ``value`` (a fraction; NaN where the record holds ``None``).

Records written before the ``complete``/``aggregation``/``method_label`` fields existed are read
with the values those fields had then: complete iff ``episodes == episodes_total``, pooled
aggregation, the bare method name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_write_text

ALL = "*"
RANDOM_MARK = "†"
INCOMPLETE_MARK = "⚠"
METRIC_NAMES = {"miou": "mIoU", "fbiou": "FB-IoU", "episode_miou": "episode mIoU", "per_image_iou": "per-image IoU",
                "per_image_dice": "per-image Dice", "image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC",
                "pixel_f1_max": "pixel F1-max", "aupro": "AUPRO", "iou": "IoU", "fps": "FPS"}
#: the number each protocol is judged by (plots, size buckets, comparisons)
PRIMARY_METRIC = {"fss": "miou", "per_support": "per_image_iou", "fad": "image_auroc"}
#: the metric of the per-class values that is averaged into PRIMARY_METRIC
PER_CLASS_METRIC = {"miou": "iou", "per_image_iou": "per_image_iou", "per_image_dice": "per_image_dice",
                    "image_auroc": "image_auroc", "pixel_auroc": "pixel_auroc", "pixel_f1_max": "pixel_f1_max",
                    "aupro": "aupro"}
FAD_METRICS = ("image_auroc", "pixel_auroc", "pixel_f1_max", "aupro")
RUN_COLUMNS = ["run_id", "method", "method_label", "label", "preset", "config_hash", "weights", "random_init",
               "trained_on", "dataset", "dataset_hash", "dataset_options", "protocol", "protocol_hash", "benchmark",
               "aggregation", "score_mode", "threshold", "manifest_hash", "fold", "shot", "seed", "episodes",
               "episodes_total", "complete", "max_episodes", "device", "device_name", "precision", "torch",
               "fdsbench", "python", "fps", "predict_p50_ms", "predict_p95_ms", "prepare_p50_ms",
               "prepare_first_ms", "prepare_calls", "peak_mib", "feature_cache"]
VALUE_COLUMNS = ["class", "size_kind", "size_bucket", "metric", "value"]
COLUMNS = RUN_COLUMNS + VALUE_COLUMNS


def load_records(runs_dir, log=None) -> list[dict]:
    """Every run record (``*.json`` with ``run_id`` and ``metrics``) of a folder, sorted by file name.
    A damaged one (truncated, unreadable) is reported through ``log`` (default: stderr), never
    dropped silently: rerunning its bench command sets it aside and recomputes it."""
    import sys

    log = log or (lambda msg: print(msg, file=sys.stderr))
    records = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log(f"warning: run record {path} is damaged ({type(e).__name__}: {e}); it is left out of the tables — "
                f"rerun its bench command to recompute it")
            continue
        if isinstance(rec, dict) and "metrics" in rec and "run_id" in rec:
            records.append(rec)
    return records


def is_random(record: dict) -> bool:
    return any(v == "random-init" for v in (record.get("weights") or {}).values())


def is_complete(record: dict) -> bool:
    """``record["complete"]``; for older records: every episode of the manifest was evaluated."""
    if record.get("complete") is not None:
        return bool(record["complete"])
    if record.get("episodes") is None or record.get("episodes_total") is None:
        return True
    return record["episodes"] == record["episodes_total"]


def trained_elsewhere(record: dict) -> str | None:
    """The training dataset of a run meta-trained outside the test dataset's base folds, else None."""
    t = record.get("trained_on") or {}
    if t and (t.get("dataset_hash") != record.get("dataset_hash") or t.get("objects") == "all"):
        return t["dataset"]
    return None


def label(record: dict) -> str:
    """Row name of the tables: ``<method label> [<preset>; trained on X]†``."""
    preset = record.get("preset") or "default"
    other = trained_elsewhere(record)
    return (f"{record.get('method_label') or record['method']} [{preset}"
            + (f"; trained on {other}" if other else "") + "]" + (RANDOM_MARK if is_random(record) else ""))


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _num(v):
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return np.nan
    return float(v)


def _ms(timing: dict, what: str, key: str):
    v = (timing.get(what) or {}).get(key)
    return np.nan if v is None else 1000.0 * v


def run_row(record: dict) -> dict:
    """The provenance columns of one run (:data:`RUN_COLUMNS`)."""
    env, t = record.get("environment") or {}, record.get("timing") or {}
    proto = record.get("protocol") or {}
    proto_name = proto.get("name", "?") if isinstance(proto, dict) else str(proto)
    dhash = record.get("dataset_hash") or ""
    phash = short_hash(proto)
    prepare = t.get("prepare") or {}
    warm = (t.get("warmup_calls") or t.get("warmup_discarded") or {}).get("prepare") or 0
    first = prepare.get("first_ms")  # the first call(s), timed apart from the statistics
    if first is None and warm and prepare.get("warmup_total_s") is not None:
        first = 1000.0 * prepare["warmup_total_s"] / warm
    calls = prepare.get("n")
    if calls is not None and not prepare.get("includes_warmup"):
        calls += warm
    peak = t.get("peak_memory_bytes")
    cached = bool(((record.get("speed_options") or {}).get("feature_cache") or {}).get("used"))
    if cached:  # encodings reused from the cache (or an earlier method): no speed of this method
        t, first, peak = {}, None, None
    return {
        "run_id": record["run_id"], "method": record["method"],
        "method_label": record.get("method_label") or record["method"], "label": label(record),
        "preset": record.get("preset") or "default", "config_hash": record.get("config_hash") or "",
        "weights": "|".join(f"{k}={v}" for k, v in sorted((record.get("weights") or {}).items())),
        "random_init": is_random(record), "trained_on": trained_elsewhere(record) or "",
        "dataset": record.get("dataset", "?"), "dataset_hash": dhash,
        "dataset_options": json.dumps(record.get("dataset_options") or {}, sort_keys=True),
        "protocol": proto_name, "protocol_hash": phash,
        "benchmark": f"{record.get('dataset', '?')}@{dhash[:8] or 'unhashed'} {proto_name}@{phash}",
        "aggregation": record.get("aggregation") or "pooled",
        "score_mode": record.get("score_mode") or (record.get("metrics") or {}).get("score_mode") or "",
        "threshold": _num(record.get("threshold", (record.get("metrics") or {}).get("threshold"))),
        "manifest_hash": record.get("manifest_hash") or "", "fold": record.get("fold"), "shot": record.get("shot"),
        "seed": record.get("seed"), "episodes": record.get("episodes"), "episodes_total": record.get("episodes_total"),
        "complete": is_complete(record), "max_episodes": record.get("max_episodes"),
        "device": record.get("device") or "", "device_name": env.get("device_name") or record.get("device") or "",
        "precision": record.get("precision") or "fp32", "torch": env.get("torch") or "",
        "fdsbench": env.get("fdsbench") or "", "python": env.get("python") or "",
        "fps": _num(t.get("fps")), "predict_p50_ms": _ms(t, "predict", "p50_s"),
        "predict_p95_ms": _ms(t, "predict", "p95_s"), "prepare_p50_ms": _ms(t, "prepare", "p50_s"),
        "prepare_first_ms": _num(first), "prepare_calls": calls,
        "peak_mib": np.nan if peak is None else peak / 2 ** 20, "feature_cache": cached,
    }


def _value_rows(metrics: dict):
    """(class, size_kind, size_bucket, metric, value) of one record's metrics."""
    for k, v in metrics.items():
        if k in ("per_class", "by_size"):
            continue
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            yield ALL, "", "", k, _num(v)
    for cls, vals in sorted((metrics.get("per_class") or {}).items()):
        for k, v in sorted((vals or {}).items()):
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                yield cls, "", "", k, _num(v)
    for kind, buckets in sorted((metrics.get("by_size") or {}).items()):
        for bucket, vals in buckets.items():
            for k, v in sorted(vals.items()):
                yield ALL, kind, bucket, k, _num(v)


def results_frame(records) -> pd.DataFrame:
    """One row per (run, class, metric) with the columns of :data:`COLUMNS` (module docstring).

    ``records``: a list of run records or a folder of them. Labels shared by runs of different
    configurations (same method label and preset, other ``--set`` values) get the config hash appended,
    so that no table averages two configurations as if they were seeds."""
    if isinstance(records, (str, Path)):
        records = load_records(records)
    rows = []
    for rec in records:
        run = run_row(rec)
        for cls, kind, bucket, metric, value in _value_rows(rec.get("metrics") or {}):
            rows.append({**run, "class": cls, "size_kind": kind, "size_bucket": bucket, "metric": metric,
                         "value": value})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if not frame.empty:
        n_cfg = frame.groupby("label")["config_hash"].transform("nunique")
        frame.loc[n_cfg > 1, "label"] = frame["label"] + " #" + frame["config_hash"].str[:6]
        frame["value"] = frame["value"].astype(float)
    return frame


def runs_of(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the provenance columns."""
    return frame[RUN_COLUMNS].drop_duplicates("run_id").reset_index(drop=True)


def write_frame(frame: pd.DataFrame, out_dir, stem: str = "results") -> list[Path]:
    """``<stem>.csv`` and ``<stem>.jsonl`` (JSON lines, one object per row) of the tidy frame."""
    out = Path(out_dir)
    csv, jsonl = out / f"{stem}.csv", out / f"{stem}.jsonl"
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(jsonl, frame.to_json(orient="records", lines=True, force_ascii=False))
    return [csv, jsonl]


# ---------------------------------------------------------------------------------------------- tables

def _as_frame(data) -> pd.DataFrame:
    return data if isinstance(data, pd.DataFrame) else results_frame(data)


def run_values(frame: pd.DataFrame, metric: str, complete_only: bool = True) -> pd.DataFrame:
    """The reported (aggregate) value of ``metric`` per run, with the run columns."""
    sel = frame[(frame["class"] == ALL) & (frame["size_kind"] == "") & (frame["metric"] == metric)]
    if complete_only:
        sel = sel[sel["complete"]]
    return sel


def per_class_values(frame: pd.DataFrame, metric: str = "iou") -> pd.DataFrame:
    """Per-class values of complete runs: index run_id, columns class."""
    sel = frame[(frame["class"] != ALL) & (frame["metric"] == metric) & frame["complete"]]
    return sel.pivot_table(index="run_id", columns="class", values="value", aggfunc="first", dropna=False)


def fmt_cell(mean, std=np.nan, n=1, scale=100.0, digits=1) -> str:
    """``mean ± std`` (std shown when there are at least two runs), ``–`` when undefined."""
    if mean is None or pd.isna(mean):
        return "–"
    out = f"{scale * mean:.{digits}f}"
    if n is not None and n > 1 and not pd.isna(std):
        out += f" ± {scale * std:.{digits}f}"
    return out


def label_order(frame: pd.DataFrame) -> list[str]:
    runs = runs_of(frame)
    return list(runs.sort_values(["method", "preset", "label"])["label"].drop_duplicates())


def fold_frame(data, metric: str = "miou") -> pd.DataFrame:
    """Paper-shaped cells: rows = labels, columns ``<s>-shot F<f>`` then ``<s>-shot Mean``; cells mean ±
    std over runs (seeds) in percent; the mean over folds of the per-fold means only when every fold of
    the table has runs. 1-shot and 5-shot are separate columns, never averaged."""
    f = _as_frame(data)
    sel = run_values(f, metric)
    folds = sorted(f.loc[f["complete"], "fold"].dropna().unique().tolist())
    shots = sorted(f.loc[f["complete"], "shot"].dropna().unique().tolist())
    labels = [lab for lab in label_order(f[f["complete"]])]
    g = sel.groupby(["label", "shot", "fold"])["value"].agg(["mean", "std", "count"])
    out = pd.DataFrame(index=pd.Index(labels, name="method"))
    for s in shots:
        for fold in folds:
            out[f"{s}-shot F{fold}"] = [fmt_cell(*g.loc[(lab, s, fold)]) if (lab, s, fold) in g.index else "–"
                                        for lab in labels]
    if len(folds) > 1:
        for s in shots:
            means = []
            for lab in labels:
                per_fold = [g.loc[(lab, s, fold), "mean"] if (lab, s, fold) in g.index else np.nan for fold in folds]
                means.append("–" if any(pd.isna(v) for v in per_fold) else fmt_cell(float(np.mean(per_fold))))
            out[f"{s}-shot Mean"] = means
    return out


def fold_table(data, metric: str = "miou") -> str:
    return to_markdown(fold_frame(data, metric))


def fad_frame(data) -> pd.DataFrame:
    """FAD cells per label (and fold when there are several): per shot the mean over categories of
    image AUROC, pixel AUROC, pixel F1-max and AUPRO (the papers' convention), then the same metrics
    pooled over all categories as secondary columns. Records that predate per-category scoring hold only
    pooled values: their mean-over-categories cells are ``–``."""
    f = _as_frame(data)
    f = f[f["complete"]]
    runs = runs_of(f).set_index("run_id")
    base = f[(f["class"] == ALL) & (f["size_kind"] == "")].pivot_table(
        index="run_id", columns="metric", values="value", aggfunc="first", dropna=False)
    cols = {}
    for m in FAD_METRICS:
        cm = runs["aggregation"].eq("class_mean")
        own = base[m] if m in base else pd.Series(np.nan, index=base.index)
        pooled = base[f"{m}_pooled"] if f"{m}_pooled" in base else pd.Series(np.nan, index=base.index)
        cols[m] = own.where(cm.reindex(base.index, fill_value=False))
        cols[f"{m}_pooled"] = pooled.where(cm.reindex(base.index, fill_value=False), own)
    vals = pd.DataFrame(cols).join(runs[["label", "fold", "shot"]])
    several_folds = vals["fold"].nunique() > 1
    keys = ["label", "fold"] if several_folds else ["label"]
    out_rows = {}
    names = {m: METRIC_NAMES[m] for m in FAD_METRICS}
    for key, grp in vals.groupby(keys + ["shot"]):
        *row_key, shot = key if isinstance(key, tuple) else (key,)
        row = out_rows.setdefault(tuple(row_key), {})
        for m in FAD_METRICS:
            for col, head in ((m, names[m]), (f"{m}_pooled", f"{names[m]} (pooled)")):
                v = grp[col].dropna()
                row[f"{shot}-shot {head}"] = fmt_cell(v.mean() if len(v) else np.nan, v.std(), len(v))
    order = {lab: i for i, lab in enumerate(label_order(f))}
    idx = sorted(out_rows, key=lambda k: (order.get(k[0], 0), *k[1:]))
    out = pd.DataFrame([out_rows[k] for k in idx],
                       index=[k[0] if not several_folds else f"{k[0]} F{k[1]}" for k in idx]).fillna("–")
    out.index.name = "method"
    return out


def timing_frame(data, complete_only: bool = False) -> pd.DataFrame:
    """One row per run: dataset, fold, shot, device, precision, FPS (predict only, batch 1), predict
    p50/p95, support preparation (per-support fit) p50, its first call apart, its number of calls."""
    runs = runs_of(_as_frame(data))
    if complete_only:
        runs = runs[runs["complete"]]
    runs = runs.sort_values(["dataset", "shot", "fold", "method", "label", "seed"])

    def num(v, digits=1):
        return "–" if v is None or pd.isna(v) else f"{v:.{digits}f}"

    return pd.DataFrame({
        "run": runs["label"] + np.where(runs["complete"], "", f" {INCOMPLETE_MARK}"),
        "dataset": runs["dataset"], "fold": runs["fold"], "shot": runs["shot"], "seed": runs["seed"],
        "device": runs["device_name"], "precision": runs["precision"],
        "FPS": [num(v, 2) for v in runs["fps"]], "p50 ms": [num(v) for v in runs["predict_p50_ms"]],
        "p95 ms": [num(v) for v in runs["predict_p95_ms"]],
        "prepare p50 ms": [num(v) for v in runs["prepare_p50_ms"]],
        "prepare 1st ms": [num(v) for v in runs["prepare_first_ms"]],
        "prepare calls": ["–" if pd.isna(v) else str(int(v)) for v in runs["prepare_calls"]],
        "peak MiB": [num(v, 0) for v in runs["peak_mib"]],
    }).set_index("run")


def to_markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub Markdown table of a frame of strings (no extra dependency)."""
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    rows = [([str(i)] if index else []) + [str(v) for v in r] for i, r in zip(df.index, df.itertuples(index=False))]
    widths = [max(len(c), *(len(r[k]) for r in rows)) if rows else len(c) for k, c in enumerate(cols)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def records_note(run_ids) -> str:
    ids = sorted(set(run_ids))
    return f"Built from {len(ids)} run record{'s' if len(ids) != 1 else ''}: " + ", ".join(f"`{r}`" for r in ids)
