"""``hdmnet`` — Hierarchical Dense correlation distillation (Peng et al., CVPR 2023).

Two variants behind one registered method:

* ``variant="official"``: the frozen PSPNet base learner on a deep-base dilated ResNet-50,
  supports masked at the input, the meta learner, the Gram-difference / K-shot reweighting and the
  base-learner ensemble; images resized to S x S without keeping the aspect (473). ``fit`` runs the
  official two stages: the PSPNet on the fold's base classes (base_learner.py, cached and reused),
  then HDMNet on top (CE(final) + CE(meta) + distillation / 3, AdamW, lr x10 outside the transformer,
  kshot_rw never trained, BatchNorm statistics frozen). Official checkpoints load strictly.
* ``variant="industrial"`` (SOFS Tables 1/2/4): frozen DINOv2-B/14 @ 518 or ResNet-50 @ 512
  taps shared with SOFS, supports not masked at the input, no base learner, a transformer that does
  not downsample, CE + Dice (``hdmnet``) or + the non-resizing protocol and the mixed normal Dice
  loss (``hdmnet-nr-mndl``). Every reconstruction choice is a config key (marked ◊ in the README).

prepare(): the support views (whole images; NR crops with ``nr``) encoded once: support features,
prototypes and the transformer's support stages. predict(): the query (or its sliding windows)
against them; returns the foreground probability at the query's original size (for the official
model softmax over final_out, whose argmax is the official prediction).
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
from fdsbench.blocks.backbones import build_backbone, required_weights
from fdsbench.blocks.backbones.deep_resnet import deep_base_key_map
from fdsbench.blocks.backbones.taps import feature_taps, tap_dims
from fdsbench.blocks.inference import probability_map
from fdsbench.blocks.losses import dice_loss, mixed_normal_dice_loss
from fdsbench.blocks.nr import EpisodeSampler, NRSettings
from fdsbench.blocks.tiling import image_to_tensor, mask_to_tensor, predict_sliding, predict_whole
from fdsbench.blocks.training import TrainLoop, param_groups, trainable_state
from fdsbench.blocks.views import support_views
from fdsbench.config import config_hash
from fdsbench.errors import FdsError
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Query, Requirements, SupportSet, TrainSource

from .base_learner import train_base_learner
from .data import IGNORE, StretchSampler, stretch_image, stretch_label
from .model import HDMNet, IndustrialHDMNet, PSPNet, distillation_loss, psp_key_map

VARIANTS = ("official", "industrial")
PASCAL_BASE_CLASSES = 15  # the official checkpoints' base learner: background + 15 base classes
LOSSES = ("official", "ce_dice", "ce_mndl")
RESIZES = ("stretch", "longest")


def default_base_cache(workdir: Path) -> Path:
    """Beside the runner's checkpoints (``<WORKDIR>/checkpoints/hdmnet_base_learners``, shared by every
    fit of the workdir), or inside a workdir that is not the runner's."""
    return (workdir.parent if workdir.parent.name == "checkpoints" else workdir) / "hdmnet_base_learners"


def _log(msg: str) -> None:
    print(f"[hdmnet] {msg}", file=sys.stderr, flush=True)


