"""AlbuNet-34: a U-Net whose encoder is torchvision's ResNet-34 (paper §III-C,
ref. [32], TernausNet family). The decoder is ours to this method (no BatchNorm).

Layer list at 512x512 input::

    conv1  resnet34 conv1 7x7/2 + bn1 + ReLU + MaxPool k x k /2   64 x 128 x 128  (k = stem_pool, 2 default)
    conv2  layer1                                                 64 x 128 x 128
    conv3  layer2                                                128 x  64 x  64
    conv4  layer3                                                256 x  32 x  32
    conv5  layer4 = encoder output F                             512 x  16 x  16
    center Dec(512, 512, 256) on MaxPool2x2(conv5)               256 x  16 x  16
    dec5   Dec(768, 512, 256) on cat[center, conv5]              256 x  32 x  32
    dec4   Dec(512, 512, 256) on cat[dec5, conv4]                256 x  64 x  64
    dec3   Dec(384, 256, 64)  on cat[dec4, conv3]                 64 x 128 x 128
    dec2   Dec(128, 128, 128) on cat[dec3, conv2]                128 x 256 x 256
    dec1   Dec(128, 128, 32)  on dec2                             32 x 512 x 512
    dec0   ConvRelu(32, 32)                                       32 x 512 x 512
    final  Conv1x1(32 -> 1) = logit; sigmoid = predicted mask

Parameters: encoder 21.28 M (ResNet-34 without fc), decoder 13.32 M. Side length: multiple of 64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fdsbench.errors import FdsError

NUM_FILTERS = 32


class ConvRelu(nn.Sequential):
    """Conv3x3 (padding 1, bias) + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


class Dec(nn.Sequential):
    """Dec(i, m, o): bilinear upsampling x2 (align_corners=False) -> ConvRelu(i, m) -> ConvRelu(m, o)."""

    def __init__(self, cin: int, cmid: int, cout: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         ConvRelu(cin, cmid), ConvRelu(cmid, cout))


@dataclass
class EncoderOutput:
    """Skips of one encoder pass; ``conv5`` is the encoder output F used by NBR and lambda."""

    conv2: torch.Tensor
    conv3: torch.Tensor
    conv4: torch.Tensor
    conv5: torch.Tensor

    def __getitem__(self, sl) -> "EncoderOutput":
        """The same skips for a slice of the batch."""
        return EncoderOutput(self.conv2[sl], self.conv3[sl], self.conv4[sl], self.conv5[sl])


class AlbuNet34(nn.Module):
    """U-Net with a ResNet-34 encoder. ``encoder`` is a torchvision-keyed ResNet-34 (its ``fc`` is
    dropped; its own 3x3 stem max-pool is replaced by a ``stem_pool`` x ``stem_pool`` /2 pool)."""

    def __init__(self, encoder: nn.Module, stem_pool: int = 2, nf: int = NUM_FILTERS):
        super().__init__()
        if stem_pool not in (2, 3):
            raise FdsError(f"nbr_cap: stem_pool must be 2 (AlbuNet reference) or 3 (ResNet), got {stem_pool}")
        if hasattr(encoder, "fc"):
            encoder.fc = nn.Identity()  # unused by the U-Net; keeps the encoder at 21.28 M parameters
        self.encoder = encoder
        # AlbuNet's stem pool is 2x2/2; the ResNet one (option 3) is 3x3/2 with padding 1
        self.stem_pool = nn.MaxPool2d(2, 2) if stem_pool == 2 else nn.MaxPool2d(3, 2, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.center = Dec(512, nf * 8 * 2, nf * 8)
        self.dec5 = Dec(512 + nf * 8, nf * 8 * 2, nf * 8)
        self.dec4 = Dec(256 + nf * 8, nf * 8 * 2, nf * 8)
        self.dec3 = Dec(128 + nf * 8, nf * 4 * 2, nf * 2)
        self.dec2 = Dec(64 + nf * 2, nf * 2 * 2, nf * 2 * 2)
        self.dec1 = Dec(nf * 2 * 2, nf * 2 * 2, nf)
        self.dec0 = ConvRelu(nf, nf)
        self.final = nn.Conv2d(nf, 1, 1)

    def decoder_modules(self) -> list[nn.Module]:
        return [self.center, self.dec5, self.dec4, self.dec3, self.dec2, self.dec1, self.dec0, self.final]

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """x: normalised images [B, 3, S, S], S a multiple of 64."""
        s = x.shape[-1]
        if x.shape[-2] % 64 or s % 64:
            raise FdsError(f"nbr_cap: AlbuNet input side must be a multiple of 64, got {tuple(x.shape[-2:])}")
        e = self.encoder
        conv1 = self.stem_pool(e.relu(e.bn1(e.conv1(x))))
        conv2 = e.layer1(conv1)
        conv3 = e.layer2(conv2)
        conv4 = e.layer3(conv3)
        conv5 = e.layer4(conv4)
        return EncoderOutput(conv2, conv3, conv4, conv5)

    def decode(self, f: EncoderOutput) -> torch.Tensor:
        """Logits [B, 1, S, S] (concatenation order: [decoder feature, encoder skip])."""
        center = self.center(self.pool(f.conv5))
        dec5 = self.dec5(torch.cat([center, f.conv5], 1))
        dec4 = self.dec4(torch.cat([dec5, f.conv4], 1))
        dec3 = self.dec3(torch.cat([dec4, f.conv3], 1))
        dec2 = self.dec2(torch.cat([dec3, f.conv2], 1))
        dec1 = self.dec1(dec2)
        return self.final(self.dec0(dec1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def count_parameters(model: AlbuNet34) -> tuple[int, int]:
    """(encoder, decoder) parameter counts."""
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for m in model.decoder_modules() for p in m.parameters())
    return enc, dec
