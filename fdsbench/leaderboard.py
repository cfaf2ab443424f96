"""Leaderboard tables and plots, built only from run records (never by hand), through the tidy
frame of :mod:`fdsbench.results`.

One Markdown file and one plot per (dataset name, protocol), named ``<dataset>_<protocol>.md/.png``
as before. Inside a file, runs are grouped by dataset identity (name + content hash + adapter options)
and protocol options: two datasets that share a name are two groups, never one cell. Tables have the
papers' shape: one row per method configuration, columns F0/F1/F2/Mean for each shot (never averaged
over shots), cells mean ± std over runs (seeds) in percent. FAD tables show the mean over categories of
image AUROC, pixel AUROC, F1-max and AUPRO, with the pooled values as secondary columns. Runs cut short
(``--max-episodes``) are listed apart and enter no table. Every table names the records it was built
from. Methods run with random weights are marked †."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import FdsError
from .io import atomic_write_text
from .results import (ALL, INCOMPLETE_MARK, METRIC_NAMES, PER_CLASS_METRIC, PRIMARY_METRIC,
                      RANDOM_MARK, fad_frame, fold_frame, is_random, label, load_records,
                      records_note, results_frame, run_row, run_values, runs_of, timing_frame, to_markdown,
                      write_frame)
from .stats import bootstrap_ci, paired_comparison

__all__ = ["write_leaderboards", "format_run_table", "format_timing_table", "fold_table", "statistics_section",
           "label", "is_random", "load_records"]

TABLE_METRICS = {
    "fss": ("miou", "fbiou", "per_image_iou", "per_image_dice", "image_auroc", "pixel_auroc", "pixel_f1_max", "aupro"),
    "per_support": ("per_image_iou", "per_image_dice", "miou", "fbiou", "image_auroc", "pixel_auroc",
                    "pixel_f1_max", "aupro"),
}


def format_run_table(records: list[dict]) -> str:
    """The table ``fdsbench bench`` prints: one row per run."""
    cols = ["run", "episodes", "mIoU", "FB-IoU", "ep-mIoU", "img IoU", "img Dice", "img AUROC", "pix AUROC",
            "F1-max", "AUPRO", "FPS", "prepare ms"]
    rows, withheld = [], False
    for r in records:
        m, speed = r["metrics"], run_row(r)  # no times where the run read cached features
        withheld |= bool(pd.isna(speed["fps"]) and (r.get("timing") or {}).get("fps"))

        def pct(key):
            v = m.get(key)
            return "–" if v is None else f"{100 * v:.1f}"

        fps, p50 = speed["fps"], speed["prepare_p50_ms"]
        done = r.get("episodes") == r.get("episodes_total") if r.get("complete") is None else r["complete"]
        rows.append([label(r) + f" {r['dataset']} f{r['fold']} {r['shot']}-shot s{r['seed']}",
                     f"{r['episodes']}/{r['episodes_total']}" + ("" if done else f" {INCOMPLETE_MARK}"),
                     pct("miou"), pct("fbiou"), pct("episode_miou"), pct("per_image_iou"), pct("per_image_dice"),
                     pct("image_auroc"), pct("pixel_auroc"), pct("pixel_f1_max"), pct("aupro"),
                     "–" if pd.isna(fps) else f"{fps:.2f}", "–" if pd.isna(p50) else f"{p50:.1f}"])
    df = pd.DataFrame(rows, columns=cols).set_index("run")
    note = f"\n{RANDOM_MARK} random-init weights: numbers are not the paper's." if any(map(is_random, records)) else ""
    if any(r.get("complete") is False for r in records):
        note += f"\n{INCOMPLETE_MARK} incomplete run (--max-episodes): not a result, kept out of leaderboards."
    if withheld:
        note += ("\nFPS – : the run read frozen features from the cache (its predict times include hits); "
                 "`make fps METHOD=...` measures the method's speed.")
    return to_markdown(df) + note


def format_timing_table(records) -> str:
    return to_markdown(timing_frame(records))


def fold_table(data, metric: str = "miou") -> str:
    return to_markdown(fold_frame(data, metric))


@dataclass
class Block:
    """One titled table of a leaderboard: rendered as Markdown here, as HTML by the report."""
    title: str
    table: pd.DataFrame
    note: str = ""  # which records the table was built from
    intro: str = ""


def statistics_blocks(data, metric: str = "iou") -> list[Block]:
    """Per (fold, shot): the mean over classes with a bootstrap CI for each method configuration, and
    paired comparisons (per-class differences, CI, sign-flip p) of configurations run on the same
    manifests. Only complete runs."""
    f = data if isinstance(data, pd.DataFrame) else results_frame(data)
    f = f[f["complete"]]
    runs = runs_of(f)
    sel = f[(f["class"] != ALL) & (f["metric"] == metric)]
    per_class = {rid: {c: (None if pd.isna(v) else float(v)) for c, v in zip(g["class"], g["value"])}
                 for rid, g in sel.groupby("run_id")}
    name = METRIC_NAMES.get(metric, metric)
    blocks = []
    for (fold, shot), grp in runs.groupby(["fold", "shot"]):
        by_label = {}  # label -> manifest hash -> {class: value}
        for r in grp.itertuples():
            if r.run_id in per_class:
                by_label.setdefault(r.label, {})[r.manifest_hash] = per_class[r.run_id]
        rows, pairs = [], []
        for lab, by_manifest in sorted(by_label.items()):
            ci = bootstrap_ci(list(by_manifest.values()), metric, n_boot=2000)
            if ci["mean"] is not None:
                rows.append([lab, f"{100 * ci['mean']:.1f}", f"[{100 * ci['ci_low']:.1f}, {100 * ci['ci_high']:.1f}]",
                             str(ci["n_classes"])])
        labels = sorted(by_label)
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                shared = sorted(set(by_label[a]) & set(by_label[b]))
                if not shared:
                    continue
                try:
                    cmp = paired_comparison([by_label[a][m] for m in shared], [by_label[b][m] for m in shared],
                                            metric, n_boot=2000)
                except FdsError:  # classes differ: not comparable
                    continue
                if cmp.get("mean_diff") is None:
                    continue
                pairs.append([f"{a} − {b}", str(len(shared)), f"{100 * cmp['mean_diff']:+.1f}",
                              f"[{100 * cmp['ci_low']:+.1f}, {100 * cmp['ci_high']:+.1f}]",
                              f"{cmp['wins']}/{cmp['losses']}/{cmp['ties']}", f"{cmp['p_value']:.3g}"])
        note = records_note(grp["run_id"])
        if rows:
            blocks.append(Block(f"Fold {fold}, {shot}-shot: mean {name} over classes with 95 % bootstrap CI",
                                pd.DataFrame(rows, columns=["method", f"mean {name}", "95 % CI", "classes"])
                                .set_index("method"), note))
        if pairs:
            blocks.append(Block(f"Fold {fold}, {shot}-shot: paired comparison on the same manifests",
                                pd.DataFrame(pairs, columns=["A − B", "runs", f"Δ {name}", "95 % CI",
                                                             "wins/losses/ties", "sign-flip p"]).set_index("A − B"),
                                note))
    return blocks


def render_markdown(blocks: list[Block], level: int) -> str:
    h = "#" * level
    return "\n".join(f"{h} {b.title}\n\n" + (f"{b.intro}\n\n" if b.intro else "") + to_markdown(b.table)
                     + (f"\n\n{b.note}" if b.note else "") + "\n" for b in blocks)


def statistics_section(data, metric: str = "iou", level: int = 2) -> str:
    blocks = statistics_blocks(data, metric)
    return f"{'#' * level} Statistics\n\n" + render_markdown(blocks, level + 1) if blocks else ""


def identity_line(runs: pd.DataFrame) -> str:
    r = runs.iloc[0]
    opts = "" if r["dataset_options"] in ("{}", "") else f", adapter options `{r['dataset_options']}`"
    manifests = ", ".join(f"`{m[:8]}`" for m in sorted(runs["manifest_hash"].unique()))
    return (f"Dataset `{r['dataset']}` (content hash `{r['dataset_hash'] or 'none recorded'}`{opts}), protocol "
            f"`{r['protocol']}` (options hash `{r['protocol_hash']}`), manifests {manifests}.")


TIMING_INTRO = ("Predict: batch 1, after warm-up, device synchronised. Prepare: the support processing of an "
                "episode (for per-support methods, the fit), timed apart; `prepare 1st` is its first call, kept "
                "apart from warm-up. Runs that read frozen features from the shared feature cache show no times "
                "(–): their calls skipped encoding; `make fps` times a method without the cache.")


def identity_blocks(frame: pd.DataFrame, metric: str | None = None) -> list[Block]:
    """The tables of one dataset identity and protocol (complete runs only), statistics last."""
    done = frame[frame["complete"]]
    if done.empty:
        return []
    proto = done["protocol"].iloc[0]
    blocks = []
    if proto == "fad":
        blocks.append(Block("FAD: mean over categories (pooled over all categories as secondary columns)",
                            fad_frame(done), records_note(runs_of(done)["run_id"])))
        metrics = []  # FAD runs are judged by the FAD metrics only
    else:
        order = TABLE_METRICS.get(proto, TABLE_METRICS["fss"])
        metrics = ([metric] if metric else []) + [m for m in order if m != metric]
    for m in metrics:
        vals = run_values(done, m).dropna(subset=["value"])
        if not vals.empty:
            blocks.append(Block(METRIC_NAMES.get(m, m), fold_frame(done, m), records_note(vals["run_id"])))
    blocks.append(Block("Timing", timing_frame(done), records_note(runs_of(done)["run_id"]), TIMING_INTRO))
    return blocks


def identity_section(frame: pd.DataFrame, level: int, metric: str | None = None) -> str:
    runs = runs_of(frame)
    blocks = identity_blocks(frame, metric)
    if not blocks:
        return identity_line(runs) + "\n\nNo complete run.\n"
    proto = runs["protocol"].iloc[0]
    stats = statistics_section(frame[frame["complete"]], PER_CLASS_METRIC.get(PRIMARY_METRIC.get(proto, "miou"), "iou"),
                               level=level)
    return identity_line(runs) + "\n\n" + render_markdown(blocks, level) + ("\n" + stats if stats else "")


def incomplete_frame(frame: pd.DataFrame) -> pd.DataFrame:
    runs = runs_of(frame)
    runs = runs[~runs["complete"]]
    return pd.DataFrame({"run": runs["label"] + f" {INCOMPLETE_MARK}", "run id": runs["run_id"],
                         "fold": runs["fold"], "shot": runs["shot"],
                         "episodes": [f"{a}/{b}" for a, b in zip(runs["episodes"], runs["episodes_total"])],
                         "max episodes": ["–" if pd.isna(v) else str(int(v)) for v in runs["max_episodes"]]}
                        ).set_index("run")


INCOMPLETE_INTRO = (f"{INCOMPLETE_MARK} These runs stopped before the end of their manifest (`--max-episodes`); "
                    "their numbers are not results.")


def incomplete_section(frame: pd.DataFrame, level: int = 2) -> str:
    df = incomplete_frame(frame)
    if df.empty:
        return ""
    df["run id"] = "`" + df["run id"] + "`"
    return f"{'#' * level} Incomplete runs (in no table)\n\n{INCOMPLETE_INTRO}\n\n{to_markdown(df)}\n"


def leaderboard_markdown(frame: pd.DataFrame, source: str, metric: str | None = None,
                         plots: tuple[str, ...] = ()) -> str:
    """The Markdown of one (dataset, protocol); ``plots``: file names of its PNGs, shown first."""
    runs = runs_of(frame)
    dataset, proto = runs["dataset"].iloc[0], runs["protocol"].iloc[0]
    idents = sorted(runs["benchmark"].unique())
    parts = [f"# {dataset} — protocol {proto}\n",
             f"Built by `fdsbench leaderboard` from {len(runs)} run record{'s' if len(runs) != 1 else ''} "
             f"in `{source}` "
             f"({int(runs['complete'].sum())} complete). Cells: mean ± std over runs (%), one cell per dataset "
             f"identity, protocol, shot and fold (1-shot and 5-shot are never averaged). "
             f"{RANDOM_MARK} = random-init weights (not the paper's numbers).\n"]
    if plots:
        parts.append(" ".join(f"![{name}]({name})" for name in plots) + "\n")
    if len(idents) > 1:
        parts.append(f"**{len(idents)} different datasets share the name `{dataset}`** (different content, "
                     f"adapter options or protocol options): each has its own tables below.\n")
    for i, ident in enumerate(idents, 1):
        part = frame[frame["benchmark"] == ident]
        if len(idents) > 1:
            parts.append(f"## Dataset identity {i}: `{ident}`\n")
        parts.append(identity_section(part, 2 if len(idents) == 1 else 3, metric))
    parts.append(incomplete_section(frame))
    return "\n".join(p for p in parts if p)


def write_leaderboards(runs_dir: Path, out: Path, metric: str | None = None) -> list[Path]:
    """Per (dataset, protocol): one Markdown file ``<dataset>_<protocol>.md`` and the accuracy-vs-FPS plot
    ``<dataset>_<protocol>.png`` (the names of earlier versions), ``..._per_class.png`` and, for
    segmentation protocols, ``..._by_size.png``; ``paper_tables.md`` (the papers' tables with our runs);
    and the tidy frame of all records as ``results.csv`` / ``results.jsonl``."""
    from .papers import gfds_speed_references
    from .plots import fps_scatter, per_class_bars, size_buckets

    frame = results_frame(load_records(runs_dir))
    out = Path(out)
    written = []
    if frame.empty:
        return written
    for (dataset, proto), part in frame.groupby(["dataset", "protocol"], sort=True):
        stem = f"{dataset}_{proto}"
        m = metric if metric and proto != "fad" else PRIMARY_METRIC.get(proto, "miou")
        pngs = [fps_scatter(part, out / f"{stem}.png", m,
                            references=gfds_speed_references() if m == "miou" else None)]
        if proto != "fad":
            pngs.append(size_buckets(part, out / f"{stem}_by_size.png"))
        pngs.append(per_class_bars(part, out / f"{stem}_per_class.png",
                                   PER_CLASS_METRIC.get(PRIMARY_METRIC.get(proto, "miou"), "iou")))
        path = out / f"{stem}.md"
        atomic_write_text(path, leaderboard_markdown(part, str(runs_dir), metric, tuple(p.name for p in pngs)))
        written += [path, *pngs]
    path = out / "paper_tables.md"
    atomic_write_text(path, paper_tables_markdown(frame, str(runs_dir)))
    written.append(path)
    written += write_frame(frame, out)
    return written


def paper_tables_markdown(frame: pd.DataFrame, source: str) -> str:
    """Every paper-shaped table: the papers' numbers (source ``paper Table N``) and our complete runs."""
    from .papers import paper_tables

    parts = [f"# Paper-shaped tables\n\nBuilt by `fdsbench leaderboard` from the run records in `{source}`. Rows "
             f"whose source is `paper Table N` are the papers' reported numbers (fdsbench/paper_refs); rows marked "
             f"`ours` are our complete runs on that benchmark. {RANDOM_MARK} = random-init weights.\n"]
    for t in paper_tables(frame):
        parts.append(f"## {t.title}\n\n{t.caption}\n\n{to_markdown(t.table)}\n\n"
                     + (records_note(t.run_ids) if t.has_runs else "No run of ours on this benchmark yet.") + "\n")
    return "\n".join(parts)
