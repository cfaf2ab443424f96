"""Harness cost of a benchmark run: the pipeline of the baseline commit ("today") beside the working
tree's ("new"), in one run of this script.

    python benchmarks/bench_harness.py [--baseline 5f10865] [--runs 3] [--repeats 3] [--ckpt-episodes 30]

(a) overhead ratio = run wall time / sum of predict time - 1, for a method whose predict costs a fixed
    20 ms without using the CPU (a sleep, like a GPU method waiting for its kernels), on 256 x 256 and
    on 1024 x 1024 queries — goal <= 0.05;
(b) queries per second with a method that returns at once, on the synthetic dataset resized by the
    protocol to 256 x 256 (GFDS size) and to 1024 x 1024 — goal >= 10x today;
(c) checkpoint cost (seconds and bytes written by one periodic save of 5 new episodes) after N and
    after 10 N episodes of 256 x 256 queries — goal: no larger after 10 N;
(d) a CPU method (predict keeps one core busy ~6 ms, 1024 x 1024 queries): its median predict time in
    the run / its median predict time alone in the same process before the run — 1.0: the harness's
    threads do not slow the method down (a CPU method's FPS is its own).

Each pipeline runs in its own subprocess with the same plugin methods on the same episodes (the
synthetic fss manifests of fold 0, seeds 0..runs-1). "today" is the baseline commit exported with
``git archive`` to a temporary folder (its default settings: exact scores, no prefetch); "new" is the
working tree with its defaults (2 loader threads, background scoring) in exact and in binned mode,
each first as the first process to read the dataset (an empty decoded-image disk cache: every image
decoded once) and then as a later process (a benchmark of the next method: the disk cache the first
one filled).
Run wall time = the run records' ``wall_s`` (evaluation + final metrics + record), summed over runs;
sum of predict time = the predict calls made inside each run's wall-clock window. Each is printed over
all runs, for run 1 (every image decoded for the first time) and for runs 2+ (the new pipeline finds
them in its decoded-image cache; today's decodes them again). Every row of (a) and (b) is measured
``--repeats`` times, the rows taking turns, and printed as the median with the range: a single
measurement of a few hundred milliseconds moves with the machine (page faults of fresh memory, other
load). The load of the machine (1-minute load average, usable cores) is printed with the results, and
for (b) the CPU time the new pipeline's run 1 spends decoding images (each once, in a first process):
a floor under the wall time of that run on this machine's cores, and the bytes it writes to the
decoded-image disk cache.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
SLEEP_S = 0.020
PLUGIN = '''
import time
import numpy as np
import torch  # noqa: F401  (a GPU method has torch loaded before its first episode)
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Requirements

CALLS = []  # (wall-clock start, seconds) of every predict


class _Fixed(Method):
    requires = Requirements()

    def prepare(self, support):
        return None

    def predict(self, state, query):
        start, t0 = time.time(), time.perf_counter()
        self.work()
        out = np.full(query.image.shape[:2], 0.25, np.float32)
        CALLS.append((start, time.perf_counter() - t0))
        return out


@register_method("harness_sleep")
class Sleep(_Fixed):
    """Costs a fixed 20 ms per query without using the CPU."""
    def work(self):
        time.sleep(%(sleep)r)


@register_method("harness_busy")
class Busy(_Fixed):
    """Keeps one core busy for a few milliseconds per query (a CPU method)."""
    A = np.random.default_rng(0).random((160, 160))

    def work(self):
        x = self.A
        for _ in range(40):
            x = np.tanh(x @ self.A * 0.01)


@register_method("harness_instant")
class Instant(_Fixed):
    """Returns at once."""
    def work(self):
        pass
''' % {"sleep": SLEEP_S}


# ------------------------------------------------------------------------------------------ children
def child_run(args) -> None:
    """One pipeline, one method, one image size: run the manifests and print a JSON line."""
    sys.path.insert(0, args.plugin_dir)
    import harness_plugin  # noqa: F401  (registers the methods)
    from fdsbench.runner import BenchSpec, run

    spec = BenchSpec(method=args.method, dataset="synthetic", fold=0, runs=args.runs, workdir=args.workdir,
                     progress=False, force=True, protocol_options={"resize": [args.size, args.size], "crops": False})
    for k, v in json.loads(args.extra).items():
        setattr(spec, k, v)
    alone = None
    if args.method == "harness_busy":  # the method's own predict time, before any harness thread exists
        import types

        import numpy as np
        probe, query = harness_plugin.Busy(), types.SimpleNamespace(image=np.zeros((args.size, args.size, 3), np.uint8))
        for _ in range(40):
            probe.predict(None, query)
        alone = median(d for _, d in harness_plugin.CALLS[10:])
        harness_plugin.CALLS.clear()
    decodes = []  # (wall-clock start, CPU seconds of the decoding thread) of every image decoded
    try:
        from fdsbench import loading
    except ImportError:  # today's pipeline has no decoding of its own to time
        loading = None
    if loading is not None:
        decode = loading.decode_image

        def timed_decode(path):
            start, c0 = time.time(), time.thread_time()
            try:
                return decode(path)
            finally:
                decodes.append((start, time.thread_time() - c0))
        loading.decode_image = timed_decode
    records = run(spec, log=lambda m: None)
    runs = []
    for r in records:  # the predict calls and decodings inside each run's wall-clock window
        def inside(calls):
            return [d for t, d in calls if r["created"] <= t <= r["created"] + r["wall_s"]]
        runs.append({"wall_s": r["wall_s"], "predict_s": sum(inside(harness_plugin.CALLS)),
                     "decode_cpu_s": sum(inside(decodes)), "decoded": len(inside(decodes)),
                     "predict_median_s": median(inside(harness_plugin.CALLS)), "queries": r["metrics"]["n_queries"]})
    folder = Path(os.environ["FDSBENCH_DECODED_CACHE_DIR"])  # what the decoded-image disk cache holds now
    cached = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    print(json.dumps({"runs": runs, "alone_s": alone, "disk_cache_bytes": cached}))


def child_ckpt(args) -> None:
    """Seconds and bytes of one periodic save (5 new episodes) after N episodes, in a JSON line."""
    import numpy as np

    from fdsbench.metrics import MeterSet
    from fdsbench.timing import TimingMeter

    rng = np.random.default_rng(0)
    side, n, new = 256, args.episodes, 5
    meters = MeterSet(score_mode=args.scores) if args.scores != "exact" else MeterSet()
    timer = TimingMeter()
    gt = np.zeros((side, side), bool)
    gt[100:120, 80:130] = True
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.pipeline == "today":
        import pickle

        from fdsbench.io import atomic_write_bytes

        path = folder / "run.partial.pkl"

        def save(done):
            atomic_write_bytes(path, pickle.dumps({"done": sorted(done), "meters": meters.state_dict(),
                                                   "timing": timer.state_dict()}))
    else:
        from fdsbench.runner import ResumeState

        class _M:  # what ResumeState reads of a manifest
            hash = "bench"
        state = ResumeState(folder / "run.partial", "bench", _M())

        def save(done):
            state.save(meters, timer.state_dict(), done)
    done = set()
    for i in range(n):
        p = np.clip(rng.normal(0.3, 0.1, (side, side)).astype(np.float32) + 0.3 * gt, 0, 1)
        meters.update(p, gt, class_key="obj/cls", episode=i, query_id=f"q{i}")
        done.add(i)
        if i == n - new - 1:
            save(done)  # the previous periodic save
    time.sleep(0.05)  # file times of the previous save fall before the measured one
    wall0 = time.time()
    t0 = time.perf_counter()
    save(done)
    dt = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime >= wall0 - 0.01)
    print(json.dumps({"save_s": dt, "bytes_written": written}))


# ------------------------------------------------------------------------------------------- parent
def export_baseline(commit: str, dest: Path) -> Path:
    """``git archive`` of the baseline commit, with the package's ``datasets``/``methods`` mapping
    (setup.py package_dir) made by links, importable through PYTHONPATH."""
    tar = dest / "base.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(tar), commit], check=True)
    root = dest / "baseline"
    with tarfile.open(tar) as t:
        t.extractall(root)
    for sub in ("datasets", "methods"):
        link = root / "fdsbench" / sub
        if not link.exists():
            link.symlink_to(root / sub, target_is_directory=True)
    return root


def call(pipeline: str, code_root: Path, argv: list[str], decoded: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1", "FDSBENCH_OFFLINE": "1",
           "FDSBENCH_DECODED_CACHE_DIR": str(decoded)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *argv], env=env,
                         capture_output=True, text=True, cwd=str(code_root))
    if out.returncode:
        raise SystemExit(f"{pipeline} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="5f10865", help="commit of today's pipeline")
    ap.add_argument("--runs", type=int, default=3, help="seeds (manifests of 56 queries each) per measurement")
    ap.add_argument("--ckpt-episodes", type=int, default=30, help="N of (c)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements of (a) and (b) per row, interleaved; the median is printed with the range")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--plugin-dir", help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--episodes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scores", default="exact", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child and args.runs < 2:
        ap.error("--runs must be at least 2: run 1 and runs 2+ are reported apart")
    if args.child:
        (child_run if args.kind == "run" else child_ckpt)(args)
        return
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fdsbench-harness-") as tmp:
        tmp = Path(tmp)
        (tmp / "plugin").mkdir()
        (tmp / "plugin" / "harness_plugin.py").write_text(PLUGIN)
        roots = {"today": export_baseline(args.baseline, tmp), "new": REPO}
        # (label, pipeline, options, decoded-image disk cache: "cold" = empty, "warm" = filled by "new (exact)")
        variants = [("today (exact)", "today", "{}", "cold"), ("new (exact)", "new", '{"score_mode": "exact"}', "cold"),
                    ("new (binned)", "new", '{"score_mode": "binned"}', "cold"),
                    ("new (exact) later", "new", '{"score_mode": "exact"}', "warm"),
                    ("new (binned) later", "new", '{"score_mode": "binned"}', "warm")]
        results: dict = {}
        t_start = time.time()
        for rep in range(args.repeats):
            for method, size in (("harness_sleep", 256), ("harness_sleep", 1024), ("harness_instant", 256),
                                 ("harness_instant", 1024), ("harness_busy", 1024)):
                for label, pipeline, extra, disk in variants:
                    n = sum(map(len, results.values()))
                    wd = tmp / f"w-{n}"
                    filled = tmp / f"decoded-{method}-{size}-{rep}"  # filled by "new (exact)", read by the later rows
                    decoded = filled if disk == "warm" or label == "new (exact)" else tmp / f"decoded-{n}"
                    results.setdefault((label, method, size), []).append(call(pipeline, roots[pipeline], [
                        "--kind", "run", "--method", method, "--size", str(size), "--workdir", str(wd),
                        "--plugin-dir", str(tmp / "plugin"), "--runs", str(args.runs), "--extra", extra], decoded))
        ckpt = {}
        for pipeline, scores in (("today", "exact"), ("new", "exact"), ("new", "binned")):
            for n in (args.ckpt_episodes, 10 * args.ckpt_episodes):
                ckpt[(pipeline, scores, n)] = call(pipeline, roots[pipeline], [
                    "--kind", "ckpt", "--pipeline", pipeline, "--scores", scores, "--episodes", str(n),
                    "--workdir", str(tmp / f"c-{pipeline}-{scores}-{n}")], tmp / "decoded-ckpt")
        elapsed = time.time() - t_start
    load1 = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    print(f"bench_harness: baseline {args.baseline} vs working tree; {cores} usable cores; load average "
          f"(1 min) {load0:.2f} at start, {load1:.2f} at end; {elapsed:.0f} s")
    parts = (("all runs", slice(None)), ("run 1", slice(0, 1)), ("runs 2+", slice(1, None)))

    def totals(pipe, method, size, part):
        """Per repeat: wall, predict time and queries summed over the runs of ``part``."""
        return [{k: sum(r[k] for r in m["runs"][part]) for k in ("wall_s", "predict_s", "queries")}
                for m in results[(pipe, method, size)]]

    print(f"\n(a) overhead ratio, predict = sleep {1000 * SLEEP_S:.0f} ms, {args.runs} runs (goal <= 0.05); "
          f"run 1 decodes every image for the first time, runs 2+ find them in the decoded-image cache; "
          f"'later': a later process, its run 1 reads the decoded images from the disk cache; "
          f"median of {args.repeats} measurements [range]")
    labels = [v[0] for v in variants]
    for size in (256, 1024):
        for pipe in labels:
            for label, part in parts:
                rs = totals(pipe, "harness_sleep", size, part)
                ratio = [r["wall_s"] / r["predict_s"] - 1 for r in rs]
                print(f"  {size:4d} px {pipe:18s} {label:8s} wall {median(r['wall_s'] for r in rs):7.2f} s  sum(predict) "
                      f"{median(r['predict_s'] for r in rs):6.2f} s  queries {rs[0]['queries']:4d}  overhead ratio "
                      f"{median(ratio):6.3f} [{min(ratio):.3f}-{max(ratio):.3f}]")
    print(f"\n(b) queries/s with an instant method (goal >= 10x today); median of {args.repeats} measurements, "
          f"ratio to today's median [range over the measurements]")
    for size in (256, 1024):
        for label, part in parts:
            base = None
            for pipe in labels:
                qps = [r["queries"] / r["wall_s"] for r in totals(pipe, "harness_instant", size, part)]
                base = base or median(qps)
                print(f"  {size:4d} px {label:8s} {pipe:18s} {median(qps):8.1f} queries/s  ({median(qps) / base:5.1f}x "
                      f"today) [{min(qps) / base:.1f}-{max(qps) / base:.1f}x]")
        today = median(r["wall_s"] for r in totals("today (exact)", "harness_instant", size, slice(None)))
        measured = results[("new (exact)", "harness_instant", size)]
        first = [m["runs"][0] for m in measured]
        cpu = median(r["decode_cpu_s"] for r in first)
        print(f"  {size:4d} px: run 1 of a first process decodes its {first[0]['decoded']} images once: "
              f"{cpu:.3f} CPU-s (decoding threads' time, median), at least {cpu / cores:.3f} s of wall on {cores} "
              f"cores; the process writes {measured[0]['disk_cache_bytes'] / 1e6:.0f} MB of decoded images and masks "
              f"to the disk cache; 10x today over all runs leaves {today / 10:.3f} s for all of them")
    print("\n(c) one periodic save (5 new episodes of 256x256) after N and 10 N episodes")
    for pipeline, scores in (("today", "exact"), ("new", "exact"), ("new", "binned")):
        a, b = ckpt[(pipeline, scores, args.ckpt_episodes)], ckpt[(pipeline, scores, 10 * args.ckpt_episodes)]
        print(f"  {pipeline:5s} {scores:6s} N={args.ckpt_episodes:4d}: {1000 * a['save_s']:8.1f} ms "
              f"{a['bytes_written'] / 2 ** 20:7.2f} MiB   10N={10 * args.ckpt_episodes:4d}: "
              f"{1000 * b['save_s']:8.1f} ms {b['bytes_written'] / 2 ** 20:7.2f} MiB   "
              f"(10N / N time {b['save_s'] / a['save_s']:5.2f})")
    print(f"\n(d) a CPU method, 1024 px: median predict time in the run / alone (goal: 1.0); median of "
          f"{args.repeats} measurements [range]")
    for pipe in labels:
        for label, part in parts:
            ratio = [median(r["predict_median_s"] for r in m["runs"][part]) / m["alone_s"]
                     for m in results[(pipe, "harness_busy", 1024)]]
            alone = median(m["alone_s"] for m in results[(pipe, "harness_busy", 1024)])
            print(f"  {pipe:18s} {label:8s} {median(ratio):5.2f} [{min(ratio):.2f}-{max(ratio):.2f}]  "
                  f"(alone {1000 * alone:.1f} ms)")


if __name__ == "__main__":
    main()
