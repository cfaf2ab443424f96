"""Plain ViT encoders with the official DINOv2 / DINO parameter names.

The module tree reproduces the released checkpoints' key names exactly, so
``dinov2_vitb14_pretrain.pth`` and ``dino_deitsmall8_pretrain.pth`` load with ``strict=True`` and a
model that registers the encoder as ``backbone`` (SOFS) loads its released checkpoint
strictly:

* ``cls_token`` [1,1,D], ``pos_embed`` [1,1+(S/p)^2,D] (S = 518 for DINOv2, 224 for DINO),
  ``mask_token`` [1,D] (DINOv2 only), ``patch_embed.proj.{weight,bias}``,
* ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``
  (``ls*`` only with LayerScale, i.e. DINOv2), ``norm.{weight,bias}``.

Positional embeddings are resized for other input sizes the way the official code does
(facebookresearch/dinov2 ``interpolate_pos_encoding``; DINO identical): bicubic, no antialias,
``scale_factor = (n + 0.1) / sqrt(N)`` (the historical 0.1 offset, dino issue #8), no resizing at
the native square grid.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import FdsError
from .base import BackboneMixin


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # [B, D, h, w]
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d)) v, as the official Attention (scale = head_dim ** -0.5)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x)). LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layerscale: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(BackboneMixin, nn.Module):
    """DINOv2 (``layerscale=1.0, mask_token=True, img_size=518``) or DINO v1
    (``layerscale=None, mask_token=False, img_size=224``) ViT encoder.

    ``forward_features(x, layers)`` returns the OUTPUT of each listed block (0-based; negative
    indices count from the end): the residual stream before the final ``norm`` (``norm=True``
    applies it, as DINO's ``get_intermediate_layers`` does), CLS token dropped, reshaped to
    [B, D, H/p, W/p]. Blocks after the last requested one are not run (their outputs would be
    discarded; results are identical)."""

    def __init__(self, *, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 img_size: int, layerscale: float | None, mask_token: bool, mlp_ratio: float = 4.0,
                 interpolate_offset: float = 0.1, interpolate_antialias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.img_size = img_size
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        n = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.strides = {i: patch_size for i in range(depth)}
        self.channels = {i: embed_dim for i in range(depth)}
        if self.pos_embed.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        """Random init as the official code: pos_embed trunc-normal(0.02), cls_token normal(1e-6),
        mask_token 0, Linear weights trunc-normal(0.02) with zero bias, LayerNorm 1/0, LayerScale
        ``init_values``, patch conv PyTorch default. (The official truncation bounds are the
        absolute values +-2, i.e. +-100 std: a plain normal draw clamped there is the same law and
        is twice as fast on CPU.)"""
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if hasattr(self, "mask_token"):
                self.mask_token.zero_()
            self.patch_embed.proj.reset_parameters()
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.02).clamp_(-2.0, 2.0)
                    m.bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
                elif isinstance(m, LayerScale):
                    m.gamma.fill_(m.init_values)

    # ---- positional embedding ------------------------------------------------------------------
    def interpolate_pos_encoding(self, n_tokens: int, height: int, width: int, dtype) -> torch.Tensor:
        N = self.pos_embed.shape[1] - 1
        if n_tokens - 1 == N and height == width:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        M = int(math.sqrt(N))
        h0, w0 = height // self.patch_size, width // self.patch_size
        if self.interpolate_offset:
            kw = {"scale_factor": (float(h0 + self.interpolate_offset) / M,
                                   float(w0 + self.interpolate_offset) / M)}
        else:
            kw = {"size": (h0, w0)}
        patch_pos = F.interpolate(patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                  antialias=self.interpolate_antialias, **kw)
        assert patch_pos.shape[-2:] == (h0, w0), (patch_pos.shape, h0, w0)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise FdsError(f"{self.name or 'ViT'}: input {H}x{W} is not a multiple of the patch size "
                           f"{self.patch_size}; pad or resize the image (e.g. 518 for DINOv2-B/14)")
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(B, -1, -1).to(t.dtype), t), dim=1)
        return t + self.interpolate_pos_encoding(t.shape[1], H, W, t.dtype)

    # ---- features --------------------------------------------------------------------------------
    def normalize_layers(self, layers) -> tuple[int, ...]:
        if layers is None:
            return (self.n_blocks - 1,)
        if isinstance(layers, int):
            layers = (layers,)
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise FdsError(f"{self.name}: ViT layers are block indices (0..{self.n_blocks - 1}), got {layer!r}")
            i = layer + self.n_blocks if layer < 0 else layer
            if not 0 <= i < self.n_blocks:
                raise FdsError(f"{self.name}: block {layer} out of range; the model has {self.n_blocks} blocks")
            out.append(i)
        return tuple(out)

    def feature_spec(self, layers, height: int, width: int):
        return [(self.embed_dim, height // self.patch_size, width // self.patch_size)
                for _ in self.normalize_layers(layers)]

    def forward_tokens(self, x: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = False):
        """Token outputs [B, 1+N, D] (CLS first) of the listed blocks."""
        want = self.normalize_layers(layers)
        with self._grad_context():
            t = self.prepare_tokens(x)
            got = {}
            for i, blk in enumerate(self.blocks[: max(want) + 1]):
                t = blk(t)
                if i in want:
                    got[i] = self.norm(t) if norm else t
            return [got[i] for i in want]

    def forward_features(self, x: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = False):
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        toks = self.forward_tokens(x, layers, norm)
        return [t[:, 1:].reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for t in toks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised CLS token (the official model's output with an identity head)."""
        return self.forward_tokens(x, (self.n_blocks - 1,), norm=True)[0][:, 0]


#: name -> constructor arguments (official hub configurations)
VIT_CONFIGS = {
    "dinov2_vits14": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, img_size=518,
                          layerscale=1.0, mask_token=True),
    "dinov2_vitb14": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, img_size=518,
                          layerscale=1.0, mask_token=True),
    "dinov2_vitl14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, img_size=518,
                          layerscale=1.0, mask_token=True),
    "dino_vits8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6, img_size=224,
                       layerscale=None, mask_token=False),
    "dino_vits16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, img_size=224,
                        layerscale=None, mask_token=False),
    "dino_vitb8": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12, img_size=224,
                       layerscale=None, mask_token=False),
}


def build_vit(name: str) -> VisionTransformer:
    """Random-init model: built on the meta device and initialised once (no default init first)."""
    with torch.device("meta"):
        m = VisionTransformer(**VIT_CONFIGS[name])
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    m.name = name
    return m
