"""The frozen-feature cache: a frozen encoder's maps of a batch are computed once and reused.

Supports recur across the episodes of a manifest, the test runs repeat the same queries, and the
methods of one comparison (SOFS, PFENet and HDMNet on the same DINOv2 / ResNet taps) encode the same
windows and crops. A frozen encoder gives the same maps each time, so a method calls its SHARED
backbone through :class:`CachedBackbone` (same ``forward_features`` API) at test time::

    bb = build_backbone("dinov2_vitb14", weights=...)              # frozen, registered as `backbone`
    enc = CachedBackbone.shared(bb)                                 # the process-wide store
    feats = enc.forward_features(x, layers=(5, 6, 7, 8, 9, 10))

What a cache entry is (one tensor per entry)::

    key = sha256(encoder name, weights content fingerprint, ONE tap (layer) and the call options,
                 numerics context, the input BATCH's shape, dtype and bytes)

* **One tap per entry**, so a method asking for a subset of another's taps hits (blocks 5-10 and
  block 7; layer2 alone and layer2 + layer3); a partial hit encodes only the missing taps.
* **The unit of reuse is the input batch**, not the image: convolution kernels round a sample
  differently with the batch it is in (oneDNN on a CPU: batch 1 vs 2 differ by up to 1e-4 on ResNet-50
  layer3, measured), so reusing one window's maps inside another batch would change numbers. Methods
  that batch the same inputs the same way (SOFS and HDMNet's sliding windows, PFENet and HDMNet's
  whole-image path, every repeat of a query or a support within a method) hit; nothing else does
  (e.g. PFENet encodes its supports one shot per call, the official loop, SOFS all crops at once).
* **Weights by content**: a fingerprint of the encoder's state dict (two random inits never share
  features; a checkpoint loaded into the encoder later invalidates the fingerprint).
* **Numerics context**: parameter dtype, device type and model, intra-op threads (CPU results depend
  on them), TF32 switches, autocast dtype and the torch version.

Storage: :class:`FeatureStore`, a byte-bounded LRU in host memory plus an optional directory
(:class:`fdsbench.diskcache.BoundedDir`: one ``.pt`` file per entry, read with
``torch.load(weights_only=True)``: no pickle; bounded in bytes, evicting the oldest entries this
process has not used).

The process-wide store (:func:`shared_store`) is OFF until something enables it: ``fdsbench bench``
does (:func:`share_features`: memory + ``<WORKDIR>/cache/features`` on disk, shared by every method of
the workdir, recorded in the run record's ``speed_options``: its predict times then include hits),
the timing commands (``fdsbench fps``, ``make fps-table``) do not, so their FPS never counts a cache
hit. Environment: ``FDSBENCH_FEATURE_CACHE=off``
disables it, ``FDSBENCH_FEATURE_CACHE_BYTES`` / ``_DISK_BYTES`` bound it, ``FDSBENCH_FEATURE_CACHE_DIR``
moves the directory. A cache entry never changes a number: the tests compare every method's output
with and without the cache with ``==``.

``CachedBackbone`` is deliberately NOT an ``nn.Module``: the encoder stays registered as ``backbone``
(checkpoint keys unchanged) and the cache sits beside it as ``feature_cache`` (:func:`frozen_encoder`).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..diskcache import BoundedDir
from ..errors import FdsError
from ..io import canonical_json
from .backbones import state_fingerprint

DEFAULT_MAX_BYTES = 2 << 30
DEFAULT_DISK_BYTES = 16 << 30


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(float(raw)) if raw else default
    except ValueError:
        raise FdsError(f"${name}={raw!r} is not a number of bytes (e.g. 2e9)") from None


def _env_on() -> bool:
    return os.environ.get("FDSBENCH_FEATURE_CACHE", "on").lower() not in ("0", "off", "false", "no")


class FeatureStore:
    """Tensors by key: an LRU in memory bounded by ``max_bytes`` and a directory bounded by
    ``disk_max_bytes`` (module docstring). Thread-safe; tensors are kept on ``device`` (host memory
    by default, so a cache never counts toward a GPU's peak memory)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, disk_dir: str | os.PathLike | None = None,
                 disk_max_bytes: int = DEFAULT_DISK_BYTES, device: str | torch.device = "cpu", enabled: bool = True):
        self.max_bytes = int(max_bytes)
        self.disk = BoundedDir(disk_dir, disk_max_bytes, ".pt") if disk_dir is not None else None
        self.device = torch.device(device)
        self.enabled = enabled
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def disk_dir(self) -> Path | None:
        return self.disk.folder if self.disk is not None else None

    # ---- memory --------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[torch.Tensor | None, str]:
        """(tensor, "memory" | "disk") or (None, "")."""
        with self._lock:
            t = self._mem.get(key)
            if t is not None:
                self._mem.move_to_end(key)
                return t, "memory"
        t = self._disk_get(key)
        if t is None:
            return None, ""
        self._mem_put(key, t)
        return t, "disk"

    def put(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().to(self.device, copy=True)
        self._mem_put(key, t)
        self._disk_put(key, t)

    def _mem_put(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._mem[key] = t
            self._bytes += n
            while self._bytes > self.max_bytes:
                _, gone = self._mem.popitem(last=False)
                self._bytes -= gone.numel() * gone.element_size()

    # ---- disk ----------------------------------------------------------------------------------
    def _disk_get(self, key: str) -> torch.Tensor | None:
        data = self.disk.read(key) if self.disk is not None else None
        if data is None:
            return None
        try:
            t = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated/corrupt file is recomputed and rewritten
            return None
        return t if isinstance(t, torch.Tensor) else None

    def _disk_put(self, key: str, t: torch.Tensor) -> None:
        if self.disk is not None:
            buf = io.BytesIO()
            torch.save(t.to("cpu"), buf)
            self.disk.write(key, buf.getvalue())

    # ---- housekeeping --------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"entries": len(self._mem), "bytes": self._bytes, "max_bytes": self.max_bytes,
                "disk_dir": str(self.disk_dir) if self.disk else None,
                "disk_max_bytes": self.disk.max_bytes if self.disk else None,
                "disk_skipped": self.disk.skipped if self.disk else 0}

    def clear(self, disk: bool = False) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0
        if disk and self.disk is not None:
            self.disk.clear()


_SHARED = FeatureStore(enabled=False)


def shared_store() -> FeatureStore:
    """The process-wide store every :meth:`CachedBackbone.shared` wrapper uses (off until enabled)."""
    return _SHARED


def enable_shared(disk_dir: str | os.PathLike | None = None, max_bytes: int | None = None,
                  disk_max_bytes: int | None = None) -> FeatureStore:
    """Switch the process-wide store on (memory, and ``disk_dir`` if given); the environment's
    ``FDSBENCH_FEATURE_CACHE*`` settings win (module docstring). Returns the store."""
    s = _SHARED
    with s._lock:
        s.enabled = _env_on()
        s.max_bytes = _env_bytes("FDSBENCH_FEATURE_CACHE_BYTES", DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        bound = _env_bytes("FDSBENCH_FEATURE_CACHE_DISK_BYTES",
                           DEFAULT_DISK_BYTES if disk_max_bytes is None else disk_max_bytes)
        where = os.environ.get("FDSBENCH_FEATURE_CACHE_DIR") or disk_dir
        s.disk = BoundedDir(where, bound, ".pt") if where else None
    return s


def disable_shared() -> None:
    """Switch the process-wide store off and drop what it holds in memory."""
    _SHARED.enabled = False
    _SHARED.clear()


class CachedBackbone:
    """Cache wrapper with the wrapped backbone's ``forward_features(x, layers, **options)`` signature.

    Counters (:meth:`stats`): ``hits`` / ``disk_hits`` / ``misses`` count batches (all taps from
    memory / some from disk, none encoded / encoded), ``forward_calls`` calls of the wrapped backbone,
    ``images`` the images it encoded."""

    def __init__(self, backbone, max_bytes: int = DEFAULT_MAX_BYTES, disk_dir: str | os.PathLike | None = None,
                 store: FeatureStore | None = None, disk_max_bytes: int = DEFAULT_DISK_BYTES):
        if not getattr(backbone, "frozen", False):
            raise FdsError(f"feature cache needs a frozen backbone; '{getattr(backbone, 'name', backbone)}' "
                           "is trainable (build it with frozen=True or do not cache it)")
        self.backbone = backbone
        self.store = store if store is not None else FeatureStore(max_bytes, disk_dir, disk_max_bytes)
        self._fingerprint: str | None = None
        self._defaults: dict | None = None
        backbone.register_load_state_dict_post_hook(self._forget_weights)
        self.hits = self.disk_hits = self.misses = self.forward_calls = self.images = 0

    @classmethod
    def shared(cls, backbone) -> "CachedBackbone":
        """A wrapper on the process-wide store (a pass-through while that store is off)."""
        return cls(backbone, store=_SHARED)

    @classmethod
    def from_env(cls, backbone) -> "CachedBackbone":
        """A private store configured by the ``$FDSBENCH_FEATURE_CACHE*`` variables (module docstring)."""
        return cls(backbone, store=FeatureStore(_env_bytes("FDSBENCH_FEATURE_CACHE_BYTES", DEFAULT_MAX_BYTES),
                                                os.environ.get("FDSBENCH_FEATURE_CACHE_DIR") or None,
                                                _env_bytes("FDSBENCH_FEATURE_CACHE_DISK_BYTES", DEFAULT_DISK_BYTES),
                                                enabled=_env_on()))

    def __getattr__(self, item):  # name, provenance, strides, channels, feature_spec, ...
        if item == "backbone":
            raise AttributeError(item)
        return getattr(self.backbone, item)

    def __deepcopy__(self, memo):  # a copied model shares the store, not the lock
        return CachedBackbone(copy.deepcopy(self.backbone, memo), store=self.store)

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    # ---- keys ----------------------------------------------------------------------------------
    def _forget_weights(self, module, incompatible) -> None:
        self._fingerprint = None

    def weights_fingerprint(self) -> str:
        """sha256 over the encoder's state dict (names, shapes, dtypes, bytes), computed once."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.backbone, length=64)
        return self._fingerprint

    def _context(self, x: torch.Tensor) -> dict:
        """Everything besides weights and input that changes the encoder's numbers."""
        p = next(self.backbone.parameters(), None)
        dev = x.device.type
        ctx = {"encoder": self.backbone.name, "weights": self.weights_fingerprint(),
               "param_dtype": str(p.dtype) if p is not None else None, "device": dev, "torch": torch.__version__,
               "autocast": str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None,
               "matmul_precision": torch.get_float32_matmul_precision()}
        if dev == "cpu":
            ctx["threads"] = torch.get_num_threads()
        elif dev == "cuda":
            ctx.update(gpu=torch.cuda.get_device_name(x.device), cudnn_tf32=torch.backends.cudnn.allow_tf32,
                       matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
        return ctx

    @staticmethod
    def tensor_digest(t: torch.Tensor) -> str:
        """sha256 of a tensor's shape, dtype and bytes."""
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def _options(self, options: dict) -> dict:
        """The call's options with the backbone's defaults filled in (``norm=False`` == not given)."""
        if self._defaults is None:
            params = inspect.signature(self.backbone.forward_features).parameters.values()
            self._defaults = {p.name: p.default for p in params
                              if p.name not in ("x", "layers") and p.default is not inspect.Parameter.empty}
        return {**self._defaults, **options}

    def keys_for(self, x: torch.Tensor, layers, **options) -> list[str]:
        """One key per requested tap (module docstring)."""
        prefix = canonical_json({**self._context(x), "options": self._options(options)})
        content = self.tensor_digest(x)
        return [hashlib.sha256(f"{prefix}|tap:{tap}|batch:{content}".encode()).hexdigest()
                for tap in self.backbone.normalize_layers(layers)]

    # ---- the API -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, layers=None, **options) -> list[torch.Tensor]:
        """Same result as ``backbone.forward_features(x, layers, **options)``, bit for bit; taps of
        a batch seen before are not encoded again (a partial hit encodes only the missing taps)."""
        if not self.store.enabled:
            self.forward_calls += 1
            self.images += x.shape[0]
            return self.backbone.forward_features(x, layers, **options)
        taps = list(self.backbone.normalize_layers(layers))
        keys = self.keys_for(x, layers, **options)
        out: list[torch.Tensor | None] = []
        disk = False
        for k in keys:
            t, where = self.store.get(k)
            disk |= where == "disk"
            out.append(None if t is None else t.to(x.device, copy=True))  # the caller may write into it
        todo = [i for i, t in enumerate(out) if t is None]
        if todo:
            computed = self.backbone.forward_features(x, [taps[i] for i in todo], **options)
            self.forward_calls += 1
            self.images += x.shape[0]
            self.misses += 1
            for i, t in zip(todo, computed):
                self.store.put(keys[i], t)
                out[i] = t
        elif disk:
            self.disk_hits += 1
        else:
            self.hits += 1
        return out

    __call__ = forward_features

    def stats(self) -> dict:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses,
                "forward_calls": self.forward_calls, "images": self.images, **self.store.stats()}

    def clear(self, disk: bool = False):
        self.store.clear(disk)


def frozen_encoder(module):
    """The encoder a model's frozen-feature forward should call: its ``feature_cache`` at test time
    (``module.training`` False), its registered ``backbone`` while training (random training crops
    never recur; the cache would only fill up)."""
    cache = getattr(module, "feature_cache", None)
    return module.backbone if module.training or cache is None else cache


def share_features(method, disk_dir: str | os.PathLike | None) -> dict:
    """Enable the process-wide store for a benchmark run (memory + ``disk_dir``) and say, for the run
    record, whether ``method`` encodes through it (or through a private :class:`CachedBackbone`)."""
    store = enable_shared(disk_dir)
    encoders = set()
    for v in vars(method).values():
        found = [v] if isinstance(v, CachedBackbone) else []
        if isinstance(v, torch.nn.Module):
            found += [c for c in (getattr(m, "feature_cache", None) for m in v.modules())
                      if isinstance(c, CachedBackbone)]
        encoders.update(c.backbone.name for c in found if c.enabled)
    return {"used": bool(encoders), "encoders": sorted(encoders),
            **({"memory_max_bytes": store.max_bytes, "disk_max_bytes": store.disk.max_bytes if store.disk else 0}
               if encoders else {})}
