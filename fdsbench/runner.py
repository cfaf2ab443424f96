"""The benchmark runner: manifest -> method.prepare/predict -> meters -> run record.

One run = one (method config, dataset, fold, shot, seed, protocol). The runner

* trains meta-trained methods on the base folds once per (config, dataset, fold, train seed) and
  keeps the checkpoint (a second run loads it);
* seeds every episode from (manifest hash, episode index), so a result never depends on the order
  or sharding of episodes;
* checkpoints the meters every few episodes (atomically, append-only, in a format that cannot run
  code: ``.npz`` read with ``allow_pickle=False`` + JSON), so a killed run resumes where it stopped
  and gives the same numbers as an uninterrupted one; a damaged resume state is set aside
  (``*.damaged``) with a warning and the run restarts — it is never trusted;
* validates every prediction (shape, dtype, range, NaN) and names the method and query on failure;
* writes one JSON run record atomically: config + hash, weights provenance, dataset + manifest hash,
  seeds, versions, device, metrics, per-class table, timing.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .config import build_config, config_dict, config_hash
from .data import DatasetAdapter
from .episodes import Manifest, check_episode_masks, get_manifest, protocol_for
from .errors import DataError, FdsError
from .io import (atomic_write_bytes, atomic_write_json, check_writable_dir, content_hash, read_json, read_npz,
                 set_aside, sha256_file, write_npz)
from .loading import DEFAULT_CACHE_MB, EpisodeLoader, OrderedWorker, host_array, responsive_gil
from .method import Method
from .metrics import MeterSet
from .metrics.meterset import SPLIT_PIXELS, state_from_arrays, state_to_arrays
from .metrics.scores import ScoreBuffer
from .timing import ShapeWarmup, accelerate, autocast, background_priority
from .datasets_cli import open_dataset
from .registry import get_dataset, get_method, load_plugin
from .seeding import cpu_threads, derive_seed, seed_everything
from .types import Episode, Query


@dataclass
class BenchSpec:
    """Everything that defines a benchmark run (what the CLI and ``make bench`` pass in)."""

    method: str = "proto"
    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)  # adapter options (--dataset-opt)
    fold: int = 0
    shot: int = 1
    seed: int = 0  # first test seed; run i uses seed + i
    runs: int = 1
    train_seed: int = 54  # the SOFS scripts' RNG_SEED
    # meta-train on another dataset (domain shift, SOFS Table 4): all its objects (train_fold = -1)
    # or the base folds of its fold train_fold. None: the base folds of `fold` of `dataset`.
    train_dataset: str | None = None
    train_data_root: str | None = None
    train_fold: int = -1
    protocol: str | None = None  # default: the method's default_protocol
    protocol_options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    threshold: float = 0.5
    workdir: str = "runs"
    plugins: list[str] = field(default_factory=list)
    force: bool = False
    max_episodes: int | None = None  # evaluate only the first N episodes (smoke runs; recorded)
    warmup: int = 1
    precision: str = "fp32"  # set from the method (``Method.precision``) by run()
    checkpoint_every_s: float = 20.0
    progress: bool = True
    score_mode: str = "exact"  # pixel scores: "exact" or "binned" (constant memory, error bound recorded)
    workers: int = 2  # decoding threads ahead of the method and measuring threads behind it; 0: all inline
    cache_mb: float = DEFAULT_CACHE_MB  # decoded-image cache of the episode loader
    compile: bool = False  # torch.compile the method's modules (recorded; part of the run identity)
    channels_last: bool = False  # channels-last memory format of its modules (recorded; identity)
    cudnn_benchmark: bool = False  # autotuned cuDNN convolutions (CUDA; pair with warmup_per_shape)
    warmup_per_shape: bool = False  # an untimed predict before the first query of each new size


class _Silent:
    """The progress bar of a run without one (a disabled tqdm still builds a multiprocessing lock)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return _Silent()
    return tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True, file=sys.stderr)


def environment(device: str) -> dict[str, Any]:
    from .timing import environment_info

    return {"fdsbench": __version__, **environment_info(device)}


def check_device(device: str) -> str:
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FdsError(f"device '{device}' requested but CUDA is not available here; use DEVICE=cpu")
    elif device != "cpu":
        raise FdsError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
    return device


def world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    NCCL on CUDA with one GPU per local rank, Gloo on CPU. Returns this process's device."""
    global _joined
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        _joined = True
    return device


