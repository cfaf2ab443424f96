"""HDMNet (Peng et al., CVPR 2023): the official model with its PSPNet base learner, and the
industrial variant of the SOFS paper (frozen tapped encoder, no base learner).

Official module tree (state-dict prefixes; an official checkpoint loads strictly)::

    HDMNet
    ├── layer0 .. layer4, ppm, cls (conv+BN), base_learnear (ReLU, Dropout2d, Conv1x1)   frozen PSPNet
    ├── down_query / down_supp          Conv1x1(1536->256, no bias) -> ReLU -> Dropout2d(0.5)
    ├── supp_merge / query_merge        Conv1x1(512 | 512+2 -> 64, no bias) -> ReLU
    ├── transformer.mix_transformer     hierarchical transformer (transformer.py)
    ├── gram_merge / cls_merge          Conv1x1(2->1, no bias), initialised to (1, 0)
    └── kshot_rw                        Conv1x1(K->2) -> ReLU -> Conv1x1(2->K)   (K > 1 only; never trained)

The industrial variant replaces the PSPNet by ``backbone`` (frozen DINOv2 / ResNet-50 taps shared
with SOFS) and keeps the meta learner (:class:`MetaLearner`): down_query/down_supp on the
concatenated taps, one similarity channel per tap, and a transformer whose patch embeddings do
not downsample. Support-only work is split into ``encode_support`` so an episode's supports are
encoded once for all of its queries (and sliding windows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fdsbench.blocks.backbones.deep_resnet import build_deep_resnet
from fdsbench.blocks.features import CachedBackbone, frozen_encoder
from fdsbench.blocks.masks import weighted_gap
from fdsbench.blocks.matching import merge_block, reduce_block, semantic_prior

from .transformer import Transformer

PRIOR_SCALE = 10.0  # the similarity stack enters query_merge multiplied by 10
GRAM_EPS = 1e-7


# ---- PSPNet base learner (BAM-style, frozen inside HDMNet) ---------------------------------------
class PPM(nn.Module):
    """Pyramid pooling: per bin AdaptiveAvgPool -> Conv1x1 (no bias) -> BN -> ReLU -> bilinear up
    (align_corners=True), concatenated with the input (2048 -> 4096 channels)."""

    def __init__(self, in_dim: int = 2048, reduction_dim: int = 512, bins=(1, 2, 3, 6)):
        super().__init__()
        self.features = nn.ModuleList(nn.Sequential(
            nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
            nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for b in bins)

    def forward(self, x):
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True)
                                for f in self.features], 1)


def psp_head(classes: int, in_dim: int = 4096) -> nn.Sequential:
    """``cls``: Conv3x3(4096->512, no bias) -> BN -> ReLU -> Dropout2d(0.1) -> Conv1x1(512->classes)."""
    return nn.Sequential(nn.Conv2d(in_dim, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512),
                         nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(512, classes, 1))


class PSPNet(nn.Module):
    """PSPNet on the deep-base dilated ResNet (output stride 8): ``layer0..layer4``, ``ppm``, ``cls``
    with ``classes`` = background + base classes. Trained first on the fold's base classes."""

    def __init__(self, classes: int, backbone: str = "deep_resnet50"):
        super().__init__()
        rn = build_deep_resnet(backbone)
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = (
            rn.layer0, rn.layer1, rn.layer2, rn.layer3, rn.layer4)
        self.ppm = PPM()
        self.cls = psp_head(classes)

    def forward(self, x):
        """Logits at the input size (bilinear, align_corners=True)."""
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))
        out = self.cls(self.ppm(f))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)


def psp_key_map(sd: dict, module: nn.Module) -> dict:
    """An official PSPNet checkpoint also stores its backbone under ``encoder.{0..4}`` (an alias of
    layer0..layer4); those duplicates are dropped."""
    return {k: v for k, v in sd.items() if not k.startswith("encoder.")}


# ---- pieces of the official model ----------------------------------------------------------------
def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """Channel-cosine Gram matrix [B,C,C]: F F^T / (|F_c| |F_c'| + 1e-7) over the flattened grid."""
    B, C = f.shape[:2]
    f = f.reshape(B, C, -1)
    n = f.norm(2, dim=2, keepdim=True)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(n, n.transpose(1, 2)) + GRAM_EPS)


