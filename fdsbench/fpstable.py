"""The GPU speed table: the FPS protocol (:mod:`fdsbench.timing`: warm-up, device synchronisation,
batch 1, prepare apart from predict) for every registered method at each of its paper presets, in
the shape of GFDS Table 4 (method, input size, precision, FPS) with p50/p95 latency, peak memory and
the ratio to the paper's FPS (RTX 3090 Ti), written with a plot under
``<out>/<gpu>-<precision>-<versions>/``.

Speed does not depend on the weights' values: every row runs with random-init weights (no weight
files, no meta-training), on the same episodes of one manifest. A method declares which paper row a
preset reproduces in ``speed_reference`` (preset -> method name in GFDS Table 4). With
``compare_fp32``, the outputs of a preset that runs under autocast are compared with the same
preset in fp32 (config ``amp="fp32"``, same random weights) on the same queries."""
from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .config import build_config, config_dict, config_hash
from .episodes import get_manifest, resolve_protocol
from .errors import FdsError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .loading import EpisodeLoader, host_array
from .registry import get_dataset, get_method, list_methods
from .seeding import seed_everything
from .timing import (ShapeWarmup, TimingMeter, accelerate, autocast, environment_info, output_difference,
                     precision_kind)

NOT_PAPER = ("cpu", "test")
SIZE_KEYS = ("image_size", "input_size", "size")


def paper_presets(cls) -> list[str]:
    """The presets of ``cls`` that are not the CPU/test ones, one per distinct configuration (a
    preset named in ``speed_reference`` is preferred over an alias with the same configuration)."""
    ref = getattr(cls, "speed_reference", {})
    names = sorted((n for n in cls.presets if n not in NOT_PAPER and not n.startswith(NOT_PAPER)),
                   key=lambda n: (n not in ref, n))
    seen, out = set(), []
    for n in names:
        h = config_hash(build_config(cls.Config, cls.presets, n, {}))
        if h not in seen:
            seen.add(h)
            out.append(n)
    return sorted(out)


def _paper_fps() -> dict[str, float]:
    from .papers import reference

    ref = reference("gfds")
    return dict(zip(ref[ref["metric"] == "fps"]["method"], ref[ref["metric"] == "fps"]["num"]))


def _speed_overrides(cls, fp32: bool = False) -> dict:
    names = {f.name for f in dataclasses.fields(cls.Config)} if dataclasses.is_dataclass(cls.Config) else set()
    out = {k: "random" for k in names if k == "weights" or k.endswith("_weights")}
    if fp32 and "amp" in names:
        out["amp"] = "fp32"
    return out


