"""``pfenet`` — PFENet (Tian et al., TPAMI 2020): the official model and the industrial variants of
the SOFS comparison (SOFS appendix A.2) and of the GFDS benchmark (GFDS §6, Table 4).

Architectures (``arch``): ``official`` = deep-base dilated ResNet/VGG as ``layer0``..``layer4``
(official state-dict names; :func:`methods.pfenet.model.load_official` loads released checkpoints
strictly); ``taps`` = a frozen shared encoder (DINOv2 blocks / merged ResNet layer2+3, as SOFS).

Test paths (``test_path``):
* ``canvas`` (official test.py): keep the aspect ratio, longer side -> ``image_size``, both sides
  floored to a multiple of 8, top-left on a canvas of ZEROS before normalisation (support label
  canvas 255 = ignored); logits resized (bilinear, align_corners=True) to the original longer-side
  square and cropped to the image;
* ``resize`` (SOFS plain protocol): ResizeLongestSide + pad, whole image;
* ``sliding`` (NR): native-resolution windows stitched as SOFS; supports are the manifest's crops.
The probability is the softmax foreground channel (argmax <=> p > 0.5).

Training: episodes from the shared SOFS sampler (``train_sampler="nr"``: NR crops or whole images)
or the official PFENet loader (``"official"``: size-filtered class lists, RandScale / RandRotate /
blur / flip / foreground-keeping random crop, labels 0/1/255 with 255 ignored by the loss), SGD with momentum and the
official hidden 10x learning-rate multiplier on every head group (``lr_scale``), poly decay per
iteration, per-epoch resumable checkpoints (the shared TrainLoop).
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdsbench import weights as W
from fdsbench.blocks.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, required_weights
from fdsbench.blocks.backbones.taps import feature_taps, tap_dims
from fdsbench.blocks.fss_episodes import FSSEpisodes, FSSSettings
from fdsbench.blocks.inference import probability_map
from fdsbench.blocks.nr import EpisodeSampler, NRSettings
from fdsbench.blocks.tiling import image_to_tensor, mask_to_tensor, predict_sliding, predict_whole
from fdsbench.blocks.training import TrainLoop, param_groups
from fdsbench.config import config_hash
from fdsbench.errors import FdsError
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Query, Requirements, SupportSet, TrainSource

from .model import PFENet, TapPFENet, load_official, pfenet_loss

# the nine optimiser groups of the official train.py (order as there; "inner_cls" before its substring "cls")
HEAD_GROUPS = ("down_query", "down_supp", "init_merge", "alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls")
OFFICIAL_LAYERS = tuple(f"layer{i}." for i in range(5))


# ---- official test-time canvas (test.py: zero padding before normalisation) -----------------------
def canvas_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Longer side -> ``size`` (aspect kept, int()), each side floored to a multiple of 8; images
    that already fit are kept as they are."""
    if max(h, w) <= size:
        return h, w
    nh, nw = (size, int(w * size / h)) if h >= w else (int(h * size / w), size)
    return nh - nh % 8, nw - nw % 8


