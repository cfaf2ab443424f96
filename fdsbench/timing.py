"""fdsbench's timing protocol (FPS: warm-up, device synchronisation, batch 1).

* batch size 1 (the runner calls ``predict`` once per query);
* ``prepare`` (support processing) and ``predict`` (one query) are timed separately;
  **FPS = queries per second of predict** = n_predict / (sum of predict latencies) — support
  processing is excluded from FPS, as in GFDS paper §6.3, but reported;
* the first ``warmup`` calls of each kind are timed apart, not in the statistics (CUDA context,
  cuDNN autotune, allocator growth, lazy initialisation); a kind that never gets past its warm-up
  (per-support fitting: one ``prepare`` per object) reports its warm-up calls instead, flagged
  ``includes_warmup`` — a warm-up never hides the only call of its kind;
* the device is synchronised before the clock starts and before it stops
  (``torch.cuda.synchronize`` on CUDA, ``torch.mps.synchronize`` on MPS) — the official FSS
  repositories time asynchronous kernel launches and overstate speed;
* latencies: mean, std, p50, p95 (linear interpolation), min, max; ``time.perf_counter``;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` (peak statistics reset when the meter is
  built, so it covers everything after that); CPU: the process's peak resident set size
  (``resource.getrusage``; it includes everything the process ever held, a coarse upper bound);
* precision (fp32 / bf16 / fp16) and the environment (:func:`environment_info`) are recorded.

State is mergeable: latencies concatenate, totals use ``math.fsum`` over sorted values and
percentiles are computed on sorted values, so merged shards give the same numbers whatever the
order. Peak memory merges by max. Each shard, and each process resuming from a saved state,
sets its own first ``warmup`` calls apart.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from contextlib import contextmanager

import numpy as np

from .errors import FdsError

PRECISIONS = ("fp32", "bf16", "fp16")


def precision_kind(precision: str) -> str:
    """The numeric precision of a method's precision label ("bf16-autocast+tf32" -> "bf16")."""
    return "bf16" if "bf16" in precision else ("fp16" if "fp16" in precision else "fp32")


STATE_VERSION = 2


def _device_type(device) -> str:
    s = str(device)
    return s.split(":", 1)[0]


def _torch():
    try:
        import torch
        return torch
    except ImportError:  # pragma: no cover - torch is a dependency of every method
        return None


def synchronize(device) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    kind = _device_type(device)
    if kind == "cuda":
        _torch().cuda.synchronize(device)
    elif kind == "mps":
        _torch().mps.synchronize()


BACKGROUND_NICE = 10


def background_priority() -> None:
    """Lower the calling thread's CPU priority by ``BACKGROUND_NICE`` (Linux: each thread has its own
    nice value). The harness's decoding and scoring threads call it as they start, so that where they
    and the method want the same cores the method runs first: a CPU method's predict time stays its
    own work. Elsewhere nothing changes (there the call would lower the whole process)."""
    if not sys.platform.startswith("linux"):
        return
    import threading

    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError:  # a sandbox that forbids it: the thread keeps its priority
        pass


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device="cpu") -> dict:
    """Versions and hardware a timing (or any run record) depends on."""
    torch = _torch()
    kind = _device_type(device)
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus_usable = os.cpu_count()
    info = {
        "device": str(device), "device_type": kind,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "cudnn": None,
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "cpu_count_usable": cpus_usable,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "device_name": None, "device_memory_bytes": None,
    }
    if torch is not None and kind == "cuda":
        if not torch.cuda.is_available():
            raise FdsError(f"device '{device}' requested but CUDA is not available; use --device cpu")
        idx = torch.device(device).index
        idx = torch.cuda.current_device() if idx is None else idx
        props = torch.cuda.get_device_properties(idx)
        info["device_name"] = props.name
        info["device_memory_bytes"] = int(props.total_memory)
        info["cudnn"] = torch.backends.cudnn.version()
    elif kind == "mps":
        info["device_name"] = "Apple MPS"
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_peak_rss_bytes() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def latency_stats(values) -> dict:
    """mean/std/p50/p95/min/max/total (seconds) of a list of latencies; order-independent."""
    v = np.sort(np.asarray(values, np.float64))
    if v.size == 0:
        return {"n": 0, "total_s": 0.0, "mean_s": None, "std_s": None, "p50_s": None,
                "p95_s": None, "min_s": None, "max_s": None}
    total = math.fsum(v.tolist())
    mean = total / v.size
    return {"n": int(v.size), "total_s": total, "mean_s": mean,
            "std_s": math.sqrt(math.fsum(((v - mean) ** 2).tolist()) / v.size),
            "p50_s": float(np.percentile(v, 50)), "p95_s": float(np.percentile(v, 95)),
            "min_s": float(v[0]), "max_s": float(v[-1])}