def time_preset(name: str, preset: str, ds, fold: int, shot: int, device: str, episodes: int, warmup: int,
                workdir: Path, compile: bool = False, channels_last: bool = False, cudnn_benchmark: bool = False,
                warmup_per_shape: bool = False, compare_fp32: int = 0) -> dict:
    """One row of the table: the FPS protocol for method ``name`` at ``preset``."""
    cls = get_method(name)
    config = build_config(cls.Config, cls.presets, preset, _speed_overrides(cls))
    seed_everything(0)
    method = cls(config, device=device)
    method.workdir = workdir / "cache" / name
    proto = resolve_protocol(getattr(cls, "default_protocol", "fss"), shot, {}, ds.protocol_defaults_for(fold))
    manifest = get_manifest(workdir, ds, fold, shot, 0, proto)
    eps = manifest.episodes[:episodes]
    speed = accelerate(method, device, compile, channels_last, cudnn_benchmark)
    precision = getattr(method, "precision", "fp32")
    timer = TimingMeter(device=device, warmup=warmup, precision=precision_kind(precision))
    amp, shapes = autocast(device, getattr(method, "autocast", None)), ShapeWarmup(warmup_per_shape)
    outputs = []
    t0 = time.perf_counter()
    for ep, support, queries in EpisodeLoader(ds, cls, manifest).iterate(eps, workers=2):
        seed_everything(support.seed)
        with timer.prepare(), amp:
            state = method.prepare(support)
        for query, _ in queries:
            with amp:
                shapes(query.size, lambda: method.predict(state, query))
            with timer.predict(), amp:
                pred = method.predict(state, query)
            if len(outputs) < compare_fp32:
                outputs.append((support, query, host_array(pred)))
    wall = time.perf_counter() - t0
    t = timer.compute(environment=False)
    cfg = config_dict(method.config)
    size = next((cfg[k] for k in SIZE_KEYS if isinstance(cfg.get(k), int)), None)
    ref = getattr(cls, "speed_reference", {}).get(preset)
    paper = _paper_fps().get(ref) if ref else None
    row = {"method": name, "preset": preset, "label": method.label() if hasattr(method, "label") else name,
           "paper_row": ref, "input_size": size, "precision": precision, "config_hash": config_hash(method.config),
           "fps": t["fps"], "p50_ms": _ms(t["predict"]["p50_s"]), "p95_ms": _ms(t["predict"]["p95_s"]),
           "prepare_ms": _ms(t["prepare"]["mean_s"]), "peak_memory_mib": t["peak_memory_bytes"] / 2 ** 20,
           "peak_memory_kind": t["peak_memory_kind"], "queries": t["predict"]["n"], "episodes": len(eps),
           "paper_fps": paper, "ratio_to_paper": (t["fps"] / paper) if paper and t["fps"] else None,
           "speed_options": {**speed, "warmup_per_shape": warmup_per_shape}, "wall_s": wall,
           "weights": "random-init (speed only)", "autocast_vs_fp32": None}
    if compare_fp32 and precision != "fp32":
        row["autocast_vs_fp32"] = _compare_fp32(cls, preset, device, outputs, workdir)
    return row


def _compare_fp32(cls, preset: str, device: str, outputs: list, workdir: Path) -> dict:
    """The same preset in fp32 (``amp="fp32"``, the same random weights) on the same queries."""
    if "amp" not in _speed_overrides(cls, fp32=True):
        return {"error": f"method '{cls.name}' has no `amp` option to run it in fp32"}
    seed_everything(0)
    ref = cls(build_config(cls.Config, cls.presets, preset, _speed_overrides(cls, fp32=True)), device=device)
    ref.workdir = workdir / "cache" / cls.name
    fp32 = []
    for support, query, _ in outputs:
        seed_everything(support.seed)
        pred = ref.predict(ref.prepare(support), query)
        fp32.append(host_array(pred))
    return output_difference(fp32, [o for _, _, o in outputs])


def _ms(seconds):
    return None if seconds is None else 1000.0 * seconds


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", str(text).lower()).strip("-")[:48]