_joined = False  # init_distributed created the process group (a caller's own one is left alone)


def close_distributed() -> None:
    """Leave the process group :func:`init_distributed` created, once a command has finished on
    every rank: the ranks meet at a barrier, then each destroys the group (PyTorch asks for it
    before exit; NCCL otherwise warns and can hang in its destructor)."""
    global _joined
    if not _joined:
        return
    import torch.distributed as dist

    _joined = False
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def validate_prediction(pred, query: Query, method: str) -> tuple[np.ndarray, tuple[float, float]]:
    """The contract's output check: float map at the query's original size, finite, in [0, 1].
    Returns the map as float32 and its (min, max), which the meters reuse."""
    try:
        import torch

        if isinstance(pred, torch.Tensor):
            pred = pred.detach().float().cpu().numpy()
    except ImportError:
        pass
    pred = np.asarray(pred)
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred = pred[0]
    if pred.shape != query.size:
        raise FdsError(f"method '{method}' returned a {pred.shape} map for query {query.id} of size {query.size}; "
                       f"predict() must return [H, W] at the query's original size")
    if not np.issubdtype(pred.dtype, np.floating):
        raise FdsError(f"method '{method}' returned dtype {pred.dtype} for query {query.id}; "
                       f"predict() must return float probabilities")
    lo, hi = float(pred.min()), float(pred.max())  # a NaN anywhere makes both NaN
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise FdsError(f"method '{method}' returned NaN/inf for query {query.id}")
    if lo < 0 or hi > 1:
        raise FdsError(f"method '{method}' returned values in [{lo:.3g}, {hi:.3g}] for query "
                       f"{query.id}; predict() must return probabilities in [0, 1] (apply the sigmoid/softmax "
                       f"the paper uses inside the method)")
    return pred.astype(np.float32, copy=False), (float(np.float32(lo)), float(np.float32(hi)))


#: protocols whose papers report scores per category, then the mean over categories (SOFS's FAD
#: table, WinCLIP, MVTec AD / VisA practice; NBR+CaP per product)
CLASS_MEAN_PROTOCOLS = ("fad", "per_support")
CLASS_MEAN_SCORES = ("image_auroc", "pixel_auroc", "pixel_f1_max", "aupro")


def aggregation(proto: dict) -> str:
    return "class_mean" if proto.get("name") in CLASS_MEAN_PROTOCOLS else "pooled"


def _make_meters(spec: BenchSpec, proto: dict):
    return MeterSet(threshold=spec.threshold, score_mode=spec.score_mode,
                    per_class_scores=aggregation(proto) == "class_mean")


def report_metrics(metrics: dict, proto: dict, manifest: Manifest) -> dict:
    """The run's reported numbers. Class-mean protocols report each score as the mean over
    categories and keep the value pooled over all pixels as ``<name>_pooled``; ``n_classes`` counts
    the manifest's classes (a class with no scored query is listed in ``unscored_classes``)."""
    out = dict(metrics)
    out["aggregation"] = aggregation(proto)
    if out["aggregation"] == "class_mean":
        for k in CLASS_MEAN_SCORES:
            out[k + "_pooled"] = out.get(k)
            out[k] = out.get(k + "_classmean")
    classes = sorted({e.class_key for e in manifest.episodes})
    out["unscored_classes"] = [c for c in classes if c not in out.get("per_class", {})]
    out["n_classes"] = len(classes)
    return out


def _make_timer(spec: BenchSpec):
    from .timing import TimingMeter, precision_kind

    return TimingMeter(device=spec.device, warmup=spec.warmup, precision=precision_kind(spec.precision))


def _train_tag(spec: BenchSpec) -> str:
    """'' for the usual base-fold training, else e.g. '_from-vision_v1' / '_from-vision_v1-f2'."""
    if not spec.train_dataset:
        return ""
    return f"_from-{spec.train_dataset}" + (f"-f{spec.train_fold}" if spec.train_fold >= 0 else "")