class TimingMeter:
    """Times ``prepare`` and ``predict`` blocks on one device. See the module docstring.

    >>> tm = TimingMeter(device="cpu", warmup=1)
    >>> with tm.prepare(): state = method.prepare(support)          # doctest: +SKIP
    >>> with tm.predict(): prob = method.predict(state, query)     # doctest: +SKIP
    >>> tm.compute()["fps"]                                          # doctest: +SKIP
    """

    def __init__(self, device="cpu", warmup: int = 1, precision: str = "fp32",
                 clock=time.perf_counter):
        if precision not in PRECISIONS:
            raise FdsError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
        if int(warmup) < 0:
            raise FdsError(f"warmup must be >= 0, not {warmup}")
        self.device = str(device)
        self.kind = _device_type(device)
        if self.kind == "cuda":
            torch = _torch()
            if torch is None or not torch.cuda.is_available():
                raise FdsError(f"device '{device}' requested but CUDA is not available; use --device cpu")
            torch.cuda.reset_peak_memory_stats(device)
        self.warmup = int(warmup)
        self.precision = precision
        self._clock = clock
        self._times: dict[str, list[float]] = {"prepare": [], "predict": []}
        self._seen = {"prepare": 0, "predict": 0}     # calls in total (state)
        self._session = {"prepare": 0, "predict": 0}  # calls in this process (not state)
        self._warm = {"prepare": [], "predict": []}  # warm-up latencies, kept apart
        self._peak = 0

    def _peak_now(self) -> int:
        if self.kind == "cuda":
            return int(_torch().cuda.max_memory_allocated(self.device))
        if self.kind == "mps":
            return int(_torch().mps.driver_allocated_memory())
        return _cpu_peak_rss_bytes()

    @contextmanager
    def _timed(self, what: str):
        synchronize(self.device)
        t0 = self._clock()
        yield
        synchronize(self.device)
        dt = self._clock() - t0
        self._seen[what] += 1
        self._session[what] += 1
        if self._session[what] <= self.warmup:
            self._warm[what].append(float(dt))
        else:
            self._times[what].append(float(dt))
        if self.kind == "mps":  # the others read a high-water mark (state_dict/compute): no per-call cost
            self._peak = max(self._peak, self._peak_now())

    def prepare(self):
        """Context manager timing one support preparation (``Method.prepare``)."""
        return self._timed("prepare")

    def predict(self):
        """Context manager timing one query (``Method.predict``, batch 1)."""
        return self._timed("predict")

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "device": self.device, "device_type": self.kind,
                "precision": self.precision, "warmup": self.warmup,
                "prepare": sorted(self._times["prepare"]), "predict": sorted(self._times["predict"]),
                "warmup_prepare": sorted(self._warm["prepare"]), "warmup_predict": sorted(self._warm["predict"]),
                "seen_prepare": self._seen["prepare"], "seen_predict": self._seen["predict"],
                "peak_memory_bytes": max(self._peak, self._peak_now() if self._seen["predict"] else 0)}

    def load_state_dict(self, s: dict) -> None:
        if s.get("version") != STATE_VERSION:
            raise FdsError(f"timing state version {s.get('version')} is not {STATE_VERSION}")
        self._check(s, "load timing state")
        self._times = {"prepare": list(map(float, s["prepare"])), "predict": list(map(float, s["predict"]))}
        self._warm = {"prepare": list(map(float, s["warmup_prepare"])),
                      "predict": list(map(float, s["warmup_predict"]))}
        self._seen = {"prepare": int(s["seen_prepare"]), "predict": int(s["seen_predict"])}
        self._peak = int(s["peak_memory_bytes"])
        # a resumed run is a new process: its first calls are cold again and are warm-up
        self._session = {"prepare": 0, "predict": 0}

    def _check(self, s: dict, what: str) -> None:
        for k, mine in (("device_type", self.kind), ("precision", self.precision)):
            if s[k] != mine:
                raise FdsError(f"cannot {what}: {k} '{s[k]}' != '{mine}'; timings from different "
                               f"devices or precisions are not comparable")

    def merge(self, other: "TimingMeter") -> "TimingMeter":
        s = other.state_dict()
        self._check(s, "merge timings")
        for k in ("prepare", "predict"):
            self._times[k] += s[k]
            self._warm[k] += list(s["warmup_" + k])
            self._seen[k] += s["seen_" + k]
        self._peak = max(self._peak, s["peak_memory_bytes"])
        return self

    def _stats(self, what: str) -> dict:
        """Latency statistics of the counted calls of ``what``, or of its warm-up calls where none
        was counted (flagged ``includes_warmup``); ``warmup_total_s`` is the warm-up time apart."""
        counted = bool(self._times[what])
        st = latency_stats(self._times[what] if counted else self._warm[what])
        st["includes_warmup"] = not counted and bool(self._warm[what])
        st["warmup_total_s"] = math.fsum(sorted(self._warm[what]))
        return st

    def compute(self, environment: bool = True) -> dict:
        """FPS, latency statistics of prepare and predict, peak memory, precision, environment."""
        pred, prep = self._stats("predict"), self._stats("prepare")
        out = {
            "fps": (pred["n"] / pred["total_s"]) if pred["n"] and pred["total_s"] > 0 else None,
            "fps_p50": (1.0 / pred["p50_s"]) if pred["n"] and pred["p50_s"] > 0 else None,
            "predict": pred, "prepare": prep,
            "warmup": self.warmup, "warmup_calls": {k: len(v) for k, v in self._warm.items()},
            "batch_size": 1, "precision": self.precision, "device": self.device,
            "device_sync": {"cuda": "torch.cuda.synchronize", "mps": "torch.mps.synchronize"}.get(
                self.kind, "none needed (CPU ops are synchronous)"),
            "peak_memory_bytes": max(self._peak, self._peak_now() if self._seen["predict"] else 0),
            "peak_memory_kind": {"cuda": "torch.cuda.max_memory_allocated",
                                 "mps": "torch.mps.driver_allocated_memory"}.get(
                                     self.kind, "process peak RSS (getrusage)"),
            "clock": "time.perf_counter",
        }
        if environment:
            out["environment"] = environment_info(self.device)
        return out


