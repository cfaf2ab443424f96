"""The SOFS network (paper §3.2, appendix A.1), module for module, with the official parameter names.

Module tree (state_dict prefixes)::

    SOFS
    ├── backbone                                  frozen encoder (DINOv2 ViT-B/14 or ResNet-50)
    └── feature_recorrect                         FeatureRecorrect (paper §3.2.3)
        ├── down_query / down_supp / down_supp_semantic   Conv1x1(no bias) -> ReLU -> Dropout2d(0.5)
        ├── supp_merge_semantic / query_merge_semantic    Conv1x1(no bias) -> ReLU
        ├── query_semantic_transformer.mix_transformer    MixVisionTransformer (paper §3.2.3-3.2.4)
        │   ├── sa_layers.{i}.{norm1, attn.attn.linear_{q,k,v,o}, norm2, ffn.layers.{0,1,4}}
        │   ├── support_prototype                         Conv1x1 with bias (meta prediction only)
        │   └── cross_layers.0 ...                        only for the learnable-fusion ablation
        └── cls_semantic.{0..4}                           only for the MLP-classifier ablation

The network works on backbone feature lists, so the head is independent of the encoder: for a
ViT the maps are the tapped block outputs, for ResNet-50 the merged layer2+3 map used twice
(appendix A.2). Support-only work (support features, prototypes, support self-attention) is split out in
:meth:`SOFS.encode_support` so the test procedure computes it once per episode and re-uses it for
every query window; :meth:`SOFS.forward` composes the same pieces for training. The semantic prior,
the transformer layers and the reduce/merge blocks are HDMNet's (:mod:`fdsbench.blocks.matching`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fdsbench.blocks.features import CachedBackbone, frozen_encoder
from fdsbench.blocks.masks import downsample_mask, weighted_gap
from fdsbench.blocks.matching import TransformerEncoderLayer, merge_block, reduce_block, semantic_prior

PRIOR_SCALE = 10.0  # both prior stacks are multiplied by 10 before the merge conv ("follow HDMNet")
COS_EPS = 1e-7


# ---- priors (paper Eqs. 2-3) -------------------------------------------------------------------
def abnormal_prior(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Abnormal prior of one layer (Eq. 3): 1 - max over ALL support positions of all crops of
    cos(F_q(i), F_s(t)) * (1 - M(t)). q [B,D,h,w]; s [Bs,K',D,h,w], m [Bs,K',1,h,w], Bs = B or 1
    -> [B,1,h,w]."""
    B, D, h, w = q.shape
    Bs, K = s.shape[:2]
    qn = F.normalize(q.flatten(2).transpose(1, 2), dim=2)  # [B,N,D]
    sn = F.normalize(s.permute(0, 2, 1, 3, 4).reshape(Bs, D, K * h * w).transpose(1, 2), dim=2)  # [Bs,K'N,D]
    keep = 1.0 - m.permute(0, 2, 1, 3, 4).reshape(Bs, 1, K * h * w)
    sim = torch.matmul(qn, sn.transpose(1, 2)) * keep  # [B,N,K'N]
    return (1.0 - sim.amax(dim=2)).view(B, 1, h, w)


# ---- fusion (paper §3.2.4) -------------------------------------------------------------------
def fusion_attention(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor, tau: float) -> torch.Tensor:
    """Reverse softmax of Eq. 4: Sim = norm(Q) norm(S)^T [B,N,K'N]; Attn = softmax over the QUERY
    axis (dim 1, size N) of (Sim * m) / tau -- masked columns get logit 0, not -inf."""
    sim = torch.einsum("bmc,bnc->bmn", F.normalize(q, dim=2), F.normalize(s, dim=2))
    return torch.softmax(sim * m / tau, dim=1)


