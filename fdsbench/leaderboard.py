"""Leaderboard tables and plots, built only from run records (never by hand).

Tables have the papers' shape: one row per method configuration, columns F0/F1/F2/Mean for each
shot, cells mean ± std over runs (seeds) in percent. "Mean" is the mean over folds of the per-fold
means, shown only when every fold has runs. Methods run with random weights are marked †."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import FdsError
from .io import atomic_write_text
from .stats import bootstrap_ci, mean_std, paired_comparison

RANDOM_MARK = "†"
METRIC_NAMES = {"miou": "mIoU", "fbiou": "FB-IoU", "episode_miou": "episode mIoU", "per_image_iou": "per-image IoU",
                "per_image_dice": "per-image Dice", "image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC",
                "pixel_f1_max": "pixel F1-max", "aupro": "AUPRO"}


def load_records(runs_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a partial or foreign file is not a record
    return [r for r in records if "metrics" in r and "run_id" in r]


def is_random(record: dict) -> bool:
    return any(v == "random-init" for v in (record.get("weights") or {}).values())


def trained_elsewhere(record: dict) -> str | None:
    """The training dataset of a run meta-trained outside the test dataset's base folds, else None."""
    t = record.get("trained_on") or {}
    if t and (t.get("dataset_hash") != record.get("dataset_hash") or t.get("objects") == "all"):
        return t["dataset"]
    return None


def label(record: dict) -> str:
    preset = record.get("preset") or "default"
    other = trained_elsewhere(record)
    return (f"{record['method']} [{preset}" + (f"; trained on {other}" if other else "") + "]"
            + (RANDOM_MARK if is_random(record) else ""))


def _fmt(values: list[float]) -> str:
    ms = mean_std(values)
    if ms["mean"] is None:
        return "–"
    return f"{100 * ms['mean']:.1f}" + (f" ± {100 * ms['std']:.1f}" if ms["std"] is not None else "")


def format_run_table(records: list[dict]) -> str:
    """The table ``fdsbench bench`` prints: one row per run."""
    cols = ["run", "episodes", "mIoU", "FB-IoU", "ep-mIoU", "img IoU", "img Dice", "img AUROC", "pix AUROC",
            "F1-max", "AUPRO", "FPS", "prepare ms"]
    rows = []
    for r in records:
        m, t = r["metrics"], r.get("timing") or {}

        def pct(key):
            v = m.get(key)
            return "–" if v is None else f"{100 * v:.1f}"

        rows.append([label(r) + f" {r['dataset']} f{r['fold']} {r['shot']}-shot s{r['seed']}",
                     f"{r['episodes']}/{r['episodes_total']}", pct("miou"), pct("fbiou"), pct("episode_miou"),
                     pct("per_image_iou"), pct("per_image_dice"), pct("image_auroc"), pct("pixel_auroc"),
                     pct("pixel_f1_max"), pct("aupro"),
                     "–" if t.get("fps") is None else f"{t['fps']:.2f}", _ms(t, "prepare", "p50_s")])
    note = f"\n{RANDOM_MARK} random-init weights: numbers are not the paper's." if any(map(is_random, records)) else ""
    return _markdown(cols, rows) + note


def format_timing_table(records: list[dict]) -> str:
    cols = ["run", "device", "precision", "FPS", "p50 ms", "p95 ms", "prepare p50 ms", "peak MiB"]
    rows = []
    for r in records:
        t = r.get("timing") or {}
        peak = t.get("peak_memory_bytes")
        rows.append([label(r), r["environment"].get("device_name") or r["device"], r.get("precision", "fp32"),
                     "–" if t.get("fps") is None else f"{t['fps']:.2f}", _ms(t, "predict", "p50_s"),
                     _ms(t, "predict", "p95_s"), _ms(t, "prepare", "p50_s"),
                     "–" if peak is None else f"{peak / 2**20:.0f}"])
    return _markdown(cols, rows)


def _ms(timing: dict, what: str, key: str) -> str:
    v = (timing.get(what) or {}).get(key)
    return "–" if v is None else f"{1000 * v:.1f}"


def _markdown(cols, rows) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def fold_table(records: list[dict], metric: str = "miou") -> str:
    """Paper-shaped table for one (dataset, protocol): rows = method configs, F0/F1/F2/Mean per shot."""
    folds = sorted({r["fold"] for r in records})
    shots = sorted({r["shot"] for r in records})
    cell = defaultdict(list)
    labels = []
    for r in sorted(records, key=lambda r: (r["method"], r.get("preset") or "")):
        lab = label(r)
        if lab not in labels:
            labels.append(lab)
        cell[(lab, r["shot"], r["fold"])].append(r["metrics"].get(metric))
    cols = ["method"] + [f"{s}-shot F{f}" for s in shots for f in folds] + \
           ([f"{s}-shot Mean" for s in shots] if len(folds) > 1 else [])
    rows = []
    for lab in labels:
        row = [lab] + [_fmt(cell[(lab, s, f)]) for s in shots for f in folds]
        if len(folds) > 1:
            for s in shots:
                per_fold = [np.mean([v for v in cell[(lab, s, f)] if v is not None]) if any(
                    v is not None for v in cell[(lab, s, f)]) else None for f in folds]
                row.append("–" if any(v is None for v in per_fold) else f"{100 * np.mean(per_fold):.1f}")
        rows.append(row)
    return _markdown(cols, rows)