def gram_distance(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e = ||G(q) - G(s)||_F / ||1_{CxC}||_F per sample, [B] (BAM Eq. 9)."""
    gq = gram_matrix(q)
    return (gq - gram_matrix(s)).norm(dim=(1, 2)) / torch.ones_like(gq).norm(dim=(1, 2))


def kshot_estimate(e: torch.Tensor, kshot_rw: nn.Module | None) -> torch.Tensor:
    """K-shot reweighting of the per-shot Gram distances e [B,K] -> [B].

    The errors are sorted ascending and fed to ``kshot_rw``; the official code then gathers the
    weights with idx1.gather(idx1.argsort()), which is the identity, so the weight computed for the
    k-th SMALLEST error multiplies the k-th shot's error in the original order. Kept for parity.
    Without ``kshot_rw`` (a model built for one shot used on K > 1 shots) the plain mean is used."""
    if e.shape[1] == 1:
        return e[:, 0]
    if kshot_rw is None:
        return e.mean(1)
    ranked = e.sort(1)[0]
    w = torch.softmax(kshot_rw(ranked[:, :, None, None])[:, :, 0, 0], 1)
    return (w * e).sum(1)


@dataclass
class SupportEncoding:
    """What a query needs from an episode's support set (B episodes, K shots)."""

    stages: list  # transformer Stage per level, tokens [B, K*h*w, C]
    masks: list  # per level [B,1,K*h*w]
    prototype: torch.Tensor  # mean over shots of the WGAP prototypes [B,256,1,1]
    sim_feats: list  # per similarity channel the support maps [B,K,D,h,w]
    sim_mask: torch.Tensor  # binary masks at feature resolution [B,K,1,h,w]
    shots: int
    low: torch.Tensor | None = None  # official: support layer2 maps [B,K,512,h,w] for the Gram distance


class MetaLearner(nn.Module):
    """HDMNet's meta learner on frozen features: front-end (down_query/down_supp, WGAP prototypes,
    cosine-max similarity x10, supp_merge/query_merge) and the hierarchical transformer."""

    def __init__(self, fea_dim: int, n_sim: int, *, reduce_dim: int = 256, embed_dim: int = 64,
                 heads=(2, 4, 8), match_heads: int = 2, patch_sizes=(1, 3, 3), strides=(1, 2, 2),
                 paddings=(0, 1, 1), sr_ratios=(4, 2, 1), mlp_ratio: int = 4, drop: float = 0.1):
        super().__init__()
        self.down_query = reduce_block(fea_dim, reduce_dim)
        self.down_supp = reduce_block(fea_dim, reduce_dim)
        self.query_merge = merge_block(2 * reduce_dim + n_sim, embed_dim)
        self.supp_merge = merge_block(2 * reduce_dim, embed_dim)
        self.transformer = Transformer(dim=embed_dim, n_sim=n_sim, heads=tuple(heads), match_heads=match_heads,
                                       patch_sizes=tuple(patch_sizes), strides=tuple(strides),
                                       paddings=tuple(paddings), sr_ratios=tuple(sr_ratios),
                                       mlp_ratio=mlp_ratio, drop=drop)

    @property
    def mix(self):
        return self.transformer.mix_transformer

    def meta_support(self, mid: torch.Tensor, sim_feats: Sequence[torch.Tensor], mask: torch.Tensor,
                     shots: int) -> SupportEncoding:
        """mid [B*K,fea_dim,h,w] (concatenated taps), sim_feats per channel [B*K,D,h,w],
        mask [B*K,1,H,W] binary at input resolution."""
        s = self.down_supp(mid)
        h, w = s.shape[-2:]
        proto = weighted_gap(s, F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=True))
        merged = self.supp_merge(torch.cat([s, proto.expand(-1, -1, h, w)], 1))
        stages = self.mix.encode(merged, shots)
        masks = [self.mix.stage_mask(mask, st.hw, shots) for st in stages]
        B = s.shape[0] // shots
        m_sim = F.interpolate(mask, size=(h, w), mode="nearest").view(B, shots, 1, h, w)
        return SupportEncoding(stages, masks, proto.view(B, shots, *proto.shape[1:]).mean(1),
                               [f.view(B, shots, *f.shape[1:]) for f in sim_feats], m_sim, shots)

    def similarity(self, q_sim: Sequence[torch.Tensor], sup: SupportEncoding) -> torch.Tensor:
        """One cosine-max prior per channel, averaged over the shots, [B,n_sim,h,w]."""
        return torch.cat([semantic_prior(q, s, sup.sim_mask) for q, s in zip(q_sim, sup.sim_feats)], 1)

    def meta(self, mid: torch.Tensor, q_sim: Sequence[torch.Tensor], sup: SupportEncoding):
        """Meta logits [B,2,h,w] and the decoder's correlation maps (coarsest first)."""
        q = self.down_query(mid)
        B, _, h, w = q.shape
        with torch.no_grad():
            sim = self.similarity(q_sim, sup)
        proto = sup.prototype if sup.prototype.shape[0] == B else sup.prototype.expand(B, -1, -1, -1)
        qm = self.query_merge(torch.cat([q, proto.expand(-1, -1, h, w), PRIOR_SCALE * sim], 1))
        return self.mix.decode(self.mix.encode(qm), sup.stages, sup.masks, sim)


