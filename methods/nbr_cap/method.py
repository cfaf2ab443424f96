"""NBR+CaP U-Net as an fdsbench method: ``prepare`` fits AlbuNet-34 on the episode's K support
images plus the product's normal pool, ``predict`` is one forward pass.

Fitted weights are cached under ``self.workdir`` keyed by (class, support ids, seed, config hash,
encoder weights, normal pool ids, CPU thread count), so an episode with the same supports does not refit."""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from fdsbench.blocks.backbones import build_backbone
from fdsbench.blocks.inference import probability_map
from fdsbench.config import config_dict, config_hash
from fdsbench.errors import FdsError
from fdsbench.io import atomic_write_bytes, content_hash
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Query, Requirements, SupportSet
from fdsbench.seeding import cpu_threads

from . import train as T
from .model import AlbuNet34

#: the paper's ablation models (Tables V-VII) as config overrides
ABLATIONS: dict[str, dict[str, str]] = {
    "B": {"nbr": "off", "cap": "unweighted"},  # AlbuNet + CaP at p 0.5, plain BCE
    "B+NBR": {"nbr": "cosine", "cap": "off"},  # NBR + plain BCE on I_d every step
    "B+NBR+CaP": {"nbr": "cosine", "cap": "weighted"},  # the full method (default)
    "lambda1": {"nbr": "cosine", "cap": "unweighted"},  # full method with λ ≡ 1 (Table VI)
    "euclidean": {"nbr": "euclidean", "cap": "weighted"},  # L_NBR = ‖b − f‖₂ (Table VII)
}

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                "area": Image.BOX}


@dataclass
class NBRCaPConfig:
    """Paper defaults ([P]) and our assumptions (◊) — all recorded in the run record."""

    weights: str = "default"  # ◊ ImageNet ResNet-34 from the weights table; "random"; or a file path
    input_size: int = 512  # [P] images and masks resized to 512 x 512 (multiple of 64)
    iterations: int = 1350  # [P] optimiser steps (inner iterations of Algorithm 1, ◊)
    batch_size: int = 0  # [P] m in both branches; 0 = paper: 2 for 1-shot, 4 otherwise (5-shot)
    lr: float = 1e-4  # [P] Adam
    betas: tuple = (0.9, 0.999)  # [P]
    weight_decay: float = 0.0  # ◊ none
    nbr: str = "cosine"  # [P] cosine | euclidean (ablation) | off
    cap: str = "weighted"  # [P] weighted (λ of eq. 6) | unweighted (λ ≡ 1) | off
    cap_prob: float = 0.5  # [P] CaP branch when u > 1 - cap_prob, u ~ U[0, 1] once per step
    lambda_detach: bool = True  # ◊ λ is a constant weight
    nbr_feature: str = "conv5"  # ◊ encoder map F used by NBR and λ (layer4 output)
    nbr_mask_downsample: str = "max"  # ◊ M̂: max (any pixel) | nearest | area
    nbr_pooling: str = "gap"  # [P] GAP over all cells (eq. 2) | masked_mean
    bce_reduction: str = "mean"  # ◊ mean over pixels (paper's eqs. sum: "sum")
    bn_train: bool = True  # ◊ BatchNorm in train mode while fitting
    bn_joint: bool = True  # ◊ one encoder pass over cat[I_d, I_n, I_cap] (False: separate passes)
    resample_defect_every_step: bool = False  # ◊ False: one pass over the normal pool per defect batch
    stem_pool: int = 2  # ◊ AlbuNet stem max-pool k (2 reference, 3 ResNet)
    input_norm: str = "imagenet"  # ◊ imagenet mean/std | none
    image_resize: str = "bilinear"  # ◊ PIL filter for images (antialiased when shrinking)
    mask_resize: str = "nearest"  # ◊ nearest | max (a pixel is defect if any source pixel is)
    final_bias_prior: float = 0.0  # ours: 0 = PyTorch's init of the final conv; p > 0 = bias log(p / (1 - p))
    crop_size: int = 0  # ours: 0 = train on the whole S x S image [P]; c > 0 = on c x c windows holding the defect
    cache: bool = True  # keep fitted weights under workdir (fp32, ~139 MB per fit)