def run_identity(spec: BenchSpec, method: Method, trained_on: dict | None, proto: dict) -> dict:
    """Everything besides the manifest (which carries the dataset's content hash, fold, shot, seed
    and protocol) that can change a number of the run: a record is reused only when all of it is
    equal. Paths are not identity; the content they name is."""
    return {"method": method.name, "config_hash": config_hash(method.config), **cpu_threads(spec.device),
            "weights": method.weights_provenance(),
            "trained_on": {k: v for k, v in trained_on.items() if k != "data_root"} if trained_on else None,
            "threshold": spec.threshold, "score_mode": spec.score_mode, "precision": spec.precision,
            "max_episodes": spec.max_episodes, "aggregation": aggregation(proto),
            **{k: getattr(spec, k) for k in ("compile", "channels_last") if getattr(spec, k, None)}}


def run_id(spec: BenchSpec, method: Method, manifest: Manifest, identity: dict) -> str:
    return (f"{method.name}_{spec.dataset}_fold{spec.fold}_{spec.shot}shot_seed{manifest.seed}_"
            f"{content_hash(identity, 8)}_{manifest.hash[:8]}" + _train_tag(spec)
            + (f"_first{spec.max_episodes}" if spec.max_episodes else ""))


def training_data(spec: BenchSpec, ds: DatasetAdapter) -> tuple[DatasetAdapter, int]:
    """The dataset and fold a meta-trained method learns from: the base folds of the test fold, or
    (``train_dataset``) another dataset, checked to share no object with the test fold."""
    if not spec.train_dataset:
        return ds, spec.fold
    tds = get_dataset(spec.train_dataset)(spec.train_data_root)
    if spec.train_fold >= 0:
        tds.check_fold(spec.train_fold)
    if tds.dataset_hash == ds.dataset_hash:
        objs = set(tds.index.objects if spec.train_fold < 0 else tds.train_objects(spec.train_fold))
        leak = sorted(objs & set(ds.test_objects(spec.fold)))
        if leak:
            raise FdsError(f"training on {tds.name} {'(all objects)' if spec.train_fold < 0 else f'fold {spec.train_fold}'}"
                           f" would train on test objects of fold {spec.fold}: {', '.join(leak[:5])}; "
                           f"drop --train-dataset to train on the base folds")
    return tds, spec.train_fold


def fit_or_load(spec: BenchSpec, method: Method, ds: DatasetAdapter, proto: dict,
                log: Callable[[str], None]) -> tuple[str | None, dict | None]:
    """Meta-train ``method`` on the base folds (or on ``spec.train_dataset``) for the test protocol's
    shot and crop size (one model per shot, as the official FSS recipes train), or load the checkpoint
    of an earlier identical fit. Under torch.distributed, rank 0 trains and the other ranks load it.
    Returns (checkpoint path, what it was trained on) or (None, None) for untrained methods."""
    if not method.requires.training:
        if spec.train_dataset:
            raise FdsError(f"method '{method.name}' is not trained: --train-dataset does not apply to it")
        return None, None
    import torch

    tds, tfold = training_data(spec, ds)
    crop = int(proto.get("crop_size") or 0) if proto.get("crops", True) else 0
    trained_on = {"dataset": tds.name, "data_root": str(tds.root), "dataset_hash": tds.dataset_hash,
                  "fold": tfold, "objects": "all" if tfold < 0 else "base folds", "seed": spec.train_seed,
                  "shot": spec.shot, "crop_size": crop, **cpu_threads(spec.device)}
    key = content_hash([method.name, config_dict(method.config), tds.dataset_hash, tfold, spec.train_seed,
                        spec.shot, crop, *cpu_threads(spec.device).values()], 12)
    what = "all" if tfold < 0 else f"fold{tfold}"
    ckpt = Path(spec.workdir) / "checkpoints" / f"{method.name}_{tds.name}_{what}_train{spec.train_seed}_{key}.pt"
    rank, size = world()
    # a method whose fit trains with DistributedDataParallel (TrainLoop) trains on every rank
    every_rank = size > 1 and getattr(method, "distributed_fit", False)
    if (rank == 0 or every_rank) and not ckpt.is_file():
        fit_dir = ckpt.with_suffix("")
        fit_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(spec.train_seed)
        log(f"training {method.name} on " + (f"all objects of {tds.name}" if tfold < 0 else
                                             f"the base folds of {tds.name} fold {tfold}")
            + f" (checkpoints in {fit_dir})")
        method.fit(dataclasses.replace(tds.train_source(tfold, spec.train_seed), shot=spec.shot, crop_size=crop),
                   fit_dir)
        if rank == 0:
            buf = io.BytesIO()
            torch.save(method.state_dict(), buf)
            atomic_write_bytes(ckpt, buf.getvalue())
        barrier()
        return str(ckpt), trained_on
    barrier()
    try:  # plain tensors only: a crafted pickle in a shared workdir cannot run code
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated file, pickled objects, not a torch file
        raise FdsError(f"cannot read the trained checkpoint {ckpt} as plain tensors ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is damaged or was not written "
                       f"by fdsbench: delete it to train again") from None
    method.load_state_dict(state)
    log(f"loaded trained weights {ckpt}")
    return str(ckpt), trained_on


