"""The "deep-base" dilated ResNet of PSPNet, used by PFENet, BAM and HDMNet (output stride 8).

Stem ``layer0`` = three 3x3 convs (3->64 stride 2, 64->64, 64->128, each + BN + ReLU) and a 3x3
max-pool stride 2; ``layer1``..``layer4`` are the usual Bottleneck stages, except that every 3x3
conv of layer3 has dilation 2 and of layer4 dilation 4 (padding = dilation) and neither stage
strides (their 1x1 downsample convs too). Feature strides: layer0..layer2 4, 4, 8; layer3, layer4 8.
At 473 input: layer0 [B,128,119,119], layer1 [B,256,119,119], layer2..layer4 [B,512|1024|2048,60,60].

Module names are those of the segmentation models built on it: ``layer0.{0,3,6}`` stem convs,
``layer0.{1,4,7}`` their BatchNorms (ReLUs at 2, 5, 8, max-pool at 9), ``layerN.<block>.{conv1,bn1,
conv2,bn2,conv3,bn3,downsample.0,downsample.1}``. A model can take ``layer0``..``layer4`` as its own
attributes (PFENet/PSPNet checkpoints keep them at the top level) or hold the whole backbone.
The ImageNet file of these models (``resnet50_v2.pth``, keys ``conv1``/``bn1``/``conv2``/... and
``fc``) loads through :func:`deep_base_key_map` (stem renamed, ``fc`` dropped).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from .base import BackboneMixin

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")
STRIDES = {"layer0": 4, "layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}

DEEP_RESNET_CONFIGS = {
    "deep_resnet50": [3, 4, 6, 3],
    "deep_resnet101": [3, 4, 23, 3],
}

# ImageNet "v2" file of PSPNet/PFENet: stem attribute names -> index inside layer0
_STEM = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}


def _stem() -> nn.Sequential:
    def conv_bn_relu(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]
    return nn.Sequential(*conv_bn_relu(3, 64, 2), *conv_bn_relu(64, 64, 1), *conv_bn_relu(64, 128, 1),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


def _stage(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """Bottleneck stage; every block's 3x3 conv gets ``dilation`` (the first one too, as the
    official code sets it on every ``conv2`` of the stage after building it)."""
    out = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    layers = [Bottleneck(inplanes, planes, stride, downsample, dilation=dilation)]
    layers += [Bottleneck(out, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class DeepBaseResNet(BackboneMixin, nn.Module):
    """Deep-base ResNet-50/101 with dilated layer3/layer4 (output stride 8)."""

    def __init__(self, name: str):
        nn.Module.__init__(self)
        blocks = DEEP_RESNET_CONFIGS[name]
        self.name = name
        self.layer0 = _stem()
        self.layer1 = _stage(128, 64, blocks[0], 1, 1)
        self.layer2 = _stage(256, 128, blocks[1], 2, 1)
        self.layer3 = _stage(512, 256, blocks[2], 1, 2)
        self.layer4 = _stage(1024, 512, blocks[3], 1, 4)
        self.channels = {"layer0": 128, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        self.strides = dict(STRIDES)
        for m in self.modules():  # ImageNet init of the official ResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def normalize_layers(self, layers) -> tuple[str, ...]:
        return self.named_stages(layers, STAGES, 0)

    def feature_spec(self, layers, height: int, width: int):
        spec = []
        for layer in self.normalize_layers(layers):
            # stem conv (3x3/2, pad 1), max-pool (3x3/2, pad 1) and layer2's stride: ceil(n / 2) each
            halvings = 3 if layer in ("layer2", "layer3", "layer4") else 2
            h, w = height, width
            for _ in range(halvings):
                h, w = (h + 1) // 2, (w + 1) // 2
            spec.append((self.channels[layer], h, w))
        return spec

    def forward_features(self, x: torch.Tensor, layers: Sequence | None = None) -> list[torch.Tensor]:
        """Maps of the listed stages, in the order asked; stages after the last requested one are not run."""
        want = self.normalize_layers(layers)
        last = max(STAGES.index(layer) for layer in want)
        got = {}
        with self._grad_context():
            for stage in STAGES[: last + 1]:
                x = getattr(self, stage)(x)
                got[stage] = x
        return [got[layer] for layer in want]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ("layer4",))[0]


def deep_base_key_map(sd: dict, module: nn.Module) -> dict:
    """ImageNet deep-base file (``conv1.weight``, ``bn1.running_mean``, ..., ``fc.*``) -> layer0 names.

    Keys already in the ``layer0.*`` layout (a PSPNet/PFENet checkpoint's backbone) pass unchanged;
    the classifier ``fc.*`` of the ImageNet file is dropped."""
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in _STEM:
            out[f"layer0.{_STEM[head]}.{rest}"] = v
        elif head != "fc":
            out[k] = v
    return out


def build_deep_resnet(name: str) -> DeepBaseResNet:
    return DeepBaseResNet(name)
