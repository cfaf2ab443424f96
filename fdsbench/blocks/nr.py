"""Episodic training data for meta-trained FSS methods: the SOFS non-resizing (NR) sampler and the
plain-resizing alternative (SOFS paper §3.2.2, Table 1), usable by SOFS and the PFENet/HDMNet + NR
variants.

One item per (image, class) pair of the base folds (``TrainSource.samples``; each pair is a query
once per epoch). For an item:

* supports: ``shot`` other images of the same class (without replacement when enough exist);
* NR on: a query whose own defect area ratio exceeds ``area_resize_ratio`` is used
  whole; otherwise ONE crop of ``crop_size`` (:func:`fdsbench.crops.sample_crop`) centred on
  a NON-defect pixel with probability ``alpha`` (a "normal" query; its target may still contain
  defect pixels) or on a defect pixel otherwise. A large support is used whole and repeated
  ``s_in_shot`` times; a small one gives ``s_in_shot`` independent defect-centred crops;
* NR off: every support and the query are whole images, one view per support image;
* then, independently per view, the official training augmentations and tensor preparation
  (ResizeLongestSide + normalise + pad; masks resized, /max, > 0.1).

Randomness comes from a generator seeded by (seed, epoch, position) only, so items are the same
whatever the worker count or batch size (``Dataset``-style ``__getitem__``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..crops import sample_crop
from ..errors import FdsError
from ..seeding import derive_seed
from .tiling import IMAGENET_MEAN, image_to_tensor, mask_to_tensor
from ..types import TrainSource, crop


# ---- augmentations (official SOFS ``datasets/transform_tri.py``) -------------------------------
def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.1) -> np.ndarray:
    """ColorJitter(b, c, s, h): factors U[1-x, 1+x] (hue U[-h, h]) applied in a random order."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    im = Image.fromarray(image)
    ops = [
        lambda x: TF.adjust_brightness(x, float(rng.uniform(1 - brightness, 1 + brightness))),
        lambda x: TF.adjust_contrast(x, float(rng.uniform(1 - contrast, 1 + contrast))),
        lambda x: TF.adjust_saturation(x, float(rng.uniform(1 - saturation, 1 + saturation))),
        lambda x: TF.adjust_hue(x, float(rng.uniform(-hue, hue))),
    ]
    for i in rng.permutation(4):
        im = ops[i](im)
    return np.asarray(im)