def statistics_section(records: list[dict], metric: str = "iou") -> str:
    """Per (fold, shot): mIoU with a bootstrap CI over classes for each method config, and paired
    comparisons (per-class IoU differences, CI, sign-flip p) of configs run on the same manifests."""
    groups = defaultdict(lambda: defaultdict(dict))  # (fold, shot) -> label -> manifest hash -> per_class
    for r in records:
        groups[(r["fold"], r["shot"])][label(r)][r["manifest_hash"]] = r["metrics"].get("per_class") or {}
    lines = []
    for (fold, shot), by_label in sorted(groups.items()):
        rows = []
        for lab, runs in sorted(by_label.items()):
            ci = bootstrap_ci(list(runs.values()), metric, n_boot=2000)
            if ci["mean"] is not None:
                rows.append([lab, f"{100 * ci['mean']:.1f}", f"[{100 * ci['ci_low']:.1f}, {100 * ci['ci_high']:.1f}]",
                             str(ci["n_classes"])])
        pairs = []
        labels = sorted(by_label)
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                shared = sorted(set(by_label[a]) & set(by_label[b]))
                if not shared:
                    continue
                try:
                    cmp = paired_comparison([by_label[a][h] for h in shared], [by_label[b][h] for h in shared],
                                            metric, n_boot=2000)
                except FdsError:  # classes differ (e.g. a run with --max-episodes): not comparable
                    continue
                if cmp.get("mean_diff") is None:
                    continue
                pairs.append([f"{a} − {b}", str(len(shared)), f"{100 * cmp['mean_diff']:+.1f}",
                              f"[{100 * cmp['ci_low']:+.1f}, {100 * cmp['ci_high']:+.1f}]",
                              f"{cmp['wins']}/{cmp['losses']}/{cmp['ties']}", f"{cmp['p_value']:.3g}"])
        if rows:
            lines.append(f"### Fold {fold}, {shot}-shot: mIoU with 95 % bootstrap CI over classes\n\n"
                         + _markdown(["method", "mIoU", "95 % CI", "classes"], rows) + "\n")
        if pairs:
            lines.append(f"### Fold {fold}, {shot}-shot: paired comparison on the same manifests\n\n"
                         + _markdown(["A − B", "runs", "Δ mIoU", "95 % CI", "wins/losses/ties", "sign-flip p"],
                                     pairs) + "\n")
    return ("## Statistics\n\n" + "\n".join(lines)) if lines else ""


def write_leaderboards(runs_dir: Path, out: Path, metric: str = "miou") -> list[Path]:
    """One markdown file (tables for the main metrics) and one plot per (dataset, protocol)."""
    records = load_records(runs_dir)
    groups = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["protocol"]["name"])].append(r)
    written = []
    for (dataset, proto), recs in sorted(groups.items()):
        metrics = [metric] + [m for m in ("miou", "fbiou", "per_image_iou", "image_auroc", "pixel_auroc",
                                          "pixel_f1_max", "aupro") if m != metric]
        parts = [f"# {dataset} — protocol {proto}\n",
                 f"Built by `fdsbench leaderboard` from {len(recs)} run records in `{runs_dir}`. "
                 f"Cells: mean ± std over runs (%). {RANDOM_MARK} = random-init weights (not the paper's numbers).\n"]
        for m in metrics:
            if all(r["metrics"].get(m) is None for r in recs):
                continue
            parts.append(f"## {METRIC_NAMES.get(m, m)}\n\n{fold_table(recs, m)}\n")
        parts.append(f"## Timing\n\n{format_timing_table(recs)}\n")
        stats = statistics_section(recs)
        if stats:
            parts.append(stats)
        path = Path(out) / f"{dataset}_{proto}.md"
        atomic_write_text(path, "\n".join(parts))
        written.append(path)
        written.append(_plot(recs, Path(out) / f"{dataset}_{proto}.png", metric))
    return written


def _plot(records: list[dict], path: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = defaultdict(lambda: ([], []))
    for r in records:
        fps = (r.get("timing") or {}).get("fps")
        val = r["metrics"].get(metric)
        if fps is not None and val is not None:
            pts[label(r)][0].append(fps)
            pts[label(r)][1].append(100 * val)
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, (x, y) in sorted(pts.items()):
        ax.scatter(np.mean(x), np.mean(y), label=lab)
    ax.set_xscale("log")
    ax.set_xlabel("FPS (queries/s, predict only)")
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (%)")
    ax.set_title(f"{records[0]['dataset']} — {records[0]['protocol']['name']}")
    if pts:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
