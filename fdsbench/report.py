"""``make report``: one self-contained HTML file from all run records of a workdir.

Plots first (PNG, base64-embedded), then per (dataset identity, protocol) the leaderboard tables, the
paper-shaped tables that have runs of ours, paired statistics, incomplete runs, and the provenance of
every run (weights, hashes, versions, device). No script, no external link: the file opens offline."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from pathlib import Path

import pandas as pd

from .io import atomic_write_text
from .leaderboard import (INCOMPLETE_INTRO, TIMING_INTRO, Block, identity_blocks, identity_line, incomplete_frame,
                          statistics_blocks)
from .papers import REF, gfds_speed_references, paper_tables
from .plots import fps_scatter, per_class_bars, png_bytes, size_buckets
from .results import (METRIC_NAMES, PER_CLASS_METRIC, PRIMARY_METRIC, RANDOM_MARK, load_records, results_frame, runs_of,
                      write_frame)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
     line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
tr.ref td{color:#555;background:#f7f7ef;font-style:italic}
.note{font-size:11px;color:#555;word-break:break-all}img{max-width:100%;border:1px solid #ddd}
code{background:#f3f3f3;padding:0 2px}details{margin:.5em 0}
"""
PROVENANCE = ["run_id", "label", "method", "preset", "config_hash", "weights", "trained_on", "dataset", "dataset_hash",
              "dataset_options", "protocol", "protocol_hash", "aggregation", "score_mode", "threshold", "manifest_hash",
              "fold", "shot", "seed", "episodes", "episodes_total", "complete", "device_name", "precision", "torch",
              "fdsbench", "python"]


def _e(text) -> str:
    return html.escape(str(text))


def _text(text) -> str:
    """Escaped text with Markdown `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", _e(text))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(df: pd.DataFrame, ref_rows: bool = False) -> str:
    """HTML of a frame of strings; rows whose ``source`` (or index) names the paper get class ``ref``."""
    head = "".join(f"<th>{_e(c)}</th>" for c in [df.index.name or ""] + list(df.columns))
    body = []
    for idx, row in zip(df.index, df.itertuples(index=False)):
        cells = [idx, *row]
        ref = ref_rows and any(str(c).startswith(REF) for c in cells)
        attr = ' class="ref"' if ref else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _block(b: Block, level: int) -> str:
    return (f"<h{level}>{_e(b.title)}</h{level}>" + (f"<p>{_text(b.intro)}</p>" if b.intro else "") + _table(b.table)
            + (f'<p class="note">{_text(b.note)}</p>' if b.note else ""))


def build_report(records, title: str = "fdsbench report", source: str = "") -> str:
    """The HTML text of the report for a list of run records (or a folder of them)."""
    frame = results_frame(records)
    runs = runs_of(frame) if not frame.empty else pd.DataFrame(columns=PROVENANCE)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>Built by <code>fdsbench report</code> on {now} from {len(runs)} run records"
             + (f" in <code>{_e(source)}</code>" if source else "") + f" ({int(runs['complete'].sum())} complete). "
             f"Cells: mean ± std over runs (%). {RANDOM_MARK} = random-init weights (not the papers' numbers). "
             "Paper rows (shaded) are the papers' reported numbers, marked with their table.</p>"]
    if frame.empty:
        return _page(title, parts + ["<p>No run record.</p>"])
    parts.append("<h2>At a glance</h2>")
    for proto, part in frame.groupby("protocol"):
        metric = PRIMARY_METRIC.get(proto, "miou")
        refs = gfds_speed_references() if proto == "fss" else None
        parts.append(f"<h3>Accuracy vs speed — protocol {_e(proto)}</h3>"
                     + _img(png_bytes(fps_scatter(part, metric=metric, references=refs)), f"{proto} accuracy vs FPS"))
        if proto != "fad" and (part["size_kind"] != "").any():
            parts.append(f"<h3>IoU by defect size — protocol {_e(proto)}</h3>"
                         + _img(png_bytes(size_buckets(part)), f"{proto} IoU by defect size"))
        parts.append(f"<h3>Per-class {_e(METRIC_NAMES.get(PER_CLASS_METRIC[metric]))} with the 95 % "
                     f"bootstrap CI of the class mean — protocol {_e(proto)}</h3>"
                     + _img(png_bytes(per_class_bars(part, metric=PER_CLASS_METRIC[metric])), f"{proto} per class"))
    for (dataset, proto), part in frame.groupby(["dataset", "protocol"]):
        parts.append(f"<h2>{_e(dataset)} — protocol {_e(proto)}</h2>")
        for ident, ipart in part.groupby("benchmark"):
            parts.append(f"<p>{_text(identity_line(runs_of(ipart)))}</p>")
            for b in identity_blocks(ipart):
                parts.append(_block(b, 3))
            stats = statistics_blocks(ipart, PER_CLASS_METRIC[PRIMARY_METRIC.get(proto, "miou")])
            for b in stats:
                parts.append(_block(b, 4))
    tables = paper_tables(frame)
    parts.append("<h2>Paper-shaped tables</h2>")
    for t in tables:
        body = (f"<p>{_text(t.caption)}</p>" + _table(t.table, ref_rows=True)
                + f'<p class="note">Our rows built from {len(t.run_ids)} run records: '
                + _e(", ".join(t.run_ids) or "none") + "</p>")
        if t.has_runs:
            parts.append(f"<h3>{_e(t.title)}</h3>" + body)
        else:
            parts.append(f"<details><summary>{_e(t.title)} — reference rows only (no run of ours on this "
                         f"benchmark)</summary>{body}</details>")
    inc = incomplete_frame(frame)
    if not inc.empty:
        parts.append(f"<h2>Incomplete runs (in no table)</h2><p>{_text(INCOMPLETE_INTRO)}</p>" + _table(inc))
    parts.append("<h2>Provenance of every run</h2><p>One row per run record: configuration and weights, dataset "
                 "content hash, protocol and manifest, versions and device.</p>"
                 + _table(runs[PROVENANCE].astype(str).set_index("run_id")))
    parts.append(f'<p class="note">{_text(TIMING_INTRO)}</p>')
    return _page(title, parts)


def _page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(runs_dir, out, title: str = "fdsbench report") -> list[Path]:
    """``out`` (HTML) and, beside it, the tidy frame as ``<stem>.csv`` / ``<stem>.jsonl``."""
    out = Path(out)
    records = load_records(runs_dir)
    atomic_write_text(out, build_report(records, title, str(runs_dir)))
    return [out, *write_frame(results_frame(records), out.parent, out.stem)]