def rotate(image: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the centre on the same canvas: image bilinear with border = ImageNet mean * 255,
    mask nearest with border 0."""
    from PIL import Image

    fill = tuple(int(round(v * 255)) for v in IMAGENET_MEAN)
    im = Image.fromarray(image).rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
    m = Image.fromarray(mask.astype(np.uint8) * 255).rotate(angle, resample=Image.NEAREST, fillcolor=0)
    return np.asarray(im), np.asarray(m) > 127


def gaussian_blur(image: np.ndarray, kernel: int = 5) -> np.ndarray:
    """k x k Gaussian blur with the sigma OpenCV derives from the kernel size (1.1 for k = 5)."""
    import torchvision.transforms.functional as TF

    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma]).permute(1, 2, 0).numpy()


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The official order: ColorJitter p=.3, rotation U(-10,10) p=.5, blur 5x5 p=.3, h-flip p=.5."""
    if rng.random() < 0.3:
        image = color_jitter(image, rng)
    if rng.random() < 0.5:
        image, mask = rotate(image, mask, float(rng.uniform(-10, 10)))
    if rng.random() < 0.3:
        image = gaussian_blur(image)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ---- the sampler ------------------------------------------------------------------------------
@dataclass
class NRSettings:
    image_size: int = 518  # model input side (ResizeLongestSide target)
    crop_size: int = 518  # crop side at native resolution
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # training crop-scale jitter U(a, b) (yaml: [1, 1])
    shot: int = 1
    s_in_shot: int = 4  # crops per support image (1-shot: 4; 5-shot: 1)
    area_resize_ratio: float = 0.01  # "large" defect threshold (SOFS paper appendix A.2)
    alpha: float = 0.3  # probability of a normal query crop
    augment: bool = True
    nr: bool = True  # False: plain-resizing protocol


class EpisodeSampler:
    """Training episodes from a TrainSource (see module docstring). ``len`` = items per epoch."""

    def __init__(self, train: TrainSource, settings: NRSettings, seed: int = 0, cache_size: int = 0):
        self.train, self.s, self.seed = train, settings, int(seed)
        # a query needs another image of its class as support (the official loader loops forever)
        self.items = [(i, c) for (i, c) in train.samples if len(train.images_of.get(c, ())) >= 2]
        if not self.items:
            raise FdsError(f"training data of dataset '{train.dataset}' fold {train.fold} has no class with "
                           f"two or more images; episodic training needs a support image besides the query")
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = int(cache_size)

    def __len__(self) -> int:
        return len(self.items)

    # ---- decoding (optionally cached) --------------------------------------------------------
    def _get(self, key, fn):
        if self._cache_size <= 0:
            return fn()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        val = fn()
        self._cache[key] = val
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return val

    def load(self, image_id: str, cls: str) -> tuple[np.ndarray, np.ndarray]:
        img = self._get(("i", image_id), lambda: self.train.load_image(image_id))
        mask = self._get(("m", image_id, cls), lambda: np.asarray(self.train.load_mask(image_id, cls), bool))
        if mask.shape != img.shape[:2]:
            raise FdsError(f"mask of class {cls} for image {image_id} is {mask.shape}, image is {img.shape[:2]}")
        return img, mask

    # ---- views ---------------------------------------------------------------------------------
    def _crop_size(self, rng) -> int:
        a, b = self.s.crop_ratio
        return int(self.s.crop_size * (rng.uniform(a, b) if b > a else a))

    def query_view(self, img, mask, rng) -> tuple[np.ndarray, np.ndarray]:
        if not self.s.nr or mask.mean() > self.s.area_resize_ratio:
            return img, mask
        normal = rng.random() < self.s.alpha
        box = sample_crop(mask, self._crop_size(rng), rng, centre_on_defect=not normal)
        return crop(img, box), crop(mask, box)

    def support_views(self, img, mask, rng) -> list[tuple[np.ndarray, np.ndarray]]:
        if not self.s.nr:
            return [(img, mask)]
        if mask.mean() > self.s.area_resize_ratio:
            return [(img, mask)] * self.s.s_in_shot
        boxes = [sample_crop(mask, self._crop_size(rng), rng) for _ in range(self.s.s_in_shot)]
        return [(crop(img, b), crop(mask, b)) for b in boxes]

    def draw_supports(self, query_id: str, cls: str, rng) -> list[str]:
        pool = [i for i in self.train.images_of[cls] if i != query_id]
        k = self.s.shot
        if len(pool) >= k:
            return [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
        return [pool[j] for j in rng.integers(0, len(pool), size=k)]

    def _prepare(self, img, mask, rng):
        if self.s.augment:
            img, mask = augment(img, mask, rng)
        x, _ = image_to_tensor(img, self.s.image_size)
        return x, mask_to_tensor(mask, self.s.image_size)

    def episode(self, position: int, epoch: int = 0, rng: np.random.Generator | None = None) -> dict:
        """One training episode: query [3,S,S], query_mask [1,S,S], supports [K',3,S,S],
        support_masks [K',1,S,S] (K' = shot * s_in_shot with NR, shot without)."""
        rng = rng or np.random.default_rng(derive_seed("nr", self.seed, epoch, position))
        qid, cls = self.items[position]
        cname = cls.split("/", 1)[1] if "/" in cls else cls
        q_img, q_mask = self.load(qid, cls)
        qx, qy = self._prepare(*self.query_view(q_img, q_mask, rng), rng)
        sx, sy = [], []
        for sid in self.draw_supports(qid, cls, rng):
            s_img, s_mask = self.load(sid, cls)
            for v_img, v_mask in self.support_views(s_img, s_mask, rng):
                x, y = self._prepare(v_img, v_mask, rng)
                sx.append(x)
                sy.append(y)
        return {"query": qx, "query_mask": qy, "supports": torch.stack(sx), "support_masks": torch.stack(sy),
                "class": cls, "query_id": qid, "class_name": cname}

    def __getitem__(self, position: int) -> dict:
        return self.episode(position, getattr(self, "epoch", 0))

    # ---- epochs ------------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """Shuffled item order of an epoch (each (image, class) pair once)."""
        return [int(i) for i in np.random.default_rng(derive_seed("order", self.seed, epoch)).permutation(len(self))]

    def n_batches(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self) / batch_size
        return max(1, int(n) if drop_last else math.ceil(n))

    def batches(self, epoch: int, batch_size: int, drop_last: bool = True) -> Iterator[dict]:
        """Collated episodic batches of an epoch (drop_last as the official DistributedSampler
        loader; a dataset smaller than one batch still gives one batch)."""
        order = self.order(epoch)
        nb = self.n_batches(batch_size, drop_last)
        for b in range(nb):
            idx = order[b * batch_size: (b + 1) * batch_size]
            yield collate([self.episode(i, epoch) for i in idx])


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("query", "query_mask", "supports", "support_masks")}
    out["class"] = [it["class"] for it in items]
    out["query_id"] = [it["query_id"] for it in items]
    return out
