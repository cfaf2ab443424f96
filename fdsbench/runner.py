"""The benchmark runner: manifest -> method.prepare/predict -> meters -> run record.

One run = one (method config, dataset, fold, shot, seed, protocol). The runner

* trains meta-trained methods on the base folds once per (config, dataset, fold, train seed) and
  keeps the checkpoint (a second run loads it);
* seeds every episode from (manifest hash, episode index), so a result never depends on the order
  or sharding of episodes;
* checkpoints the meters every few episodes (atomically), so a killed run resumes where it stopped
  and gives the same numbers as an uninterrupted one;
* validates every prediction (shape, dtype, range, NaN) and names the method and query on failure;
* writes one JSON run record atomically: config + hash, weights provenance, dataset + manifest hash,
  seeds, versions, device, metrics, per-class table, timing.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .config import build_config, config_dict, config_hash
from .data import DatasetAdapter
from .episodes import Manifest, get_manifest, resolve_protocol
from .errors import FdsError
from .io import atomic_write_bytes, atomic_write_json, content_hash
from .method import Method
from .registry import get_dataset, get_method, load_plugin
from .seeding import derive_seed, seed_everything
from .types import Episode, Query, Shot, SupportSet


@dataclass
class BenchSpec:
    """Everything that defines a benchmark run (what the CLI and ``make bench`` pass in)."""

    method: str = "proto"
    dataset: str = "synthetic"
    data_root: str | None = None
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


def _progress(iterable=None, total=None, desc="", enabled=True, initial=0):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, initial=initial, leave=False,
                dynamic_ncols=True, file=sys.stderr)


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
    return device


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def validate_prediction(pred, query: Query, method: str) -> np.ndarray:
    """The contract's output check: float map at the query's original size, finite, in [0, 1]."""
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
    if not np.isfinite(pred).all():
        raise FdsError(f"method '{method}' returned NaN/inf for query {query.id}")
    if pred.min() < 0 or pred.max() > 1:
        raise FdsError(f"method '{method}' returned values in [{pred.min():.3g}, {pred.max():.3g}] for query "
                       f"{query.id}; predict() must return probabilities in [0, 1] (apply the sigmoid/softmax "
                       f"the paper uses inside the method)")
    return pred.astype(np.float32, copy=False)


class EpisodeLoader:
    """Decodes an episode's support set and queries from the dataset. Ground truth = the episode's
    class only (the union of all defects for ``"<object>/*"`` episodes); a query without a mask of
    its class (user folders: predict-only queries) has ground truth ``None``. With the protocol's
    ``resize`` set, images and masks are decoded at that size."""

    def __init__(self, ds: DatasetAdapter, method_cls: type, manifest: Manifest):
        self.ds, self.method_cls, self.manifest = ds, method_cls, manifest
        resize = (manifest.protocol or {}).get("resize")
        self.size = tuple(resize) if resize else None

    def gt(self, image_id: str, ep: Episode) -> np.ndarray | None:
        rec = self.ds.record(image_id)
        cls = ep.defect_class
        if cls == "*":
            if not rec.masks:
                return np.zeros(self.size or self.ds.image_size(image_id), bool)
            return self.ds.load_mask(image_id, "*", size=self.size)
        if cls not in rec.masks:
            if rec.split == "query":
                return None
            raise FdsError(f"query {image_id} has no mask of class {cls}")
        return self.ds.load_mask(image_id, cls, size=self.size)

    def support(self, ep: Episode) -> SupportSet:
        shots = []
        fad = ep.defect_class == "*" and self.manifest.protocol.get("name") == "fad"
        for ref in ep.supports:
            image = self.ds.load_image(ref.id, size=self.size)
            mask = np.zeros(image.shape[:2], bool) if fad else self.gt(ref.id, ep)
            if mask.shape != image.shape[:2]:
                raise FdsError(f"mask of {ref.id} is {mask.shape}, image is {image.shape[:2]}")
            shots.append(Shot(ref.id, image, mask, ref.crops))
        pool = None
        if self.method_cls.requires.normal_pool:
            pool = self.ds.normal_pool(ep.object)
            if len(pool) == 0:
                raise FdsError(f"method '{self.method_cls.name}' needs defect-free images of product "
                               f"'{ep.object}', and dataset '{self.ds.name}' has none: not applicable (N/A)")
        return SupportSet(ep.class_key, shots, derive_seed(self.manifest.hash, ep.index), pool, ep.index)

    def query(self, image_id: str) -> Query:
        return Query(image_id, self.ds.load_image(image_id, size=self.size))


def _make_meters(spec: BenchSpec):
    from .metrics import MeterSet

    return MeterSet(threshold=spec.threshold)


def _make_timer(spec: BenchSpec):
    from .timing import TimingMeter

    return TimingMeter(device=spec.device, warmup=spec.warmup, precision=spec.precision)


def _train_tag(spec: BenchSpec) -> str:
    """'' for the usual base-fold training, else e.g. '_from-vision_v1' / '_from-vision_v1-f2'."""
    if not spec.train_dataset:
        return ""
    return f"_from-{spec.train_dataset}" + (f"-f{spec.train_fold}" if spec.train_fold >= 0 else "")


def run_id(spec: BenchSpec, method: Method, manifest: Manifest) -> str:
    return (f"{method.name}_{spec.dataset}_fold{spec.fold}_{spec.shot}shot_seed{manifest.seed}_"
            f"{config_hash(method.config)[:8]}_{manifest.hash[:8]}" + _train_tag(spec)
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


def fit_or_load(spec: BenchSpec, method: Method, ds: DatasetAdapter,
                log: Callable[[str], None]) -> tuple[str | None, dict | None]:
    """Meta-train ``method`` on the base folds (or on ``spec.train_dataset``), or load the checkpoint
    of an earlier identical fit. Under torch.distributed, rank 0 trains and the other ranks load it.
    Returns (checkpoint path, what it was trained on) or (None, None) for untrained methods."""
    if not method.requires.training:
        if spec.train_dataset:
            raise FdsError(f"method '{method.name}' is not trained: --train-dataset does not apply to it")
        return None, None
    import torch

    tds, tfold = training_data(spec, ds)
    trained_on = {"dataset": tds.name, "data_root": str(tds.root), "dataset_hash": tds.dataset_hash,
                  "fold": tfold, "objects": "all" if tfold < 0 else "base folds", "seed": spec.train_seed}
    key = content_hash([method.name, config_dict(method.config), tds.dataset_hash, tfold, spec.train_seed], 12)
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
        method.fit(tds.train_source(tfold, spec.train_seed), fit_dir)
        if rank == 0:
            buf = io.BytesIO()
            torch.save(method.state_dict(), buf)
            atomic_write_bytes(ckpt, buf.getvalue())
        barrier()
        return str(ckpt), trained_on
    barrier()
    method.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False))
    log(f"loaded trained weights {ckpt}")
    return str(ckpt), trained_on


def evaluate(spec: BenchSpec, method: Method, ds: DatasetAdapter, manifest: Manifest, rid: str,
             log: Callable[[str], None]):
    """Run this process's share of the manifest's episodes (all of them unless distributed: rank r
    of w takes episodes with index % w == r); resumable through a partial-state file. Returns the
    meters, the timing meter and the number of episodes evaluated over all ranks."""
    rank, size = world()
    runs_dir = Path(spec.workdir) / "runs"
    partial = runs_dir / (f"{rid}.partial.pkl" if size == 1 else f"{rid}.rank{rank}of{size}.partial.pkl")
    meters, timer = _make_meters(spec), _make_timer(spec)
    done: set[int] = set()
    if partial.is_file() and not spec.force:
        try:
            state = pickle.loads(partial.read_bytes())
            meters.load_state_dict(state["meters"])
            timer.load_state_dict(state["timing"])
            done = set(state["done"])
            log(f"resuming {rid}: {len(done)} episodes already done")
        except Exception as e:  # a damaged partial file: start over rather than trust it
            log(f"ignoring unreadable partial state {partial} ({e})")
            meters, timer, done = _make_meters(spec), _make_timer(spec), set()
    episodes = manifest.episodes[: spec.max_episodes] if spec.max_episodes else manifest.episodes
    loader = EpisodeLoader(ds, type(method), manifest)
    last_save = time.monotonic()

    def save():
        atomic_write_bytes(partial, pickle.dumps({"done": sorted(done), "meters": meters.state_dict(),
                                                  "timing": timer.state_dict()}))

    n_total = len(episodes)
    episodes = [e for e in episodes if e.index % size == rank]
    todo = [e for e in episodes if e.index not in done]
    bar = _progress(total=sum(len(e.queries) for e in episodes), desc=f"{method.name} {ds.name} f{spec.fold}",
                    enabled=spec.progress and rank == 0,
                    initial=sum(len(e.queries) for e in episodes if e.index in done))
    for ep in todo:
        support = loader.support(ep)
        seed_everything(support.seed)
        with timer.prepare():
            state = method.prepare(support)
        for qid in ep.queries:
            query = loader.query(qid)
            with timer.predict():
                pred = method.predict(state, query)
            pred = validate_prediction(pred, query, method.name)
            gt = loader.gt(qid, ep)
            if gt is None:  # predict-only query: keep the map, score nothing
                save_prediction(Path(spec.workdir) / "predictions" / rid, qid, pred)
            else:
                meters.update(pred, gt, class_key=ep.class_key, episode=ep.index, query_id=qid)
            bar.update(1)
        done.add(ep.index)
        if time.monotonic() - last_save > spec.checkpoint_every_s:
            save()
            last_save = time.monotonic()
    bar.close()
    if todo:
        save()
    if size > 1:
        meters, timer = _gather(spec, meters, timer, partial)
    return meters, timer, n_total


def save_prediction(folder: Path, query_id: str, pred: np.ndarray) -> Path:
    """The probability map of a query without ground truth, as an 8-bit PNG (p·255)."""
    from PIL import Image

    path = folder / (query_id.replace("/", "__") + ".png")
    buf = io.BytesIO()
    Image.fromarray((np.clip(pred, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _gather(spec: BenchSpec, meters, timer, partial: Path):
    """Merge every rank's meter state on rank 0 (the states merge exactly: same numbers as one process)."""
    import torch.distributed as dist

    rank, size = world()
    states = [None] * size
    dist.all_gather_object(states, {"meters": meters.state_dict(), "timing": timer.state_dict()})
    if rank == 0:
        for r, st in enumerate(states):
            if r == 0:
                continue
            m, t = _make_meters(spec), _make_timer(spec)
            m.load_state_dict(st["meters"])
            t.load_state_dict(st["timing"])
            meters.merge(m)
            timer.merge(t)
    return meters, timer


