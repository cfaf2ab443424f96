"""Query-support matching pieces of HDMNet (Peng et al., CVPR 2023), shared by HDMNet and SOFS
(whose front-end and transformer derive from HDMNet's).

* :func:`semantic_prior` — HDMNet's ``get_similarity`` / SOFS Eq. 2: for every query position the
  max over support positions of cos(F_q(i), M(t) F_s(t)), averaged over the shots.

Every piece follows the official arithmetic (full-grid cosine with its 1e-7, explicit attention
scores), so a forward with the same weights is bit-identical to the official code on CPU.
* :class:`MaskMultiHeadAttention` — bias-free q/k/v/o projections. Self-attention: softmax over keys
  of q k^T / (sqrt(d) + 1e-9). Cross-attention (HDMNet §3.2): per head cos(q, k) / 0.1, softmax over
  the QUERY axis, entries of masked-out support positions set to 0 after the softmax; it also
  returns the correlation map w(i) = sum_t score(i,t) M(t) / (sum_t M(t) + 1e-9), mean over heads,
  which the distillation loss supervises.
* :class:`EfficientMultiheadAttention` — spatial reduction (SegFormer): keys/values from
  LN(Conv(k = stride = sr)) of the tokens when sr > 1.
* :class:`MixFFN`, :class:`TransformerEncoderLayer` (pre-norm, LayerNorm eps 1e-6).
* :func:`reduce_block` (Conv1x1 -> ReLU -> Dropout2d(0.5)) and :func:`merge_block` (Conv1x1 -> ReLU).

Parameter names follow the official mmcv-based modules (``attn.attn.linear_q``, ``attn.sr``,
``attn.norm``, ``ffn.layers.{0,1,4}``) so released checkpoints load strictly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CROSS_TEMPERATURE = 0.1
LN_EPS = 1e-6
COS_EPS = 1e-7


def semantic_prior(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Cosine-max similarity prior of one layer, averaged over the K shots, computed as the official
    ``get_similarity``: the support map is multiplied by its mask, cos = s.q / (|s||q| + 1e-7) over
    the full grid, max over the support positions (masked-out positions give 0), mean over shots.
    q [B,D,h,w]; s [Bs,K,D,h,w], m [Bs,K,1,h,w] with Bs = B or 1 (one support set shared by B query
    windows) -> [B,1,h,w]."""
    B, D, h, w = q.shape
    Bs, K = s.shape[:2]
    qf = q.flatten(2).contiguous()  # [B,D,N]
    qn = torch.norm(qf, 2, 1, True)  # [B,1,N]
    per_shot = []
    for k in range(K):
        sk = (s[:, k] * m[:, k]).flatten(2).permute(0, 2, 1).contiguous()  # [Bs,N,D] (official layout)
        skn = torch.norm(sk, 2, 2, True)  # [Bs,N,1]
        if Bs != B:
            sk, skn = sk.expand(B, -1, -1), skn.expand(B, -1, -1)
        per_shot.append((torch.bmm(sk, qf) / (torch.bmm(skn, qn) + COS_EPS)).amax(1))  # [B,N]
    return torch.stack(per_shot, 1).mean(1).view(B, 1, h, w)


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def tokens_to_nchw(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw)