def table_folder(out: Path, env: dict, rows: list[dict]) -> Path:
    """``<out>/<gpu>-<precision>-<versions>``: the device, the precision of the rows (``mixed`` when
    they differ) and the torch/CUDA versions."""
    precisions = {precision_kind(r["precision"]) for r in rows if r.get("fps")}
    prec = precisions.pop() if len(precisions) == 1 else ("mixed" if precisions else "none")
    versions = f"torch{env.get('torch')}" + (f"-cuda{env['cuda']}" if env.get("device_type") == "cuda" and env.get("cuda")
                                              else "")
    return Path(out) / f"{_slug(env.get('device_name') or 'cpu')}-{prec}-{_slug(versions)}"


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(rows: list[dict], env: dict, episodes: int, warmup: int) -> str:
    lines = [f"# FPS table — {env.get('device_name')} ({env.get('device_type')})", "",
             f"GFDS Table 4 shape. FPS protocol: batch 1, {warmup} warm-up calls, device synchronised, prepare "
             f"(support processing) excluded from FPS; {episodes} episodes per row, random-init weights (speed "
             f"only). Paper FPS: GFDS Table 4 on an RTX 3090 Ti. torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}.", "",
             "| method | preset | paper row | input | precision | FPS | p50 ms | p95 ms | prepare ms | peak MiB "
             "| paper FPS | ratio | autocast vs fp32 (max abs / flipped) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['preset']} | – | – | – | error: {r['error']} | | | | | | | |")
            continue
        d = r.get("autocast_vs_fp32") or {}
        diff = (f"{d['max_abs']:.2e} / {100 * d['flipped_fraction']:.3f} %" if "max_abs" in d
                else d.get("error", "–"))
        lines.append(f"| {r['label']} | {r['preset']} | {r['paper_row'] or '–'} | {r['input_size'] or 'native'} | "
                     f"{r['precision']} | {_fmt(r['fps'], '.1f')} | {_fmt(r['p50_ms'], '.2f')} | "
                     f"{_fmt(r['p95_ms'], '.2f')} | {_fmt(r['prepare_ms'], '.1f')} | "
                     f"{_fmt(r['peak_memory_mib'], '.0f')} | {_fmt(r['paper_fps'], '.1f')} | "
                     f"{_fmt(r['ratio_to_paper'], '.2f')} | {diff} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], env: dict, path: Path) -> Path:
    """Our FPS per row as a dot on a log axis (bars would start at an arbitrary left edge there), the
    paper's FPS as a grey mark where known."""
    from .plots import _plt, png_bytes

    ok = [r for r in rows if r.get("fps")]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * max(len(ok), 1) + 1.6))
    ys = np.arange(len(ok))
    ax.scatter([r["fps"] for r in ok], ys, color="tab:blue", zorder=3, label=f"ours ({env.get('device_name')})")
    ref = [(y, r["paper_fps"]) for y, r in zip(ys, ok) if r.get("paper_fps")]
    if ref:
        ax.scatter([v for _, v in ref], [y for y, _ in ref], marker="|", s=200, color="0.3",
                   label="paper (RTX 3090 Ti)")
    ax.set_yticks(ys, [f"{r['label']} [{r['preset']}]" for r in ok], fontsize=7)
    ax.set_xscale("log")
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=6)
    ax.set_xlabel("FPS (queries/s, predict only, batch 1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, png_bytes(fig))
    return path


def fps_table(device: str = "cpu", dataset: str = "synthetic", data_root: str | None = None, fold: int = 0,
              shot: int = 1, presets: str = "paper", methods: list[str] | None = None, episodes: int = 20,
              warmup: int = 3, workdir: str = "runs", out: str = "leaderboards", compare_fp32: int = 4,
              log: Callable[[str], None] = print, **speed) -> Path:
    """Time every (method, preset) and write ``fps_table.md/.csv/.json`` and ``fps_table.png``.
    ``presets``: ``paper`` (every paper preset of each method) or a comma list of preset names
    (methods without such a preset are skipped, e.g. ``test`` for the CPU check)."""
    import pandas as pd

    ds = get_dataset(dataset)(data_root)
    ds.check_fold(fold)
    names = methods or list(list_methods())
    rows = []
    for name in names:
        cls = get_method(name)
        chosen = paper_presets(cls) if presets == "paper" else [p for p in presets.split(",") if p in cls.presets]
        for preset in chosen:
            log(f"fps-table: {name} [{preset}] on {device}")
            try:
                rows.append(time_preset(name, preset, ds, fold, shot, device, episodes, warmup, Path(workdir),
                                        compare_fp32=compare_fp32, **speed))
            except Exception as e:  # noqa: BLE001 - one row that cannot run says why; the table goes on
                msg = (str(e).splitlines() or [""])[0][:200]
                rows.append({"method": name, "preset": preset, "error": f"{type(e).__name__}: {msg}"})
                log(f"fps-table: {name} [{preset}] failed: {rows[-1]['error']}")
    if not rows:
        raise FdsError(f"no method has a preset '{presets}'; use --presets paper or a preset name the methods have")
    env = environment_info(device)
    folder = table_folder(Path(out), env, rows)
    atomic_write_text(folder / "fps_table.md", markdown(rows, env, episodes, warmup))
    frame = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows])
    atomic_write_text(folder / "fps_table.csv", frame.to_csv(index=False))
    atomic_write_json(folder / "fps_table.json", {"environment": env, "episodes": episodes, "warmup": warmup,
                                                  "dataset": dataset, "dataset_hash": ds.dataset_hash,
                                                  "fold": fold, "shot": shot, "rows": rows})
    plot(rows, env, folder / "fps_table.png")
    return folder
