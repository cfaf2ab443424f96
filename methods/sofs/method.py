"""``sofs`` — Small Object Few-shot Segmentation (Zhang et al., NeurIPS 2024).

prepare(): the support views of the protocol (manifest crops at native resolution: 1-shot = 4 crops
of one image, 5-shot = 1 crop per image; a large-defect support without crops is resized whole and
repeated s_in_shot times), encoded once (backbone features, prototypes, support self-attention).
predict(): sliding windows at native resolution (fdsbench.blocks.tiling), or the whole-image resize
path when every support is large (paper appendix A.2) — also the FAD path (normal supports come without crops);
returns the stitched probability map at the original size. With all support masks empty the output
is the abnormal prior (FAD, paper Eq. 5). fit(): NR episodic training with MNDL + 0.01 CE (paper §3.2.5, appendix A.2).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdsbench import weights as W
from fdsbench.blocks.backbones import build_backbone, required_weights
from fdsbench.blocks.backbones.taps import feature_taps, tap_dims
from fdsbench.blocks.inference import probability_map
from fdsbench.config import config_hash
from fdsbench.errors import FdsError
from fdsbench.blocks.losses import dice_ce_loss
from fdsbench.method import Method
from fdsbench.blocks.nr import EpisodeSampler, NRSettings
from fdsbench.registry import register_method
from fdsbench.blocks.tiling import image_to_tensor, mask_to_tensor, predict_sliding, predict_whole
from fdsbench.blocks.training import TrainLoop, param_groups, trainable_state
from fdsbench.blocks.views import support_views
from fdsbench.types import Query, Requirements, SupportSet, TrainSource

from .model import SOFS, _same_map

ETA_YAML = 1e5  # TRAIN.SOFS.smooth_r of the yaml, used for folds train.sh does not list


@register_method("sofs")
class SOFSMethod(Method):
    """SOFS: NR crops + PFIM + priors + shared SA + non-learnable fusion + meta prediction."""

    requires = Requirements(training=True, fad=True, weights=("dinov2_vitb14",), gpu_recommended=True)
    distributed_fit = True  # fit() trains with DDP under torchrun (TrainLoop): same batch, same episodes

    @dataclass
    class Config:
        # --- model (paper §3.2, appendix A.2); defaults = the paper's DINOv2 ViT-B/14 @ 518 ---
        backbone: str = "dinov2_vitb14"
        weights: str = "default"  # encoder: "default" (weights table), "random", or a file path
        checkpoint: str = ""  # released SOFS_model.pth ("default" = weights table): fit() loads it instead of training
        layers: tuple = (5, 6, 7, 8, 9, 10)  # prior_layer_pointer (ViT blocks, 0-based)
        merge_dim: int = 1024  # ResNet: channels of the merged layer2+3 map
        image_size: int = 518  # model input side
        patch: int = 14  # l: feature stride = PFIM kernel (8 for ResNet)
        reduce_dim: int = 256  # C
        embed_dim: int = 256  # C1
        num_stages: int = 2
        heads: int = 4
        tau: float = 0.1
        # --- test procedure (official tools/epoch_train_eval_ss.py) ---
        # the official code's one crop_size: support crops (the manifest's), test windows and
        # training crops; 0 = the protocol's crop_size (image_size where supports have no crops).
        # A value that disagrees with the manifest's support crops is refused.
        window: int = 0
        window_batch: int = 4  # windows per forward (ND_batch_size)
        s_in_shot: int = 0  # copies of a whole-image support; 0 = as many as the other shots' crops, else 4 (1-shot) / 1
        output: str = "heat"  # "heat": stitched probability; "binary": the official averaged binary map
        # --- ablations (Tables 5-6) ---
        nr: bool = True  # non-resizing procedure (train crops + test windows); False = plain resizing
        mask_downsample: str = "pfim"  # pfim | bilinear | nearest
        loss: str = "mndl"  # mndl | dice
        fusion: str = "nonlearnable"  # nonlearnable | learnable (HDMNet-style cross-attention)
        abnormal_prior: bool = True  # abnormal prior as a head input (FAD output exists regardless)
        meta_cls: bool = True  # meta prediction; False = MLP classifier (cls_semantic)
        # --- training (paper §3.2.5, appendix A.2) ---
        epochs: int = 50
        batch_size: int = 4  # episodes per optimiser step (official: 7 GPUs x 4 = 28, see README)
        lr: float = 1e-5
        lr_multiple: float = 2.0  # non-transformer params
        weight_decay: float = 0.01
        power: float = 0.9
        eta: float = 0.0  # MNDL eta; 0 = per fold from eta_per_fold (train.sh)
        eta_per_fold: tuple = (1.0, 1.0, 1e5)
        beta: float = 1.0
        dice_weight: float = 1.0
        ce_weight: float = 0.01
        alpha: float = 0.3  # probability of a normal query crop
        area_resize_ratio: float = 0.0  # 0 = per fold from area_resize_ratio_per_fold (train.sh)
        area_resize_ratio_per_fold: tuple = (0.01, 0.005, 0.01)
        train_shot: int = 0  # 0 = the test shot (train.sh trains one model per shot)
        train_s_in_shot: int = 0  # 0 = 4 crops for 1-shot, 1 per image otherwise (paper appendix A.1)
        crop_ratio: tuple = (1.0, 1.0)
        augment: bool = True
        max_iters_per_epoch: int = 0  # 0 = the whole epoch
        cache_images: int = 0  # decoded training images kept in memory (0 = none)

    presets = {
        # the official effective batch: train.sh's 7 GPUs x 4 episodes (README, "Effective batch")
        "paper": {"batch_size": 28},
        "paper_resnet50": {"backbone": "resnet50", "layers": (2, 3), "image_size": 512, "patch": 8,
                           "reduce_dim": 64, "embed_dim": 64, "batch_size": 28},
        # CPU-sized: HED's VGG-16 (offline weights, provenance hed_bsds500), conv3 + conv4 merged
        # (256 ch, stride 4 = l), 96-px input for the 256-px native windows/crops of the synthetic
        # protocol (a 24 x 24 grid: a feature cell covers ~11 native px, the paper's 518/14 covers 14),
        # C = C1 = 64, 750 steps of 2 episodes at 6x the paper's lr, eta = 1e5; from lr 1e-4 up (eta = 1
        # too) every logit ended negative on synthetic fold 0 (README). Not the paper's numbers.
        "cpu": {"backbone": "vgg16_hed", "weights": "default", "layers": (3, 4), "merge_dim": 256,
                "image_size": 96, "patch": 4, "reduce_dim": 64, "embed_dim": 64, "epochs": 15,
                "max_iters_per_epoch": 50, "batch_size": 2, "lr": 6e-5, "eta": 1e5, "cache_images": 512},
        "test": {"backbone": "resnet18", "weights": "random", "layers": (2, 3), "merge_dim": 32,
                 "image_size": 64, "patch": 8, "reduce_dim": 16, "embed_dim": 16, "heads": 2,
                 "num_stages": 1, "epochs": 1, "batch_size": 2, "max_iters_per_epoch": 2, "lr": 1e-3,
                 "cache_images": 64},
    }
    default_preset = "cpu"

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        self.requires = dataclasses.replace(type(self).requires, weights=required_weights(c.backbone, c.weights))
        for name, value, allowed in (("mask_downsample", c.mask_downsample, ("pfim", "bilinear", "nearest")),
                                     ("loss", c.loss, ("mndl", "dice")),
                                     ("fusion", c.fusion, ("nonlearnable", "learnable")),
                                     ("output", c.output, ("heat", "binary"))):
            if value not in allowed:
                raise FdsError(f"sofs: {name}={value!r} is not one of {', '.join(allowed)}")
        if c.image_size % c.patch:
            raise FdsError(f"sofs: image_size {c.image_size} is not a multiple of patch {c.patch}")
        weights = None if c.weights in ("", "default") else c.weights
        bb = build_backbone(c.backbone, weights, seed=0)
        feats = feature_taps(c.backbone, c.layers, c.merge_dim)
        dims = tap_dims(bb, c.backbone, c.layers, c.merge_dim)
        torch.manual_seed(0)  # head init independent of the caller's RNG state
        self.model = SOFS(bb, feats, fea_dims=dims, patch=c.patch, reduce_dim=c.reduce_dim,
                          embed_dim=c.embed_dim, num_stages=c.num_stages, heads=c.heads, tau=c.tau,
                          mask_downsample=c.mask_downsample, abnormal_prior=c.abnormal_prior,
                          meta_cls=c.meta_cls, fusion=c.fusion).to(device).eval()
        self._checkpoint_prov: dict | None = None
        self.history: list[dict] = []

    # ---- weights -----------------------------------------------------------------------------
    def weights_provenance(self) -> dict[str, str]:
        if self._checkpoint_prov:  # the released checkpoint carries the backbone too (loaded strictly)
            sha = self._checkpoint_prov["sha256"]
            return {self.config.backbone: sha, "sofs": sha}
        return {self.config.backbone: self.model.backbone.provenance["sha256"]}

    def load_checkpoint(self, path: str | None = None) -> None:
        """Load the released SOFS checkpoint (all keys, backbone included, strictly)."""
        p, prov = W.resolve("sofs", None if path in (None, "", "default") else path)
        W.load_into(self.model, p, strict=True, source=str(p))
        self.model.to(self.device).eval()
        self._checkpoint_prov = prov

    def state_dict(self) -> dict:
        return trainable_state(self.model)

    def load_state_dict(self, state: dict) -> None:
        """Head-only state (what fit saves) or a full official state dict (``backbone.*`` included)."""
        own = self.model.state_dict()
        if any(k.startswith("backbone.") for k in state):
            W.load_into(self.model, state, strict=True, source="sofs state dict")
        else:
            head = {k for k in own if not k.startswith("backbone.")}
            missing, unexpected = sorted(head - set(state)), sorted(set(state) - head)
            if missing or unexpected:
                raise FdsError(f"sofs state dict does not match this config: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                               f"was it trained with another preset?")
            W.load_into(self.model, state, strict=False, source="sofs state dict")  # checks shapes
        self.model.to(self.device).eval()

    # ---- training ----------------------------------------------------------------------------
    #: the dataset train.sh's per-fold eta and area ratio were tuned for
    PER_FOLD_DATASET = "vision_v1"

    def fold_value(self, value: float, per_fold: tuple, train: TrainSource, fallback: float) -> float:
        """An explicit value, else train.sh's per-fold value on VISION V1, else the yaml's value."""
        if value:
            return float(value)
        if train.dataset == self.PER_FOLD_DATASET and 0 <= train.fold < len(per_fold):
            return float(per_fold[train.fold])
        return float(fallback)

    def label(self) -> str:
        return f"sofs ({self.config.output})"

    def crop_side(self, protocol_crop: int, what: str) -> int:
        """The official code's single crop_size: ``window`` when set, else the protocol's crop side,
        else ``image_size``. A window that disagrees with the protocol's crops is refused."""
        w = self.config.window
        if w and protocol_crop and w != protocol_crop:
            raise FdsError(f"sofs: window={w} but {what} is {protocol_crop}; SOFS uses one crop size for "
                           f"support crops, test windows and training crops: drop --set window or pass "
                           f"--protocol-opt crop_size={w}")
        return w or protocol_crop or self.config.image_size

    def fit(self, train: TrainSource, workdir: Path) -> None:
        c = self.config
        if c.checkpoint:
            self.load_checkpoint(c.checkpoint)
            return
        eta = self.fold_value(c.eta, c.eta_per_fold, train, ETA_YAML)
        ratio = self.fold_value(c.area_resize_ratio, c.area_resize_ratio_per_fold, train, 0.01)
        crop = self.crop_side(train.crop_size, "the protocol's crop_size")
        shot = c.train_shot or train.shot
        s_in_shot = (c.train_s_in_shot or (4 if shot == 1 else 1)) if c.nr else 1
        settings = NRSettings(image_size=c.image_size, crop_size=crop,
                              crop_ratio=tuple(c.crop_ratio), shot=shot,
                              s_in_shot=s_in_shot, area_resize_ratio=ratio,
                              alpha=c.alpha if c.nr else 0.0, augment=c.augment, nr=c.nr)
        seed = train.seed  # the harness's train seed (SOFS train.sh: RNG_SEED 54)
        sampler = EpisodeSampler(train, settings, seed=seed, cache_size=c.cache_images)
        n_it = sampler.n_batches(c.batch_size)
        if c.max_iters_per_epoch:
            n_it = min(n_it, c.max_iters_per_epoch)
        model = self.model
        groups = param_groups(model, [("query_semantic_transformer", 1.0)], default_mult=c.lr_multiple)
        loop = TrainLoop(model, groups, workdir, epochs=c.epochs, iters_per_epoch=n_it, base_lr=c.lr,
                         weight_decay=c.weight_decay, power=c.power, seed=seed, log=_log,
                         fingerprint=config_hash(c) + f"|{train.dataset}|{train.fold}|{train.seed}|{shot}|{crop}")
        dev = self.device

        def step_loss(batch):
            z = loop.module(batch["query"].to(dev), batch["supports"].to(dev), batch["support_masks"].to(dev))
            x = model.feature_probability(z)
            y = (model.down(batch["query_mask"].to(dev), tuple(x.shape[-2:])) > 0.1).float()[:, 0]
            return dice_ce_loss(x, y, eta=eta, beta=c.beta, dice_weight=c.dice_weight, ce_weight=c.ce_weight,
                                mixed=c.loss == "mndl")

        self.history = loop.run(lambda epoch: itertools.islice(sampler.batches(epoch, c.batch_size), n_it), step_loss)
        self.model.eval()

    # ---- episodes ----------------------------------------------------------------------------
    def support_views(self, support: SupportSet) -> tuple[list, bool]:
        """(views, whole): the protocol's (image, mask) views and whether the query goes through
        the whole-image path (every support without crops, or NR off)."""
        return support_views(support, self.config.nr, self.config.s_in_shot)

    @torch.no_grad()
    def prepare(self, support: SupportSet):
        c = self.config
        views, whole = self.support_views(support)
        uniq: dict[int, int] = {}
        xs, ys, index = [], [], []
        for img, mask in views:  # identical repeated whole-image supports are encoded once
            key = id(img)
            if key not in uniq:
                uniq[key] = len(xs)
                xs.append(image_to_tensor(img, c.image_size)[0])
                ys.append(mask_to_tensor(mask, c.image_size))
            index.append(uniq[key])
        x = torch.stack(xs).to(self.device)
        feats = _same_map(self.model.encode(x), lambda f: f[index])
        y = torch.stack(ys)[index].to(self.device)
        K = len(index)
        self.model.eval()
        sup = self.model.encode_support(x[index].view(1, K, *x.shape[1:]), y.view(1, K, *y.shape[1:]), feats=feats)
        window = self.crop_side(support.crop_size, "the manifest's support crop size")
        return {"support": sup, "whole": whole, "window": window}

    @torch.no_grad()
    def predict(self, state, query: Query) -> np.ndarray:
        c = self.config
        sup = state["support"]
        fn = lambda x: self.model.predict(x.to(self.device), sup)  # noqa: E731
        if state["whole"]:
            out = predict_whole(query.image, fn, c.image_size)
        else:
            out = predict_sliding(query.image, fn, c.image_size, window=state["window"], batch=c.window_batch)
        m = out.heat if c.output == "heat" else out.binary
        return probability_map(m)

    def describe(self) -> dict:
        d = super().describe()
        if self.history:
            d["training"] = self.history
        return d


def _log(msg: str) -> None:
    import sys

    print(f"[sofs] {msg}", file=sys.stderr, flush=True)


__all__ = ["SOFSMethod"]
