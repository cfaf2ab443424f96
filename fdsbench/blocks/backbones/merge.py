"""PatchCore-style neighbourhood aggregation of ResNet layer2 + layer3 (SOFS paper appendix A.2).

For each layer the map is unfolded into 3x3 neighbourhoods (stride 1, zero pad 1); layer3's
neighbourhood maps are bilinearly upsampled (align_corners=False) to layer2's grid; at every
location each layer's flattened (c, 3, 3) vector (channel-major, as ``F.unfold`` orders it) is
adaptive-average-pooled (1-D) to ``out_dim``; the two vectors are concatenated and pooled again to
``out_dim``. At 512 input: layer2 [B,512,64,64] + layer3 [B,1024,32,32] -> [B,1024,64,64].

Bilinear upsampling and averaging are linear, so when a layer's c*9 is a multiple of ``out_dim``
(layer3: 9216 = 9 x 1024) the pooling is done before upsampling (1024 instead of 9216 maps);
the result is the same up to float rounding (tested against the literal order).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def _pool_neighbourhoods(fmap: torch.Tensor, out_hw: tuple[int, int], out_dim: int, k: int = 3) -> torch.Tensor:
    """[B, C, h, w] -> [B, out_dim, H, W]: unfold k x k, upsample to out_hw, pool c*k*k -> out_dim."""
    B, C, h, w = fmap.shape
    D = C * k * k
    patches = F.unfold(fmap, kernel_size=k, padding=k // 2)  # [B, C*k*k, h*w], channel-major
    if D % out_dim == 0:
        pooled = patches.reshape(B, out_dim, D // out_dim, h, w).mean(2)
        if (h, w) != tuple(out_hw):
            pooled = F.interpolate(pooled, size=out_hw, mode="bilinear", align_corners=False)
        return pooled
    patches = patches.reshape(B, D, h, w)
    if (h, w) != tuple(out_hw):
        patches = F.interpolate(patches, size=out_hw, mode="bilinear", align_corners=False)
    H, W = out_hw
    vec = patches.reshape(B, D, H * W).transpose(1, 2).reshape(B * H * W, 1, D)
    vec = F.adaptive_avg_pool1d(vec, out_dim)  # [B*H*W, 1, out_dim]
    return vec.reshape(B, H, W, out_dim).permute(0, 3, 1, 2)


def merge_layer23(layer2, layer3: torch.Tensor | None = None, *, out_dim: int = 1024,
                  patch_size: int = 3) -> torch.Tensor:
    """Merged PatchCore map [B, out_dim, H2, W2] from ResNet layer2 and layer3 maps.

    Accepts ``merge_layer23(l2, l3)``, a sequence ``(l2, l3)`` or a dict with keys ``layer2``,
    ``layer3`` (what ``forward_features(x, ("layer2", "layer3"))`` returns)."""
    if layer3 is None:
        if isinstance(layer2, Mapping):
            layer2, layer3 = layer2["layer2"], layer2["layer3"]
        elif isinstance(layer2, Sequence) and len(layer2) == 2:
            layer2, layer3 = layer2
        else:
            raise TypeError("merge_layer23 needs layer2 and layer3 maps")
    hw = tuple(layer2.shape[-2:])
    per_layer = [_pool_neighbourhoods(f, hw, out_dim, patch_size) for f in (layer2, layer3)]
    B, _, H, W = per_layer[0].shape
    # Aggregator: concat the per-layer vectors (layer order) and pool 2*out_dim -> out_dim.
    stacked = torch.stack(per_layer, dim=1)  # [B, 2, out_dim, H, W]
    vec = stacked.permute(0, 3, 4, 1, 2).reshape(B * H * W, 1, 2 * out_dim)
    vec = F.adaptive_avg_pool1d(vec, out_dim)
    return vec.reshape(B, H, W, out_dim).permute(0, 3, 1, 2).contiguous()
