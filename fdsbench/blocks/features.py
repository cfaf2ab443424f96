"""The frozen-feature cache: encoder features of an image are computed once and reused.

Supports recur across the episodes of a manifest and the 5 test runs repeat the same queries; a
frozen encoder gives the same features each time, so methods opt in by calling the SHARED backbone
through :class:`CachedBackbone` instead of caching themselves::

    bb = build_backbone("dinov2_vitb14", weights=...)            # frozen
    enc = CachedBackbone(bb, max_bytes=2 << 30, disk_dir=None)    # same forward_features API
    feats = enc.forward_features(x, layers=(5, 6, 7, 8, 9, 10))

Key of one image (one sample of the batch) = sha256 over: the encoder name, its weights id (file
sha256, or a fingerprint of the random-init state), the requested layers and options, the
parameter dtype, device type and autocast dtype (they change the numbers), the sample's shape and
dtype, and its content — the input tensor bytes (so the crop/window and the
preprocessing are part of it), or, if the caller passes ``keys=``, the caller's key (e.g. image
file sha256 + crop box) plus ``crop``. Memory is an LRU bounded in bytes; ``disk_dir`` adds a
persistent layer (one file per key, written atomically) shared by runs of the same manifest.

``CachedBackbone`` is deliberately NOT an ``nn.Module``: a method can keep the encoder registered
as ``backbone`` (its checkpoint keys stay the official ones) and hold the cache beside it.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import FdsError
from ..io import atomic_write_bytes, canonical_json

DEFAULT_MAX_BYTES = 2 << 30


class CachedBackbone:
    """Cache wrapper with the wrapped backbone's ``forward_features`` signature (plus ``keys``/``crop``).

    Counters (``stats()``): ``hits`` (memory), ``disk_hits``, ``misses`` (images encoded),
    ``forward_calls`` (calls of the wrapped backbone), ``bytes`` and ``entries`` in memory."""

    def __init__(self, backbone, max_bytes: int = DEFAULT_MAX_BYTES, disk_dir: str | os.PathLike | None = None,
                 store_device: str | torch.device | None = None):
        if not getattr(backbone, "frozen", False):
            raise FdsError(f"feature cache needs a frozen backbone; '{getattr(backbone, 'name', backbone)}' "
                           "is trainable (build it with frozen=True or do not cache it)")
        self.backbone = backbone
        self.max_bytes = int(max_bytes)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.store_device = torch.device(store_device) if store_device is not None else None
        self._mem: OrderedDict[str, tuple[list[torch.Tensor], int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.disk_hits = self.misses = self.forward_calls = 0

    @classmethod
    def from_env(cls, backbone) -> "CachedBackbone":
        """Limits from ``$FDSBENCH_FEATURE_CACHE_BYTES`` and ``$FDSBENCH_FEATURE_CACHE_DIR``."""
        return cls(backbone, int(os.environ.get("FDSBENCH_FEATURE_CACHE_BYTES", DEFAULT_MAX_BYTES)),
                   os.environ.get("FDSBENCH_FEATURE_CACHE_DIR") or None)

    def __getattr__(self, item):  # name, provenance, strides, channels, feature_spec, ...
        if item == "backbone":
            raise AttributeError(item)
        return getattr(self.backbone, item)

    # ---- keys ----------------------------------------------------------------------------------------
    def _prefix(self, x: torch.Tensor, layers, options: dict) -> bytes:
        bb = self.backbone
        p = next(bb.parameters(), None)
        dev = x.device.type
        # numerics: parameter dtype, device type and autocast state change the features slightly
        autocast = str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
        return canonical_json({"encoder": bb.name, "weights": bb.weights_id,
                               "layers": [str(v) for v in bb.normalize_layers(layers)],
                               "options": options, "param_dtype": str(p.dtype) if p is not None else None,
                               "device": dev, "autocast": autocast}).encode()

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

    def keys_for(self, x: torch.Tensor, layers, keys: Sequence[str] | None = None, crop: Any = None,
                 **options) -> list[str]:
        prefix = self._prefix(x, layers, options)
        out = []
        for i in range(x.shape[0]):
            if keys is not None:
                content = f"key:{keys[i]}|crop:{canonical_json(crop)}|{tuple(x.shape[1:])}|{x.dtype}"
            else:
                content = "tensor:" + self.tensor_digest(x[i]) + f"|crop:{canonical_json(crop)}"
            out.append(hashlib.sha256(prefix + b"|" + content.encode()).hexdigest())
        return out

    # ---- storage -------------------------------------------------------------------------------------
    def _mem_get(self, key):
        item = self._mem.get(key)
        if item is None:
            return None
        self._mem.move_to_end(key)
        return item[0]

    def _mem_put(self, key, feats: list[torch.Tensor]):
        n = sum(t.numel() * t.element_size() for t in feats)
        if n > self.max_bytes:
            return
        if key in self._mem:
            self._bytes -= self._mem.pop(key)[1]
        self._mem[key] = (feats, n)
        self._bytes += n
        while self._bytes > self.max_bytes:
            _, (_, m) = self._mem.popitem(last=False)
            self._bytes -= m

    def _disk_path(self, key) -> Path:
        return self.disk_dir / key[:2] / f"{key}.pt"

    def _disk_get(self, key):
        if self.disk_dir is None:
            return None
        p = self._disk_path(key)
        if not p.is_file():
            return None
        try:
            return list(torch.load(p, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 - a truncated/corrupt cache file is recomputed and rewritten
            return None

    def _disk_put(self, key, feats):
        if self.disk_dir is None:
            return
        buf = io.BytesIO()
        torch.save([t.to("cpu") for t in feats], buf)
        atomic_write_bytes(self._disk_path(key), buf.getvalue())

    # ---- the API ------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, layers=None, *, keys: Sequence[str] | None = None,
                         crop: Any = None, **options) -> list[torch.Tensor]:
        """Same result as ``backbone.forward_features(x, layers, **options)``; images seen before
        (same key) are not encoded again. Misses of one call are encoded in one backbone call."""
        if keys is not None and len(keys) != x.shape[0]:
            raise FdsError(f"feature cache: {len(keys)} keys for a batch of {x.shape[0]} images")
        ks = self.keys_for(x, layers, keys, crop, **options)
        per_sample: list[list[torch.Tensor] | None] = [None] * len(ks)
        todo = []
        for i, k in enumerate(ks):
            f = self._mem_get(k)
            if f is not None:
                self.hits += 1
            else:
                f = self._disk_get(k)
                if f is not None:
                    self.disk_hits += 1
                    f = [t.to(self.store_device or x.device) for t in f]
                    self._mem_put(k, f)
            if f is None:
                todo.append(i)
            per_sample[i] = f
        if todo:
            # one image may occur twice in a batch: encode each distinct key once
            first = {}
            for i in todo:
                first.setdefault(ks[i], i)
            idx = list(first.values())
            out = self.backbone.forward_features(x[idx], layers, **options)
            self.forward_calls += 1
            self.misses += len(idx)
            for j, i in enumerate(idx):
                f = [t[j].detach().clone() for t in out]
                if self.store_device is not None:
                    f = [t.to(self.store_device) for t in f]
                self._mem_put(ks[i], f)
                self._disk_put(ks[i], f)
                for i2 in todo:
                    if ks[i2] == ks[i]:
                        per_sample[i2] = f
        n_layers = len(per_sample[0])
        return [torch.stack([s[li] for s in per_sample]).to(x.device) for li in range(n_layers)]

    __call__ = forward_features

    def stats(self) -> dict:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses,
                "forward_calls": self.forward_calls, "entries": len(self._mem), "bytes": self._bytes,
                "max_bytes": self.max_bytes}

    def clear(self, disk: bool = False):
        self._mem.clear()
        self._bytes = 0
        if disk and self.disk_dir is not None and self.disk_dir.is_dir():
            for p in self.disk_dir.glob("*/*.pt"):
                p.unlink()
