"""torchvision ResNets as shared encoders.

The class IS a ``torchvision.models.ResNet`` (same module tree, fc included), so its state-dict keys
are torchvision's and the official ``resnet50-0676ba61.pth`` etc. load with ``strict=True``; a
model that registers it as ``backbone`` gets the ``backbone.<torchvision name>`` keys of the SOFS checkpoint.

Feature taps (``forward_features(x, layers=...)``), stride in input pixels:
``relu`` 2 (conv1+bn1+relu), ``maxpool`` 4, ``layer1`` 4, ``layer2`` 8, ``layer3`` 16, ``layer4`` 32.
Integers 1..4 mean ``layer1..layer4`` (SOFS ``prior_layer_pointer`` [2, 3]). Each map is the output
of the last block of the stage (what a forward hook on the stage returns). Stages after the last
requested one are not run.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ...errors import FdsError
from .base import BackboneMixin

STAGES = ("relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
STRIDES = {"relu": 2, "maxpool": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

RESNET_CONFIGS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


class ResNetBackbone(BackboneMixin, ResNet):
    def __init__(self, name: str):
        block, layers = RESNET_CONFIGS[name]
        ResNet.__init__(self, block, layers)
        self.name = name
        e = block.expansion
        self.channels = {"relu": 64, "maxpool": 64, "layer1": 64 * e, "layer2": 128 * e,
                         "layer3": 256 * e, "layer4": 512 * e}
        self.strides = dict(STRIDES)

    def normalize_layers(self, layers) -> tuple[str, ...]:
        if layers is None:
            return ("layer4",)
        if isinstance(layers, (str, int)):
            layers = (layers,)
        out = []
        for layer in layers:
            if isinstance(layer, int) and not isinstance(layer, bool) and 1 <= layer <= 4:
                layer = f"layer{layer}"
            if layer not in STRIDES:
                raise FdsError(f"{self.name}: unknown feature layer {layer!r}; use one of "
                               f"{', '.join(STAGES)} (or 1..4)")
            out.append(layer)
        return tuple(out)

    def feature_spec(self, layers, height: int, width: int):
        spec = []
        for layer in self.normalize_layers(layers):
            h, w = height, width
            # conv1 (7x7/2, pad 3) and maxpool (3x3/2, pad 1) and every stride-2 3x3/1x1 conv: ceil(n/2)
            for _ in range({"relu": 1, "maxpool": 2, "layer1": 2, "layer2": 3, "layer3": 4, "layer4": 5}[layer]):
                h, w = (h + 1) // 2, (w + 1) // 2
            spec.append((self.channels[layer], h, w))
        return spec

    def forward_features(self, x: torch.Tensor, layers: Sequence | None = None) -> list[torch.Tensor]:
        """Maps of the listed stages, in the order asked, each [B, C, H/stride, W/stride]."""
        want = self.normalize_layers(layers)
        last = max(STAGES.index(layer) for layer in want)
        got = {}
        with self._grad_context():
            x = self.relu(self.bn1(self.conv1(x)))
            got["relu"] = x
            for stage in STAGES[1: last + 1]:
                x = getattr(self, stage)(x)
                got[stage] = x
        return [got[layer] for layer in want]


def build_resnet(name: str) -> ResNetBackbone:
    return ResNetBackbone(name)