def nonlearnable_fusion(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4 as coded: F_qs = Q + Attn (S * m^T). q [B,N,C], s [B,K'N,C], m [B,1,K'N]."""
    return q + torch.bmm(fusion_attention(q, s, m, tau), s * m.transpose(1, 2))


class MixVisionTransformer(nn.Module):
    """Shared self-attention layers, fusion and prototype (``mix_transformer``, paper §3.2.3-3.2.4)."""

    def __init__(self, dim: int, heads: int, num_stages: int = 2, tau: float = 0.1, mlp_ratio: int = 4,
                 drop: float = 0.1, meta_cls: bool = True, fusion: str = "nonlearnable"):
        super().__init__()
        self.tau = tau
        self.meta_cls = meta_cls
        self.fusion = fusion
        self.sa_layers = nn.ModuleList(TransformerEncoderLayer(dim, heads, mlp_ratio, drop) for _ in range(num_stages))
        if meta_cls:
            self.support_prototype = nn.Conv2d(dim, dim, kernel_size=1)
        if fusion == "learnable":
            self.cross_layers = nn.ModuleList([TransformerEncoderLayer(dim, heads, mlp_ratio, drop)])
        elif fusion != "nonlearnable":
            raise ValueError(f"unknown fusion '{fusion}' (nonlearnable or learnable)")

    def self_attend(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] -> tokens [B,N,C] after the SA layers (self-attention within one image)."""
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for layer in self.sa_layers:
            t = layer(t, (h, w))[0]
        return t

    def encode_support(self, s: torch.Tensor, m: torch.Tensor, K: int) -> dict:
        """s [B*K',C,h,w] merged support features, m [B*K',1,h,w] downsampled masks."""
        BK, C, h, w = s.shape
        B = BK // K
        st = self.self_attend(s)  # [BK,N,C]
        out = {}
        if self.meta_cls:
            smap = st.transpose(1, 2).reshape(BK, C, h, w)
            proto = weighted_gap(self.support_prototype(smap), m)  # [BK,C,1,1]
            out["prototype"] = proto.view(B, K, C).mean(1)  # p-bar [B,C]
        out["tokens"] = st.view(B, K, h * w, C).reshape(B, K * h * w, C)  # shot-major concat
        out["mask"] = m.view(B, K, h * w).reshape(B, 1, K * h * w)
        return out

    def forward(self, q: torch.Tensor, support: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [B,C,h,w] -> fused query map F_qs [B,C,h,w] and the prototype p-bar [B,C] (or None)."""
        B, C, h, w = q.shape
        qt = self.self_attend(q)
        s, m = support["tokens"], support["mask"]
        if s.shape[0] != B:  # one support set shared by several query windows
            s, m = s.expand(B, -1, -1), m.expand(B, -1, -1)
        if self.fusion == "nonlearnable":
            fused = nonlearnable_fusion(qt, s, m, self.tau)
        else:
            fused = qt
            for layer in self.cross_layers:
                fused = layer(fused, (h, w), source=s, mask=m)[0]
        proto = support.get("prototype")
        if proto is not None and proto.shape[0] != B:
            proto = proto.expand(B, -1)
        return fused.transpose(1, 2).reshape(B, C, h, w), proto


class TransformerNonlearnableFusion(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.mix_transformer = MixVisionTransformer(**kw)


class FeatureRecorrect(nn.Module):
    """Front end + transformer + prediction (Feature_Recorrect_Module, paper §3.2.3-3.2.4)."""

    def __init__(self, fea_dim: int, n_layers: int, reduce_dim: int = 256, embed_dim: int = 256,
                 num_stages: int = 2, heads: int = 4, tau: float = 0.1, abnormal_prior: bool = True,
                 meta_cls: bool = True, fusion: str = "nonlearnable"):
        super().__init__()
        self.abnormal_prior = abnormal_prior
        self.meta_cls = meta_cls
        self.down_query = reduce_block(fea_dim, reduce_dim)
        self.down_supp = reduce_block(fea_dim, reduce_dim)
        self.down_supp_semantic = reduce_block(fea_dim, reduce_dim)
        self.supp_merge_semantic = merge_block(2 * reduce_dim, embed_dim)
        n_prior = (2 if abnormal_prior else 1) * n_layers
        self.query_merge_semantic = merge_block(2 * reduce_dim + n_prior, embed_dim)
        self.query_semantic_transformer = TransformerNonlearnableFusion(
            dim=embed_dim, heads=heads, num_stages=num_stages, tau=tau, meta_cls=meta_cls, fusion=fusion)
        if not meta_cls:  # the learnable classifier of PFENet/HDMNet (Table 6 "without MC")
            self.cls_semantic = nn.Sequential(
                nn.Conv2d(embed_dim, 4 * embed_dim, 1), nn.BatchNorm2d(4 * embed_dim),
                nn.Conv2d(4 * embed_dim, 4 * embed_dim, 3, padding=1), nn.BatchNorm2d(4 * embed_dim),
                nn.Conv2d(4 * embed_dim, 2, 1))

    @property
    def mix(self) -> MixVisionTransformer:
        return self.query_semantic_transformer.mix_transformer

    def encode_support(self, s_feats: Sequence[torch.Tensor], protos: Sequence[torch.Tensor],
                       m: torch.Tensor, K: int) -> dict:
        """s_feats: per-layer [B*K',D,h,w]; protos: per-layer prototypes [B*K',D,1,1]; m [B*K',1,h,w]."""
        h, w = s_feats[0].shape[-2:]
        s = self.down_supp(torch.cat(list(s_feats), 1))
        bins = self.down_supp_semantic(torch.cat([p.expand(-1, -1, h, w) for p in protos], 1))
        merged = self.supp_merge_semantic(torch.cat([s, bins], 1))
        BK = s.shape[0]
        out = self.mix.encode_support(merged, m, K)
        out["bin_mean"] = bins.view(BK // K, K, *bins.shape[1:]).mean(1)  # [B,C,h,w]
        return out

    def forward(self, q_feats: Sequence[torch.Tensor], support: dict, sem: torch.Tensor,
                abn: torch.Tensor) -> torch.Tensor:
        """Logits: [B,h,w] (meta prediction) or [B,2,h,w] (MLP classifier)."""
        q = self.down_query(torch.cat(list(q_feats), 1))
        B = q.shape[0]
        bins = support["bin_mean"]
        if bins.shape[0] != B:
            bins = bins.expand(B, -1, -1, -1)
        priors = torch.cat([sem, abn], 1) if self.abnormal_prior else sem
        qm = self.query_merge_semantic(torch.cat([q, bins, PRIOR_SCALE * priors], 1))
        fused, proto = self.mix(qm, support)
        if self.meta_cls:  # z(i) = p-bar . F_qs(i)
            return torch.einsum("bc,bchw->bhw", proto, fused)
        return self.cls_semantic(fused)


def _same_map(maps: Sequence[torch.Tensor], fn: Callable) -> list[torch.Tensor]:
    """Apply fn to each map, keeping repeated maps (ResNet's merged map used twice) identical objects."""
    done: dict[int, torch.Tensor] = {}
    return [done.setdefault(id(f), fn(f)) if id(f) not in done else done[id(f)] for f in maps]


@dataclass
class SupportState:
    """Everything a query needs from the support set (computed once per episode)."""

    feats: list  # per-layer support maps, reshaped [B, K', D, h, w]
    mask_hat: torch.Tensor  # downsampled masks [B, K', 1, h, w]
    weight: torch.Tensor  # [B] 1 if any support mask is non-empty (FSS) else 0 (FAD)
    head: dict  # FeatureRecorrect.encode_support output


class SOFS(nn.Module):
    """SOFS on top of a feature function.

    ``backbone``: the frozen encoder module (registered under the name ``backbone``);
    ``features``: callable(backbone, images [n,3,S,S]) -> list of L maps [n, D_j, h, w] (the tapped
    layers; for ResNet-50 the merged map twice). ``patch`` = l, the feature stride (PFIM kernel)."""

    def __init__(self, backbone: nn.Module, features: Callable, *, fea_dims: Sequence[int], patch: int,
                 reduce_dim: int = 256, embed_dim: int = 256, num_stages: int = 2, heads: int = 4,
                 tau: float = 0.1, mask_downsample: str = "pfim", abnormal_prior: bool = True,
                 meta_cls: bool = True, fusion: str = "nonlearnable"):
        super().__init__()
        self.backbone = backbone
        self.feature_cache = CachedBackbone.shared(backbone)  # test-time forwards, shared by methods
        self._features = features
        self.patch = int(patch)
        self.mask_downsample = mask_downsample
        self.meta_cls = meta_cls
        self.feature_recorrect = FeatureRecorrect(
            sum(fea_dims), len(fea_dims), reduce_dim, embed_dim, num_stages, heads, tau,
            abnormal_prior=abnormal_prior, meta_cls=meta_cls, fusion=fusion)

    # ---- pieces ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone features of a batch of prepared images."""
        self.backbone.eval()
        return [f.float() for f in self._features(frozen_encoder(self), x)]

    def down(self, mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Support/target mask [n,1,H,W] -> feature resolution (PFIM, bilinear or nearest)."""
        return downsample_mask(mask, hw, self.mask_downsample, self.patch)

    def encode_support(self, s_x: torch.Tensor, s_y: torch.Tensor,
                       feats: list[torch.Tensor] | None = None) -> SupportState:
        """s_x [B,K',3,S,S], s_y [B,K',1,S,S] (0/1) -> SupportState. ``feats`` may carry
        precomputed backbone features of the flattened supports."""
        B, K = s_x.shape[:2]
        if feats is None:
            feats = self.encode(s_x.flatten(0, 1))
        mask = (s_y.flatten(0, 1) == 1).float()
        h, w = feats[0].shape[-2:]
        m_hat = self.down(mask, (h, w))  # [B*K',1,h,w]
        with torch.no_grad():
            protos = [weighted_gap(f, m_hat) for f in feats]
        head = self.feature_recorrect.encode_support(feats, protos, m_hat, K)
        weight = (mask.view(B, -1).sum(1) > 0).float()
        return SupportState(_same_map(feats, lambda f: f.view(B, K, *f.shape[1:])), m_hat.view(B, K, 1, h, w),
                            weight, head)

    def logits(self, q_feats: list[torch.Tensor], sup: SupportState) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at feature resolution and the abnormal-prior map M_a [B,1,h,w]."""
        with torch.no_grad():
            sem, abn, seen = [], [], {}
            for q, s in zip(q_feats, sup.feats):
                key = (id(q), id(s))  # ResNet: the merged map is used twice -> identical priors
                if key not in seen:
                    seen[key] = (semantic_prior(q, s, sup.mask_hat), abnormal_prior(q, s, sup.mask_hat))
                sem.append(seen[key][0])
                abn.append(seen[key][1])
            sem, abn = torch.cat(sem, 1), torch.cat(abn, 1)
            m_a = abn.amax(1, keepdim=True)
        return self.feature_recorrect(q_feats, sup.head, sem, abn), m_a

    def probability(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsample logits to ``size`` (bilinear, align_corners=False), then sigmoid / softmax."""
        if self.meta_cls:
            return torch.sigmoid(F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
        return torch.softmax(F.interpolate(z, size=size, mode="bilinear", align_corners=False), 1)[:, 1]

    def feature_probability(self, z: torch.Tensor) -> torch.Tensor:
        """Probability at feature resolution (what the loss sees, paper §3.2.5)."""
        return torch.sigmoid(z) if self.meta_cls else torch.softmax(z, 1)[:, 1]

    def predict(self, x: torch.Tensor, sup: SupportState) -> torch.Tensor:
        """Eval output (paper Eq. 5): final = w * sigmoid(up(z)) + (1 - w) * up(M_a), [B,S,S]."""
        size = tuple(x.shape[-2:])
        z, m_a = self.logits(self.encode(x), sup)
        p = self.probability(z, size)
        a = F.interpolate(m_a, size=size, mode="bilinear", align_corners=False)[:, 0]
        w = sup.weight.view(-1, 1, 1)
        return w * p + (1 - w) * a

    def forward(self, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor) -> torch.Tensor:
        """Training forward: logits at feature resolution for query x [B,3,S,S] and supports
        s_x [B,K',3,S,S] with masks s_y [B,K',1,S,S]."""
        sup = self.encode_support(s_x, s_y)
        z, _ = self.logits(self.encode(x), sup)
        return z
