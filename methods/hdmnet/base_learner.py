"""Stage 1 of HDMNet's two-stage recipe (following BAM): a PSPNet trained on the BASE classes of the
fold, later frozen inside HDMNet as encoder and base learner.

Training data: every image of the base folds once per epoch with a label map of all its base
classes (0 background, i+1 for the i-th class of ``TrainSource.classes``; a later class wins where
masks overlap), official augmentation and S x S resize (data.py); loss CE (ignore 255); SGD with
momentum and the per-iteration poly schedule of the shared TrainLoop; BatchNorm trains.

The result is cached like a checkpoint, keyed by everything that changes it (the base-learner
settings, the encoder weights, the dataset, fold, seed and training samples), and reused by every
later fit of the same fold, e.g. another meta-training config or another shot. An interrupted stage
resumes from its last epoch.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fdsbench.blocks.training import TrainLoop
from fdsbench.errors import FdsError
from fdsbench.io import atomic_write_bytes, content_hash, sha256_file
from fdsbench.seeding import derive_seed
from fdsbench.types import TrainSource

from .data import IGNORE, prepare_pair
from .model import PSPNet


def base_label(train: TrainSource, image_id: str, classes: list[str], of_image: dict) -> np.ndarray:
    """uint8 label map of one image: 0 background, 1 + class index where that class's mask is set."""
    label = None
    for cls in of_image[image_id]:
        m = np.asarray(train.load_mask(image_id, cls), bool)
        if label is None:
            label = np.zeros(m.shape, np.uint8)
        label[m] = classes.index(cls) + 1
    return label


def cache_key(train: TrainSource, settings: dict) -> str:
    return content_hash({"settings": settings, "dataset": train.dataset, "fold": train.fold, "seed": train.seed,
                         "samples": sorted(map(list, train.samples))}, 12)


def train_base_learner(psp: PSPNet, train: TrainSource, settings: dict, cache_dir: Path, device: str,
                       log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Train ``psp`` on the base classes (or load the cached result). ``settings``: image_size, epochs,
    batch_size, lr, momentum, weight_decay, power, train_encoder, max_iters_per_epoch, augment and
    the encoder's weights id. Returns the provenance {file, sha256, reused, history}."""
    key = cache_key(train, settings)
    stem = f"pspnet_{train.dataset}_fold{train.fold}_train{train.seed}_{key}"
    final = Path(cache_dir) / f"{stem}.pt"
    if final.is_file():
        try:
            state = torch.load(final, map_location="cpu", weights_only=True)
            psp.load_state_dict(state["model"])
        except Exception as e:  # noqa: BLE001 - damaged or foreign file
            raise FdsError(f"cannot load the cached base learner {final} ({type(e).__name__}: {e}); "
                           f"delete it to train the PSPNet again") from None
        log(f"base learner reused from {final}")
        return {"file": str(final), "sha256": sha256_file(final), "reused": True,
                "history": [dict(zip(("epoch", "loss"), h.tolist())) for h in state.get("history", [])]}
    classes = train.classes
    of_image: dict[str, list[str]] = {}
    for image_id, cls in train.samples:
        of_image.setdefault(image_id, []).append(cls)
    images = sorted(of_image)
    if not images:
        raise FdsError(f"no base-class images in training data of {train.dataset} fold {train.fold}")
    S, bs = int(settings["image_size"]), int(settings["batch_size"])
    n_it = max(1, len(images) // bs)
    if settings["max_iters_per_epoch"]:
        n_it = min(n_it, int(settings["max_iters_per_epoch"]))
    psp.to(device)
    psp.requires_grad_(True)
    encoder = [getattr(psp, f"layer{i}") for i in range(5)]
    if not settings["train_encoder"]:
        for m in encoder:
            m.requires_grad_(False)
    params = [p for p in psp.parameters() if p.requires_grad]
    loop = TrainLoop(psp, [{"params": params, "lr_mult": 1.0}], Path(cache_dir) / stem, epochs=int(settings["epochs"]),
                     iters_per_epoch=n_it, base_lr=float(settings["lr"]), power=float(settings["power"]),
                     weight_decay=float(settings["weight_decay"]), optimizer="sgd",
                     momentum=float(settings["momentum"]), seed=train.seed, exclude=(), fingerprint=key, log=log)

    def batches(epoch: int):
        order = np.random.default_rng(derive_seed("pspnet-order", train.seed, epoch)).permutation(len(images))
        for b in range(n_it):
            xs, ys = [], []
            for pos in order[b * bs: (b + 1) * bs]:
                rng = np.random.default_rng(derive_seed("pspnet", train.seed, epoch, int(pos)))
                image_id = images[int(pos)]
                x, y = prepare_pair(train.load_image(image_id), base_label(train, image_id, classes, of_image), S,
                                    rng, bool(settings["augment"]))
                xs.append(x)
                ys.append(y)
            yield torch.stack(xs).to(device), torch.stack(ys).to(device)

    def step_loss(batch):
        x, y = batch
        return F.cross_entropy(loop.module(x), y.long(), ignore_index=IGNORE)

    def train_mode():  # the PSPNet stage trains its BatchNorm statistics (a frozen encoder keeps its own)
        psp.train()
        if not settings["train_encoder"]:
            for m in encoder:
                m.eval()

    history = loop.run(batches, step_loss, train_mode=train_mode)
    for p in psp.parameters():
        p.requires_grad_(False)
    psp.eval()
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in psp.state_dict().items()},
                "history": [torch.tensor([h["epoch"], h["loss"]]) for h in history]}, buf)
    atomic_write_bytes(final, buf.getvalue())
    log(f"base learner saved to {final}")
    return {"file": str(final), "sha256": sha256_file(final), "reused": False,
            "history": [{"epoch": h["epoch"], "loss": h["loss"]} for h in history]}
