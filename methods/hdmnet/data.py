"""HDMNet's own input pipeline (official code, util/transform.py as configured in train.py/test.py):
images and masks are resized to S x S WITHOUT keeping the aspect ratio (bilinear / nearest, OpenCV)
and ImageNet-normalised; training adds RandScale(0.9-1.1) -> RandRotate(+-10 deg, p 0.5, image
border = ImageNet mean, label border = 255 ignore) -> Gaussian blur 5x5 (p 0.5) -> h-flip (p 0.5)
before the resize. Labels are uint8: 0 background, 1 target (or a class index), 255 ignore.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from fdsbench.blocks.nr import EpisodeSampler
from fdsbench.blocks.tiling import IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255


def stretch_image(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> normalised [3,S,S] (bilinear resize to S x S, aspect not kept)."""
    im = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_LINEAR)
    x = (im.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def stretch_label(label: np.ndarray, size: int) -> torch.Tensor:
    """uint8 label [H,W] -> float [S,S] (nearest resize to S x S)."""
    lab = cv2.resize(np.ascontiguousarray(label, dtype=np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(lab.astype(np.float32))


def official_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                     scale=(0.9, 1.1), rotate=(-10.0, 10.0)) -> tuple[np.ndarray, np.ndarray]:
    """RandScale -> RandRotate (p 0.5) -> GaussianBlur 5x5 (p 0.5) -> h-flip (p 0.5)."""
    s = float(rng.uniform(*scale))
    image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        h, w = label.shape
        rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(*rotate)), 1)
        fill = tuple(float(v * 255) for v in IMAGENET_MEAN)
        image = cv2.warpAffine(image, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=fill)
        label = cv2.warpAffine(label, rot, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=IGNORE)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (5, 5), 0)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def prepare_pair(image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator | None,
                 augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3,S,S], label [S,S]) with the official augmentation (training) and the S x S resize."""
    label = np.asarray(label, dtype=np.uint8)
    if augment and rng is not None:
        image, label = official_augment(np.asarray(image, dtype=np.uint8), label, rng)
    return stretch_image(image, size), stretch_label(label, size)


class StretchSampler(EpisodeSampler):
    """The shared episodic sampler with HDMNet's per-view preparation: official augmentation and
    the S x S resize instead of SOFS's (ResizeLongestSide + pad). Masks come back as [1,S,S]
    labels with 255 = ignore (rotation borders)."""

    def _prepare(self, img, mask, rng):
        x, y = prepare_pair(img, np.asarray(mask, dtype=np.uint8), self.s.image_size, rng, self.s.augment)
        return x, y[None]
