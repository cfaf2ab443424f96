"""PFENet: Prior Guided Feature Enrichment Network (Tian et al., TPAMI 2020, arXiv 2008.01449).

Two feature front-ends share one head (module names = the official state dict):

* :class:`PFENet` — the official model: deep-base dilated ResNet-50/101 (or VGG-16) as the
  attributes ``layer0``..``layer4``; query/support "middle" features cat[layer3, layer2]; the
  support's layer4 runs on its MASKED layer3; the prior compares layer4 maps (paper §3.2).
* :class:`TapPFENet` — the industrial variant of the SOFS comparison (SOFS appendix A.2): a frozen
  shared encoder (``backbone``: DINOv2 blocks or the merged ResNet layer2+3), middle features =
  the concatenated taps, support features NOT masked, prior averaged over the tapped layers, FEM
  branches at full feature resolution (``ppm_scales`` 1.0 = the feature size).

Head (paper §3.3, Fig. 3), per query and K supports:

    q = down_query(mid_q)                      v = mean_k WGAP(down_supp(mid_s^k), M^k)
    Y = mean_k prior(high_q, high_s^k * M^k)   (cosine max over support cells, per-image min-max)
    for each scale b (largest first): m = init_merge[cat(pool_b(q), v, Y_b)]
        (+ alpha_conv[cat(m, previous scale)]), + beta_conv(m), aux = inner_cls(m)
    logits = cls(res2(res1(cat of all scales)) + ...)  -> bilinear to the input size

Support masks go to feature resolution bilinearly (align_corners=True, as the official code) or,
with ``mask_rule="gfds"``, by the small-defect fallback of GFDS (bilinear -> nearest -> any pixel);
the branch that fired is counted in ``mask_branches``.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fdsbench import weights as W
from fdsbench.blocks.backbones import VGG_HED_CONFIGS, VGG16HED, build_backbone
from fdsbench.blocks.features import CachedBackbone, frozen_encoder
from fdsbench.blocks.losses import dice_loss, mixed_normal_dice_loss
from fdsbench.blocks.masks import downsample_keep_small, weighted_gap
from fdsbench.errors import FdsError

COSINE_EPS = 1e-7
IGNORE = 255


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv(cin: int, cout: int, k: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2, bias=bias)


def _classifier(dim: int, classes: int) -> nn.Sequential:
    return nn.Sequential(_conv(dim, dim, 3), nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), _conv(dim, classes, 1, True))


def _two_convs(dim: int) -> nn.Sequential:
    return nn.Sequential(_conv(dim, dim, 3), nn.ReLU(inplace=True), _conv(dim, dim, 3), nn.ReLU(inplace=True))


def prior_mask(q: torch.Tensor, s: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Training-free prior (paper Eq. 4-5): for every query cell the best cosine similarity to any
    (masked) support cell, min-max normalised per image. q [B,C,h,w], s [B,C,h',w'] -> [B,1,h,w]."""
    B, C, h, w = q.shape
    qf = q.reshape(B, C, h * w)
    sf = s.reshape(B, C, -1).permute(0, 2, 1)
    sim = torch.bmm(sf, qf) / (torch.bmm(sf.norm(2, 2, True), qf.norm(2, 1, True)) + eps)
    c = sim.max(1)[0]
    lo, hi = c.min(1, keepdim=True)[0], c.max(1, keepdim=True)[0]
    return ((c - lo) / (hi - lo + eps)).view(B, 1, h, w)


