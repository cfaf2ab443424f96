"""Mask downsampling to feature resolution and masked average pooling, shared by the
prototype-based FSS methods (SOFS, PFENet, HDMNet variants).

* Prototype intensity downsampling (PFIM, SOFS paper §3.2.2, Eq. 1): an all-ones l x l
  convolution with stride l divided by l^2 -- i.e. l x l average pooling, no padding. Every
  feature cell gets the FRACTION of its l x l input patch covered by the mask, so a 3-pixel defect
  keeps a small non-zero weight instead of vanishing or being inflated.
* ``nearest`` and ``bilinear`` (align_corners=False, as the official code's ``F.interpolate``)
  are the common alternatives (Table 5 "without PFIM" uses bilinear).
* ``weighted_gap`` = Weighted_GAP / MaskAvgPool: sum(F * M) / (sum(M) + 5e-4) (SOFS paper Eq. 7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FdsError

MODES = ("pfim", "nearest", "bilinear")


def _as4d(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    if mask.dim() == 2:
        return mask[None, None], 2
    if mask.dim() == 3:
        return mask[:, None], 3
    if mask.dim() == 4:
        return mask, 4
    raise FdsError(f"mask must be [H,W], [B,H,W] or [B,1,H,W], got shape {tuple(mask.shape)}")


def _restore(out: torch.Tensor, ndim: int) -> torch.Tensor:
    return out[0, 0] if ndim == 2 else out[:, 0] if ndim == 3 else out


def prototype_intensity_downsample(mask: torch.Tensor, l: int) -> torch.Tensor:
    """PFIM (Eq. 1): l x l average pooling with stride l (= all-ones conv / l^2), no padding.

    Input [H,W], [B,H,W] or [B,1,H,W] (0/1 values); output has H//l x W//l cells in [0, 1]."""
    m, nd = _as4d(mask)
    return _restore(F.avg_pool2d(m.float(), kernel_size=int(l), stride=int(l)), nd)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "pfim",
                    l: int | None = None) -> torch.Tensor:
    """Downsample a binary mask to feature resolution ``size`` = (h, w).

    ``mode``: ``pfim`` (average pooling with kernel = stride = ``l``; ``l`` defaults to H // h),
    ``nearest`` or ``bilinear`` (align_corners=False)."""
    m, nd = _as4d(mask)
    m = m.float()
    h, w = int(size[0]), int(size[1])
    if mode == "pfim":
        l = int(l) if l else m.shape[-2] // h
        if l < 1:
            raise FdsError(f"PFIM needs a mask at least as large as the feature map ({tuple(m.shape[-2:])} vs {size})")
        out = F.avg_pool2d(m, kernel_size=l, stride=l)
        if tuple(out.shape[-2:]) != (h, w):
            raise FdsError(f"PFIM with l={l} turns a {m.shape[-2]}x{m.shape[-1]} mask into "
                           f"{out.shape[-2]}x{out.shape[-1]} cells, not the feature map's {h}x{w}; "
                           f"use an input size that is a multiple of the feature stride")
    elif mode == "nearest":
        out = F.interpolate(m, size=(h, w), mode="nearest")
    elif mode == "bilinear":
        out = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    else:
        raise FdsError(f"unknown mask downsampling mode '{mode}'; use one of {', '.join(MODES)}")
    return _restore(out, nd)


def weighted_gap(feat: torch.Tensor, mask: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """Masked average pooling (Weighted_GAP): [B,C,h,w] x [B,1,h,w] -> [B,C,1,1],
    sum over the grid of F * M divided by (sum of M + eps). The sums are taken as the official
    HDMNet/SOFS code takes them (grid average x h x w), which keeps the result bit-identical to it."""
    if mask.dim() == 3:
        mask = mask[:, None]
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + eps
    return F.avg_pool2d(feat * mask, (h, w)) * h * w / area


masked_average_pooling = weighted_gap


SMALL_DEFECT_BRANCHES = ("bilinear", "nearest", "any_pixel")


def downsample_keep_small(mask: torch.Tensor, size: tuple[int, int], *, threshold: float = 0.5,
                          align_corners: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Support-mask downsampling of the meta-learning baselines with the small-defect fallback of
    GFDS (paper §6.1): per sample, bilinear as the baseline (``align_corners`` as its
    code); if no cell reaches ``threshold`` the defect vanished, so nearest; if that is empty too,
    the "any pixel" rule (adaptive max-pool: a cell is 1 if any mask pixel in it is).
    Input [B,1,H,W] (0/1), output [B,1,h,w] and the branch that fired for each sample."""
    m = mask.float()
    out = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=align_corners)
    branches = []
    for b in range(m.shape[0]):
        if out[b].max() >= threshold or m[b].max() <= 0:  # kept (or nothing to keep: a normal support)
            branches.append("bilinear")
            continue
        near = F.interpolate(m[b:b + 1], size=tuple(size), mode="nearest")
        if near.max() > 0:
            out[b] = near[0]
            branches.append("nearest")
        else:
            out[b] = F.adaptive_max_pool2d(m[b:b + 1], tuple(size))[0]
            branches.append("any_pixel")
    return out, branches