RESUME_VERSION = 1
_CHUNK_RE = re.compile(r"^(chunk|hist)-\d{5}\.npz$")


def partial_dir(workdir: str | os.PathLike, rid: str, rank: int = 0, size: int = 1) -> Path:
    """Folder of the resumable progress of run ``rid`` (one per rank under torch.distributed)."""
    return Path(workdir) / "runs" / (f"{rid}.partial" if size == 1 else f"{rid}.rank{rank}of{size}.partial")


class ResumeState:
    """Resumable progress of one run on one rank, in ``runs/<run_id>.partial/``:

    * ``chunk-NNNNN.npz`` — the meter rows (and exact-mode pixel scores) of the queries scored since
      the previous save; each chunk is written once and never rewritten, so a save costs what was
      added since the last one, not the whole run;
    * ``hist-NNNNN.npz`` — binned mode only: the constant-size histograms (the latest one listed);
    * ``state.json`` — episodes done, timing state, and the chunk files with their sha256, written
      last (atomically): a chunk not listed there is ignored.

    Nothing is unpickled (``allow_pickle=False``; JSON). On load everything is checked — the run id,
    the manifest hash, each chunk's sha256, the meter state's consistency, and that the scored
    queries are exactly those of the episodes said to be done."""

    def __init__(self, folder: Path, rid: str, manifest: Manifest):
        self.folder, self.rid, self.manifest = folder, rid, manifest
        self.chunks: list[dict] = []
        self.hist: dict | None = None
        self.saved: set[tuple] = set()

    def _read(self, make_meters, make_timer, loader: "EpisodeLoader", mine: dict[int, Episode]):
        meters, timer = make_meters(), make_timer()
        st = read_json(self.folder / "state.json", "resume state")
        if st.get("version") != RESUME_VERSION or st.get("run_id") != self.rid:
            raise DataError(f"state.json is for run {st.get('run_id')!r} (version {st.get('version')!r})")
        if st.get("manifest_hash") != self.manifest.hash:
            raise DataError("state.json was made from another episode manifest")
        done, chunks, hist = st.get("done"), st.get("chunks"), st.get("hist")
        if not (isinstance(done, list) and all(isinstance(i, int) and i in mine for i in done)):
            raise DataError("state.json lists episodes that are not this run's")
        if not isinstance(chunks, list) or not (hist is None or isinstance(hist, dict)):
            raise DataError("state.json has no chunk list")
        for entry in chunks + ([hist] if hist else []):
            name = entry.get("file") if isinstance(entry, dict) else None
            if not (isinstance(name, str) and _CHUNK_RE.match(name)):
                raise DataError(f"state.json names an unexpected file {name!r}")
            path = self.folder / name
            if not path.is_file() or sha256_file(path) != entry.get("sha256"):
                raise DataError(f"{name} is missing or does not match its sha256 in state.json")
            part = make_meters()
            part.load_state_dict(state_from_arrays(read_npz(path)))
            meters.merge(part)
        done = set(done)
        expected = {(e, q, mine[e].class_key) for e in done for q in mine[e].queries if loader.scored(q, mine[e])}
        if set(meters.keys()) != expected:
            raise DataError(f"the meters hold {len(meters)} scored queries, the {len(done)} episodes said to be "
                            f"done have {len(expected)}")
        timer.load_state_dict(st.get("timing"))
        self.chunks, self.hist, self.saved = list(chunks), hist, set(expected)
        return meters, timer, done

    def load(self, make_meters, make_timer, loader: "EpisodeLoader", mine: dict[int, Episode],
             log: Callable[[str], None]):
        """(meters, timer, episodes already done) from the saved state; fresh ones and no episode when
        there is none, or when it is damaged — then it is set aside as ``*.damaged`` with a warning
        naming it, and the run restarts clean. ``mine``: this rank's episodes by index."""
        legacy = self.folder.with_name(self.folder.name + ".pkl")
        if legacy.exists():
            log(f"warning: ignoring {legacy}: fdsbench no longer reads pickled resume state (loading a pickle "
                f"can run code); delete the file")
        if (self.folder / "state.json").exists():  # else nothing was saved yet (chunks not listed are ignored)
            try:
                return self._read(make_meters, make_timer, loader, mine)
            except (FdsError, KeyError, TypeError, ValueError, OSError) as e:
                moved = set_aside(self.folder)
                log(f"warning: resume state {self.folder} is damaged ({e}); set aside as {moved}; "
                    f"the run restarts from its first episode")
                self.chunks, self.hist, self.saved = [], None, set()
        return make_meters(), make_timer(), set()

    def save(self, meters, timing: dict, done: set[int]) -> None:
        """Append the queries scored since the last save; ``timing``: the timing meter's state."""
        new = [k for k in meters.keys() if k not in self.saved]
        binned = meters.config["score_mode"] == "binned"
        if any(k[0] not in done for k in new):  # the first queries of an episode that failed
            if binned:
                return  # histograms cannot be split by query: the previous save stands
            new = [k for k in new if k[0] in done]
        if new:
            name = f"chunk-{len(self.chunks):05d}.npz"
            write_npz(self.folder / name, state_to_arrays(meters.state_dict(keys=new, pixels=False)))
            self.chunks.append({"file": name, "sha256": sha256_file(self.folder / name), "rows": len(new)})
            self.saved.update(new)
        old_hist = self.hist
        if binned and (new or self.hist is None):
            name = f"hist-{len(self.chunks):05d}.npz"
            write_npz(self.folder / name, state_to_arrays(meters.state_dict(keys=[])))
            self.hist = {"file": name, "sha256": sha256_file(self.folder / name)}
        atomic_write_json(self.folder / "state.json", {
            "version": RESUME_VERSION, "run_id": self.rid, "manifest_hash": self.manifest.hash,
            "done": sorted(done), "timing": timing, "chunks": self.chunks, "hist": self.hist})
        if old_hist and old_hist != self.hist:
            (self.folder / old_hist["file"]).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _method_failure(method: str, call: str, ep: Episode, qid: str | None, e: Exception) -> FdsError:
    """One line for an exception raised inside a method: which call, episode and query, where."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {where.filename}:{where.lineno}" if where else ""
    return FdsError(f"method '{method}' raised {type(e).__name__} in {call}() on episode {ep.index} ({ep.class_key})"
                    + (f", query {qid}" if qid else "") + f"{at}: {e}; finished episodes are saved — fix the "
                    f"method and run the same command again to resume")


def evaluate(spec: BenchSpec, method: Method, ds: DatasetAdapter, manifest: Manifest, rid: str,
             log: Callable[[str], None]):
    """Run this process's share of the manifest's episodes (all of them unless distributed: rank r
    of w takes episodes with index % w == r); resumable through :class:`ResumeState`. Returns the
    meters, the timing meter and the number of episodes evaluated over all ranks."""
    rank, size = world()
    meters, timer = _make_meters(spec, manifest.protocol), _make_timer(spec)
    episodes = manifest.episodes[: spec.max_episodes] if spec.max_episodes else manifest.episodes
    loader = EpisodeLoader(ds, type(method), manifest, cache_mb=spec.cache_mb, prepare_gt=meters.prepare_gt)
    n_total = len(episodes)
    episodes = [e for e in episodes if e.index % size == rank]
    resume = ResumeState(partial_dir(spec.workdir, rid, rank, size), rid, manifest)
    done: set[int] = set()
    if spec.force:
        resume.remove()
    else:
        meters, timer, done = resume.load(lambda: _make_meters(spec, manifest.protocol), lambda: _make_timer(spec), loader,
                                          {e.index: e for e in episodes}, log)
        if done:
            log(f"resuming {rid}: {len(done)} episodes already done")
    todo = [e for e in episodes if e.index not in done]
    meters.reserve(loader.scored_pixels(todo))
    bar = _progress(total=sum(len(e.queries) for e in episodes), desc=f"{method.name} {ds.name} f{spec.fold}",
                    enabled=spec.progress and rank == 0,
                    initial=sum(len(e.queries) for e in episodes if e.index in done))
    # each output is validated and measured (large maps on the measuring threads, several at once),
    # then added to the meters in order on the scorer thread, overlapping the next predict
    scorer = OrderedWorker(enabled=spec.workers > 0)
    measurer = ThreadPoolExecutor(spec.workers, thread_name_prefix="fdsbench-measure",
                                  initializer=background_priority) if spec.workers > 0 else None

    def measure(pred, query: Query, gt):
        pred, value_range = validate_prediction(pred, query, method.name)
        if gt is None:  # predict-only query: the map is kept, nothing scored
            return pred
        return meters.measure(pred, gt, query.id, value_range, split=spec.workers < 2)

    def score(out, query: Query, gt, ep: Episode) -> None:
        measured = out.result() if isinstance(out, Future) else measure(out, query, gt)
        if gt is None:
            save_prediction(Path(spec.workdir) / "predictions" / rid, query.id, measured)
        else:
            meters.add(measured, class_key=ep.class_key, episode=ep.index, query_id=query.id)

    def hand_over(pred, query: Query, gt, ep: Episode) -> tuple:
        """The scorer's job for one output. A large map starts being measured now, on the measuring
        threads; a small one is measured by the scorer itself (a hand-off costs more than its work)."""
        if measurer is not None and getattr(pred, "size", 0) >= SPLIT_PIXELS:
            pred = measurer.submit(measure, pred, query, gt)
        return score, pred, query, gt, ep

    def checkpoint(wait: bool) -> None:
        """Save progress on the scorer thread, after the scoring jobs handed over before it (so the
        meters and ``done`` agree); the timing state is taken now, on this thread."""
        scorer.submit(resume.save, meters, timer.state_dict(), done)
        if wait:
            scorer.join()

    try:
        with responsive_gil(spec.workers > 0):
            _episodes(spec, method, loader, todo, timer, scorer, hand_over, done, checkpoint, bar)
    finally:
        scorer.close()
        if measurer is not None:
            measurer.shutdown(wait=True, cancel_futures=True)
    bar.close()
    scorer.join()  # every query scored; no final save: the record is written next
    if size > 1:
        meters, timer = _gather(spec, manifest, meters, timer)
    return meters, timer, n_total


def _episodes(spec: BenchSpec, method: Method, loader: EpisodeLoader, todo: list[Episode], timer, scorer,
              hand_over, done: set[int], checkpoint, bar) -> None:
    """The timed loop: episodes decoded ahead by the loader, prepare and predict timed, each output
    turned into a scoring job by ``hand_over`` and run on the scorer thread, progress saved every
    ``checkpoint_every_s``. Outputs are handed over just before the method's next call, so scoring
    works while the method does (a GPU method waits for its kernels without the GIL), not while the
    harness prepares it."""
    last_save = time.monotonic()
    amp = autocast(spec.device, getattr(method, "autocast", None))
    shape_warmup = ShapeWarmup(spec.warmup_per_shape)
    pending: list[tuple] = []  # ("output", pred, query, gt, ep) and ("done", episode index) since the last call

    def flush() -> None:
        if pending:  # one hand-over for all of them
            scorer.submit(_run_jobs, [hand_over(*args) if kind == "output" else (done.add, *args)
                                      for kind, *args in pending])
            pending.clear()

    def save(wait: bool = False) -> None:
        flush()
        checkpoint(wait)

    for ep, support, queries in loader.iterate(todo, spec.workers):
        seed_everything(support.seed)
        flush()
        try:
            with timer.prepare(), amp:
                state = method.prepare(support)
        except FdsError:
            raise
        except Exception as e:  # noqa: BLE001 - a plugin's bug: name where it happened
            save(wait=True)
            raise _method_failure(method.name, "prepare", ep, None, e) from e
        for query, gt in queries:
            qid = query.id
            flush()
            try:
                with amp:
                    shape_warmup(query.size, lambda: method.predict(state, query))
                with timer.predict(), amp:
                    pred = method.predict(state, query)
            except FdsError:
                raise
            except Exception as e:  # noqa: BLE001
                save(wait=True)
                raise _method_failure(method.name, "predict", ep, qid, e) from e
            pending.append(("output", host_array(pred), query, gt, ep))
            bar.update(1)
        pending.append(("done", ep.index))
        if time.monotonic() - last_save > spec.checkpoint_every_s:
            save()
            last_save = time.monotonic()
    flush()


def _run_jobs(jobs: list[tuple]) -> None:
    for fn, *args in jobs:
        fn(*args)


def save_prediction(folder: Path, query_id: str, pred: np.ndarray) -> Path:
    """The probability map of a query without ground truth, as an 8-bit PNG (p·255)."""
    from PIL import Image

    path = folder / (query_id.replace("/", "__") + ".png")
    buf = io.BytesIO()
    Image.fromarray((np.clip(pred, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _gather(spec: BenchSpec, manifest: Manifest, meters, timer):
    """Merge every rank's meter state on rank 0 (the states merge exactly: same numbers as one process)."""
    import torch.distributed as dist

    rank, size = world()
    states = [None] * size
    dist.all_gather_object(states, {"meters": meters.state_dict(), "timing": timer.state_dict()})
    if rank == 0:
        for r, st in enumerate(states):
            if r == 0:
                continue
            m, t = _make_meters(spec, manifest.protocol), _make_timer(spec)
            m.load_state_dict(st["meters"])
            t.load_state_dict(st["timing"])
            meters.merge(m)
            timer.merge(t)
    return meters, timer