class PFENetHead(nn.Module):
    """down_query/down_supp, the prior and the Feature Enrichment Module with its classifiers.

    Subclasses give ``query_features(x) -> (mid, highs)`` and
    ``support_features(x, mask) -> (mid, highs, mask at mid size)`` with ``highs`` the maps the
    prior compares (already masked on the support side where the variant masks the backbone)."""

    def __init__(self, fea_dim: int, *, classes: int = 2, reduce_dim: int = 256,
                 ppm_scales: Sequence[float] = (60, 30, 15, 8), mask_rule: str = "bilinear",
                 small_defect_threshold: float = 0.5):
        super().__init__()
        if mask_rule not in ("bilinear", "gfds"):
            raise FdsError(f"pfenet: mask_rule={mask_rule!r} is not one of bilinear, gfds")
        self.ppm_scales = tuple(ppm_scales)
        self.mask_rule, self.small_defect_threshold = mask_rule, float(small_defect_threshold)
        self.mask_branches: Counter = Counter()
        r, n = reduce_dim, len(self.ppm_scales)
        self.cls = _classifier(r, classes)
        self.down_query = nn.Sequential(_conv(fea_dim, r, 1), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))
        self.down_supp = nn.Sequential(_conv(fea_dim, r, 1), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))
        self.init_merge = nn.ModuleList(nn.Sequential(_conv(2 * r + 1, r, 1), nn.ReLU(inplace=True)) for _ in range(n))
        self.beta_conv = nn.ModuleList(_two_convs(r) for _ in range(n))
        self.inner_cls = nn.ModuleList(_classifier(r, classes) for _ in range(n))
        self.res1 = nn.Sequential(_conv(r * n, r, 1), nn.ReLU(inplace=True))
        self.res2 = _two_convs(r)
        self.alpha_conv = nn.ModuleList(nn.Sequential(_conv(2 * r, r, 1), nn.ReLU()) for _ in range(n - 1))

    # ---- masks ---------------------------------------------------------------------------------
    def down_mask(self, mask: torch.Tensor, size, record: bool = False) -> torch.Tensor:
        """Support mask [B,1,H,W] -> feature grid ``size`` (bilinear, align_corners=True; or GFDS
        rule). ``record``: count the branch per support (once per shot, at test time)."""
        if self.mask_rule == "bilinear":
            return _up(mask, size)
        out, branches = downsample_keep_small(mask, size, threshold=self.small_defect_threshold)
        if record and not self.training:
            self.mask_branches.update(branches)
        return out

    # ---- support / query -----------------------------------------------------------------------
    def encode_support(self, s_x: torch.Tensor, s_y: torch.Tensor) -> dict:
        """Support set [B,K,3,H,W] and labels [B,K,H,W] (1 = target, 255 ignored) -> prototype
        v [B,r,1,1] (mean of the K prototypes) and the per-shot maps the prior needs."""
        protos, highs = [], []
        for k in range(s_x.shape[1]):
            mask = (s_y[:, k] == 1).float().unsqueeze(1)
            mid, high, m_mid = self.support_features(s_x[:, k], mask)
            protos.append(weighted_gap(self.down_supp(mid), m_mid))
            highs.append([h * self.down_mask(mask, h.shape[-2:]) for h in high])
        v = protos[0]
        for p in protos[1:]:
            v = v + p
        return {"proto": v / len(protos), "highs": highs}

    def prior(self, q_highs: list, support: dict, size) -> torch.Tensor:
        """Mean over shots (and tapped layers) of the per-shot priors, each resized to ``size``."""
        maps = []
        for s_highs in support["highs"]:
            per_layer = [prior_mask(q, s) for q, s in zip(q_highs, s_highs)]
            maps.append(torch.cat([_up(p, size) for p in per_layer], 1).mean(1, keepdim=True))
        return torch.cat(maps, 1).mean(1, keepdim=True)

    def fem(self, q: torch.Tensor, v: torch.Tensor, prior: torch.Tensor):
        """Feature Enrichment Module (paper §3.3): scales from the largest to the smallest, each
        merged with the previous (larger) one; returns (logits at feature size, auxiliary logits)."""
        h, w = q.shape[-2:]
        pyramid, aux = [], []
        for idx, b in enumerate(self.ppm_scales):
            bh, bw = (int(b), int(b)) if b > 1 else (int(h * b), int(w * b))
            m = torch.cat([F.adaptive_avg_pool2d(q, (bh, bw)), v.expand(-1, -1, bh, bw), _up(prior, (bh, bw))], 1)
            m = self.init_merge[idx](m)
            if idx >= 1:
                m = self.alpha_conv[idx - 1](torch.cat([m, _up(pyramid[idx - 1], (bh, bw))], 1)) + m
            m = self.beta_conv[idx](m) + m
            aux.append(self.inner_cls[idx](m))
            pyramid.append(_up(m, (h, w)))
        x = self.res1(torch.cat(pyramid, 1))
        x = self.res2(x) + x
        return self.cls(x), aux

    def predict_logits(self, x: torch.Tensor, support: dict):
        """Query [B,3,H,W] against an encoded support -> (logits [B,2,H,W], aux logits at feature size)."""
        mid, q_highs = self.query_features(x)
        q = self.down_query(mid)
        v = support["proto"]
        if v.shape[0] != q.shape[0]:  # one support set for a batch of windows
            v = v.expand(q.shape[0], -1, -1, -1)
            support = {"proto": v, "highs": [[s.expand(q.shape[0], -1, -1, -1) for s in sh] for sh in support["highs"]]}
        prior = self.prior(q_highs, support, q.shape[-2:])
        logits, aux = self.fem(q, v, prior)
        return _up(logits, x.shape[-2:]), aux

    def forward(self, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor):
        return self.predict_logits(x, self.encode_support(s_x, s_y))

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)[:, 1]


