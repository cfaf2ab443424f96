"""Fusion of the FM mask R0 with FastSAM's "everything" masks (GFDS paper §5.1, eqs. 11–14, Table 7),
with the released code's semantics as default.

1. Disjoint masks (:func:`remove_overlap`): masks sorted by area (ascending); each loses the pixels
   already claimed by a smaller one.
2. Selection (:func:`select`, eqs. 11–12): o_i = |m_i ∧ R0| / |m_i| > τ1 (0.2) and — code only — the mask
   is small (|m_i| < 0.4·S²) or its overlap is large (o_i > 0.6). R_sam = ∪ selected.
3. Fusion (:func:`fuse`):
   * ``"code"`` (default): R0's 4-connected components; for every selected m with dilation
     D = m ⊕ 21×21, the component with most pixels in D is "replaced" when > τ2 (0.9) of it lies in D:
     m joins REPL and the ring D ∖ m joins RING. R = (R0 ∪ R_sam) ∖ (RING ∖ REPL).
   * ``"paper"`` (eqs. 13–14): R = R_sam ∪ the components C of R0 with |Dil(m) ∧ C| / |C| < τ2 for
     every selected m (a covered component is dropped whole).
   * ``"union"`` (Table 7 row R0 ∪ R_sam) and ``"sam_only"`` (row R_sam).
   With no selected mask (or no mask at all) every variant but ``sam_only`` returns R0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fdsbench.errors import FdsError

FUSIONS = ("code", "paper", "union", "sam_only")


@dataclass(frozen=True)
class FusionParams:
    tau1: float = 0.2  # selection overlap threshold (eq. 11)
    area_cap: float = 0.4  # code-only clause: masks of area ≥ area_cap·S² need overlap > big_overlap
    big_overlap: float = 0.6
    dilation: int = 21  # square structuring element of the boundary refinement (odd)
    tau2: float = 0.9  # component coverage threshold (eq. 13)
    area_clause: bool = True  # False: the paper's selection (overlap only)


def remove_overlap(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] bool masks → disjoint masks in ascending-area order (ties as ``torch.argsort``)."""
    areas = masks.sum(dim=(1, 2))
    order = torch.argsort(areas)
    out = masks[order].clone()
    claimed = torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    for i in range(out.shape[0]):
        out[i] &= ~claimed
        claimed |= out[i]
    return out


def select(masks: torch.Tensor, R0: torch.Tensor, p: FusionParams) -> torch.Tensor:
    """Indices of the selected (disjoint) masks, ascending-area order kept. Emptied masks (0/0) never
    pass."""
    area = masks.sum(dim=(1, 2)).float()
    overlap = (masks & R0).sum(dim=(1, 2)).float() / area
    keep = overlap > p.tau1
    if p.area_clause:
        S2 = R0.shape[-2] * R0.shape[-1]
        keep &= (area < p.area_cap * S2) | (overlap > p.big_overlap)
    return torch.nonzero(keep)[:, 0]


def dilate(m: torch.Tensor, k: int) -> torch.Tensor:
    """Binary dilation by a k×k square (max-pool, stride 1, padding k//2)."""
    return F.max_pool2d(m[None, None].float(), kernel_size=k, stride=1, padding=k // 2)[0, 0] > 0


def components(R0: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of R0 (scipy.ndimage.label's default structure), int64 [H, W]."""
    labels, _ = ndimage.label(R0.cpu().numpy())
    return torch.from_numpy(labels.astype(np.int64)).to(R0.device)


def fuse(R0: torch.Tensor, masks: torch.Tensor | None, variant: str = "code",
         params: FusionParams | None = None) -> tuple[torch.Tensor, dict]:
    """Fused binary mask [H, W] and a summary (masks, selected, replaced components).

    ``R0`` bool [H, W]; ``masks`` bool [N, H, W] (FastSAM, any order) or None when FastSAM kept none."""
    if variant not in FUSIONS:
        raise FdsError(f"fm_fastsam: fusion '{variant}' is unknown; use one of {', '.join(FUSIONS)}")
    p = params or FusionParams()
    info = {"masks": 0 if masks is None else int(masks.shape[0]), "selected": 0, "replaced": 0}
    if masks is None or masks.shape[0] == 0:
        return (torch.zeros_like(R0) if variant == "sam_only" else R0.clone()), info
    masks = remove_overlap(masks.bool())
    chosen = masks[select(masks, R0, p)]
    info["selected"] = int(chosen.shape[0])
    R_sam = chosen.any(dim=0) if chosen.shape[0] else torch.zeros_like(R0)
    if variant == "sam_only":
        return R_sam, info
    if chosen.shape[0] == 0:
        return R0.clone(), info
    if variant == "union":
        return R0 | R_sam, info
    labels = components(R0)
    sizes = torch.bincount(labels.flatten())
    if variant == "code":
        ring = torch.zeros_like(R0)
        replaced = torch.zeros_like(R0)
        for m in chosen:
            D = dilate(m, p.dilation)
            inside = labels[D & (labels > 0)]
            if inside.numel() == 0:  # cannot happen for a selected mask (it overlaps R0); the code would crash
                continue
            best = int(torch.argmax(torch.bincount(inside)))  # ties → smallest label
            if (D & (labels == best)).sum() / sizes[best] > p.tau2:  # float32 ratio, strict ">" as the code
                replaced |= m
                ring |= D & ~m
                info["replaced"] += 1
        return (R0 | R_sam) & ~(ring & ~replaced), info
    # paper, eqs. 13–14: drop every component that some dilated selected mask covers ≥ τ2
    n = int(labels.max())
    drop = torch.zeros(n + 1, dtype=torch.bool, device=R0.device)
    for m in chosen:
        cover = torch.bincount(labels[dilate(m, p.dilation)].flatten(), minlength=n + 1).float() / sizes.float()
        drop |= cover >= p.tau2
    drop[0] = True  # label 0 = background
    info["replaced"] = int(drop[1:].sum())
    return R_sam | ~drop[labels], info
