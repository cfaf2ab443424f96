"""The episodic training data of the classic FSS recipes (PFENet, and the BAM-style pipeline HDMNet
inherits): class lists filtered by object size, one query per listed image and epoch, K distinct
supports, labels binarised with 255 kept as "ignore", and the OpenCV train transform
(PFENet, Tian et al. TPAMI 2020, §5.1 "Implementation details"; the released data loader).

* Lists: a class is kept for an image only if it covers at least ``min_pixels`` pixels at the
  original resolution (2·32·32: the object survives a 1/32 downsampling with more than two cells);
  images with no kept class are dropped.
* Episode: the query is the next image of the epoch's shuffled list; its class is drawn uniformly
  among the image's classes (all of them: the size filter only governs the support lists); the K
  supports are distinct images of the class's list, never the query. Labels: 1 = the class,
  0 = everything else, 255 (padding, rotation border, ignored pixels) kept.
* Transform, independently for the query and each support: RandScale → RandRotate → Gaussian blur
  → horizontal flip → random crop with foreground-keeping re-draws (or, BAM/HDMNet, a plain resize)
  → normalisation with the ImageNet mean/std on the 0–255 scale.

Every random draw comes from a NumPy generator seeded by (seed, epoch, position) only, so the
episodes do not depend on the worker count or the batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import FdsError
from ..seeding import derive_seed
from ..types import TrainSource
from .nr import collate
from .tiling import IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255
MEAN_255 = [float(v) * 255 for v in IMAGENET_MEAN]  # padding / rotation border of the image
STD_255 = [float(v) * 255 for v in IMAGENET_STD]


@dataclass
class FSSSettings:
    size: int = 473  # training input side (crop or resize target)
    shot: int = 1
    min_pixels: int = 2 * 32 * 32  # a class is listed for an image only from this many pixels on
    scale: tuple = (0.9, 1.1)  # RandScale factor U(a, b)
    rotate: tuple = (-10.0, 10.0)  # RandRotate angle U(a, b), degrees
    rotate_p: float = 0.5
    blur_kernel: int = 5
    blur_p: float = 0.5
    flip_p: float = 0.5
    final: str = "crop"  # crop (PFENet) | resize (BAM/HDMNet: size x size, aspect not kept)
    crop_keep: float = 0.85  # re-draw the crop while it keeps less of the foreground than this
    crop_redraws: int = 31  # the official loop (``crop_cnt <= 30``) re-draws at most 31 times


# ---- the train transform (OpenCV, float32 image on the 0–255 scale) -----------------------------
def rand_scale(image, labels, rng, scale):
    """Resize by s ~ U(scale): image bilinear, labels nearest."""
    import cv2

    s = scale[0] + (scale[1] - scale[0]) * rng.random()
    image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    return image, [cv2.resize(y, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST) for y in labels]


def rand_rotate(image, labels, rng, angles, p):
    """With probability p, rotate by U(angles) degrees about the image centre on the same canvas:
    image bilinear with the mean colour as border, labels nearest with border 255."""
    import cv2

    if rng.random() >= p:
        return image, labels
    angle = angles[0] + (angles[1] - angles[0]) * rng.random()
    h, w = labels[0].shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=MEAN_255)
    return image, [cv2.warpAffine(y, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=IGNORE) for y in labels]


def rand_blur(image, rng, kernel, p):
    """With probability p, a k x k Gaussian blur (sigma derived from k by OpenCV)."""
    import cv2

    return cv2.GaussianBlur(image, (kernel, kernel), 0) if rng.random() < p else image


def rand_hflip(image, labels, rng, p):
    """With probability p, mirror left-right."""
    import cv2

    if rng.random() >= p:
        return image, labels
    return cv2.flip(image, 1), [cv2.flip(y, 1) for y in labels]


def rand_crop(image, labels, rng, size, keep=0.85, redraws=31):
    """Pad to at least size x size (centred; image with the mean colour, labels 255), then a random
    size x size window, re-drawn while it keeps less than ``keep`` of the first label's foreground
    (at most ``redraws`` times; the last draw is used)."""
    import cv2

    h, w = labels[0].shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        border = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
        image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=MEAN_255)
        labels = [cv2.copyMakeBorder(y, *border, cv2.BORDER_CONSTANT, value=IGNORE) for y in labels]
        h, w = labels[0].shape
    total = int((labels[0] == 1).sum())

    def window():
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        return top, left, int((labels[0][top:top + size, left:left + size] == 1).sum())

    top, left, kept = window()
    for _ in range(redraws):
        if kept >= keep * total:
            break
        top, left, kept = window()
    return image[top:top + size, left:left + size], [y[top:top + size, left:left + size] for y in labels]


def normalise(image: np.ndarray) -> torch.Tensor:
    """[H,W,3] 0–255 -> [3,H,W] float32, (x - mean) / std with the ImageNet values on the 0–255 scale."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(MEAN_255, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD_255, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def train_transform(image: np.ndarray, labels: list, rng, s: FSSSettings) -> tuple[torch.Tensor, list]:
    """RGB image (any dtype, converted to float32 0–255) and uint8 label maps (the first one is the
    binary 0/1/255 target the crop watches) -> normalised [3,S,S] and [S,S] float label tensors."""
    import cv2

    image = np.asarray(image, np.float32)
    labels = [np.ascontiguousarray(y, dtype=np.uint8) for y in labels]
    image, labels = rand_scale(image, labels, rng, s.scale)
    image, labels = rand_rotate(image, labels, rng, s.rotate, s.rotate_p)
    image = rand_blur(image, rng, s.blur_kernel, s.blur_p)
    image, labels = rand_hflip(image, labels, rng, s.flip_p)
    if s.final == "crop":
        image, labels = rand_crop(image, labels, rng, s.size, s.crop_keep, s.crop_redraws)
    else:
        image = cv2.resize(np.ascontiguousarray(image), (s.size, s.size), interpolation=cv2.INTER_LINEAR)
        labels = [cv2.resize(np.ascontiguousarray(y), (s.size, s.size), interpolation=cv2.INTER_NEAREST)
                  for y in labels]
    return normalise(image), [torch.from_numpy(np.ascontiguousarray(y)).float() for y in labels]


