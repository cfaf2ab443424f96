"""``fdsbench datasets list | check NAME ROOT | stats NAME ROOT [--out DIR]``.

* ``check`` validates a dataset tree: counts per object and class, the fold assignment, and every
  problem with the file it concerns (missing or unreadable image, mask size different from the
  image, empty mask for a labelled class, unknown category id, duplicate files, objects named in a
  fold but absent). Exit status 1 when there is an error, 0 otherwise (warnings allowed).
* ``stats`` prints and plots the defect-size picture of the SOFS paper (Fig. 6/7: area proportion
  and pixel area per defect class), so users see how small their defects are.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import FdsError

#: area-proportion buckets of the SOFS paper (84 % of VISION V1 types < 0.3 %, 63 % of Defect
#: Spectrum types < 2 %) and pixel-area buckets (38 % of VISION V1 types < 900 px)
PROP_EDGES = (0.003, 0.02)
PIXEL_EDGES = (900, 10_000)


def parse_dataset_options(items) -> dict:
    """``["mask_threshold=0", "domain=view"]`` -> ``{"mask_threshold": 0, "domain": "view"}``: adapter
    options as ``datasets check -o``, ``bench/episodes/fps --dataset-opt`` and ``DATASET_OPTS=`` pass them
    (values read as YAML scalars, like ``--set``)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise FdsError(f"dataset option '{item}' is not key=value (e.g. --dataset-opt mask_threshold=0)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v.strip()
    return out


def open_dataset(name: str, root: str | None, cache_dir: str | None = None, options: dict | None = None):
    """The adapter ``name`` on ``root`` with ``options``; a bad option name or value is one error."""
    from .registry import get_dataset

    cls = get_dataset(name)
    try:
        return cls(root, cache_dir=cache_dir, **(options or {}))
    except (TypeError, ValueError) as e:
        raise FdsError(f"dataset '{name}' does not accept the options {options or {}} ({e}); its options: "
                       f"{', '.join(cls.option_names) or 'none'}") from None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _progress(total: int, desc: str):
    if not sys.stderr.isatty() or total < 200:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    return bar


# ---- check -----------------------------------------------------------------------------------------
def run_check(ds, out=print) -> int:
    """Print the report of ``datasets check``; return the exit status (1 if any error)."""
    out(f"dataset {ds.name} at {ds.root}")
    out(f"layout: {ds.layout}")
    out(f"masks:  {ds.mask_rule}")
    counts = ds.counts()
    classes = sorted({c for d in counts.values() for c in d if c not in ("images", "normal")})
    out("")
    out("counts per object (images with a mask of each class; an image with several classes counts once per class):")
    rows = []
    for obj, d in counts.items():
        per = [f"{c}={d[c]}" for c in classes if c in d]
        rows.append([obj, d["images"], d["normal"], len(per), " ".join(per)])
    out(_table(rows, ["object", "images", "normal", "classes", "images per class"]))
    n_cls = len(ds.index.classes)
    out(f"total: {len(ds.index.records)} images, {sum(d['normal'] for d in counts.values())} normal, "
        f"{n_cls} classes in {len(counts)} objects")
    out("")
    present = set(ds.index.objects)
    if ds.folds:
        out("folds (test objects; training objects = all others):")
        for k, fold in enumerate(ds.folds):
            test = [o if o in present else f"{o} (ABSENT)" for o in fold]
            n = sum(1 for c in ds.index.classes if c.split("/", 1)[0] in fold)
            out(f"  fold {k}: {', '.join(test)}  [{n} test classes, "
                f"{len([o for o in present if o not in fold])} training objects]")
    else:
        out("folds: none (every object is a test object in fold 0)")
    bar = _progress(len(ds.index.records), f"checking {ds.name}")
    problems = ds.check(progress=bar.update if bar else None)
    if bar:
        bar.close()
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    out("")
    if problems:
        out("problems:")
        for p in sorted(problems, key=lambda p: (p.severity != "error", p.path)):
            out(f"  {p}")
    out(f"{len(errors)} error(s), {len(warnings)} warning(s)")
    return 1 if errors else 0


def cmd_check(args) -> int:
    try:
        ds = open_dataset(args.name, args.root, args.cache_dir, parse_dataset_options(args.option))
        ds.index
    except FdsError as e:  # a tree the adapter cannot even index: the one problem to report
        print(f"error: {e}")
        print("1 error(s), 0 warning(s)")
        return 1
    return run_check(ds)


# ---- stats -----------------------------------------------------------------------------------------
def _bucket(v: float, edges, labels) -> str:
    return labels[0] if v < edges[0] else labels[1] if v < edges[1] else labels[2]


PROP_LABELS = ("<0.3%", "0.3-2%", ">2%")
PIXEL_LABELS = ("<900px", "900-10k px", ">10k px")


def compute_stats(ds, progress=None) -> dict:
    """Per class: defect pixel areas and area proportions over its (image, class) pairs; summary of
    the share of classes per bucket, classified by the class MEDIAN (our reading of the SOFS
    statement "84 % of defect types have area proportions less than 0.3 %")."""
    rows = ds.defect_areas(progress)
    per: dict[str, dict] = {}
    for cls, image_id, area, total in rows:
        d = per.setdefault(cls, {"areas": [], "props": []})
        d["areas"].append(area)
        d["props"].append(area / total if total else 0.0)
    classes = {}
    for cls, d in sorted(per.items()):
        a, p = np.asarray(d["areas"], float), np.asarray(d["props"], float)
        classes[cls] = {"n": int(a.size), "median_prop": float(np.median(p)), "mean_prop": float(p.mean()),
                        "min_prop": float(p.min()), "max_prop": float(p.max()), "median_px": float(np.median(a)),
                        "mean_px": float(a.mean()), "min_px": float(a.min()), "max_px": float(a.max()),
                        "prop_bucket": _bucket(float(np.median(p)), PROP_EDGES, PROP_LABELS),
                        "px_bucket": _bucket(float(np.median(a)), PIXEL_EDGES, PIXEL_LABELS),
                        "areas": d["areas"], "props": d["props"]}
    n = max(len(classes), 1)
    all_props = np.asarray([v for d in per.values() for v in d["props"]], float)
    all_px = np.asarray([v for d in per.values() for v in d["areas"]], float)
    summary = {
        "classes": len(classes), "pairs": int(all_props.size),
        "classes_by_median_prop": {b: sum(c["prop_bucket"] == b for c in classes.values()) / n for b in PROP_LABELS},
        "classes_by_median_px": {b: sum(c["px_bucket"] == b for c in classes.values()) / n for b in PIXEL_LABELS},
        "pairs_by_prop": {b: float(np.mean([_bucket(v, PROP_EDGES, PROP_LABELS) == b for v in all_props]))
                          if all_props.size else 0.0 for b in PROP_LABELS},
        "pairs_by_px": {b: float(np.mean([_bucket(v, PIXEL_EDGES, PIXEL_LABELS) == b for v in all_px]))
                        if all_px.size else 0.0 for b in PIXEL_LABELS},
    }
    return {"dataset": ds.name, "root": str(ds.root), "mask_rule": ds.mask_rule, "classes": classes,
            "summary": summary}


def stats_table(stats: dict) -> str:
    rows = []
    for cls, c in stats["classes"].items():
        rows.append([cls, c["n"], f"{100 * c['median_prop']:.3f}", f"{100 * c['mean_prop']:.3f}",
                     f"{100 * c['min_prop']:.4f}", f"{c['median_px']:.0f}", f"{c['mean_px']:.0f}", f"{c['min_px']:.0f}",
                     c["prop_bucket"], c["px_bucket"]])
    table = _table(rows, ["class", "n", "median %", "mean %", "min %", "median px", "mean px", "min px",
                          "prop bucket", "px bucket"])
    s = stats["summary"]
    fmt = lambda d: ", ".join(f"{k} {100 * v:.0f}%" for k, v in d.items())
    return (f"{table}\n\n{s['classes']} classes, {s['pairs']} (image, class) pairs\n"
            f"classes by median area proportion: {fmt(s['classes_by_median_prop'])}\n"
            f"classes by median pixel area:      {fmt(s['classes_by_median_px'])}\n"
            f"pairs by area proportion:          {fmt(s['pairs_by_prop'])}\n"
            f"pairs by pixel area:               {fmt(s['pairs_by_px'])}")


def plot_stats(stats: dict, path: Path) -> Path:
    """Two panels as in SOFS Fig. 6/7: area proportion (%) and pixel area per class (box plots, log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(stats["classes"])
    n = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.22 * n + 1.5)), sharey=True)
    data_p = [np.maximum(np.asarray(stats["classes"][c]["props"]) * 100, 1e-4) for c in classes]
    data_a = [np.maximum(np.asarray(stats["classes"][c]["areas"], float), 1) for c in classes]
    for ax, data, title, lines in ((axes[0], data_p, "area proportion (%)", (0.3, 2.0)),
                                   (axes[1], data_a, "pixel area (px)", (900,))):
        try:
            ax.boxplot(data, orientation="horizontal", showfliers=True, flierprops={"markersize": 2})
        except TypeError:  # matplotlib < 3.10
            ax.boxplot(data, vert=False, showfliers=True, flierprops={"markersize": 2})
        ax.set_xscale("log")
        ax.set_xlabel(title)
        for x in lines:
            ax.axvline(x, color="tab:red", lw=0.8, ls="--")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(1, n + 1))
    axes[0].set_yticklabels(classes, fontsize=7)
    s = stats["summary"]
    fig.suptitle(f"{stats['dataset']}: {s['classes']} classes; median area < 0.3 %: "
                 f"{100 * s['classes_by_median_prop']['<0.3%']:.0f}% of classes, median < 900 px: "
                 f"{100 * s['classes_by_median_px']['<900px']:.0f}%", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_stats(args) -> int:
    from .io import atomic_write_json

    ds = open_dataset(args.name, args.root, args.cache_dir, parse_dataset_options(args.option))
    if not ds.index.classes:
        raise FdsError(f"dataset '{ds.name}' at {ds.root} has no defect masks to measure")
    total = sum(len(v) for v in ds.index.images_of.values())
    bar = _progress(total, f"measuring {ds.name}")
    stats = compute_stats(ds, bar.update if bar else None)
    if bar:
        bar.close()
    print(stats_table(stats))
    out = Path(args.out)
    png = plot_stats(stats, out / f"{ds.name}_defect_sizes.png")
    atomic_write_json(out / f"{ds.name}_defect_sizes.json", stats)
    print(f"\nwrote {png} and {out / f'{ds.name}_defect_sizes.json'}")
    return 0


def cmd_list(args) -> int:
    from .registry import list_datasets

    for name, cls in list_datasets().items():
        folds = f"{len(cls.folds)} fold(s)" if cls.folds else "no folds"
        print(f"{name:16s} {folds:10s} {cls.layout}")
    return 0


def add_datasets_cli(subparsers) -> None:
    """Register ``fdsbench datasets {list,check,stats}`` on the main parser's subparsers."""
    p = subparsers.add_parser("datasets", help="list dataset adapters, check a dataset tree, plot defect sizes")
    sub = p.add_subparsers(dest="datasets_cmd", required=True)
    sub.add_parser("list", help="registered dataset adapters").set_defaults(func=cmd_list)
    for name, func, help_ in (("check", cmd_check, "validate a dataset tree (exit 1 on errors)"),
                              ("stats", cmd_stats, "defect-size table and PNG (SOFS Fig. 6/7)")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("name", help="dataset adapter (fdsbench datasets list)")
        q.add_argument("root", nargs="?", default=None, help="dataset root folder (optional for synthetic)")
        q.add_argument("--cache-dir", default=None, help="index cache folder (default ~/.cache/fdsbench/index)")
        q.add_argument("--option", "-o", action="append", default=[],
                       help="adapter option key=value (e.g. domain=view for aebad, mask_threshold=0 for folder)")
        if name == "stats":
            q.add_argument("--out", default="runs/datasets", help="folder for the PNG and JSON (default runs/datasets)")
        q.set_defaults(func=func)


def main(argv=None) -> int:  # ``python -m fdsbench.datasets_cli`` without the main CLI
    import argparse

    parser = argparse.ArgumentParser(prog="fdsbench")
    add_datasets_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FdsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
