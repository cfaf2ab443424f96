"""The non-resizing crop sampler of SOFS (paper §3.2.2), shared by the episode manifests
(support crops) and by training loaders (defect and normal crops)."""
from __future__ import annotations

import numpy as np

from .types import Box


def sample_crop(mask: np.ndarray, crop_size: int, rng: np.random.Generator, centre_on_defect: bool = True) -> Box:
    """Crop box of side ``crop_size`` (clipped to the image) around a random pixel.

    The centre pixel (cy, cx) is drawn uniformly from the defect pixels (``centre_on_defect``) or
    from the non-defect pixels; offsets dd, dr are uniform on {0..c}; then
    bottom = cy + min(H - cy, dd), right = cx + min(W - cx, dr), top = bottom - th,
    left = right - tw, shifted inside the image. The crop keeps native resolution."""
    H, W = mask.shape
    c = int(crop_size)
    th, tw = min(c, H), min(c, W)
    pool = np.flatnonzero(mask.reshape(-1) if centre_on_defect else ~mask.reshape(-1))
    if pool.size == 0:  # no pixel of the requested kind: centre anywhere
        pool = np.arange(H * W)
    flat = int(pool[rng.integers(pool.size)])
    cy, cx = divmod(flat, W)
    dd, dr = int(rng.integers(0, c + 1)), int(rng.integers(0, c + 1))
    bottom, right = cy + min(H - cy, dd), cx + min(W - cx, dr)
    top, left = bottom - th, right - tw
    if top < 0:
        top, bottom = 0, th
    if left < 0:
        left, right = 0, tw
    return int(top), int(left), int(bottom), int(right)


def is_large(mask: np.ndarray, area_resize_ratio: float) -> bool:
    """The SOFS 1 % rule (paper appendix A.2): a support whose defect covers more than ``area_resize_ratio`` of
    the image is resized whole instead of cropped."""
    return float(mask.mean()) > area_resize_ratio
