"""Patch-based feature matching of GFDS (paper §5.1.2, eqs. 2–6), with the released code's semantics.

Per episode with K supports (I_s^k, M_s^k) and a query I_q (all S×S, S = 256):

1. F = E(I) ∈ R^{384×h×w}; the support mask is brought to the h×w grid by the "any pixel" rule
   (:func:`mask_to_grid`): a cell is foreground iff any mask pixel falls into it (no bilinear step —
   small defects survive).
2. Foreground vectors F_f^k = the foreground cells in row-major order, background vectors F_b^k = all
   other cells. PatchAvg (:func:`patch_average`): ``"sequence"`` (code) replaces the row-major list by
   the means of consecutive triples (window 3, stride 1, n − 2 vectors) when it has more than 10
   entries; ``"2d"`` (the paper's reading of "patch size 3, stride 1") averages, for every cell, the
   same-side cells of its 3×3 neighbourhood (n vectors).
3. K shots: per-shot vectors are concatenated, P_f ∈ R^{384×N_f}, P_b ∈ R^{384×N_b}; ``"pool"``
   prototypes are the mean of all shots' vectors (masked average pooling, ablation rows).
4. s_f(i) = max_j cos(F_q(i), P_f(j)), s_b likewise (or 1/(‖·‖₂ + 1e-8) for ``distance="l2"``).
5. L = 10·[s_b, s_f], bilinearly upsampled (align_corners=True); R0 = argmax (ties → background);
   the probability is softmax(L)[1] = sigmoid(10·(s_f − s_b)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fdsbench.errors import FdsError

FG_PROTOS = ("patch", "dense", "pool")
BG_PROTOS = ("dense", "patch", "pool")
PATCH_AVGS = ("sequence", "2d")
DISTANCES = ("cosine", "l2")
LOGIT_SCALE = 10.0
SEQUENCE_MIN = 10  # the code averages a shot's list only when it has more than 10 vectors
PATCH = 3  # window 3, stride 1


def mask_to_grid(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Boolean [grid, grid]: cell (i, j) is set iff a mask pixel (y, x) has ⌊y/r⌋ = i, ⌊x/r⌋ = j with
    r = H / (grid + 1e-6) (clamped to grid − 1). Square masks only (the code scales both axes by H).
    For 256 → 64 this is "any foreground pixel in the 4×4 block"."""
    H, W_ = mask.shape[-2:]
    if H != W_:
        raise FdsError(f"fm: support mask is {H}x{W_}; the matcher maps square inputs only (resize to S×S first)")
    ij = (mask.reshape(H, W_) != 0).nonzero()
    scale = H / (grid + 0.000001)
    ij = (ij / scale).to(torch.int64).clamp(max=grid - 1)
    cells = torch.zeros(grid, grid, dtype=torch.bool, device=mask.device)
    cells[ij[:, 0], ij[:, 1]] = True
    return cells


def patch_average(vectors: torch.Tensor, feat: torch.Tensor, cells: torch.Tensor, mode: str) -> torch.Tensor:
    """PatchAvg of one shot's vectors [1, C, n] (the ``cells`` of ``feat`` [1, C, h, w] in row-major
    order). ``"sequence"``: means of consecutive triples of the list when n > 10 (else unchanged);
    ``"2d"``: per cell, the mean over the selected cells of its 3×3 neighbourhood."""
    if mode == "sequence":
        if vectors.shape[-1] > SEQUENCE_MIN:
            return vectors.unfold(2, PATCH, 1).mean(dim=-1)
        return vectors
    if mode == "2d":
        C = feat.shape[1]
        m = cells.to(feat.dtype)[None, None]
        ones = torch.ones(C, 1, PATCH, PATCH, dtype=feat.dtype, device=feat.device)
        total = F.conv2d(feat * m, ones, padding=PATCH // 2, groups=C)
        count = F.conv2d(m, ones[:1], padding=PATCH // 2)
        return (total / count.clamp(min=1))[:, :, cells]
    raise FdsError(f"fm: patch_avg '{mode}' is unknown; use one of {', '.join(PATCH_AVGS)}")


def shot_vectors(feat: torch.Tensor, cells: torch.Tensor, fg_proto: str, bg_proto: str,
                 patch_avg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background vectors [1, C, ·] of one support feature map [1, C, h, w]."""
    fg, bg = feat[:, :, cells], feat[:, :, ~cells]
    if fg_proto == "patch":
        fg = patch_average(fg, feat, cells, patch_avg)
    if bg_proto == "patch":
        bg = patch_average(bg, feat, ~cells, patch_avg)
    return fg, bg


def combine_shots(vectors: list[torch.Tensor], mode: str) -> torch.Tensor:
    """K-shot concatenation along the vector axis; ``"pool"``: their mean (one prototype)."""
    P = torch.cat(vectors, dim=-1)
    if mode == "pool" and P.shape[-1]:
        return P.mean(dim=-1, keepdim=True)
    return P


def prepare_prototypes(P: torch.Tensor, distance: str) -> torch.Tensor:
    """What the similarity uses: channel-L2-normalised prototypes for cosine, raw ones for l2."""
    return F.normalize(P, p=2, dim=1) if distance == "cosine" else P


def similarity(feat_q: torch.Tensor, P: torch.Tensor, distance: str) -> torch.Tensor:
    """max over prototypes of the similarity of each query cell: [1, 1, h, w].

    ``P`` comes from :func:`prepare_prototypes`. cosine: F̂_qᵀ P̂ (eq. 5); l2: 1/(‖F_q − P‖₂ + 1e-8)."""
    B, C, h, w = feat_q.shape
    if distance == "cosine":
        q = F.normalize(feat_q, p=2, dim=1).reshape(B, C, h * w).transpose(1, 2)  # [1, hw, C]
        s = torch.bmm(q, P)  # [1, hw, N]
    elif distance == "l2":
        q = feat_q.reshape(B, C, h * w).transpose(1, 2)
        s = 1 / (torch.cdist(q, P.transpose(1, 2)) + 0.00000001)
    else:
        raise FdsError(f"fm: distance '{distance}' is unknown; use cosine or l2")
    return s.max(dim=2).values.reshape(B, 1, h, w)


def logits(s_b: torch.Tensor, s_f: torch.Tensor) -> torch.Tensor:
    """L = 10·[s_b, s_f] (channel 0 = background, 1 = defect), [1, 2, h, w]."""
    return torch.cat((s_b, s_f), dim=1) * LOGIT_SCALE


def upsample(L: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True, as the released forward."""
    return F.interpolate(L, size=size, mode="bilinear", align_corners=True)


def probability(L_up: torch.Tensor) -> torch.Tensor:
    """p = softmax(L)[1] [1, H, W]; p > 0.5 ⇔ argmax = defect (exact ties → background)."""
    return torch.softmax(L_up.float(), dim=1)[:, 1]


def binary(L_up: torch.Tensor) -> torch.Tensor:
    """R0 = argmax over the two channels (ties → background), bool [1, H, W]."""
    return L_up[:, 1] > L_up[:, 0]