def run(spec: BenchSpec, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``spec.runs`` seeds of one benchmark and return their run records."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    for plugin in spec.plugins:
        load_plugin(plugin)
    spec.device = check_device(spec.device)
    method_cls = get_method(spec.method)
    ds = get_dataset(spec.dataset)(spec.data_root)
    ds.check_fold(spec.fold)
    config = build_config(method_cls.Config, method_cls.presets, spec.preset or method_cls.default_preset,
                          spec.overrides)
    method = method_cls(config, device=spec.device)
    method.workdir = Path(spec.workdir) / "cache" / method.name
    spec.precision = getattr(method, "precision", "fp32")
    proto_name = spec.protocol or getattr(method_cls, "default_protocol", "fss")
    if proto_name == "fad" and not method_cls.requires.fad:
        raise FdsError(f"method '{method.name}' does not support few-shot anomaly detection (protocol fad)")
    proto = resolve_protocol(proto_name, spec.shot, spec.protocol_options, ds.protocol_defaults_for(spec.fold))
    ckpt, trained_on = fit_or_load(spec, method, ds, log)
    records = []
    for i in range(spec.runs):
        seed = spec.seed + i
        manifest = get_manifest(Path(spec.workdir), ds, spec.fold, spec.shot, seed, proto)
        rid = run_id(spec, method, manifest)
        path = Path(spec.workdir) / "runs" / f"{rid}.json"
        if path.is_file() and not spec.force:
            log(f"run {rid} is complete; reusing its record (FORCE=1 recomputes)")
            records.append(json.loads(path.read_text()))
            continue
        seed_everything(derive_seed(manifest.hash, "run"))
        started = time.time()
        meters, timer, n_eval = evaluate(spec, method, ds, manifest, rid, log)
        rank, size = world()
        if rank != 0:
            barrier()  # rank 0 writes the record
            records.append(json.loads(path.read_text()))
            path.with_name(f"{rid}.rank{rank}of{size}.partial.pkl").unlink(missing_ok=True)
            continue
        metrics, timing = meters.compute(), timer.compute()
        record = {
            "run_id": rid, "created": started, "wall_s": time.time() - started,
            **method.describe(), "preset": spec.preset or method_cls.default_preset,
            "requires": dataclasses.asdict(method.requires),
            "dataset": ds.name, "data_root": str(ds.root), "dataset_hash": ds.dataset_hash,
            "fold": spec.fold, "shot": spec.shot, "seed": seed, "train_seed": spec.train_seed if ckpt else None,
            "trained_on": trained_on,
            "protocol": proto, "manifest": str(manifest.path), "manifest_hash": manifest.hash,
            "episodes": n_eval, "episodes_total": len(manifest.episodes), "checkpoint": ckpt,
            "device": spec.device, "precision": spec.precision, "world_size": size,
            "environment": environment(spec.device), "metrics": metrics, "timing": {k: v for k, v in timing.items() if k != "environment"},
        }
        atomic_write_json(path, record)
        path.with_name(f"{rid}.partial.pkl" if size == 1 else f"{rid}.rank0of{size}.partial.pkl").unlink(
            missing_ok=True)
        barrier()
        records.append(json.loads(path.read_text()))  # exactly what a later reader sees
    return records