def canvas_image(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 -> [3, size, size]: bilinear resize (OpenCV), zeros canvas, then normalisation."""
    import cv2

    h, w = image.shape[:2]
    nh, nw = canvas_size(h, w, size)
    im = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else image
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:nh, :nw] = im
    x = (canvas / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def canvas_label(mask: np.ndarray, size: int) -> torch.Tensor:
    """Binary mask -> [size, size] labels: nearest resize, 1 = target, canvas 255 (ignored)."""
    import cv2

    h, w = mask.shape[:2]
    nh, nw = canvas_size(h, w, size)
    m = np.asarray(mask, np.float32)
    if (nh, nw) != (h, w):
        m = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST)
    out = np.full((size, size), 255.0, np.float32)
    out[:nh, :nw] = (m > 0).astype(np.float32)
    return torch.from_numpy(out)


def canvas_output(prob: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Probability [S, S] -> the original longer-side square (bilinear, align_corners=True) -> [:h, :w]."""
    side = max(h, w)
    return F.interpolate(prob[None, None], size=(side, side), mode="bilinear", align_corners=True)[0, 0, :h, :w]


@register_method("pfenet")
class PFENetMethod(Method):
    """PFENet: prior from frozen high-level features + Feature Enrichment Module (official / industrial)."""

    requires = Requirements(training=True, weights=("dinov2_vitb14",), gpu_recommended=True)

    @dataclass
    class Config:
        # ◊ marks an option the official PFENet code does not have (the industrial rows' and ours)
        # --- model; defaults = the industrial "PFENet" row on DINOv2 ViT-B/14 @ 518 (SOFS Table 1) ---
        arch: str = "taps"  # official (layer0..layer4) | taps (frozen shared encoder)
        backbone: str = "dinov2_vitb14"  # official: deep_resnet50 | deep_resnet101 | vgg16_bn | vgg16_hed
        weights: str = "default"  # encoder: "default" (weights table), "random", or a file path
        checkpoint: str = ""  # official PFENet checkpoint (train_epoch_*.pth): fit() loads it instead of training
        layers: tuple = (5, 6, 7, 8, 9, 10)  # taps: ViT blocks (0-based); ResNet: merged layer2+3 (twice)
        merge_dim: int = 1024  # taps/ResNet: channels of the merged layer2+3 map
        image_size: int = 518  # model input side
        reduce_dim: int = 256
        ppm_scales: tuple = (1.0, 1.0, 1.0, 1.0)  # FEM bins: > 1 absolute, <= 1 fraction of the feature size ◊
        mask_layer4: bool = True  # official: support layer4 on the masked layer3
        strict_size: bool = True  # official: refuse inputs that are not 8k+1
        backbone_bn: str = "train"  # official: frozen backbone BatchNorm follows model.train() (no fix_bn)
        mask_rule: str = "bilinear"  # bilinear (align_corners=True) | gfds (small-defect fallback) ◊
        small_defect_threshold: float = 0.5  # gfds rule: a bilinear mask below it everywhere has vanished ◊
        # --- test ---
        test_path: str = "resize"  # canvas (official) | resize (SOFS plain) | sliding (NR)
        window: int = 0  # sliding: window side at native resolution; 0 = image_size
        window_batch: int = 4
        s_in_shot: int = 0  # sliding: copies of a whole-image support; 0 = as many as the crops, else 4 / 1
        amp: str = "fp32"  # fp32 | bf16 (autocast on CUDA; the GFDS speed protocol)
        # --- loss (A4; Dice / MNDL for the industrial rows) ---
        aux_weight: float = 1.0
        dice: str = "dice"  # none (official) | dice | mndl ◊
        dice_weight: float = 1.0  # ◊
        eta: float = 1e5  # MNDL eta ◊ (SOFS value)
        beta: float = 1.0
        # --- training (A5) ---
        train_sampler: str = "nr"  # nr (shared SOFS sampler) | official (PFENet loader and transform, A6)
        min_pixels: int = 2048  # official sampler: a class is listed for an image from 2*32*32 pixels on
        scale_range: tuple = (0.9, 1.1)  # official sampler: RandScale (COCO recipe 0.8-1.25)
        rotate_range: tuple = (-10.0, 10.0)  # official sampler: RandRotate, degrees
        nr: bool = False  # non-resizing training crops (SOFS sampler) and sliding-window test
        epochs: int = 50
        batch_size: int = 4  # episodes per iteration
        lr: float = 0.0025  # config base_lr ...
        lr_scale: float = 10.0  # ... times the hidden multiplier of poly_learning_rate (every head group)
        momentum: float = 0.9
        weight_decay: float = 1e-4
        power: float = 0.9
        train_shot: int = 1
        train_s_in_shot: int = 4  # NR: support crops per image
        crop_size: int = 0  # NR training crop side; 0 = window
        alpha: float = 0.3  # NR: probability of a normal query crop
        area_resize_ratio: float = 0.01
        augment: bool = True  # SOFS training augmentations (nr sampler only)
        max_iters_per_epoch: int = 0
        cache_images: int = 0

    _dino = {}
    _resnet = {"backbone": "resnet50", "layers": (2, 3), "image_size": 512}
    _official = {"arch": "official", "backbone": "deep_resnet50", "image_size": 473, "ppm_scales": (60, 30, 15, 8),
                 "test_path": "canvas", "dice": "none", "epochs": 200, "train_sampler": "official"}
    _gfds = {**_official, "image_size": 256, "strict_size": False, "ppm_scales": (1.0, 0.5, 0.25, 0.125),
             "mask_rule": "gfds", "test_path": "resize", "epochs": 400, "train_sampler": "nr"}
    _nr_mndl = {"nr": True, "test_path": "sliding", "dice": "mndl"}
    presets = {
        "official": _official,  # PASCAL-5i recipe (ResNet-50, 473, base_lr 0.0025 x 10, 200 epochs)
        "paper": _dino,  # SOFS Table 1/2 "PFENet", DINOv2-B/14 @ 518
        "paper_nr_mndl": {**_dino, **_nr_mndl},  # "PFENet+NR+MNDL"
        "paper_resnet50": _resnet,
        "paper_resnet50_nr_mndl": {**_resnet, **_nr_mndl},
        "gfds": _gfds,  # GFDS Table 4 "PFENet": ResNet-50, 256 x 256, 400 epochs, small-defect mask rule
        # speed of the GFDS row (154 FPS on a 3090 Ti): bf16 autocast, random weights, a 1-step fit
        "fps": {**_gfds, "weights": "random", "amp": "bf16", "epochs": 1, "max_iters_per_epoch": 1,
                "batch_size": 1},
        # CPU-sized: the official model on HED's VGG-16 (offline ImageNet/BSDS500 weights) split as the
        # official VGG (layer2 = pool3, layer3 = pool4, layer4 = conv5); 256-px native NR crops and
        # sliding windows at native resolution (16 x 16 grid); MNDL x3 on defect crops only (alpha 0): with
        # x1 and normal crops every test pixel stayed background (README). Not the paper's numbers.
        "cpu": {"arch": "official", "backbone": "vgg16_hed", "weights": "default", "strict_size": False,
                "image_size": 256, "window": 256, "nr": True, "test_path": "sliding",
                "ppm_scales": (1.0, 0.5, 0.25, 0.125), "mask_rule": "gfds", "dice": "mndl", "dice_weight": 3.0,
                "alpha": 0.0, "train_s_in_shot": 1, "epochs": 8, "max_iters_per_epoch": 30, "batch_size": 2,
                "lr": 0.0025, "cache_images": 512},
        "test": {"backbone": "resnet18", "weights": "random", "layers": (2, 3), "merge_dim": 32, "image_size": 64,
                 "reduce_dim": 16, "epochs": 1, "batch_size": 2, "max_iters_per_epoch": 2, "cache_images": 64},
    }
    default_preset = "cpu"
    #: preset -> its row in GFDS Table 4 (the FPS table's paper FPS, RTX 3090 Ti)
    speed_reference = {"fps": "PFENet"}

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        self.requires = dataclasses.replace(type(self).requires, weights=required_weights(c.backbone, c.weights))
        for name, value, allowed in (("arch", c.arch, ("official", "taps")), ("test_path", c.test_path,
                                     ("canvas", "resize", "sliding")), ("dice", c.dice, ("none", "dice", "mndl")),
                                     ("amp", c.amp, ("fp32", "bf16")),
                                     ("train_sampler", c.train_sampler, ("nr", "official"))):
            if value not in allowed:
                raise FdsError(f"pfenet: {name}={value!r} is not one of {', '.join(allowed)}")
        head = dict(reduce_dim=c.reduce_dim, ppm_scales=tuple(c.ppm_scales), mask_rule=c.mask_rule,
                    small_defect_threshold=c.small_defect_threshold)
        weights = None if c.weights in ("", "default") else c.weights
        torch.manual_seed(0)  # head init independent of the caller's RNG state
        if c.arch == "official":
            self.model = PFENet(c.backbone, "random" if weights is None and c.checkpoint else weights,
                                mask_layer4=c.mask_layer4, strict_size=c.strict_size, backbone_bn=c.backbone_bn, **head)
            self.backbone_prov = self.model.backbone_provenance
        else:
            bb = build_backbone(c.backbone, weights, seed=0)
            self.model = TapPFENet(bb, feature_taps(c.backbone, c.layers, c.merge_dim),
                                   tap_dims(bb, c.backbone, c.layers, c.merge_dim), **head)
            self.backbone_prov = dict(bb.provenance)
        self.model.to(device).eval()
        self.use_bf16 = c.amp == "bf16" and str(device).startswith("cuda")
        self.precision = "bf16" if self.use_bf16 else "fp32"
        self._checkpoint_prov: dict | None = None
        self.history: list[dict] = []

    # ---- state ---------------------------------------------------------------------------------
    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """Keys not stored with a trained model: the frozen encoder, except where the official
        training updates its BatchNorm statistics (then the whole model is the checkpoint; a
        BatchNorm-free backbone such as ``vgg16_hed`` is never stored)."""
        c = self.config
        if c.arch == "taps":
            return ("backbone.",)
        return () if c.backbone_bn == "train" and self.model.backbone_has_bn else OFFICIAL_LAYERS

    def weights_provenance(self) -> dict[str, str]:
        if self._checkpoint_prov:
            return {"pfenet": self._checkpoint_prov["sha256"]}
        return {self.config.backbone: self.backbone_prov["sha256"]}

    def state_dict(self) -> dict:
        skip = self.frozen_prefixes
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if not (skip and k.startswith(skip))}

    def load_state_dict(self, state: dict) -> None:
        """A state saved by :meth:`state_dict` (strict on the learned keys) or a full official checkpoint."""
        skip = self.frozen_prefixes
        own = {k for k in self.model.state_dict() if not (skip and k.startswith(skip))}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - set(self.model.state_dict()))
        if missing or unexpected:
            raise FdsError(f"pfenet state dict does not match this config: {len(missing)} missing (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it trained with another preset?")
        self.model.load_state_dict(state, strict=False)
        self.model.to(self.device).eval()

    def load_checkpoint(self, path: str) -> None:
        """Official PFENet checkpoint (dict with ``state_dict``, keys ``module.*``), loaded strictly."""
        if self.config.arch != "official":
            raise FdsError("pfenet: official checkpoints need arch=official (the industrial rows have none)")
        load_official(self.model, str(path))
        self.model.to(self.device).eval()
        self._checkpoint_prov = {"sha256": W.file_sha256(path), "path": str(path)}

    # ---- training ------------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict]:
        """The nine official head groups, each at lr_scale x the poly lr (official train.py)."""
        c = self.config
        return param_groups(self.model, [(g, c.lr_scale) for g in HEAD_GROUPS], default_mult=c.lr_scale,
                            exclude=OFFICIAL_LAYERS + ("backbone.",))

    def backbone_train_mode(self) -> None:
        """Official: after the loop froze every BatchNorm, the backbone's go back to train mode."""
        if self.config.arch == "official" and self.config.backbone_bn == "train":
            for name in PFENet.LAYERS:
                getattr(self.model, name).train()

    def fit(self, train: TrainSource, workdir: Path) -> None:
        c = self.config
        if c.checkpoint:
            self.load_checkpoint(c.checkpoint)
            return
        sampler = self.train_episodes(train)
        n_it = sampler.n_batches(c.batch_size)
        if c.max_iters_per_epoch:
            n_it = min(n_it, c.max_iters_per_epoch)
        loop = TrainLoop(self.model, self.optimizer_groups(), workdir, epochs=c.epochs, iters_per_epoch=n_it,
                         base_lr=c.lr, weight_decay=c.weight_decay, power=c.power, seed=train.seed,
                         optimizer="sgd", momentum=c.momentum, exclude=self.frozen_prefixes, log=_log,
                         fingerprint=config_hash(c) + f"|{train.dataset}|{train.fold}|{train.seed}")
        self.history = loop.run(lambda epoch: itertools.islice(sampler.batches(epoch, c.batch_size), n_it),
                                lambda batch: self.step_loss(batch, loop.module), train_mode=self.backbone_train_mode)
        self.model.eval()

    def train_episodes(self, train: TrainSource):
        """The episode source of ``train_sampler``: the official PFENet loader (A6) or the shared sampler."""
        c = self.config
        if c.train_sampler == "official":
            return FSSEpisodes(train, FSSSettings(size=c.image_size, shot=c.train_shot, min_pixels=c.min_pixels,
                                                  scale=tuple(c.scale_range), rotate=tuple(c.rotate_range)),
                               seed=train.seed)
        settings = NRSettings(image_size=c.image_size, crop_size=c.crop_size or c.window or c.image_size,
                              shot=c.train_shot, s_in_shot=c.train_s_in_shot if c.nr else 1,
                              area_resize_ratio=c.area_resize_ratio, alpha=c.alpha if c.nr else 0.0,
                              augment=c.augment, nr=c.nr)
        return EpisodeSampler(train, settings, seed=train.seed, cache_size=c.cache_images)

    def step_loss(self, batch: dict, module=None) -> torch.Tensor:
        """Training loss of a collated batch; ``module`` = the (possibly DDP-wrapped) model."""
        c, dev = self.config, self.device
        module = module or self.model
        logits, aux = module(batch["query"].to(dev), batch["supports"].to(dev), batch["support_masks"][:, :, 0].to(dev))
        y = batch["query_mask"][:, 0].to(dev).long()
        return pfenet_loss(logits, aux, y, aux_weight=c.aux_weight, dice=c.dice, dice_weight=c.dice_weight,
                           eta=c.eta, beta=c.beta)

    # ---- episodes --------------------------------------------------------------------------------
    def support_views(self, support: SupportSet) -> list:
        """Sliding path: the manifest's crops (a whole-image shot repeated as often); else whole images."""
        if self.config.test_path != "sliding":
            return [(s.image, s.mask) for s in support.shots]
        counts = [len(s.crops) for s in support.shots if s.crops is not None]
        reps = self.config.s_in_shot or (counts[0] if counts else (4 if support.shot == 1 else 1))
        views = []
        for s in support.shots:
            views += s.views() if s.crops is not None else [(s.image, s.mask)] * reps
        return views

    def _autocast(self):
        import contextlib

        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def prepare(self, support: SupportSet):
        c = self.config
        xs, ys = [], []
        for img, mask in self.support_views(support):
            if c.test_path == "canvas":
                xs.append(canvas_image(img, c.image_size))
                ys.append(canvas_label(mask, c.image_size))
            else:
                xs.append(image_to_tensor(img, c.image_size)[0])
                ys.append(mask_to_tensor(mask, c.image_size)[0])
        s_x = torch.stack(xs)[None].to(self.device)
        s_y = torch.stack(ys)[None].to(self.device)
        self.model.eval()
        with self._autocast():
            return self.model.encode_support(s_x, s_y)

    @torch.no_grad()
    def predict(self, state, query: Query) -> np.ndarray:
        c = self.config

        def fn(x):
            with self._autocast():
                logits, _ = self.model.predict_logits(x.to(self.device), state)
            return self.model.probability(logits.float())

        if c.test_path == "canvas":
            h, w = query.image.shape[:2]
            out = canvas_output(fn(canvas_image(query.image, c.image_size)[None])[0].float().cpu(), h, w)
        elif c.test_path == "resize":
            out = predict_whole(query.image, fn, c.image_size).heat
        else:
            out = predict_sliding(query.image, fn, c.image_size, window=c.window or c.image_size,
                                  batch=c.window_batch).heat
        return probability_map(out)

    def describe(self) -> dict:
        d = super().describe()
        if self.config.mask_rule == "gfds":  # which branch of the small-defect rule fired, per support
            d["mask_branches"] = dict(self.model.mask_branches)
        if self.history:
            d["training"] = self.history
        return d


def _log(msg: str) -> None:
    print(f"[pfenet] {msg}", file=sys.stderr, flush=True)


__all__ = ["PFENetMethod", "canvas_image", "canvas_label", "canvas_output", "canvas_size"]