def distillation_loss(corrs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Sum over the decoder stages of KL(softmax(t) || softmax(s)) over positions (paper Eq. 7):
    the coarsest map learns from the ground truth (1 on foreground, -1e9 elsewhere, bilinearly
    resized), every finer map from the previous (detached) one. target [B,H,W] (1 = foreground)."""
    t = torch.where(target == 1, 1.0, -1e9).float()
    total = 0.0
    for s in corrs:
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t[:, None], size=s.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        ps, pt = torch.softmax(s.flatten(1), 1), torch.softmax(t.flatten(1), 1)
        total = total + (pt * torch.log(pt + 1e-12) - pt * torch.log(ps + 1e-12)).sum(1).mean()
        t = s.detach()
    return total


class HDMNet(MetaLearner):
    """The official model: frozen PSPNet features (supports masked at the input), meta
    learner, Gram-difference / K-shot reweighting and the base-learner ensemble."""

    def __init__(self, shot: int = 1, base_classes: int = 15, backbone: str = "deep_resnet50",
                 kshot_trans_dim: int = 2, **kw):
        psp = PSPNet(base_classes + 1, backbone)
        super().__init__(1024 + 512, 2, **kw)
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = (
            psp.layer0, psp.layer1, psp.layer2, psp.layer3, psp.layer4)
        self.ppm = psp.ppm
        self.cls = nn.Sequential(psp.cls[0], psp.cls[1])
        self.base_learnear = nn.Sequential(psp.cls[2], psp.cls[3], psp.cls[4])
        self.shot = int(shot)
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.gram_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
            self.cls_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        if self.shot > 1:
            self.kshot_rw = nn.Sequential(nn.Conv2d(self.shot, kshot_trans_dim, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(kshot_trans_dim, self.shot, 1))
        for name in self.frozen_modules():
            getattr(self, name).requires_grad_(False)

    @staticmethod
    def frozen_modules() -> tuple[str, ...]:
        return ("layer0", "layer1", "layer2", "layer3", "layer4", "ppm", "cls", "base_learnear")

    def load_pspnet(self, psp: PSPNet) -> None:
        """Take the (trained) base learner's weights."""
        sd = {k: v for k, v in psp.state_dict().items()}
        own = self.state_dict()
        for k, v in sd.items():
            name = k
            if k.startswith("cls."):
                i = int(k.split(".")[1])
                name = (f"cls.{i}." if i < 2 else f"base_learnear.{i - 2}.") + k.split(".", 2)[2]
            own[name].copy_(v)

    @torch.no_grad()
    def extract_feats(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[l0, l1, l2, l3, l4, f5 = cls(ppm(l4))]; supports are multiplied by their mask first."""
        if mask is not None:
            x = x * F.interpolate(mask, size=x.shape[-2:], mode="nearest")
        out = [self.layer0(x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out.append(layer(out[-1]))
        out.append(self.cls(self.ppm(out[-1])))
        return out

    def encode_support(self, s_x: torch.Tensor, s_y: torch.Tensor) -> SupportEncoding:
        """s_x [B,K,3,H,W], s_y [B,K,H,W] or [B,K,1,H,W] (1 = target, 255 = ignore)."""
        B, K = s_x.shape[:2]
        mask = (s_y.reshape(B * K, 1, *s_y.shape[-2:]) == 1).float()
        f = self.extract_feats(s_x.flatten(0, 1), mask)
        sup = self.meta_support(torch.cat([f[3], f[2]], 1), [f[5], f[4]], mask, K)
        sup.low = f[2].view(B, K, *f[2].shape[1:])
        return sup

    def forward_features(self, x: torch.Tensor, sup: SupportEncoding, base_class: Sequence[int] | None = None):
        """(final_out, meta_out, base_out) at feature resolution and the correlation maps.
        ``base_class``: per episode the 1-based base-learner class of the episode during training
        (excluded from the base map), None at test."""
        f = self.extract_feats(x)
        meta_out, corrs = self.meta(torch.cat([f[3], f[2]], 1), [f[5], f[4]], sup)
        base_out = self.base_learnear(f[5])
        B = x.shape[0]
        low = sup.low if sup.low.shape[0] == B else sup.low.expand(B, *sup.low.shape[1:])
        e = torch.stack([gram_distance(f[2], low[:, k]) for k in range(sup.shots)], 1)  # [B,K]
        est = kshot_estimate(e, getattr(self, "kshot_rw", None)).view(B, 1, 1, 1)
        p_meta, p_base = meta_out.softmax(1), base_out.softmax(1)
        if base_class is None:
            base_map = p_base[:, 1:].sum(1, keepdim=True)
        else:
            keep = torch.ones(B, p_base.shape[1], dtype=torch.bool, device=x.device)
            keep[:, 0] = False
            keep[torch.arange(B), torch.as_tensor(base_class, device=x.device)] = False
            base_map = (p_base * keep[:, :, None, None]).sum(1, keepdim=True)
        est_map = est.expand_as(p_meta[:, :1])
        bg = self.gram_merge(torch.cat([p_meta[:, :1], est_map], 1))
        fg = self.gram_merge(torch.cat([p_meta[:, 1:], est_map], 1))
        final = torch.cat([self.cls_merge(torch.cat([bg, base_map], 1)), fg], 1)
        return final, meta_out, base_out, corrs

    def forward(self, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor, base_class=None):
        """Official eval outputs (final_out, meta_out, base_out), bilinearly upsampled
        (align_corners=True) to the input size, plus the correlation maps."""
        final, meta, base, corrs = self.forward_features(x, self.encode_support(s_x, s_y), base_class)
        size = x.shape[-2:]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        return up(final), up(meta), up(base), corrs


class IndustrialHDMNet(MetaLearner):
    """HDMNet as re-implemented for SOFS Tables 1/2/4: frozen ``backbone`` taps, supports NOT masked
    at the input, one similarity channel per tapped map, no base learner; output = meta logits."""

    def __init__(self, backbone: nn.Module, features: Callable, fea_dims: Sequence[int], **kw):
        super().__init__(sum(fea_dims), len(fea_dims), **kw)
        self.backbone = backbone
        self.feature_cache = CachedBackbone.shared(backbone)  # test-time forwards, shared by methods
        self._features = features

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.backbone.eval()
        return [f.float() for f in self._features(frozen_encoder(self), x)]

    @staticmethod
    def _mid(feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(feats, 1)

    def encode_support(self, s_x: torch.Tensor, s_y: torch.Tensor, feats: list | None = None) -> SupportEncoding:
        """s_x [B,K,3,S,S], s_y [B,K,1,S,S] (0/1); ``feats`` = precomputed maps of the flattened supports."""
        B, K = s_x.shape[:2]
        mask = (s_y.reshape(B * K, 1, *s_y.shape[-2:]) == 1).float()
        if feats is None:
            feats = self.encode(s_x.flatten(0, 1))
        return self.meta_support(self._mid(feats), feats, mask, K)

    def logits(self, x: torch.Tensor, sup: SupportEncoding):
        feats = self.encode(x)
        return self.meta(self._mid(feats), feats, sup)

    def forward(self, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor):
        return self.logits(x, self.encode_support(s_x, s_y))