def vgg16_bn_layers() -> list[nn.Sequential]:
    """VGG-16-bn features (max-pools with ceil_mode, as the official VGG) split as PFENet:
    indices 0-6, 7-13, 14-23, 24-33, 34-42 -> layer0..layer4."""
    from torchvision.models import vgg16_bn

    feats = vgg16_bn(weights=None).features
    for m in feats:
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = True
    cuts = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)]
    return [nn.Sequential(*[feats[i] for i in range(a, b)]) for a, b in cuts]


class CaffeInput(nn.Module):
    """ImageNet-normalised RGB -> the BGR, mean-subtracted 0..255 input HED's VGG-16 was trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return VGG16HED.caffe_input(x)


def vgg16_hed_layers() -> tuple[list[nn.Sequential], dict]:
    """HED's VGG-16 (ImageNet, fine-tuned on BSDS500; offline weights) split as PFENet splits VGG-16:
    layer0..layer3 = stage 1..4 convolutions + their 2x2 ceil-mode max-pool, layer4 = stage 5
    convolutions -> layer2 = pool3 (256 ch, stride 8), layer3 = pool4 (512, stride 16),
    layer4 = conv5_3 (512, stride 16). layer0 starts with HED's Caffe input conversion."""
    bb = build_backbone("vgg16_hed", "default")
    layers = []
    for s, widths in enumerate(VGG_HED_CONFIGS["vgg16_hed"], 1):
        mods = [CaffeInput()] if s == 1 else []
        for i in range(1, len(widths) + 1):
            mods += [getattr(bb, f"conv{s}_{i}"), nn.ReLU(inplace=True)]
        if s < 5:
            mods.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        layers.append(nn.Sequential(*mods))
    return layers, dict(bb.provenance)


