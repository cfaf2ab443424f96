"""Segmentation losses for probability maps, shared by SOFS and the NR+MNDL variants of
PFENet/HDMNet (SOFS paper §3.2.5, Eq. 6).

All functions take probabilities ``X`` in [0, 1] and binary targets ``Y`` of the same shape
[B, ...]; sums run over every non-batch axis, so each sample gets its own term.

Mixed normal Dice loss (MNDL), per sample b with t = 1[|Y| > 0]:
    L = t * (1 - (2|X.Y| + 1e-5) / (|X| + |Y| + 1e-5)) + beta * (1 - t) * (1 - 1 / (eta |X| + 1))
averaged over the batch. On a defect-free target the second term penalises ANY predicted mass;
its gradient eta / (eta |X| + 1)^2 is large when |X| is small, i.e. at the start of training when
the model predicts almost nothing, which is what suppresses false positives.
"""
from __future__ import annotations

import torch

from ..errors import FdsError

SMOOTH = 1e-5  # smooth_nr_defect of the official dice_binary_loss


def _sums(x: torch.Tensor, y: torch.Tensor):
    if x.shape != y.shape:
        raise FdsError(f"loss: prediction shape {tuple(x.shape)} differs from target shape {tuple(y.shape)}")
    axes = tuple(range(1, x.dim()))
    y = y.to(x.dtype)
    return (x * y).sum(axes), x.sum(axes), y.sum(axes)


def dice_loss(x: torch.Tensor, y: torch.Tensor, smooth: float = SMOOTH, reduction: str = "mean") -> torch.Tensor:
    """Plain soft Dice loss per sample, 1 - (2I + s)/(|X| + |Y| + s), batch mean (Table 6 baseline)."""
    inter, sx, sy = _sums(x, y)
    f = 1.0 - (2.0 * inter + smooth) / (sx + sy + smooth)
    return _reduce(f, reduction)


def mixed_normal_dice_loss(x: torch.Tensor, y: torch.Tensor, eta: float = 1e5, beta: float = 1.0,
                           smooth: float = SMOOTH, reduction: str = "mean") -> torch.Tensor:
    """MNDL (Eq. 6): Dice on samples with a defect, beta * (1 - 1/(eta |X| + 1)) on normal ones."""
    inter, sx, sy = _sums(x, y)
    t = (sy > 0).to(x.dtype)
    f_defect = 1.0 - (2.0 * inter + smooth) / (sx + sy + smooth)
    f_normal = 1.0 - 1.0 / (eta * sx + 1.0)
    f = t * f_defect + beta * (1.0 - t) * f_normal
    return _reduce(f, reduction)


def binary_cross_entropy(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """-mean[Y log(X + eps) + (1 - Y) log(1 - X + eps)] over all elements (official dice_ce_loss_sum)."""
    y = y.to(x.dtype)
    return -(y * torch.log(x + eps) + (1 - y) * torch.log(1 - x + eps)).mean()


def dice_ce_loss(x: torch.Tensor, y: torch.Tensor, *, eta: float = 1e5, beta: float = 1.0,
                 dice_weight: float = 1.0, ce_weight: float = 0.01, mixed: bool = True) -> torch.Tensor:
    """The SOFS training loss: dice_weight * (MNDL or plain Dice) + ce_weight * CE (SOFS paper §3.2.5)."""
    dice = mixed_normal_dice_loss(x, y, eta=eta, beta=beta) if mixed else dice_loss(x, y)
    return dice_weight * dice + ce_weight * binary_cross_entropy(x, y)


def _reduce(f: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    if reduction == "none":
        return f
    raise FdsError(f"unknown loss reduction '{reduction}'; use mean, sum or none")
