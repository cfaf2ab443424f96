"""``fdsbench`` command line: bench, fps, episodes, leaderboard, methods, datasets, weights.

Every user error is one line on stderr (``error: ...`` with the fix) and exit status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import parse_overrides
from .datasets_cli import open_dataset, parse_dataset_options
from .errors import FdsError


def _add_dataset_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset adapter option, e.g. mask_threshold=0 (folder) or domain=view (aebad); "
                        "part of the dataset identity (repeatable)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", "-m", default="proto", help="registered method name (fdsbench methods)")
    p.add_argument("--dataset", "-d", default="synthetic", help="dataset adapter name (fdsbench datasets list)")
    p.add_argument("--data-root", default=None, help="dataset root folder (optional for synthetic)")
    _add_dataset_opt(p)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="first test seed; run i uses seed+i")
    p.add_argument("--runs", type=int, default=1, help="number of test seeds (the papers use 5 to 15)")
    p.add_argument("--train-seed", type=int, default=54, help="seed of meta-training (SOFS scripts: 54)")
    p.add_argument("--train-dataset", default=None,
                   help="meta-train on this dataset instead of the test dataset's base folds (domain shift)")
    p.add_argument("--train-data-root", default=None, help="root folder of --train-dataset")
    p.add_argument("--train-fold", type=int, default=-1,
                   help="with --train-dataset: train on the base folds of this fold (default -1: all objects)")
    p.add_argument("--protocol", default=None, help="fss | fad | per_support (default: the method's own)")
    p.add_argument("--protocol-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="protocol option, e.g. crop_size=518 (repeatable)")
    p.add_argument("--preset", default=None, help="method config preset (paper, cpu, test, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one method config value (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threshold", type=float, default=0.5, help="binarisation threshold of the meters")
    p.add_argument("--workdir", default="runs", help="where manifests, checkpoints and run records go")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="import a plugin file that registers methods (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute finished runs")
    p.add_argument("--max-episodes", type=int, default=None, help="evaluate only the first N episodes")
    p.add_argument("--checkpoint-every", type=float, default=20.0, metavar="SECONDS",
                   help="save resumable progress at most this often")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--scores", choices=("exact", "binned"), default="exact",
                   help="pixel AUROC/F1/AUPRO: exact (default) or binned (constant memory, error bound recorded)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads decoding episodes ahead of the method, and as many measuring its large "
                        "outputs behind it (0: decode and score inline); results do not depend on it")
    p.add_argument("--cache-mb", type=float, default=None, help="decoded-image cache size (default 512)")
    _add_speed_args(p)


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="torch.compile the method's modules (recorded)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (recorded)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="autotuned cuDNN convolutions (CUDA)")
    p.add_argument("--warmup-per-shape", action="store_true",
                   help="an untimed predict before the first query of each new size (with --cudnn-benchmark)")


def _spec(args):
    from .runner import BenchSpec, init_distributed

    def blank(v):
        return v if v not in ("", None) else None

    return BenchSpec(method=args.method, dataset=args.dataset, data_root=blank(args.data_root),
                     dataset_options=parse_dataset_options(args.dataset_opt), fold=args.fold,
                     shot=args.shot, seed=args.seed, runs=args.runs, train_seed=args.train_seed,
                     train_dataset=blank(args.train_dataset), train_data_root=blank(args.train_data_root),
                     train_fold=args.train_fold,
                     protocol=blank(args.protocol), protocol_options=parse_overrides(args.protocol_opt),
                     preset=blank(args.preset), overrides=parse_overrides(args.overrides),
                     device=init_distributed(args.device),
                     threshold=args.threshold, workdir=args.workdir, plugins=args.plugin, force=args.force,
                     max_episodes=args.max_episodes, progress=not args.no_progress,
                     checkpoint_every_s=args.checkpoint_every, score_mode=args.scores, workers=args.workers,
                     **({"cache_mb": args.cache_mb} if args.cache_mb is not None else {}),
                     compile=args.compile, channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark,
                     warmup_per_shape=args.warmup_per_shape)


def cmd_bench(args) -> int:
    from .leaderboard import format_run_table
    from .runner import run

    from .runner import world

    records = run(_spec(args))
    if world()[0] != 0:
        return 0
    print(format_run_table(records))
    for r in records:
        print(f"run record: {Path(args.workdir) / 'runs' / (r['run_id'] + '.json')}")
    return 0


def cmd_fps(args) -> int:
    from .leaderboard import format_timing_table
    from .runner import run

    spec = _spec(args)
    spec.max_episodes = args.episodes
    spec.warmup = args.warmup
    spec.force = True
    records = run(spec)
    out = Path(args.workdir) / "fps"
    from .io import atomic_write_json

    for r in records:
        env = r["environment"]
        runtime = r.get("runtime") or {}
        pkg = next((f"_{k.removesuffix('_version')}-{v}" for k, v in runtime.items() if k.endswith("_version")), "")
        name = (f"{r['method']}_{r['config_hash'][:8]}_{env.get('device_name') or 'cpu'}_{r['precision']}_"
                f"torch{env.get('torch', 'na')}{pkg}.json").replace(" ", "-").replace("/", "-")
        atomic_write_json(out / name, {k: r.get(k) for k in ("run_id", "method", "preset", "config", "config_hash",
                                                             "weights", "runtime", "device", "precision",
                                                             "environment", "timing", "episodes", "dataset",
                                                             "fold", "shot")})
        print(f"fps record: {out / name}")
    print(format_timing_table(records))
    return 0


def cmd_fps_table(args) -> int:
    from .fpstable import fps_table
    from .registry import load_plugin
    from .runner import check_device

    for plugin in args.plugin:
        load_plugin(plugin)
    folder = fps_table(device=check_device(args.device), dataset=args.dataset, data_root=args.data_root or None,
                       fold=args.fold, shot=args.shot, presets=args.presets,
                       methods=[m for m in args.methods.split(",") if m] if args.methods else None,
                       episodes=args.episodes, warmup=args.warmup, workdir=args.workdir, out=args.out,
                       compare_fp32=args.compare_fp32, compile=args.compile, channels_last=args.channels_last,
                       cudnn_benchmark=args.cudnn_benchmark, warmup_per_shape=args.warmup_per_shape,
                       log=lambda m: print(m, file=sys.stderr))
    print((folder / "fps_table.md").read_text())
    print(f"wrote {folder}/fps_table.md, .csv, .json, .png")
    return 0


def cmd_episodes(args) -> int:
    from .episodes import Manifest, check_episode_masks, get_manifest, protocol_for

    if args.action == "show":
        if not args.path:
            raise FdsError("episodes show needs a manifest file: fdsbench episodes show runs/manifests/<name>.json")
        m = Manifest.load(args.path)
        print(f"{m.path}: dataset {m.dataset} fold {m.fold} {m.shot}-shot seed {m.seed} "
              f"protocol {m.protocol['name']} hash {m.hash}")
        print(f"{len(m.episodes)} episodes, {m.n_queries} queries; skipped: {len(m.skipped)}")
        for s in m.skipped:
            print(f"  skipped {s}")
        for e in m.episodes[: args.limit]:
            sup = ", ".join(f"{s.id}" + (f"[{len(s.crops)} crops]" if s.crops else "[whole]") for s in e.supports)
            print(f"  #{e.index} {e.class_key}: supports {sup}; queries {', '.join(e.queries[:3])}"
                  + (" ..." if len(e.queries) > 3 else ""))
        return 0
    from .io import check_writable_dir
    from .runner import replacement_warnings

    if args.path:
        raise FdsError(f"episodes make takes no manifest path (got '{args.path}'); it writes under --workdir")
    for name, lo in (("shot", 1), ("runs", 1), ("fold", 0)):
        if getattr(args, name) < lo:
            raise FdsError(f"{name} must be >= {lo}, got {getattr(args, name)}")
    check_writable_dir(args.workdir)
    ds = open_dataset(args.dataset, args.data_root or None, options=parse_dataset_options(args.dataset_opt))
    ds.check_fold(args.fold)
    proto = protocol_for(ds, args.protocol, args.shot, args.fold, parse_overrides(args.protocol_opt))
    for seed in range(args.seed, args.seed + args.runs):
        m = get_manifest(Path(args.workdir), ds, args.fold, args.shot, seed, proto)
        for line in replacement_warnings(m):
            print(line, file=sys.stderr)
        check_episode_masks(ds, m.episodes, proto)
        print(f"{m.path}  ({len(m.episodes)} episodes, {m.n_queries} queries, hash {m.hash})")
    return 0


def cmd_leaderboard(args) -> int:
    from .leaderboard import write_leaderboards

    for path in write_leaderboards(Path(args.workdir) / "runs", Path(args.out), metric=args.metric):
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    for path in write_report(Path(args.workdir) / "runs", Path(args.out), title=args.title):
        print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, per_class_frame, summary_frame, write_comparison
    from .results import load_records, to_markdown

    records = load_records(Path(args.workdir) / "runs")
    comparisons, unpaired = compare(records, args.a, args.b, metric=args.metric, n_boot=args.n_boot)
    print(to_markdown(summary_frame(comparisons)))
    for c in comparisons:
        print(f"\n{c.title}\n{to_markdown(per_class_frame(c))}")
    if unpaired:
        print(f"\nleft out (no run of the other side on their manifest): {', '.join(unpaired)}")
    if args.out:
        stem = "compare_" + "_vs_".join("".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in x)[:40]
                                        for x in (args.a, args.b))
        for path in write_comparison(comparisons, Path(args.out), stem):
            print(f"wrote {path}")
    return 0


def cmd_methods(args) -> int:
    import dataclasses

    from .registry import get_method, list_methods, load_plugin, unavailable

    for p in args.plugin:
        load_plugin(p)
    if args.name:
        cls = get_method(args.name)
        print(f"{cls.name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        print(f"  requires: {dataclasses.asdict(cls.requires)}")
        print(f"  protocol: {getattr(cls, 'default_protocol', 'fss')}; presets: {', '.join(cls.presets) or '-'}"
              f" (default {cls.default_preset})")
        if dataclasses.is_dataclass(cls.Config):
            for f in dataclasses.fields(cls.Config):
                print(f"  {f.name} = {f.default!r}")
        return 0
    for name, cls in list_methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:16s} {doc}")
    for name, why in unavailable().items():
        print(f"{name:16s} (unavailable: {why})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fdsbench bench: error: ...`` and where to see the options)
    instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fdsbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="run a method on a dataset fold and print the results table")
    _add_run_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("fps", help="timing protocol: warm-up, synchronised, batch 1, prepare/predict apart")
    _add_run_args(p)
    p.add_argument("--episodes", type=int, default=20, help="episodes to time")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls of prepare and predict")
    p.set_defaults(func=cmd_fps)

    p = sub.add_parser("fps-table", help="FPS of every method at each paper preset, GFDS Table 4 shape, with plot")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu")
    p.add_argument("--dataset", "-d", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--presets", default="paper", help="paper (every paper preset) or preset names, e.g. test")
    p.add_argument("--methods", default="", help="comma list (default: every registered method)")
    p.add_argument("--episodes", type=int, default=20, help="episodes timed per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls of prepare and predict")
    p.add_argument("--compare-fp32", type=int, default=4, metavar="N",
                   help="compare the outputs of autocast rows with fp32 on the first N queries (0: off)")
    p.add_argument("--workdir", default="runs")
    p.add_argument("--out", default="leaderboards")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py")
    _add_speed_args(p)
    p.set_defaults(func=cmd_fps_table)

    p = sub.add_parser("episodes", help="make or show frozen episode manifests")
    p.add_argument("action", choices=["make", "show"])
    p.add_argument("path", nargs="?", help="manifest file (show)")
    p.add_argument("--dataset", "-d", default="synthetic")
    p.add_argument("--data-root", default=None)
    _add_dataset_opt(p)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--protocol", default="fss")
    p.add_argument("--protocol-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", default="runs")
    p.add_argument("--limit", type=int, default=10, help="episodes to list (show)")
    p.set_defaults(func=cmd_episodes)

    p = sub.add_parser("leaderboard", help="write tables and plots from run records")
    p.add_argument("--workdir", default="runs")
    p.add_argument("--out", default="leaderboards")
    p.add_argument("--metric", default=None,
                   help="metric of the first table and the plot (default: mIoU for fss, per-image IoU for "
                        "per_support; FAD always shows the FAD metrics)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("report", help="one self-contained HTML report (tables, plots, provenance) of all run records")
    p.add_argument("--workdir", default="runs")
    p.add_argument("--out", default="report.html", help="HTML file; the tidy results frame is written beside it")
    p.add_argument("--title", default="fdsbench report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="paired per-class comparison of two methods on the same manifests")
    p.add_argument("a", help="run id, run-id prefix, method name or table label")
    p.add_argument("b", help="run id, run-id prefix, method name or table label")
    p.add_argument("--workdir", default="runs")
    p.add_argument("--metric", default=None,
                   help="per-class metric (default: iou for fss, per_image_iou for per_support, image_auroc for fad)")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (and sign-flip draws beyond 16 classes)")
    p.add_argument("--out", default=None, help="folder for the Markdown table and the paired-difference plot")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("methods", help="list registered methods, or show one")
    p.add_argument("name", nargs="?")
    p.add_argument("--plugin", action="append", default=[])
    p.set_defaults(func=cmd_methods)

    for module, func in (("datasets_cli", "add_datasets_cli"), ("weights", "add_weights_cli")):
        try:
            mod = __import__(f"fdsbench.{module}", fromlist=[func])
        except ImportError:
            continue
        getattr(mod, func)(sub)
    return parser


def main(argv=None) -> int:
    from .netguard import offline_from_env

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with offline_from_env():  # FDSBENCH_OFFLINE=1 (the Makefile sets it): network attempts fail loudly
            code = args.func(args) or 0
        if "fdsbench.runner" in sys.modules:  # under torchrun: leave the process group together
            sys.modules["fdsbench.runner"].close_distributed()
        return code
    except FdsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished episodes are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
