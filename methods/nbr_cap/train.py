"""Per-support fitting of AlbuNet-34 with NBR and CaP (paper Algorithm 1).

Images arrive already resized to S x S (uint8). One optimiser step, for the m pairs
(I_d,i, M_d,i, I_n,i) of the step:

1. F_d = Enc(I_d), F_n = Enc(I_n) (encoder output conv5 by default);
2. L_NBR,i (eqs. 1-3) unless ``nbr="off"``;
3. u ~ U[0, 1] once per step; CaP branch for the whole minibatch iff u > 1 - cap_prob:
   I_cap = I_d ⊙ M_d + I_n ⊙ (1 − M_d) (eq. 4), L_seg,i = λ_i BCE(Dec(Enc(I_cap)), M_d) (eqs. 5-6);
   otherwise L_seg,i = BCE(Dec(F_d), M_d) (eq. 7);
4. L = Σ L_NBR,i + Σ L_seg,i; Adam step.

Sampling (Algorithm 1): the outer loop draws a defect minibatch of m pairs (with replacement when
m > K, ◊), the inner loop is one shuffled pass over the normal pool in chunks of m (◊), every inner
iteration is one step, ``iterations`` steps in all.

Training window (ours, for CPU budgets; off in the paper preset): with ``crop_size`` c > 0 every
pair of a step is trained on a c x c window of its S x S images that holds the defect (the same
window of I_d, M_d and I_n, so CaP still pastes at the same position). The network is fully
convolutional, so ``predict`` still runs on the whole S x S image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from fdsbench.blocks.backbones import imagenet_normalize
from fdsbench.errors import FdsError

from .losses import bce_per_image, crop_and_paste, nbr_loss, realism_weight
from .model import AlbuNet34, EncoderOutput


@dataclass
class FitLog:
    """What happened during a fit (kept with the cached weights; summarised in the state)."""

    loss: list[float] = field(default_factory=list)
    nbr: list[float] = field(default_factory=list)
    seg: list[float] = field(default_factory=list)
    cap: list[bool] = field(default_factory=list)  # branch of each step
    lam: list[float] = field(default_factory=list)  # mean λ of each CaP step
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"loss": self.loss, "nbr": self.nbr, "seg": self.seg, "cap": self.cap, "lam": self.lam,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "FitLog":
        return cls(**{k: list(d[k]) if isinstance(d[k], (list, tuple)) else d[k] for k in d})

    def summary(self) -> dict:
        n = len(self.loss)
        return {"steps": n, "cap_steps": int(sum(self.cap)), "first_loss": self.loss[0] if n else None,
                "last_loss": self.loss[-1] if n else None,
                "mean_lambda": float(np.mean(self.lam)) if self.lam else None, "seconds": self.seconds}


def schedule(k: int, n: int, m: int, iterations: int, rng: np.random.Generator,
             resample_defect_every_step: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(defect indices [m], normal indices [m]) for each of the ``iterations`` steps (Algorithm 1)."""
    if k < 1 or n < 1:
        raise FdsError(f"nbr_cap: a fit needs >= 1 defect image and >= 1 normal image (got {k} and {n})")
    step = 0
    while step < iterations:
        d_idx = rng.choice(k, size=m, replace=k < m)
        if resample_defect_every_step:
            inner = [rng.choice(n, size=m, replace=n < m)]
        elif n >= m:
            perm = rng.permutation(n)
            inner = [perm[i * m:(i + 1) * m] for i in range(n // m)]
        else:
            inner = [rng.integers(0, n, size=m)]
        for n_idx in inner:
            yield d_idx, n_idx
            step += 1
            if step >= iterations:
                return


def defect_window(mask: torch.Tensor, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``size`` x ``size`` window of ``mask`` [1, S, S] that holds the defect:
    the whole defect when its bounding box fits (uniform over such windows), else a uniformly drawn
    defect pixel; any window when the mask is empty."""
    s_h, s_w = mask.shape[-2:]
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    if len(ys) == 0:
        return int(rng.integers(0, s_h - size + 1)), int(rng.integers(0, s_w - size + 1))
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    if y1 - y0 >= size or x1 - x0 >= size:  # larger than the window: keep one of its pixels
        j = int(rng.integers(len(ys)))
        y0 = y1 = int(ys[j])
        x0 = x1 = int(xs[j])
    return (int(rng.integers(max(0, y1 - size + 1), min(y0, s_h - size) + 1)),
            int(rng.integers(max(0, x1 - size + 1), min(x0, s_w - size) + 1)))


def crop_windows(tensors: list[torch.Tensor | None], masks: torch.Tensor, size: int,
                 rng: np.random.Generator) -> list[torch.Tensor | None]:
    """The ``size`` x ``size`` window of each pair i, drawn by :func:`defect_window` on masks[i],
    cut from every tensor [m, C, S, S] of ``tensors`` (``None`` stays ``None``)."""
    corners = [defect_window(mk, size, rng) for mk in masks]
    return [None if t is None else torch.stack([t[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(corners)])
            for t in tensors]


def to_input(images_uint8: torch.Tensor, input_norm: str) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float network input (ImageNet mean/std by default, ◊)."""
    x = images_uint8.float() / 255.0
    if input_norm == "imagenet":
        return imagenet_normalize(x)
    if input_norm == "none":
        return x
    raise FdsError(f"nbr_cap: unknown input_norm '{input_norm}'; use imagenet or none")


def _encode_groups(model: AlbuNet34, groups: list[torch.Tensor], joint: bool) -> list[EncoderOutput]:
    """Encoder outputs of each group; ``joint``: one pass over their concatenation (shared BN batch)."""
    if not joint or len(groups) == 1:
        return [model.encode(g) for g in groups]
    out = model.encode(torch.cat(groups, 0))
    res, start = [], 0
    for g in groups:
        res.append(out[start:start + g.shape[0]])
        start += g.shape[0]
    return res


def fit(model: AlbuNet34, defect_images: torch.Tensor, defect_masks: torch.Tensor,
        normal_image: Callable[[int], torch.Tensor], n_normals: int, cfg, m: int,
        rng: np.random.Generator, device: str = "cpu", progress: Callable[[int], None] | None = None) -> FitLog:
    """Train ``model`` in place.

    defect_images: uint8 [K, 3, S, S]; defect_masks: float {0, 1} [K, 1, S, S];
    normal_image(i): uint8 [3, S, S] of normal pool image i; ``cfg``: the method Config."""
    import time

    if cfg.nbr not in ("cosine", "euclidean", "off"):
        raise FdsError(f"nbr_cap: unknown nbr '{cfg.nbr}'; use cosine, euclidean or off")
    if cfg.cap not in ("weighted", "unweighted", "off"):
        raise FdsError(f"nbr_cap: unknown cap '{cfg.cap}'; use weighted, unweighted (λ ≡ 1) or off")
    if cfg.nbr_feature not in ("conv2", "conv3", "conv4", "conv5"):
        raise FdsError(f"nbr_cap: unknown nbr_feature '{cfg.nbr_feature}'; use conv2..conv5")
    t0 = time.perf_counter()
    model.to(device)
    model.train(cfg.bn_train)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    log = FitLog()
    use_nbr = cfg.nbr != "off"
    for step, (d_idx, n_idx) in enumerate(schedule(len(defect_images), n_normals, m, cfg.iterations, rng,
                                                   cfg.resample_defect_every_step)):
        use_cap = cfg.cap != "off" and rng.random() > 1.0 - cfg.cap_prob
        i_d = to_input(defect_images[torch.as_tensor(d_idx)], cfg.input_norm).to(device)
        m_d = defect_masks[torch.as_tensor(d_idx)].to(device)
        need_n = use_nbr or use_cap
        i_n = (to_input(torch.stack([normal_image(int(j)) for j in n_idx]), cfg.input_norm).to(device)
               if need_n else None)
        if 0 < cfg.crop_size < i_d.shape[-1]:
            i_d, i_n, m_d = crop_windows([i_d, i_n, m_d], m_d, cfg.crop_size, rng)
        need_d = use_nbr or not use_cap or cfg.cap == "weighted"
        named = {}
        if need_d:
            named["d"] = i_d
        if use_nbr:
            named["n"] = i_n
        if use_cap:
            named["cap"] = crop_and_paste(i_d, i_n, m_d)
        feats = dict(zip(named, _encode_groups(model, list(named.values()), cfg.bn_joint)))

        if use_nbr:
            l_nbr = nbr_loss(getattr(feats["d"], cfg.nbr_feature), getattr(feats["n"], cfg.nbr_feature), m_d,
                             cfg.nbr, cfg.nbr_mask_downsample, cfg.nbr_pooling)
        else:
            l_nbr = torch.zeros(m, device=device)
        if use_cap:
            logits = model.decode(feats["cap"])
            if cfg.cap == "weighted":
                lam = realism_weight(getattr(feats["d"], cfg.nbr_feature), getattr(feats["cap"], cfg.nbr_feature),
                                     detach=cfg.lambda_detach)
            else:
                lam = torch.ones(m, device=device)
            l_seg = lam * bce_per_image(logits, m_d, cfg.bce_reduction)
        else:
            l_seg = bce_per_image(model.decode(feats["d"]), m_d, cfg.bce_reduction)
        loss = l_nbr.sum() + l_seg.sum()
        if not torch.isfinite(loss):
            raise FdsError(f"nbr_cap: the loss became {loss.item()} at step {step}; lower lr or use "
                           "bce_reduction=mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.loss.append(float(loss.detach()))
        log.nbr.append(float(l_nbr.detach().sum()))
        log.seg.append(float(l_seg.detach().sum()))
        log.cap.append(bool(use_cap))
        if use_cap:
            log.lam.append(float(lam.detach().mean()))
        if progress:
            progress(step)
    model.eval()
    log.seconds = time.perf_counter() - t0
    return log