class MaskMultiHeadAttention(nn.Module):
    """Multi-head attention, self (mask None) or HDMNet cross mode (mask [B,1,Nk] of support
    positions, 1 = target). Returns (output [B,Nq,C], correlation [B,Nq] or None)."""

    def __init__(self, dim: int, heads: int, cross_temperature: float = CROSS_TEMPERATURE):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.cross_temperature = cross_temperature
        self.linear_q = nn.Linear(dim, dim, bias=False)
        self.linear_k = nn.Linear(dim, dim, bias=False)
        self.linear_v = nn.Linear(dim, dim, bias=False)
        self.linear_o = nn.Linear(dim, dim, bias=False)

    def _split(self, x):
        B, N, C = x.shape
        return x.view(B, N, self.heads, C // self.heads).transpose(1, 2)  # [B,h,N,d]

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor):
        """HDMNet matching on projected, head-split q [B,h,Nq,d], k [B,h,Nk,d] with the support mask
        [B,1,Nk]: scores = cos(q, k) / temperature; attention = softmax over the QUERY axis with the
        columns of masked-out support positions zeroed; correlation w(i) = sum_t score(i,t) M(t) /
        (sum_t M(t) + 1e-9), averaged over heads. Returns (attention [B,h,Nq,Nk], correlation [B,Nq])."""
        scores = torch.einsum("bhmc,bhnc->bhmn", F.normalize(q, dim=-1), F.normalize(k, dim=-1))
        scores = scores / self.cross_temperature
        m = mask[:, None]  # [B,1,1,Nk]
        attn = torch.softmax(scores, dim=-2).masked_fill(m == 0, 0.0)
        corr = ((scores * m).sum(-1) / (m.sum(-1) + 1e-9)).mean(1)
        return attn, corr

    def forward(self, q, k, v, mask: torch.Tensor | None = None):
        B, N, C = q.shape
        q, k, v = self._split(self.linear_q(q)), self._split(self.linear_k(k)), self._split(self.linear_v(v))
        corr = None
        if mask is None:
            scores = torch.einsum("bhmc,bhnc->bhmn", q, k) / (math.sqrt(q.shape[-1]) + 1e-9)
            y = torch.softmax(scores, dim=-1) @ v
        else:
            attn, corr = self.cross_attention(q, k, mask)
            y = attn @ v
        return self.linear_o(y.transpose(1, 2).reshape(B, N, C)), corr


class EfficientMultiheadAttention(nn.Module):
    """Holds ``attn`` (the mmcv parent's name, hence ``attn.attn.linear_*`` keys), the optional
    spatial reduction (``sr`` conv + ``norm``) and the output dropout:
    returns (identity + Dropout(attn(x, kv)), correlation)."""

    def __init__(self, dim: int, heads: int, drop: float, sr_ratio: int = 1):
        super().__init__()
        self.sr_ratio = int(sr_ratio)
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MaskMultiHeadAttention(dim, heads)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x, identity, hw=None, source=None, mask=None):
        kv = x if source is None else source
        if self.sr_ratio > 1:
            kv = self.norm(nchw_to_tokens(self.sr(tokens_to_nchw(kv, hw))))
        out, corr = self.attn(x, kv, kv, mask)
        return identity + self.proj_drop(out), corr


class MixFFN(nn.Module):
    """SegFormer Mix-FFN on the h x w grid: Conv1x1 -> depthwise Conv3x3 -> GELU -> Dropout ->
    Conv1x1 -> Dropout (``layers.0/1/4`` carry weights)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=True),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Conv2d(hidden, dim, 1, bias=True),
            nn.Dropout(drop),
        )

    def forward(self, x, hw, identity):
        return identity + nchw_to_tokens(self.layers(tokens_to_nchw(x, hw)))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm layer: x += Drop(MHA(LN1 x [, LN1 source])); x += MixFFN(LN2 x).
    Returns (tokens, correlation map or None)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, drop: float = 0.1, sr_ratio: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientMultiheadAttention(dim, heads, drop, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = MixFFN(dim, mlp_ratio * dim, drop)

    def forward(self, x, hw, source=None, mask=None):
        if source is None:
            x, corr = self.attn(self.norm1(x), identity=x, hw=hw)
        else:
            x, corr = self.attn(self.norm1(x), identity=x, hw=hw, source=self.norm1(source), mask=mask)
        return self.ffn(self.norm2(x), hw, identity=x), corr


def reduce_block(cin: int, cout: int) -> nn.Sequential:
    """Conv1x1 (no bias) -> ReLU -> Dropout2d(0.5) (``down_query`` / ``down_supp``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))


def merge_block(cin: int, cout: int) -> nn.Sequential:
    """Conv1x1 (no bias) -> ReLU (``query_merge`` / ``supp_merge``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
