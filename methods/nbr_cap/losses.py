"""The two regularisers of the paper (paper §III-D/E, eqs. 1-7).

All functions work on a minibatch and return one value per pair i (the caller sums them, as
Algorithm 1 does)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from fdsbench.errors import FdsError

EPS = 1e-8


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "max") -> torch.Tensor:
    """M̂ (eq. 1): a float mask [B, 1, H, W] brought to the feature grid ``size``.

    ``max`` (default ◊): a cell is defect if any of its pixels is; ``nearest``; ``area``: the
    fraction of defect pixels in the cell (soft)."""
    if mode == "max":
        return F.adaptive_max_pool2d(mask, size)
    if mode == "area":
        return F.adaptive_avg_pool2d(mask, size)
    if mode == "nearest":
        return F.interpolate(mask, size=size, mode="nearest")
    raise FdsError(f"nbr_cap: unknown nbr_mask_downsample '{mode}'; use max, nearest or area")


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling [B, C, h, w] -> [B, C] (eq. 2)."""
    return x.mean(dim=(2, 3))


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-wise cosine similarity with ``eps`` in the denominator (0 when a vector is zero)."""
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def nbr_loss(f_d: torch.Tensor, f_n: torch.Tensor, mask: torch.Tensor, distance: str = "cosine",
             mask_downsample: str = "max", pooling: str = "gap") -> torch.Tensor:
    """Normal Background Regularisation, eqs. 1-3, per pair: [B].

    f_d, f_n: encoder outputs F^d, F^n [B, C, h, w]; mask: M^d [B, 1, H, W] in {0, 1}.
    B^d = F^d ⊙ (1 − M̂^d); b = GAP(B^d), f = GAP(F^n);
    ``cosine``: L = −bᵀf / (‖b‖‖f‖) (−1 when the background matches, 0 when the defect covers the
    whole grid); ``euclidean`` (ablation, Table VII): L = ‖b − f‖₂.
    ``pooling``: ``gap`` over all cells (eq. 2, literal) or ``masked_mean`` over background cells
    (same cosine, different Euclidean distance)."""
    m_hat = downsample_mask(mask, f_d.shape[-2:], mask_downsample)
    keep = 1.0 - m_hat
    b_d = f_d * keep
    if pooling == "gap":
        b = gap(b_d)
    elif pooling == "masked_mean":
        b = b_d.sum(dim=(2, 3)) / keep.sum(dim=(2, 3)).clamp_min(EPS)
    else:
        raise FdsError(f"nbr_cap: unknown nbr_pooling '{pooling}'; use gap or masked_mean")
    f = gap(f_n)
    if distance == "cosine":
        return -cosine(b, f)
    if distance == "euclidean":
        return (b - f).norm(dim=1)
    raise FdsError(f"nbr_cap: unknown nbr '{distance}'; use cosine, euclidean or off")


def crop_and_paste(i_d: torch.Tensor, i_n: torch.Tensor, m_d: torch.Tensor) -> torch.Tensor:
    """Eq. 4: I_CaP = I^d ⊙ M^d + I^n ⊙ (1 − M^d), pasted at the same position.
    i_d, i_n: [B, 3, H, W]; m_d: [B, 1, H, W] in {0, 1}."""
    return i_d * m_d + i_n * (1.0 - m_d)


def realism_weight(f_d: torch.Tensor, f_cap: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """Eq. 6: λ = |GAP(F^d)ᵀ GAP(F_CaP)| / (‖GAP(F^d)‖ ‖GAP(F_CaP)‖), per pair [B].

    Detached by default (◊): a constant weight; a gradient through λ would reward making the
    pasted image's features unlike the original's."""
    lam = cosine(gap(f_d), gap(f_cap)).abs()
    return lam.detach() if detach else lam


def bce_per_image(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eqs. 5/7 without λ, per image [B]: BCE over the pixels (logits form, same value).

    ``mean`` (default ◊) averages over pixels; ``sum`` is the paper's literal sum over (w, h)."""
    per_px = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if reduction == "mean":
        return per_px.flatten(1).mean(1)
    if reduction == "sum":
        return per_px.flatten(1).sum(1)
    raise FdsError(f"nbr_cap: unknown bce_reduction '{reduction}'; use mean or sum")