# ---- GPU-aware options of a timed run ----------------------------------------------------------
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def method_modules(method) -> list:
    """The torch modules a method runs: its ``nn.Module`` attributes and its ``model`` property
    (built on first use by methods that load lazily), each once."""
    torch = _torch()
    found = [v for v in vars(method).values() if isinstance(v, torch.nn.Module)]
    if isinstance(getattr(type(method), "model", None), property):
        model = method.model
        if isinstance(model, torch.nn.Module):
            found.append(model)
    out, seen = [], set()
    for m in found:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def accelerate(method, device, compile: bool = False, channels_last: bool = False,
               cudnn_benchmark: bool = False) -> dict:
    """Apply the speed options of a timed run to ``method`` and return what was applied (recorded
    in the run record): ``cudnn.benchmark`` (autotuned convolutions per input shape: pair it with
    per-shape warm-up), ``channels_last`` memory format of the modules' 4-D weights, and
    ``torch.compile`` of each module in place (``nn.Module.compile``: parameter names unchanged)."""
    torch = _torch()
    applied = {"compile": bool(compile), "channels_last": bool(channels_last),
               "cudnn_benchmark": bool(cudnn_benchmark) and _device_type(device) == "cuda", "modules": []}
    if applied["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True
    if compile or channels_last:
        mods = method_modules(method)
        if not mods:
            raise FdsError(f"method '{method.name}' exposes no torch module (an nn.Module attribute or a `model` "
                           f"property): --compile / --channels-last cannot apply; drop them")
        for m in mods:
            if channels_last:
                m.to(memory_format=torch.channels_last)
            if compile:
                m.compile()
        applied["modules"] = [type(m).__name__ for m in mods]
    return applied


def autocast(device, dtype: str | None):
    """``torch.autocast`` for a method that declares ``autocast = "bf16"`` / ``"fp16"``; a no-op
    context for fp32."""
    import contextlib

    if not dtype:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise FdsError(f"unknown autocast dtype '{dtype}'; use {', '.join(AUTOCAST_DTYPES)} or none")
    torch = _torch()
    return torch.autocast(_device_type(device), dtype=getattr(torch, AUTOCAST_DTYPES[dtype]))


class ShapeWarmup:
    """Per-shape warm-up: the first call with each new input shape runs once untimed before its timed
    call (cuDNN autotuning and compiled graphs are per shape). The untimed output is dropped; the
    timed call's output is the one scored, so results are unchanged for deterministic methods."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shapes: set = set()
        self.calls = 0

    def __call__(self, shape, fn) -> None:
        if self.enabled and shape not in self.shapes:
            self.shapes.add(shape)
            fn()
            self.calls += 1


def output_difference(reference, other, threshold: float = 0.5) -> dict:
    """How far ``other`` probability maps are from ``reference`` ones (e.g. autocast vs fp32 on the
    same queries): max and mean absolute difference, and the fraction of pixels whose binarisation
    at ``threshold`` flips."""
    if len(reference) != len(other) or not len(reference):
        raise FdsError("output_difference needs the same, non-zero number of maps on both sides")
    mx, total, flips, n = 0.0, 0.0, 0, 0
    for a, b in zip(reference, other):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        d = np.abs(a - b)
        mx, total, n = max(mx, float(d.max())), total + float(d.sum()), n + d.size
        flips += int(np.count_nonzero((a > threshold) != (b > threshold)))
    return {"queries": len(reference), "max_abs": mx, "mean_abs": total / n, "flipped_fraction": flips / n,
            "threshold": threshold}
