"""Plots of the tidy results frame (matplotlib, Agg): accuracy vs FPS, accuracy by defect size,
per-class bars with a bootstrap CI of the class mean, and paired per-class differences.

Every figure panel holds one dataset identity, protocol and shot (never two shots in one point), uses
complete runs only, and states at its foot the run records it was drawn from. Each function returns
the figure, or writes it to ``path`` (PNG) and returns the path."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from .results import ALL, FAD_METRICS, METRIC_NAMES, run_values
from .stats import bootstrap_ci

REFERENCE_STYLE = dict(marker="x", color="0.45")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, run_ids, path):
    """Footer with the records, tight layout, then save (atomic) or return the figure."""
    ids = sorted(set(run_ids))
    text = f"Drawn from {len(ids)} run record{'s' if len(ids) != 1 else ''}: " + ", ".join(ids[:12]) + \
        (f", … (+{len(ids) - 12} more)" if len(ids) > 12 else "")
    lines = textwrap.wrap(text, int(fig.get_figwidth() * 19))
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, va="bottom", ha="left", color="0.3")
    fig.tight_layout(rect=(0, 0.012 * (len(lines) + 1) * 6 / max(fig.get_figheight(), 1), 1, 1))
    if path is None:
        return fig
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (closes it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def _bucket_order(name: str):
    """``<a`` first, then ``a-b`` by a, then ``>=b`` (the names of fdsbench.metrics.segmentation)."""
    num = float("".join(ch for ch in name.split("-")[0] if ch.isdigit() or ch == ".") or 0)
    return (0 if name.startswith("<") else 2 if name.startswith(">=") else 1, num)


def _panels(frame: pd.DataFrame, by=("benchmark", "shot")):
    done = frame[frame["complete"]]
    return [(key, grp) for key, grp in done.groupby(list(by), sort=True)]


def _grid(n, w=5.2, h=3.8):
    plt = _plt()
    cols = min(n, 2)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows + 0.5), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _title(grp: pd.DataFrame, shot) -> str:
    r = grp.iloc[0]
    return f"{r['dataset']} ({r['dataset_hash'][:8] or 'no hash'}) — {r['protocol']}, {shot}-shot"


def fps_scatter(frame: pd.DataFrame, path=None, metric: str = "miou", references: pd.DataFrame | None = None):
    """Accuracy vs FPS (log axis): one point per method configuration (mean over runs, bars = std),
    one panel per dataset identity and shot. ``references``: rows of a paper's table (``method``,
    ``accuracy``, ``fps`` in %, 1/s) drawn as grey crosses on panels of the same dataset."""
    panels = _panels(frame)
    fig, axes = _grid(max(len(panels), 1))
    used = []
    for ax, ((ident, shot), grp) in zip(axes, panels):
        vals = run_values(grp, metric).dropna(subset=["value", "fps"])
        if metric in FAD_METRICS:  # records scored before per-category FAD hold the pooled value
            vals = vals.assign(label=vals["label"].where(vals["aggregation"] == "class_mean",
                                                         vals["label"] + " (pooled)"))
        used += vals["run_id"].tolist()
        for lab, pts in vals.groupby("label", sort=True):
            y, x = 100 * pts["value"], pts["fps"]
            ax.errorbar(x.mean(), y.mean(), xerr=x.std() if len(x) > 1 else None,
                        yerr=y.std() if len(y) > 1 else None, fmt="o", capsize=3, label=f"{lab} (n={len(pts)})")
        if references is not None and shot == 1 and grp["dataset"].iloc[0] in set(references["dataset"]):
            ref = references[references["dataset"] == grp["dataset"].iloc[0]]
            ax.scatter(ref["fps"], ref["accuracy"], label=f"paper ({ref['source'].iloc[0]}; FPS on the authors' GPU)",
                       **REFERENCE_STYLE)
            for r in ref.itertuples():
                ax.annotate(r.method, (r.fps, r.accuracy), fontsize=6, color="0.35", xytext=(3, 2),
                            textcoords="offset points")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        plain = _plt().FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=6)
        lo, hi = ax.get_xlim()
        if hi / lo > 20:  # minor labels only where the axis spans about a decade
            ax.xaxis.set_minor_formatter(_plt().NullFormatter())
        ax.set_xlabel("FPS (queries/s, predict only, batch 1)")
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (%)")
        ax.set_title(_title(grp, shot), fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    if not panels:
        axes[0].text(0.5, 0.5, "no complete run", ha="center", va="center")
    return _finish(fig, used, path)


def size_buckets(frame: pd.DataFrame, path=None, kind: str = "area_ratio", metric: str = "iou"):
    """Pooled IoU (``metrics.by_size``) per defect-size bucket and method configuration; one panel per
    dataset identity and shot; bars = mean over runs, the number of query images under each bucket."""
    panels = _panels(frame)
    fig, axes = _grid(max(len(panels), 1), w=6)
    used = []
    for ax, ((ident, shot), grp) in zip(axes, panels):
        sel = grp[(grp["size_kind"] == kind) & (grp["metric"] == metric)]
        if sel.empty:
            ax.set_title(_title(grp, shot) + "\n(records without size buckets)", fontsize=9)
            continue
        used += sel["run_id"].unique().tolist()
        buckets = sorted(dict.fromkeys(sel["size_bucket"]), key=_bucket_order)
        table = sel.pivot_table(index="size_bucket", columns="label", values="value", aggfunc="mean").reindex(buckets)
        counts = grp[(grp["size_kind"] == kind) & (grp["metric"] == "images")].groupby("size_bucket")["value"].max()
        labels = list(table.columns)
        width = 0.8 / max(len(labels), 1)
        x = np.arange(len(buckets))
        for i, lab in enumerate(labels):
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, 100 * table[lab].fillna(0).to_numpy(), width, label=lab)
        ax.set_xticks(x, [f"{b}\n({int(counts.get(b, 0))} img)" for b in buckets], fontsize=7)
        ax.set_xlabel("defect size (" + ("share of the image" if kind == "area_ratio" else "pixels") + ")")
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (%)")
        ax.set_title(_title(grp, shot), fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    if not panels:
        axes[0].text(0.5, 0.5, "no complete run", ha="center", va="center")
    return _finish(fig, used, path)


def per_class_bars(frame: pd.DataFrame, path=None, metric: str = "iou", n_boot: int = 2000):
    """Per-class values (mean over runs) of each method configuration, and at the right the mean over
    classes with its 95 % bootstrap CI over classes (fdsbench.stats.bootstrap_ci); one panel per
    dataset identity, fold and shot."""
    panels = _panels(frame, by=("benchmark", "fold", "shot"))
    fig, axes = _grid(max(len(panels), 1), w=7, h=4)
    used = []
    for ax, ((ident, fold, shot), grp) in zip(axes, panels):
        sel = grp[(grp["class"] != ALL) & (grp["metric"] == metric)]
        if sel.empty:
            continue
        used += sel["run_id"].unique().tolist()
        table = sel.pivot_table(index="class", columns="label", values="value", aggfunc="mean", dropna=False)
        classes, labels = list(table.index), list(table.columns)
        width = 0.8 / max(len(labels), 1)
        x = np.arange(len(classes) + 1)
        for i, lab in enumerate(labels):
            runs = [dict(zip(g["class"], [None if pd.isna(v) else v for v in g["value"]]))
                    for _, g in sel[sel["label"] == lab].groupby("run_id")]
            ci = bootstrap_ci(runs, metric, n_boot=n_boot)
            heights = np.append(table[lab].to_numpy(), np.nan if ci["mean"] is None else ci["mean"])
            pos = x + (i - (len(labels) - 1) / 2) * width
            ax.bar(pos, 100 * np.nan_to_num(heights), width, label=lab)
            if ci["mean"] is not None:
                ax.errorbar(pos[-1], 100 * ci["mean"], yerr=[[100 * (ci["mean"] - ci["ci_low"])],
                                                             [100 * (ci["ci_high"] - ci["mean"])]],
                            fmt="none", ecolor="k", capsize=3)
        ax.set_xticks(x, classes + ["mean\n(95 % CI)"], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (%)")
        ax.set_title(_title(grp, shot) + f", fold {fold}", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    if not panels:
        axes[0].text(0.5, 0.5, "no complete run", ha="center", va="center")
    return _finish(fig, used, path)


def paired_difference(comparison: dict, run_ids, title: str, path=None):
    """Per-class differences A − B (sorted), their mean with the 95 % bootstrap CI (shaded) and the
    sign-flip p-value, from a :func:`fdsbench.stats.paired_comparison` result."""
    plt = _plt()
    diffs = sorted(comparison["per_class_diff"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(diffs) + 2))
    if diffs:
        names, d = zip(*diffs)
        d = 100 * np.asarray(d)
        ax.barh(np.arange(len(d)), d, color=["tab:green" if v > 0 else "tab:red" if v < 0 else "0.6" for v in d])
        ax.set_yticks(np.arange(len(d)), names, fontsize=7)
        ax.axvline(100 * comparison["mean_diff"], color="k", lw=1)
        ax.axvspan(100 * comparison["ci_low"], 100 * comparison["ci_high"], color="k", alpha=0.12)
    ax.axvline(0, color="0.5", lw=0.8)
    name = METRIC_NAMES.get(comparison["metric"], comparison["metric"])
    p = comparison.get("p_value")
    ax.set_xlabel(f"Δ {name} per class, A − B (percentage points)")
    ax.set_title(f"{title}\nmean Δ {100 * (comparison.get('mean_diff') or 0):+.2f} pp, 95 % CI "
                 f"[{100 * (comparison.get('ci_low') or 0):+.2f}, {100 * (comparison.get('ci_high') or 0):+.2f}], "
                 f"sign-flip p = {'–' if p is None else f'{p:.3g}'}", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, run_ids, path)