class PFENet(PFENetHead):
    """The official PFENet: ``layer0``..``layer4`` + head, official key names.

    ``backbone``: "deep_resnet50" | "deep_resnet101" | "vgg16_bn" | "vgg16_hed" (HED's VGG-16, the
    offline pretrained route); ``weights``: "random" or the ImageNet file (resnet50_v2.pth);
    ``mask_layer4``: support layer4 on its masked layer3 (official); ``strict_size``: refuse inputs other
    than 8k+1 (official assert);
    ``backbone_bn``: "train" lets the frozen backbone's BatchNorm follow ``model.train()`` (official: no
    fix_bn), "eval" keeps it in eval mode."""

    LAYERS = ("layer0", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, backbone: str = "deep_resnet50", weights: str = "random", *, mask_layer4: bool = True,
                 strict_size: bool = True, backbone_bn: str = "train", **head):
        if backbone == "vgg16_bn":
            if weights != "random":
                raise FdsError("pfenet: VGG-16-bn is built with random weights only; load an official "
                               "PFENet checkpoint (which holds the backbone) with load_official")
            layers, fea_dim, provenance = vgg16_bn_layers(), 512 + 256, {"name": backbone, "sha256": "random-init"}
        elif backbone == "vgg16_hed":
            if weights not in (None, "default"):
                raise FdsError("pfenet: vgg16_hed takes its weights from the weights table (weights=default)")
            layers, provenance = vgg16_hed_layers()
            fea_dim = 512 + 256
        elif backbone in ("deep_resnet50", "deep_resnet101"):
            bb = build_backbone(backbone, weights, seed=0)
            layers, fea_dim, provenance = [getattr(bb, n) for n in self.LAYERS], 1024 + 512, dict(bb.provenance)
        else:
            raise FdsError(f"pfenet: official backbone must be deep_resnet50, deep_resnet101, vgg16_bn or vgg16_hed, "
                           f"not '{backbone}'")
        if backbone_bn not in ("train", "eval"):
            raise FdsError(f"pfenet: backbone_bn={backbone_bn!r} is not one of train, eval")
        super().__init__(fea_dim, **head)
        for name, layer in zip(self.LAYERS, layers):
            setattr(self, name, layer)
        for p in self.backbone_parameters():
            p.requires_grad_(False)
        self.backbone_provenance = provenance
        self.mask_layer4, self.strict_size, self.backbone_bn = mask_layer4, strict_size, backbone_bn
        self.backbone_has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for layer in layers for m in layer.modules())

    def backbone_parameters(self):
        for name in self.LAYERS:
            yield from getattr(self, name).parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_bn == "eval":
            for name in self.LAYERS:
                getattr(self, name).eval()
        return self

    def _check_size(self, x: torch.Tensor) -> None:
        if self.strict_size and ((x.shape[-2] - 1) % 8 or (x.shape[-1] - 1) % 8):
            raise FdsError(f"pfenet: input {tuple(x.shape[-2:])} is not 8k+1 (official assert, e.g. 473); "
                           f"set strict_size=False for other sizes")

    @torch.no_grad()
    def _trunk(self, x: torch.Tensor):
        f2 = self.layer2(self.layer1(self.layer0(x)))
        return f2, self.layer3(f2)

    @staticmethod
    def _mid(f3: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        if f2.shape[-2:] != f3.shape[-2:]:  # VGG: layer2 has twice layer3's resolution
            f2 = _up(f2, f3.shape[-2:])
        return torch.cat([f3, f2], 1)

    def query_features(self, x):
        self._check_size(x)
        f2, f3 = self._trunk(x)
        with torch.no_grad():
            f4 = self.layer4(f3)
        return self._mid(f3, f2), [f4]

    def support_features(self, x, mask):
        self._check_size(x)
        f2, f3 = self._trunk(x)
        m3 = self.down_mask(mask, f3.shape[-2:], record=True)
        with torch.no_grad():
            f4 = self.layer4(f3 * m3 if self.mask_layer4 else f3)
        return self._mid(f3, f2), [f4], m3


class TapPFENet(PFENetHead):
    """Industrial PFENet (SOFS appendix A.2): a frozen shared encoder registered as ``backbone``
    (excluded from the learned state), taps from ``taps(backbone, x)``, unmasked support features."""

    def __init__(self, backbone: nn.Module, taps, tap_dims: Sequence[int], **head):
        super().__init__(int(sum(tap_dims)), **head)
        self.backbone = backbone
        self.feature_cache = CachedBackbone.shared(backbone)  # test-time forwards, shared by methods
        self.taps = taps

    def query_features(self, x):
        feats = self.taps(frozen_encoder(self), x)
        return torch.cat(feats, 1), feats

    def support_features(self, x, mask):
        feats = self.taps(frozen_encoder(self), x)
        return torch.cat(feats, 1), feats, self.down_mask(mask, feats[0].shape[-2:], record=True)


def pfenet_loss(logits: torch.Tensor, aux: list, y: torch.Tensor, *, aux_weight: float = 1.0,
                dice: str = "none", dice_weight: float = 1.0, eta: float = 1e5, beta: float = 1.0) -> torch.Tensor:
    """CE(main, ignore 255) + aux_weight * mean_i CE(aux_i upsampled) (the official loss), plus for the
    industrial rows dice_weight * Dice (``dice="dice"``) or mixed normal Dice (``"mndl"``) on the
    foreground probability over the non-ignored pixels. ``y`` [B,H,W] long."""
    size = logits.shape[-2:]
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
    if aux:
        loss = loss + aux_weight * sum(F.cross_entropy(_up(a, size), y, ignore_index=IGNORE) for a in aux) / len(aux)
    if dice != "none":
        valid = (y != IGNORE).to(logits.dtype)
        p = logits.softmax(1)[:, 1] * valid
        t = (y == 1).to(logits.dtype) * valid
        d = mixed_normal_dice_loss(p, t, eta=eta, beta=beta) if dice == "mndl" else dice_loss(p, t)
        loss = loss + dice_weight * d
    return loss


def load_official(model: nn.Module, state, *, source: str = "state dict") -> None:
    """Strictly load an official PFENet checkpoint (``{'epoch', 'state_dict', 'optimizer'}`` or a bare
    state dict; keys with or without DataParallel's ``module.``). A mismatch is refused with every
    missing, unexpected and mis-shaped key named."""
    if not isinstance(state, dict):
        source = str(state)
        state = W.read_checkpoint(state, strip_prefixes=False)
    sd = W.unwrap_state_dict(state, source=source)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shaped = sorted(f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})" for k in set(sd) & set(own)
                    if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shaped:
        def listing(title, keys):
            shown = ", ".join(keys[:40]) + (" ..." if len(keys) > 40 else "")
            return f"\n  {len(keys)} {title}: {shown}" if keys else ""
        raise W.WeightsError(f"{source} is not a PFENet checkpoint for this model ({len(own)} tensors):"
                             + listing("missing", missing) + listing("unexpected", unexpected)
                             + listing("mis-shaped", shaped)
                             + "\n  check the backbone (ResNet-50/101, VGG-16-bn), reduce_dim and ppm_scales")
    model.load_state_dict(sd, strict=True)