def validate_spec(spec: BenchSpec) -> None:
    """Refuse values that would give an empty, truncated or silently different run, in one line each
    — and a workdir that cannot be written — before any work starts (indexing can take minutes)."""
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name, lo in (("runs", 1), ("shot", 1), ("fold", 0), ("warmup", 0)):
        if not whole(getattr(spec, name)) or getattr(spec, name) < lo:
            raise FdsError(f"{name} must be >= {lo} (an integer), got {getattr(spec, name)!r}")
    if spec.max_episodes is not None and (not whole(spec.max_episodes) or spec.max_episodes < 1):
        raise FdsError(f"max_episodes must be >= 1 (an integer; leave it unset for all episodes), got "
                       f"{spec.max_episodes!r}")
    if not 0 <= spec.threshold <= 1:
        raise FdsError(f"threshold must be in [0, 1] (probabilities), got {spec.threshold}")
    if not spec.checkpoint_every_s >= 0:
        raise FdsError(f"checkpoint interval must be >= 0 seconds (0: after every episode), got "
                       f"{spec.checkpoint_every_s}")
    check_writable_dir(spec.workdir)


def _read_record(path: Path, rid: str, log: Callable[[str], None]) -> dict | None:
    """The finished record of run ``rid``, or None (recompute) when it is damaged — then it is set
    aside as ``*.damaged`` with a warning naming it."""
    try:
        record = read_json(path, "run record")
        if record.get("run_id") != rid or not isinstance(record.get("metrics"), dict):
            raise DataError(f"run record {path} is not the record of run {rid}")
        return record
    except DataError as e:
        log(f"warning: {e}; set aside as {set_aside(path)}; recomputing the run")
        return None