def binarise(mask: np.ndarray) -> np.ndarray:
    """Class mask -> uint8 label: 1 = the class, 0 = everything else, 255 kept as ignore (a bool
    mask has no ignore; an integer mask marks ignore with 255 and the class with any other nonzero)."""
    m = np.asarray(mask)
    if m.dtype == bool:
        return m.astype(np.uint8)
    return np.where(m == IGNORE, IGNORE, m != 0).astype(np.uint8)


# ---- the episodes ------------------------------------------------------------------------------
class FSSEpisodes:
    """Training episodes from a TrainSource (see the module docstring). ``len`` = listed images."""

    def __init__(self, train: TrainSource, settings: FSSSettings, seed: int = 0):
        if settings.final not in ("crop", "resize"):
            raise FdsError(f"fss episodes: final={settings.final!r} is not one of crop, resize")
        self.train, self.s, self.seed = train, settings, int(seed)
        classes_of: dict[str, list[str]] = {}
        self.lists: dict[str, list[str]] = {c: [] for c in train.classes}
        for image_id, cls in train.samples:
            classes_of.setdefault(image_id, []).append(cls)
            if int((binarise(train.load_mask(image_id, cls)) == 1).sum()) >= settings.min_pixels:
                self.lists.setdefault(cls, []).append(image_id)
        listed = {i for ids in self.lists.values() for i in ids}
        # a query class needs K support images besides the query (the official loader would loop forever)
        self.items: list[tuple[str, list[str]]] = []
        for image_id in dict.fromkeys(i for i, _ in train.samples):
            usable = [c for c in classes_of[image_id]
                      if len([j for j in self.lists[c] if j != image_id]) >= settings.shot]
            if image_id in listed and usable:
                self.items.append((image_id, usable))
        if not self.items:
            raise FdsError(f"training data of dataset '{train.dataset}' fold {train.fold} has no image with a class "
                           f"of >= {settings.min_pixels} pixels and {settings.shot} other such images; lower "
                           f"min_pixels (--set min_pixels=...) or the training shot")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, image_id: str, cls: str) -> tuple[np.ndarray, np.ndarray]:
        """RGB image and its binarised label for ``cls``."""
        img = self.train.load_image(image_id)
        y = binarise(self.train.load_mask(image_id, cls))
        if y.shape != img.shape[:2]:
            raise FdsError(f"mask of class {cls} for image {image_id} is {y.shape}, image is {img.shape[:2]}")
        return img, y

    def episode(self, position: int, epoch: int = 0) -> dict:
        """query [3,S,S], query_mask [1,S,S] (0/1/255), supports [K,3,S,S], support_masks [K,1,S,S]."""
        rng = np.random.default_rng(derive_seed("fss", self.seed, epoch, position))
        qid, classes = self.items[position]
        cls = classes[int(rng.integers(0, len(classes)))]
        pool = [j for j in self.lists[cls] if j != qid]
        sids = [pool[j] for j in rng.choice(len(pool), size=self.s.shot, replace=False)]
        img, y = self.load(qid, cls)
        qx, (qy,) = train_transform(img, [y], rng, self.s)
        sx, sy = [], []
        for sid in sids:
            img, y = self.load(sid, cls)
            x, (y,) = train_transform(img, [y], rng, self.s)
            sx.append(x)
            sy.append(y[None])
        cname = cls.split("/", 1)[1] if "/" in cls else cls
        return {"query": qx, "query_mask": qy[None], "supports": torch.stack(sx), "support_masks": torch.stack(sy),
                "class": cls, "query_id": qid, "support_ids": sids, "class_name": cname}

    def order(self, epoch: int) -> list[int]:
        """The epoch's shuffled image order (the official loader reshuffles with seed + epoch)."""
        return [int(i) for i in np.random.default_rng(derive_seed("fss-order", self.seed, epoch)).permutation(len(self))]

    def n_batches(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self) / batch_size
        return max(1, int(n) if drop_last else math.ceil(n))

    def batches(self, epoch: int, batch_size: int, drop_last: bool = True) -> Iterator[dict]:
        """Collated batches of an epoch (drop_last as the official loader; a list smaller than one
        batch still gives one batch)."""
        order = self.order(epoch)
        for b in range(self.n_batches(batch_size, drop_last)):
            yield collate([self.episode(i, epoch) for i in order[b * batch_size: (b + 1) * batch_size]])


__all__ = ["FSSEpisodes", "FSSSettings", "train_transform", "rand_scale", "rand_rotate", "rand_blur", "rand_hflip",
           "rand_crop", "normalise", "binarise", "MEAN_255", "STD_255", "IGNORE"]
