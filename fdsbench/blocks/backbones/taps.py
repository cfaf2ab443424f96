"""The feature taps SOFS and the industrial FSS baselines (PFENet, HDMNet) share (SOFS appendix A.2):
DINOv2/DINO ViT block outputs (e.g. blocks 5-10 of ViT-B/14 @ 518, 6 x [B,768,37,37]), or for a
ResNet the PatchCore-merged layer2+3 map (``merge_layer23``, stride 8) returned twice, so that a head
written for n tapped maps sees the ResNet as two layers; for a VGG (``vgg16_hed``) the same merge of
the two listed stages, e.g. ``layers=(4, 5)``: conv4 + conv5, strides 8 and 16 like layer2 + layer3."""
from __future__ import annotations

from typing import Callable, Sequence

from ...errors import FdsError
from .merge import merge_layer23


def _indices(backbone: str, layers: Sequence, what: str) -> tuple[int, ...]:
    """``layers`` as integers, or one error saying what this backbone's taps are."""
    try:
        out = tuple(int(v) for v in layers)
    except (TypeError, ValueError):
        out = None
    if out is None or any(isinstance(v, bool) or o != v for o, v in zip(out, layers)):
        raise FdsError(f"layers={list(layers)!r} for backbone '{backbone}': {what}")
    return out


def feature_taps(backbone: str, layers: Sequence, merge_dim: int) -> Callable:
    """callable(bb, x) -> list of maps: ViT block outputs, or the merged ResNet map twice. Layers that
    name no tap of the backbone are refused (the ResNet taps are always layer2 + layer3)."""
    if backbone.startswith(("dinov2", "dino_")):
        layers = _indices(backbone, layers, "ViT blocks are tapped by index, e.g. layers=[5,6,7,8,9,10]")
        return lambda bb, x: bb.forward_features(x, layers=layers)
    if backbone.startswith("resnet"):
        if _indices(backbone, layers, "use layers=[2,3]") != (2, 3):
            raise FdsError(f"layers={list(layers)!r} for backbone '{backbone}': the ResNet taps are layer2 and layer3 "
                           f"merged (PatchCore, stride 8); use layers=[2,3]")

        def resnet_feats(bb, x):
            m = merge_layer23(bb.forward_features(x, layers=("layer2", "layer3")), out_dim=merge_dim)
            return [m, m]
        return resnet_feats
    if backbone.startswith("vgg"):
        pair = tuple(f"conv{v}" for v in _indices(backbone, layers, "VGG stages are tapped by number, e.g. layers=[4,5]"))
        # e.g. (4, 5): strides 8 and 16, as layer2 + layer3

        def vgg_feats(bb, x):
            m = merge_layer23(bb.forward_features(x, layers=pair), out_dim=merge_dim)
            return [m, m]
        return vgg_feats
    raise FdsError(f"tapped features exist for DINOv2/DINO ViTs, ResNets and VGG, not backbone '{backbone}'")


def tap_dims(bb, backbone: str, layers: Sequence, merge_dim: int) -> list[int]:
    """Channels of each map ``feature_taps`` returns (ViT: embed dim per block; ResNet: merge_dim x 2)."""
    if backbone.startswith(("resnet", "vgg")):
        bb.normalize_layers(tuple(layers))  # refuses a stage the trunk does not have
        return [merge_dim, merge_dim]
    return [bb.channels[i] for i in bb.normalize_layers(tuple(layers))]  # refuses a block out of range