@register_method("nbr_cap")
class NBRCaP(Method):
    """Lin et al., few-shot defect segmentation with NBR and CaP (paper Algorithm 1)."""

    requires = Requirements(normal_pool=True, weights=("resnet34",), fad=False, gpu_recommended=True)
    Config = NBRCaPConfig
    default_protocol = "per_support"  # K supports per (class, seed), all other images as queries
    presets = {
        "paper": {},
        # ours, CPU-sized (`make bench METHOD=nbr_cap` on 2 cores in < 10 min, README "The cpu preset"):
        # 80 steps of m = 1 on 64 x 64 windows holding the defect of the 384 x 384 images, prediction on the
        # whole image, final bias at a 1 % defect prior, lr 1e-3 (random init), masks max-pooled
        "cpu": {"weights": "random", "input_size": 384, "crop_size": 64, "iterations": 80, "batch_size": 1,
                "lr": 1e-3, "final_bias_prior": 0.01, "mask_resize": "max"},
        "test": {"weights": "random", "input_size": 64, "iterations": 3, "cache": False},
    }
    default_preset = "cpu"

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        if c.input_size < 64 or c.input_size % 64:
            raise FdsError(f"nbr_cap: input_size must be a positive multiple of 64 (got {c.input_size})")
        if c.crop_size < 0 or c.crop_size % 64:
            raise FdsError(f"nbr_cap: crop_size must be 0 (whole image) or a positive multiple of 64 "
                           f"(got {c.crop_size})")
        if not 0.0 <= c.final_bias_prior < 1.0:
            raise FdsError(f"nbr_cap: final_bias_prior is a defect probability in [0, 1) (got {c.final_bias_prior})")
        if c.image_resize not in _PIL_FILTERS:
            raise FdsError(f"nbr_cap: unknown image_resize '{c.image_resize}'; use {', '.join(_PIL_FILTERS)}")
        if c.mask_resize not in ("nearest", "max"):
            raise FdsError(f"nbr_cap: unknown mask_resize '{c.mask_resize}'; use nearest or max")
        self._provenance: dict | None = None

    # ---- preprocessing -------------------------------------------------------------------------
    def _image(self, img: np.ndarray) -> torch.Tensor:
        """RGB uint8 [H, W, 3] -> uint8 [3, S, S]."""
        s = self.config.input_size
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise FdsError(f"nbr_cap: expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
        if img.shape[:2] != (s, s):
            img = np.asarray(Image.fromarray(img).resize((s, s), _PIL_FILTERS[self.config.image_resize]))
        return torch.tensor(img).permute(2, 0, 1).contiguous()

    def _mask(self, mask: np.ndarray) -> torch.Tensor:
        """bool [H, W] -> float {0, 1} [1, S, S]."""
        s = self.config.input_size
        m = torch.from_numpy(np.asarray(mask, bool).astype(np.float32))[None, None]
        if m.shape[-2:] != (s, s):
            if self.config.mask_resize == "max" and m.shape[-2] >= s and m.shape[-1] >= s:
                m = F.adaptive_max_pool2d(m, (s, s))
            else:
                m = F.interpolate(m, size=(s, s), mode="nearest")
        return (m[0] > 0.5).float()

    # ---- encoder and cache ---------------------------------------------------------------------
    def _encoder(self, seed: int):
        w = self.config.weights
        enc = build_backbone("resnet34", weights=w, frozen=False, seed=seed if w == "random" else None)
        self._provenance = dict(enc.provenance)
        return enc

    def weights_provenance(self) -> dict[str, str]:
        if self.config.weights == "random":
            return {"resnet34": "random-init"}
        if self._provenance is None:
            self._encoder(0)
        return {"resnet34": self._provenance["sha256"]}

    def build(self, seed: int) -> AlbuNet34:
        """The untrained AlbuNet-34 of an episode (decoder and random encoder init drawn from ``seed``).

        ``final_bias_prior`` p > 0 starts the final conv's bias at log(p / (1 - p)), so the first
        steps do not spend themselves on learning that almost every pixel is background (the prior
        initialisation of Lin et al., focal loss, ICCV 2017)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AlbuNet34(self._encoder(seed), stem_pool=self.config.stem_pool)
        p = self.config.final_bias_prior
        if p > 0:
            with torch.no_grad():
                model.final.bias.fill_(math.log(p / (1.0 - p)))
        return model

    def batch_size(self, k: int) -> int:
        """m: the configured one, else the paper's (2 for 1-shot, 4 for 5-shot)."""
        return self.config.batch_size if self.config.batch_size > 0 else (2 if k == 1 else 4)

    def cache_key(self, support: SupportSet) -> str:
        pool = support.normal_pool
        return content_hash({
            "class": support.class_key, "supports": [s.id for s in support.shots], "seed": int(support.seed),
            "config": config_hash(self.config), "weights": self.weights_provenance()["resnet34"],
            "normal_pool": content_hash(list(getattr(pool, "ids", []))), **cpu_threads(self.device),
        })

    def cache_path(self, support: SupportSet) -> Path | None:
        if self.workdir is None or not self.config.cache:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", support.class_key)
        return Path(self.workdir) / f"{safe}_{self.cache_key(support)}.pt"

    # ---- the contract --------------------------------------------------------------------------
    def prepare(self, support: SupportSet) -> "Fitted":
        pool = support.normal_pool
        if pool is None or len(pool) == 0:
            raise FdsError(f"nbr_cap needs defect-free images of product '{support.object}' and the dataset "
                           "has no normal pool for it: report N/A (another product's normals are never used)")
        if not support.shots:
            raise FdsError(f"nbr_cap: episode {support.episode} of {support.class_key} has no support image")
        seed = int(support.seed)
        model = self.build(seed)
        path = self.cache_path(support)
        if path is not None and path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["model"])
            model.to(self.device).eval()
            return Fitted(model, T.FitLog.from_dict(blob["log"]), from_cache=True, path=path)

        images = torch.stack([self._image(s.image) for s in support.shots])
        masks = torch.stack([self._mask(s.mask) for s in support.shots])
        resized: dict[int, torch.Tensor] = {}

        def normal_image(i: int) -> torch.Tensor:  # decoded and resized lazily, once
            if i not in resized:
                resized[i] = self._image(pool[i])
            return resized[i]

        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            log = T.fit(model, images, masks, normal_image, len(pool), self.config,
                        self.batch_size(len(support.shots)), rng, device=self.device)
        if path is not None:
            buf = io.BytesIO()
            torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "log": log.to_dict(), "class": support.class_key,
                        "supports": [s.id for s in support.shots], "seed": seed,
                        "config": config_dict(self.config)}, buf)
            atomic_write_bytes(path, buf.getvalue())
        return Fitted(model, log, from_cache=False, path=path)

    @torch.no_grad()
    def predict(self, state: "Fitted", query: Query) -> np.ndarray:
        """Sigmoid probability at the query's original size (bilinear on p)."""
        h, w = query.size
        x = T.to_input(self._image(query.image)[None], self.config.input_norm).to(self.device)
        state.model.eval()
        p = torch.sigmoid(state.model(x).float())
        if p.shape[-2:] != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        return probability_map(p[0, 0])


@dataclass
class Fitted:
    """What ``prepare`` returns: the fitted network (eval mode) and its training log."""

    model: AlbuNet34
    log: Any
    from_cache: bool = False
    path: Path | None = None
