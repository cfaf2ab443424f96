"""What every shared backbone provides: frozen eval mode, provenance, strides and a
``forward_features`` that returns feature maps ``[B, C, h, w]``."""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Sequence

import torch
from torch import nn

from ...errors import FdsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM_INIT = "random-init"


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` for RGB in [0, 1], ``x`` of shape [B, 3, H, W] (all encoders here expect it)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def state_fingerprint(module: nn.Module, length: int = 16) -> str:
    """sha256 (truncated) over the names, shapes, dtypes and bytes of a module's state dict.

    Identifies random-init weights (which all read "random-init" in provenance) for the feature
    cache, so two different random inits never share cached features."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


class BackboneMixin:
    """Mixed into every backbone ``nn.Module``.

    Attributes set by :func:`fdsbench.blocks.backbones.build_backbone`:
    ``name`` (registry name), ``provenance`` ({"name", "sha256" or "random-init", "path"}),
    ``strides`` (layer -> stride in input pixels), ``channels`` (layer -> channels),
    ``frozen`` (True: requires_grad False, eval mode kept even if a parent calls ``.train()``,
    ``forward_features`` runs under ``torch.no_grad``)."""

    name: str = ""
    frozen: bool = False

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        nn.Module.train(self, False)
        return self

    def unfreeze(self):
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (BatchNorm statistics and dropout never change),
        # also when a parent model (e.g. SOFS with ``backbone`` as a submodule) calls .train().
        return nn.Module.train(self, False if self.frozen else mode)

    @property
    def weights_id(self) -> str:
        """sha256 of the weights file, or a fingerprint of the random-init state (cache key part)."""
        prov = getattr(self, "provenance", None) or {}
        sha = prov.get("sha256")
        if sha and sha != RANDOM_INIT:
            return sha
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = RANDOM_INIT + ":" + state_fingerprint(self)
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    def normalize_layers(self, layers) -> tuple:
        raise NotImplementedError

    def named_stages(self, layers, stages: tuple[str, ...], first: int) -> tuple[str, ...]:
        """``layers`` as stage names for encoders whose taps are the named stages ``stages``, which an
        integer may also name (``first`` numbers ``stages[0]``); ``None`` asks for the last stage."""
        if layers is None:
            return (stages[-1],)
        if isinstance(layers, (str, int)):
            layers = (layers,)
        out = []
        for layer in layers:
            if isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer - first < len(stages):
                layer = stages[layer - first]
            if layer not in stages:
                raise FdsError(f"{self.name}: unknown feature layer {layer!r}; use one of {', '.join(stages)} "
                               f"(or {first}..{first + len(stages) - 1})")
            out.append(layer)
        return tuple(out)

    def feature_spec(self, layers, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, h, w) of each requested map for an input of ``height`` x ``width``."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, layers: Sequence[Any] | None = None, **kw) -> list[torch.Tensor]:
        raise NotImplementedError

    def _grad_context(self):
        return torch.no_grad() if self.frozen else contextlib.nullcontext()
