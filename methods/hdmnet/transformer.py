"""HDMNet's hierarchical dense-matching transformer (paper §3.2-3.3; ``transformer.mix_transformer``).

Encoder, per stage i: PatchEmbed (Conv k_i / stride s_i + LayerNorm) -> two self-attention layers
with spatial-reduction ratio sr_i -> LayerNorm; query and supports share the weights and each
support image is encoded on its own. Decoder, coarse to fine: a cross-attention layer (cosine/0.1
scores, softmax over the QUERY axis, masked support positions zeroed; it yields the correlation map
of the stage), a ConvModule on [matched tokens, similarity prior], and the fusion
``outs = up(outs) + parse_i(o_i + up(outs))``; ``cls`` maps the finest result to two logits.

The support side of the encoder depends only on the support set, so :meth:`MixVisionTransformer.encode`
is called once per episode for the supports and once per query; :meth:`MixVisionTransformer.decode`
does the matching. Module and parameter names are the official ones (``down_sample_layers``,
``match_layers``, ``parse_layers``, ``cls``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fdsbench.blocks.matching import LN_EPS, TransformerEncoderLayer, nchw_to_tokens, tokens_to_nchw


class PatchEmbed(nn.Module):
    """Conv (``projection``) + LayerNorm (``norm``) on the token grid: [B,C,H,W] -> ([B,N,C], (h, w))."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.projection = nn.Conv2d(dim, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x):
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(nchw_to_tokens(x)), hw


class ConvModule(nn.Module):
    """Conv3x3 (no bias) -> BatchNorm (``bn``; SyncBN in the official code) -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


def parse_block(dim: int) -> nn.Sequential:
    """Conv1x1+BN -> Conv3x3+BN -> Conv1x1+BN -> ReLU (no activation in between, as the official code)."""
    return nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.BatchNorm2d(4 * dim),
                         nn.Conv2d(4 * dim, 4 * dim, 3, padding=1), nn.BatchNorm2d(4 * dim),
                         nn.Conv2d(4 * dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU())


@dataclass
class Stage:
    tokens: torch.Tensor  # [B, n*h*w, C] (supports: the n shots of an episode concatenated shot-major)
    hw: tuple[int, int]


class MixVisionTransformer(nn.Module):
    def __init__(self, *, dim: int = 64, n_sim: int = 2, heads=(2, 4, 8), match_heads: int = 2,
                 patch_sizes=(1, 3, 3), strides=(1, 2, 2), paddings=(0, 1, 1), sr_ratios=(4, 2, 1),
                 mlp_ratio: int = 4, drop: float = 0.1):
        super().__init__()
        n = len(heads)
        if not (len(patch_sizes) == len(strides) == len(paddings) == len(sr_ratios) == n):
            raise ValueError("heads, patch_sizes, strides, paddings and sr_ratios need one entry per stage")
        self.down_sample_layers = nn.ModuleList(nn.ModuleList([
            PatchEmbed(dim, patch_sizes[i], strides[i], paddings[i]),
            TransformerEncoderLayer(dim, heads[i], mlp_ratio, drop, sr_ratios[i]),
            TransformerEncoderLayer(dim, heads[i], mlp_ratio, drop, sr_ratios[i]),
            nn.LayerNorm(dim, eps=LN_EPS)]) for i in range(n))
        self.match_layers = nn.ModuleList(nn.ModuleList([
            TransformerEncoderLayer(dim, match_heads, mlp_ratio, drop, 1),
            ConvModule(dim + n_sim, dim)]) for _ in range(n))
        self.parse_layers = nn.ModuleList(parse_block(dim) for _ in range(n))
        self.cls = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.BatchNorm2d(4 * dim),
                                 nn.Conv2d(4 * dim, 4 * dim, 3, padding=1), nn.BatchNorm2d(4 * dim),
                                 nn.Conv2d(4 * dim, 2, 1))

    def encode(self, x: torch.Tensor, shots: int = 1) -> list[Stage]:
        """Self-attention stages of one side. x [B*shots,C,h,w] -> per stage tokens [B, shots*h_i*w_i, C]."""
        stages = []
        for i, (embed, sa1, sa2, norm) in enumerate(self.down_sample_layers):
            t, hw = embed(x)
            t = sa1(t, hw)[0]
            t = norm(sa2(t, hw)[0])
            BK, N, C = t.shape
            stages.append(Stage(t.reshape(BK // shots, shots * N, C), hw))
            x = tokens_to_nchw(t, hw)
        return stages

    @staticmethod
    def stage_mask(mask: torch.Tensor, hw: tuple[int, int], shots: int) -> torch.Tensor:
        """Support mask [B*shots,1,H,W] -> nearest to the stage grid -> [B,1,shots*h*w]."""
        m = F.interpolate(mask, size=hw, mode="nearest")
        return m.reshape(m.shape[0] // shots, 1, shots * hw[0] * hw[1])

    def decode(self, query: list[Stage], support: list[Stage], masks: list[torch.Tensor],
               similarity: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Matching + fusion. Returns meta logits [B,2,h_0,w_0] and the correlation maps
        [B,h_i,w_i] in decoder order (coarsest first)."""
        outs, corrs = None, []
        for i in reversed(range(len(query))):
            q, s, m = query[i], support[i], masks[i]
            B = q.tokens.shape[0]
            st, m = (s.tokens, m) if s.tokens.shape[0] == B else (s.tokens.expand(B, -1, -1), m.expand(B, -1, -1))
            cross, conv = self.match_layers[i]
            out, corr = cross(q.tokens, q.hw, source=st, mask=m)
            sim = F.interpolate(similarity, size=q.hw, mode="bilinear", align_corners=True)
            out = conv(torch.cat([tokens_to_nchw(out, q.hw), sim], 1))
            corrs.append(corr.view(B, *q.hw))
            if outs is None:
                outs = self.parse_layers[i](out)
            else:
                outs = F.interpolate(outs, size=out.shape[-2:], mode="bilinear", align_corners=False)
                outs = outs + self.parse_layers[i](out + outs)
        return self.cls(outs), corrs


class Transformer(nn.Module):
    """Container giving the official ``transformer.mix_transformer.`` prefix."""

    def __init__(self, **kw):
        super().__init__()
        self.mix_transformer = MixVisionTransformer(**kw)