def replacement_warnings(manifest: Manifest) -> list[str]:
    """Classes whose supports are drawn with replacement (fewer images than the shot, as in the
    official SOFS loader), so one image appears several times in a support set."""
    short: dict[str, int] = {}
    for ep in manifest.episodes:
        ids = [s.id for s in ep.supports]
        if len(set(ids)) < len(ids):
            short[ep.class_key] = short.get(ep.class_key, 0) + 1
    return [f"warning: {cls}: {n} episode(s) repeat a support image — the class has fewer images than "
            f"shot={manifest.shot}, so supports are drawn with replacement (as the official SOFS loader does)"
            for cls, n in sorted(short.items())]


def run(spec: BenchSpec, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``spec.runs`` seeds of one benchmark and return their run records."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    validate_spec(spec)
    for plugin in spec.plugins:
        load_plugin(plugin)
    spec.device = check_device(spec.device)
    method_cls = get_method(spec.method)
    ds = open_dataset(spec.dataset, spec.data_root, options=spec.dataset_options)
    ds.check_fold(spec.fold)
    config = build_config(method_cls.Config, method_cls.presets, spec.preset or method_cls.default_preset,
                          spec.overrides)
    method = method_cls(config, device=spec.device)
    method.workdir = Path(spec.workdir) / "cache" / method.name
    spec.precision = getattr(method, "precision", "fp32")
    proto_name = spec.protocol or getattr(method_cls, "default_protocol", "fss")
    if proto_name == "fad" and not method_cls.requires.fad:
        raise FdsError(f"method '{method.name}' does not support few-shot anomaly detection (protocol fad)")
    proto = protocol_for(ds, proto_name, spec.shot, spec.fold, spec.protocol_options)
    ckpt, trained_on = fit_or_load(spec, method, ds, proto, log)
    from .blocks.features import disable_shared, share_features  # frozen features shared in the workdir

    speed = {**accelerate(method, spec.device, spec.compile, spec.channels_last, spec.cudnn_benchmark),
             "warmup_per_shape": spec.warmup_per_shape, "autocast": getattr(method, "autocast", None),
             "feature_cache": share_features(method, Path(spec.workdir) / "cache" / "features")}
    seed_everything(derive_seed(method.name, "build"))  # a method that builds lazily (weights provenance)
    identity = run_identity(spec, method, trained_on, proto)  # inits the same way in every run
    try:
        with ScoreBuffer.reusing():  # each run's exact scores in the memory of the run before
            return [_run_seed(spec, method, ds, proto, spec.seed + i, identity, (ckpt, trained_on), speed, log)
                    for i in range(spec.runs)]
    finally:
        disable_shared()  # a timing-only measurement later in this process must not read cached features


def _run_seed(spec: BenchSpec, method: Method, ds: DatasetAdapter, proto: dict, seed: int, identity: dict,
              training: tuple[str | None, dict | None], speed: dict, log: Callable[[str], None]) -> dict:
    """One run: the manifest of ``seed``, its evaluation and its record (or the finished record of an
    identical earlier run)."""
    ckpt, trained_on = training
    manifest = get_manifest(Path(spec.workdir), ds, spec.fold, spec.shot, seed, proto)
    rid = run_id(spec, method, manifest, identity)
    path = Path(spec.workdir) / "runs" / f"{rid}.json"
    if path.is_file() and not spec.force:
        record = _read_record(path, rid, log)
        if record is not None:
            log(f"run {rid} is complete; reusing its record (FORCE=1 recomputes)")
            return record
    for line in replacement_warnings(manifest):
        log(line)
    check_episode_masks(ds, manifest.episodes[: spec.max_episodes] if spec.max_episodes else manifest.episodes,
                        proto)
    seed_everything(derive_seed(manifest.hash, "run"))
    started = time.time()
    meters, timer, n_eval = evaluate(spec, method, ds, manifest, rid, log)
    rank, size = world()
    if rank != 0:
        barrier()  # rank 0 writes the record
        shutil.rmtree(partial_dir(spec.workdir, rid, rank, size), ignore_errors=True)
        return read_json(path, "run record")
    metrics, timing = report_metrics(meters.compute(consume=True), proto, manifest), timer.compute()
    record = {
        "run_id": rid, "created": started, "wall_s": time.time() - started,
        **method.describe(), "method_label": method.label(), "preset": spec.preset or type(method).default_preset,
        "identity": identity, "complete": n_eval == len(manifest.episodes), "max_episodes": spec.max_episodes,
        "threshold": spec.threshold, "score_mode": spec.score_mode, "aggregation": metrics["aggregation"],
        "requires": dataclasses.asdict(method.requires),
        "dataset": ds.name, "data_root": str(ds.root), "dataset_hash": ds.dataset_hash,
        "dataset_options": dict(getattr(ds, "options", None) or {}),
        "fold": spec.fold, "shot": spec.shot, "seed": seed, "train_seed": spec.train_seed if ckpt else None,
        "trained_on": trained_on,
        "protocol": proto, "manifest": str(manifest.path), "manifest_hash": manifest.hash,
        "episodes": n_eval, "episodes_total": len(manifest.episodes), "checkpoint": ckpt,
        "device": spec.device, "precision": spec.precision, "world_size": size, "speed_options": speed,
        "loader": {"workers": spec.workers, "cache_mb": spec.cache_mb},
        "environment": environment(spec.device), "metrics": metrics, "timing": {k: v for k, v in timing.items() if k != "environment"},
    }
    atomic_write_json(path, record)
    shutil.rmtree(partial_dir(spec.workdir, rid, rank, size), ignore_errors=True)
    barrier()
    return read_json(path, "run record")  # exactly what a later reader sees
