"""``fdsbench compare A B``: method A against method B on the same episodes.

A and B are run ids, run-id prefixes, method names or table labels. Their runs are paired by manifest
(same dataset content, fold, shot, seed and protocol: the same episodes); runs on manifests the other
side lacks are left out and named. Per dataset identity, protocol and shot (shots are never pooled),
the per-class differences A − B go to :func:`fdsbench.stats.paired_comparison`: mean difference with a
bootstrap CI over classes, wins/losses/ties and the sign-flip p-value."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import FdsError
from .results import ALL, PER_CLASS_METRIC, PRIMARY_METRIC, is_complete, label, results_frame, to_markdown
from .stats import paired_comparison


def select(records: list[dict], selector: str, where: str = "") -> list[dict]:
    """Records of one side: the run id, else runs whose id starts with it, else method name, method
    label or table label equal to it. Incomplete runs are never selected."""
    done = [r for r in records if is_complete(r)]
    for rule in (lambda r: r["run_id"] == selector, lambda r: r["run_id"].startswith(selector),
                 lambda r: selector in (r["method"], r.get("method_label"), label(r))):
        hit = [r for r in done if rule(r)]
        if hit:
            return hit
    methods = sorted({r["method"] for r in done})
    raise FdsError(f"no complete run record matches '{selector}'{where} (give a run id, a run-id prefix, a method "
                   f"name or a table label; methods with complete runs: {', '.join(methods) or 'none'})")


@dataclass
class Comparison:
    dataset: str
    dataset_hash: str
    protocol: str
    shot: int
    label_a: str
    label_b: str
    manifests: list
    run_ids: list
    result: dict  # fdsbench.stats.paired_comparison

    @property
    def title(self) -> str:
        return (f"{self.label_a} − {self.label_b}: {self.dataset} ({self.dataset_hash[:8]}), {self.protocol}, "
                f"{self.shot}-shot, {len(self.manifests)} manifest{'s' if len(self.manifests) != 1 else ''}")


def _one_per_manifest(recs: list[dict], side: str, selector: str) -> dict:
    by = {}
    for r in recs:
        if r["manifest_hash"] in by and label(by[r["manifest_hash"]]) != label(r):
            raise FdsError(f"{side} '{selector}' matches two configurations on manifest {r['manifest_hash'][:8]} "
                           f"({label(by[r['manifest_hash']])}, {label(r)}): give a run id or a table label")
        by[r["manifest_hash"]] = r
    return by


def _describe(recs) -> str:
    return "; ".join(sorted({f"{r['dataset']} fold {r['fold']} {r['shot']}-shot seed {r['seed']} manifest "
                             f"{r['manifest_hash'][:8]}" for r in recs})[:4])


def compare(records: list[dict], a: str, b: str, metric: str | None = None, n_boot: int = 10000,
            seed: int = 0) -> tuple[list[Comparison], list[str]]:
    """Paired comparisons of A and B, one per (dataset identity, protocol, shot), and the run ids left
    out because the other side has no run on their manifest. Refuses A and B without a shared manifest."""
    ra = _one_per_manifest(select(records, a, " (A)"), "A", a)
    rb = _one_per_manifest(select(records, b, " (B)"), "B", b)
    shared = sorted(set(ra) & set(rb))
    if not shared:
        raise FdsError(f"A '{a}' and B '{b}' share no manifest, so they did not see the same episodes: A ran on "
                       f"{_describe(ra.values())}; B on {_describe(rb.values())}. Run both on the same dataset, fold, "
                       f"shot, seed and protocol (the manifest hash is in each run record)")
    if any(ra[m]["run_id"] == rb[m]["run_id"] for m in shared):
        raise FdsError(f"A '{a}' and B '{b}' select the same run; name two different methods or configurations")
    unpaired = sorted(r["run_id"] for m, r in {**ra, **rb}.items() if m not in shared)
    frame = results_frame([ra[m] for m in shared] + [rb[m] for m in shared])
    side = {ra[m]["run_id"]: "A" for m in shared} | {rb[m]["run_id"]: "B" for m in shared}
    frame["side"] = frame["run_id"].map(side)
    out = []
    for (ds, dh, proto, _, shot), grp in frame.groupby(["dataset", "dataset_hash", "protocol", "protocol_hash",
                                                        "shot"]):
        m = metric or PER_CLASS_METRIC[PRIMARY_METRIC.get(proto, "miou")]
        sel = grp[(grp["class"] != ALL) & (grp["metric"] == m)]
        if sel.empty:
            raise FdsError(f"the runs hold no per-class '{m}' values; choose --metric among: "
                           f"{', '.join(sorted(grp.loc[grp['class'] != ALL, 'metric'].unique()))}")

        def per_class(s):
            return [{c: (None if pd.isna(v) else float(v)) for c, v in zip(g["class"], g["value"])}
                    for _, g in sel[sel["side"] == s].sort_values("manifest_hash").groupby("manifest_hash")]

        result = paired_comparison(per_class("A"), per_class("B"), m, n_boot=n_boot, seed=seed)
        out.append(Comparison(ds, dh, proto, int(shot), grp.loc[grp["side"] == "A", "label"].iloc[0],
                              grp.loc[grp["side"] == "B", "label"].iloc[0], sorted(grp["manifest_hash"].unique()),
                              sorted(grp["run_id"].unique()), result))
    return out, unpaired


def summary_frame(comparisons: list[Comparison]) -> pd.DataFrame:
    rows = []
    for c in comparisons:
        r = c.result
        rows.append({"A − B": f"{c.label_a} − {c.label_b}", "dataset": f"{c.dataset} ({c.dataset_hash[:8]})",
                     "protocol": c.protocol, "shot": c.shot, "manifests": len(c.manifests), "classes": r["n_classes"],
                     "metric": r["metric"], "A": _pct(r.get("mean_a")), "B": _pct(r.get("mean_b")),
                     "Δ": _pct(r.get("mean_diff"), "+"),
                     "95 % CI": "–" if r.get("ci_low") is None else
                     f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]",
                     "wins/losses/ties": f"{r['wins']}/{r['losses']}/{r['ties']}",
                     "sign-flip p": "–" if r.get("p_value") is None
                     else f"{r['p_value']:.3g} ({r['p_value_method']})"})
    return pd.DataFrame(rows).set_index("A − B")


def per_class_frame(c: Comparison) -> pd.DataFrame:
    d = c.result["per_class_diff"]
    return pd.DataFrame({"class": list(d), "Δ (pp)": [f"{100 * v:+.2f}" for v in d.values()]}).set_index("class")


def _pct(v, sign=""):
    return "–" if v is None else f"{100 * v:{sign}.2f}"


def write_comparison(comparisons: list[Comparison], out: Path, stem: str) -> list[Path]:
    """The summary and per-class tables (Markdown) and one paired-difference plot per comparison."""
    from .io import atomic_write_text
    from .plots import paired_difference

    out = Path(out)
    parts = [f"# Paired comparison\n\n{to_markdown(summary_frame(comparisons))}\n"]
    paths = []
    for i, c in enumerate(comparisons):
        png = paired_difference(c.result, c.run_ids, c.title, out / f"{stem}_{i}.png")
        paths.append(png)
        parts.append(f"## {c.title}\n\nRuns: {', '.join(f'`{r}`' for r in c.run_ids)}\n\n"
                     f"{to_markdown(per_class_frame(c))}\n\n![paired differences]({png.name})\n")
    md = out / f"{stem}.md"
    atomic_write_text(md, "\n".join(parts))
    return [md, *paths]