@register_method("hdmnet")
class HDMNetMethod(Method):
    """HDMNet: hierarchical dense matching with correlation distillation (official or SOFS industrial)."""

    requires = Requirements(training=True, weights=("dinov2_vitb14",), gpu_recommended=True)

    @dataclass
    class Config:
        variant: str = "industrial"  # official | industrial (SOFS tables)
        # --- encoder ---
        backbone: str = "dinov2_vitb14"  # industrial: a tapped encoder; official: deep_resnet50
        weights: str = "default"  # encoder: "default" (weights table), "random", or a file path
        layers: tuple = (5, 6, 7, 8, 9, 10)  # industrial taps (ViT blocks, 0-based), as SOFS
        merge_dim: int = 1024  # ResNet taps: channels of the merged layer2+3 map
        image_size: int = 518
        # --- official model ---
        checkpoint: str = ""  # an official HDMNet checkpoint (module. keys): loaded strictly, no training
        pspnet: str = ""  # a trained official PSPNet (initmodel/PSPNet/...best.pth): skips stage 1
        base_classes: int = 0  # PSPNet foreground classes; 0 = the training data's (15, PASCAL-5i, without fit)
        shot: int = 0  # K the official model is built for (kshot_rw exists for K > 1); 0 = the test shot
        kshot_trans_dim: int = 2
        # --- meta learner ---
        reduce_dim: int = 256
        embed_dim: int = 64
        heads: tuple = (2, 4, 8)
        match_heads: int = 2
        patch_sizes: tuple = (1, 3, 3)
        strides: tuple = (1, 1, 1)  # ◊ industrial: no downsampling (official (1, 2, 2))
        paddings: tuple = (0, 1, 1)  # ◊ industrial: kernel // 2 (official stride // 2 = (0, 1, 1))
        sr_ratios: tuple = (4, 2, 1)  # ◊ kept for the industrial variant
        mlp_ratio: int = 4
        drop: float = 0.1
        # --- protocol ---
        resize: str = "longest"  # longest: SOFS resize (ResizeLongestSide + pad) | stretch: S x S (official)
        nr: bool = False  # non-resizing procedure: NR training crops + sliding-window test (industrial)
        window: int = 0  # NR window / training crop side at native resolution; 0 = the protocol's crop side
        window_batch: int = 4
        s_in_shot: int = 0  # NR: copies of a whole-image support; 0 = the protocol's rule
        amp: str = "fp32"  # fp32 | bf16 (autocast at test time on CUDA)
        # --- loss ---
        loss: str = "ce_dice"  # official: CE(final)+CE(meta) | ce_dice | ce_mndl (each + distillation/3)
        ce_weight: float = 1.0  # ◊ industrial
        dice_weight: float = 1.0  # ◊ industrial
        distill_weight: float = 1.0  # aux_weight1 (on D/3)
        eta: float = 0.0  # MNDL eta; 0 = per fold from eta_per_fold on VISION V1 (as SOFS), else 1e5
        eta_per_fold: tuple = (1.0, 1.0, 1e5)
        beta: float = 1.0
        # --- meta-training (official train.py; industrial ◊ with SOFS's 50 epochs) ---
        epochs: int = 50
        batch_size: int = 4
        lr: float = 1e-4
        lr_multiple: float = 10.0  # down_*/merges (official index_split 0)
        weight_decay: float = 0.01
        power: float = 0.9
        fix_bn: bool = True  # every BatchNorm (the transformer's too) keeps its statistics (official fix_bn)
        augment: bool = True  # official: RandScale/RandRotate/blur/flip; industrial: SOFS augmentations
        train_shot: int = 0  # 0 = the test shot (one model per shot, as the official recipes)
        train_s_in_shot: int = 0  # NR: crops per support image; 0 = 4 for 1-shot, 1 otherwise
        alpha: float = 0.3  # NR: probability of a normal query crop
        area_resize_ratio: float = 0.0  # NR: 0 = per fold on VISION V1 as SOFS, else 0.01
        area_resize_ratio_per_fold: tuple = (0.01, 0.005, 0.01)
        max_iters_per_epoch: int = 0
        cache_images: int = 0
        # --- base learner (official stage 1; ◊ BAM's PSPNet recipe) ---
        base_epochs: int = 100
        base_batch_size: int = 12
        base_lr: float = 0.0025
        base_momentum: float = 0.9
        base_weight_decay: float = 1e-4
        base_train_encoder: bool = True
        base_max_iters_per_epoch: int = 0
        base_cache: str = ""  # folder of cached base learners; "" = beside the runner's checkpoints

    _official = {"variant": "official", "backbone": "deep_resnet50", "image_size": 473, "resize": "stretch",
                 "strides": (1, 2, 2), "paddings": (0, 1, 1), "loss": "official", "epochs": 200,
                 "weights": "default"}
    presets = {
        # the official PASCAL recipe (A5-A7): 200 epochs, batch 4, lr 1e-4, 473 x 473 stretch
        "official": dict(_official),
        # SOFS Tables 1/2/4 rows, DINOv2-B/14 @ 518
        "paper": {"loss": "ce_dice"},
        "hdmnet": {"loss": "ce_dice"},
        "hdmnet-nr-mndl": {"loss": "ce_mndl", "nr": True},
        "paper_resnet50": {"backbone": "resnet50", "layers": (2, 3), "image_size": 512, "loss": "ce_dice"},
        "hdmnet-nr-mndl_resnet50": {"backbone": "resnet50", "layers": (2, 3), "image_size": 512,
                                    "loss": "ce_mndl", "nr": True},
        # CPU-sized: the industrial variant with NR + MNDL ("HDMNet + NR + MNDL") on HED's VGG-16 (offline
        # weights, provenance hed_bsds500), conv3 + conv4 merged (the official VGG option's layer2 / layer3
        # stages; stride 4), 64-px windows for the 256-px native windows/crops of the synthetic protocol,
        # eta = 1e5; steps and lr chosen by measurement (README). Not the paper's numbers.
        "cpu": {"backbone": "vgg16_hed", "weights": "default", "layers": (3, 4), "merge_dim": 256, "image_size": 64,
                "loss": "ce_mndl", "nr": True, "eta": 1e5, "epochs": 20, "max_iters_per_epoch": 50,
                "batch_size": 2, "lr": 1e-4, "cache_images": 512},
        # tiny official model (32 px) for the tests of the two-stage fit
        "test_official": {**_official, "weights": "random", "image_size": 32, "reduce_dim": 16, "embed_dim": 16,
                          "epochs": 1, "batch_size": 2, "max_iters_per_epoch": 2, "lr": 1e-3, "base_epochs": 1,
                          "base_batch_size": 2, "base_train_encoder": False, "base_max_iters_per_epoch": 2,
                          "cache_images": 64},
        # tiny industrial model (random ResNet-18 taps, NR + MNDL) for the shared contract test
        "test": {"backbone": "resnet18", "weights": "random", "layers": (2, 3), "merge_dim": 32, "image_size": 64,
                 "reduce_dim": 16, "embed_dim": 16, "loss": "ce_mndl", "nr": True, "epochs": 1,
                 "batch_size": 2, "max_iters_per_epoch": 2, "lr": 1e-3, "cache_images": 64},
        # speed (fdsbench fps): the official PASCAL-sized model at 473 (15 base classes), bf16 autocast on CUDA;
        # timing does not depend on the weights, so random ones are allowed here
        "fps": {**_official, "weights": "random", "amp": "bf16"},
    }
    default_preset = "cpu"

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        self.requires = dataclasses.replace(type(self).requires, weights=required_weights(c.backbone, c.weights))
        for name, value, allowed in (("variant", c.variant, VARIANTS), ("loss", c.loss, LOSSES),
                                     ("resize", c.resize, RESIZES), ("amp", c.amp, ("fp32", "bf16"))):
            if value not in allowed:
                raise FdsError(f"hdmnet: {name}={value!r} is not one of {', '.join(allowed)}")
        if c.variant == "official" and (c.nr or c.loss != "official"):
            raise FdsError("hdmnet: the official model is trained with loss='official' and tested without NR; "
                           "use variant='industrial' for the SOFS rows")
        if c.variant == "industrial" and c.loss == "official":
            raise FdsError("hdmnet: loss='official' needs the base learner (variant='official')")
        self.model = None
        self.base_provenance: dict | None = None
        self._checkpoint_prov: dict | None = None
        self.history: list[dict] = []
        if c.variant == "industrial":
            self._build_industrial()
        elif c.base_classes:
            self._build_official(c.base_classes, c.shot or 1)

    # ---- construction ------------------------------------------------------------------------
    def _kw(self) -> dict:
        c = self.config
        return dict(reduce_dim=c.reduce_dim, embed_dim=c.embed_dim, heads=c.heads, match_heads=c.match_heads,
                    patch_sizes=c.patch_sizes, strides=c.strides, paddings=c.paddings, sr_ratios=c.sr_ratios,
                    mlp_ratio=c.mlp_ratio, drop=c.drop)

    def _build_industrial(self) -> None:
        c = self.config
        weights = None if c.weights in ("", "default") else c.weights
        bb = build_backbone(c.backbone, weights, seed=0)
        torch.manual_seed(0)  # head init independent of the caller's RNG state
        self.model = IndustrialHDMNet(bb, feature_taps(c.backbone, c.layers, c.merge_dim),
                                      tap_dims(bb, c.backbone, c.layers, c.merge_dim), **self._kw())
        self.model.to(self.device).eval()

    def _encoder_provenance(self) -> dict:
        c = self.config
        if c.weights == "random":
            return {"name": c.backbone, "sha256": "random-init"}
        _, prov = W.resolve("resnet50_v2_deepbase", None if c.weights in ("", "default") else c.weights)
        return prov

    def _build_official(self, base_classes: int, shot: int) -> None:
        """HDMNet for ``shot`` shots with a fresh PSPNet (encoder ImageNet weights unless random)."""
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = HDMNet(shot=shot, base_classes=base_classes, backbone=c.backbone,
                                kshot_trans_dim=c.kshot_trans_dim, **self._kw())
        self.encoder_prov = self._encoder_provenance()
        if c.weights != "random":
            path, _ = W.resolve("resnet50_v2_deepbase", None if c.weights in ("", "default") else c.weights)
            enc = torch.nn.ModuleDict({f"layer{i}": getattr(self.model, f"layer{i}") for i in range(5)})
            W.load_into(enc, path, strict=True, key_map=deep_base_key_map, source=str(path))
        self.model.to(self.device).eval()

    def _fresh_pspnet(self) -> PSPNet:
        """A PSPNet holding the official model's (shared) encoder, ppm and head modules."""
        m = self.model
        psp = PSPNet.__new__(PSPNet)
        torch.nn.Module.__init__(psp)
        for i in range(5):
            setattr(psp, f"layer{i}", getattr(m, f"layer{i}"))
        psp.ppm = m.ppm
        psp.cls = torch.nn.Sequential(m.cls[0], m.cls[1], *m.base_learnear)
        return psp

    # ---- weights -----------------------------------------------------------------------------
    def weights_provenance(self) -> dict[str, str]:
        c = self.config
        if self._checkpoint_prov:
            return {"hdmnet": self._checkpoint_prov["sha256"]}
        if c.variant == "industrial":
            return {c.backbone: self.model.backbone.provenance["sha256"]}
        out = {c.backbone: self._encoder_provenance()["sha256"]}
        if self.base_provenance:
            out["pspnet"] = self.base_provenance["sha256"]
        return out

    def _ensure_model(self, state: dict | None = None) -> None:
        """Build the official model from the shapes of a state dict (classes, kshot_rw) when needed."""
        if state is not None and "base_learnear.2.weight" in state:
            n = state["base_learnear.2.weight"].shape[0] - 1
            shot = state["kshot_rw.0.weight"].shape[1] if "kshot_rw.0.weight" in state else 1
            if self.model is None or (n, shot) != (self.model.base_learnear[2].out_channels - 1, self.model.shot):
                if self.config.shot and shot != self.config.shot:
                    raise FdsError(f"hdmnet: the state dict is of a {shot}-shot model, the config asks for "
                                   f"shot={self.config.shot}")
                self._build_official(n, shot)
        if self.model is None:  # neither fit nor a checkpoint (the speed protocol): the PASCAL-5i layout
            self._build_official(PASCAL_BASE_CLASSES, self.config.shot or 1)

    def load_checkpoint(self, path: str) -> None:
        """An official HDMNet checkpoint (``{'state_dict': {'module.<name>': ...}}``), loaded strictly."""
        sd = W.read_checkpoint(path, strip_prefixes=True)
        self._ensure_model(sd)
        W.load_into(self.model, sd, strict=True, source=str(path))
        self.model.to(self.device).eval()
        self._checkpoint_prov = {"sha256": W.file_sha256(path)}

    def state_dict(self) -> dict:
        if self.config.variant == "official":  # the official layout (frozen PSPNet included)
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return trainable_state(self.model)

    def load_state_dict(self, state: dict) -> None:
        """Official variant: a full state dict in the official layout (``module.`` prefixes allowed),
        loaded strictly. Industrial: the head (what fit saves), or with ``backbone.*`` everything."""
        if self.config.variant == "official":
            self._ensure_model({k.removeprefix("module."): v for k, v in state.items()})
            W.load_into(self.model, state, strict=True, source="hdmnet state dict")
        elif any(k.startswith("backbone.") for k in state):
            W.load_into(self.model, state, strict=True, source="hdmnet state dict")
        else:
            head = {k for k in self.model.state_dict() if not k.startswith("backbone.")}
            missing, unexpected = sorted(head - set(state)), sorted(set(state) - head)
            if missing or unexpected:
                raise FdsError(f"hdmnet state dict does not match this config: {len(missing)} missing "
                               f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                               f"was it trained with another preset?")
            W.load_into(self.model, state, strict=False, source="hdmnet state dict")
        self.model.to(self.device).eval()

    # ---- training ----------------------------------------------------------------------------
    #: the dataset SOFS's per-fold eta and area ratio were tuned for (train.sh)
    PER_FOLD_DATASET = "vision_v1"

    def _fold_value(self, value: float, per_fold: tuple, train: TrainSource, fallback: float) -> float:
        """An explicit value, else SOFS's per-fold value on VISION V1, else SOFS's yaml value."""
        if value:
            return float(value)
        if train.dataset == self.PER_FOLD_DATASET and 0 <= train.fold < len(per_fold):
            return float(per_fold[train.fold])
        return float(fallback)

    def base_settings(self) -> dict:
        c = self.config
        return {"backbone": c.backbone, "encoder": self._encoder_provenance()["sha256"], "image_size": c.image_size,
                "epochs": c.base_epochs, "batch_size": c.base_batch_size, "lr": c.base_lr,
                "momentum": c.base_momentum, "weight_decay": c.base_weight_decay, "power": c.power,
                "train_encoder": c.base_train_encoder, "max_iters_per_epoch": c.base_max_iters_per_epoch,
                "augment": c.augment}

    def fit_base_learner(self, train: TrainSource, workdir: Path) -> None:
        """Stage 1: the PSPNet on the fold's base classes (or the given official PSPNet file)."""
        c = self.config
        n = c.base_classes or len(train.classes)
        shot = c.shot or train.shot
        if self.model is None or (self.model.base_learnear[2].out_channels, self.model.shot) != (n + 1, shot):
            self._build_official(n, shot)
        psp = self._fresh_pspnet()
        if c.pspnet:
            W.load_into(psp, c.pspnet, strict=True, key_map=psp_key_map, source=c.pspnet)
            self.base_provenance = {"file": c.pspnet, "sha256": W.file_sha256(c.pspnet), "reused": True}
        else:
            cache = Path(c.base_cache) if c.base_cache else default_base_cache(Path(workdir))
            self.base_provenance = train_base_learner(psp, train, {**self.base_settings(), "classes": n}, cache,
                                                      self.device, _log)
        for name in HDMNet.frozen_modules():
            getattr(self.model, name).requires_grad_(False)
        self.model.to(self.device).eval()

    def sampler(self, train: TrainSource) -> EpisodeSampler:
        c = self.config
        ratio = self._fold_value(c.area_resize_ratio, c.area_resize_ratio_per_fold, train, 0.01)
        shot = c.train_shot or (self.model.shot if c.variant == "official" else train.shot)
        s_in_shot = (c.train_s_in_shot or (4 if shot == 1 else 1)) if c.nr else 1
        settings = NRSettings(image_size=c.image_size, crop_size=c.window or train.crop_size or c.image_size,
                              shot=shot, s_in_shot=s_in_shot, area_resize_ratio=ratio,
                              alpha=c.alpha if c.nr else 0.0, augment=c.augment, nr=c.nr)
        cls = StretchSampler if c.resize == "stretch" else EpisodeSampler
        return cls(train, settings, seed=train.seed, cache_size=c.cache_images)

    def loss(self, batch: dict, classes: list[str], eta: float, net=None) -> torch.Tensor:
        """Official: CE(final) + CE(meta) + w * D/3; industrial: ce * CE(meta) + dice * (Dice | MNDL) + w * D/3.
        ``net``: the module to call (the TrainLoop's DDP wrapper under torchrun), default the model."""
        c, m, dev = self.config, net or self.model, self.device
        x = batch["query"].to(dev)
        y = batch["query_mask"].to(dev)[:, 0]
        s_x, s_y = batch["supports"].to(dev), batch["support_masks"].to(dev)
        size = x.shape[-2:]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        if c.variant == "official":
            base_class = [classes.index(k) + 1 for k in batch["class"]]
            final, meta, _, corrs = m(x, s_x, s_y, base_class=base_class)
            main = F.cross_entropy(final, y.long(), ignore_index=IGNORE) + F.cross_entropy(meta, y.long(),
                                                                                             ignore_index=IGNORE)
        else:
            meta, corrs = m(x, s_x, s_y)
            meta = up(meta)
            p = torch.softmax(meta, 1)[:, 1]
            t = (y == 1).float()
            dice = (mixed_normal_dice_loss(p, t, eta=eta, beta=c.beta) if c.loss == "ce_mndl" else dice_loss(p, t))
            main = c.ce_weight * F.cross_entropy(meta, y.long(), ignore_index=IGNORE) + c.dice_weight * dice
        return main + c.distill_weight * distillation_loss(corrs, y) / 3

    def fit(self, train: TrainSource, workdir: Path) -> None:
        c = self.config
        if c.checkpoint:
            self.load_checkpoint(c.checkpoint)
            return
        if c.variant == "official":
            self.fit_base_learner(train, workdir)
        eta = self._fold_value(c.eta, c.eta_per_fold, train, 1e5)
        sampler = self.sampler(train)
        n_it = sampler.n_batches(c.batch_size)
        if c.max_iters_per_epoch:
            n_it = min(n_it, c.max_iters_per_epoch)
        model = self.model
        frozen = tuple(f"{n}." for n in HDMNet.frozen_modules()) if c.variant == "official" else ("backbone.",)
        groups = param_groups(model, [("transformer.mix_transformer.", 1.0)], default_mult=c.lr_multiple,
                              exclude=frozen + ("kshot_rw.",))
        loop = TrainLoop(model, groups, workdir, epochs=c.epochs, iters_per_epoch=n_it, base_lr=c.lr,
                         weight_decay=c.weight_decay, power=c.power, seed=train.seed, log=_log, exclude=frozen,
                         fingerprint=config_hash(c) + f"|{train.dataset}|{train.fold}|{train.seed}|"
                                     + str((self.base_provenance or {}).get("sha256", "")))
        classes = train.classes

        def train_mode():
            if not c.fix_bn:  # trainable BatchNorms (the transformer's) update their statistics
                model.transformer.train()

        self.history = loop.run(lambda epoch: itertools.islice(sampler.batches(epoch, c.batch_size), n_it),
                                lambda batch: self.loss(batch, classes, eta, loop.module), train_mode=train_mode)
        self.model.eval()

    # ---- episodes ----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return "bf16-autocast" if self.config.amp == "bf16" and str(self.device).startswith("cuda") else "fp32"

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16-autocast")

    def _to_input(self, image: np.ndarray) -> torch.Tensor:
        c = self.config
        return stretch_image(image, c.image_size) if c.resize == "stretch" else image_to_tensor(image, c.image_size)[0]

    def _mask_input(self, mask: np.ndarray) -> torch.Tensor:
        c = self.config
        if c.resize == "stretch":
            return stretch_label(np.asarray(mask, np.uint8), c.image_size)[None]
        return mask_to_tensor(mask, c.image_size)

    @torch.no_grad()
    def prepare(self, support: SupportSet):
        c = self.config
        self._ensure_model()
        views, whole = support_views(support, c.nr, c.s_in_shot)
        K = len(views)
        if c.variant == "official" and self.model.shot > 1 and K != self.model.shot:
            raise FdsError(f"hdmnet: this official model was built for {self.model.shot} shots (kshot_rw), the "
                           f"episode has {K}; use a model trained for {K} shots")
        x = torch.stack([self._to_input(img) for img, _ in views]).to(self.device)
        y = torch.stack([self._mask_input(m) for _, m in views]).to(self.device)
        self.model.eval()
        with self._autocast():
            sup = self.model.encode_support(x[None], y[None])
        return {"support": sup, "whole": whole, "window": c.window or support.crop_size or c.image_size}

    def _probability(self, x: torch.Tensor, sup) -> torch.Tensor:
        """Foreground probability [B,S,S] at the model input size."""
        size = x.shape[-2:]
        if self.config.variant == "official":
            out = self.model.forward_features(x, sup)[0]
        else:
            out = self.model.logits(x, sup)[0]
        return torch.softmax(F.interpolate(out.float(), size=size, mode="bilinear", align_corners=True), 1)[:, 1]

    @torch.no_grad()
    def predict(self, state, query: Query) -> np.ndarray:
        with self._autocast():
            return self._predict(state, query)

    def _predict(self, state, query: Query) -> np.ndarray:
        c = self.config
        sup = state["support"]
        if c.resize == "stretch":  # official: final_out at S x S, then bilinear (align_corners) to H x W
            x = stretch_image(query.image, c.image_size)[None].to(self.device)
            out = self.model.forward_features(x, sup)[0] if c.variant == "official" else self.model.logits(x, sup)[0]
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)
            out = F.interpolate(out, size=query.size, mode="bilinear", align_corners=True)
            m = torch.softmax(out.float(), 1)[0, 1]
        else:
            fn = lambda t: self._probability(t.to(self.device), sup)  # noqa: E731
            if state["whole"]:
                m = predict_whole(query.image, fn, c.image_size).heat
            else:
                m = predict_sliding(query.image, fn, c.image_size, window=state["window"], batch=c.window_batch).heat
        return probability_map(m)

    def describe(self) -> dict:
        d = super().describe()
        d["precision"] = self.precision
        if self.base_provenance:
            d["base_learner"] = self.base_provenance
        if self.history:
            d["training"] = self.history
        return d


__all__ = ["HDMNetMethod"]
