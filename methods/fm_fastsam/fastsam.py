"""FastSAM (Zhao et al. 2023; YOLOv8-seg trained on 2 % of SA-1B) through ultralytics, strictly offline.

Importing this module sets, BEFORE ultralytics is first imported:

* ``YOLO_OFFLINE=1`` — no DNS probe at import (``ultralytics.utils.ONLINE``), hence no analytics;
* ``YOLO_AUTOINSTALL=false`` — no pip installs from ``check_requirements``;
* ``YOLO_CONFIG_DIR=$FDSBENCH_CACHE/ultralytics`` — the settings file lives in fdsbench's cache;
* ``YOLO_VERBOSE=false``; settings ``sync`` off.

Weights are only ever local files (a bare name like ``FastSAM-s.pt`` would make ultralytics
download it): :func:`load` refuses anything that is not an existing file. Nothing is plotted or
saved (fonts would be downloaded). FastSAM checkpoints are pickled modules, so ultralytics loads
them with ``weights_only=False``: only the weights table's files (sha256 checked) or a file the user
names explicitly are loaded, never a file of the workdir (the random-init model is built in-process
from ultralytics' YOLOv8-seg yaml and handed over through a private temporary folder).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from fdsbench import weights as W
from fdsbench.errors import FdsError, WeightsError

from .method import MODELS

ULTRALYTICS_PINNED = "8.4.190"


def _offline_environment() -> None:
    if "ultralytics" in sys.modules:
        from ultralytics.utils import ONLINE

        if ONLINE:
            raise FdsError("ultralytics was imported before fdsbench could make it offline (it probed the "
                           "network at import); set YOLO_OFFLINE=1 in the environment, or import "
                           "fdsbench.methods.fm_fastsam before ultralytics")
        return
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["YOLO_VERBOSE"] = "false"
    config = W.cache_dir().parent / "ultralytics"
    config.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config)


_offline_environment()

import PIL.Image  # noqa: E402

_pillow_open = PIL.Image.open
import ultralytics  # noqa: E402 - the environment above must be set before the first import
from ultralytics import FastSAM  # noqa: E402
from ultralytics.nn.tasks import SegmentationModel  # noqa: E402
from ultralytics.utils import SETTINGS  # noqa: E402

# ultralytics replaces PIL.Image.open process-wide with a wrapper that pip-installs a HEIF plugin on
# the first unidentified file; fdsbench's readers (and this process's other methods) keep Pillow's own
PIL.Image.open = _pillow_open

if SETTINGS.get("sync"):
    SETTINGS.update({"sync": False})


def version() -> str:
    return ultralytics.__version__


def load(path: str | os.PathLike) -> FastSAM:
    """FastSAM from an EXISTING local checkpoint (never a bare name: that would download)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"FastSAM weights file {p} does not exist; fdsbench never lets ultralytics download. "
                           "Put FastSAM-s.pt / FastSAM-x.pt in $FDSBENCH_WEIGHTS (see `fdsbench weights where fastsam_s`)")
    return FastSAM(str(p.resolve()))


def build_random(size: str, seed: int = 0, class_bias: float = 0.0) -> FastSAM:
    """Untrained FastSAM-s/x (YOLOv8s/x-seg, one class) with a seeded random init. ``class_bias`` is
    added to the objectness logits so an untrained head emits masks above conf 0.1 (tests, CPU runs)."""
    if size not in MODELS:
        raise FdsError(f"fm_fastsam: fastsam '{size}' is unknown; use s (FastSAM-s) or x (FastSAM-x)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SegmentationModel(MODELS[size][1], nc=1, verbose=False)
    net.names = {0: "object"}
    net.task = "segment"
    if class_bias:
        for seq in net.model[-1].cv3:
            seq[-1].bias.data.fill_(class_bias)
    # FastSAM() only takes a checkpoint file: write ours to a private temporary file and load it back
    with tempfile.TemporaryDirectory(prefix="fdsbench-fastsam-") as tmp:
        f = Path(tmp) / f"FastSAM-{size}-random.pt"
        torch.save({"model": net, "train_args": {"task": "segment", "imgsz": 1024}}, f)
        return FastSAM(str(f))


class Everything:
    """FastSAM "everything" mode on one S×S RGB image: all instance masks after NMS, bool [N, S, S].

    ``call="low"`` (GFDS's fast path): after one high-level warm-up call that builds the predictor,
    ``predictor.preprocess`` → ``predictor.model`` → ``predictor.postprocess``; ``call="high"``:
    ``FastSAM.predict`` every time. Both give the same masks (tested)."""

    def __init__(self, model: FastSAM, *, imgsz: int, conf: float, iou: float, max_det: int, device: str,
                 call: str = "low"):
        if call not in ("low", "high"):
            raise FdsError(f"fm_fastsam: fastsam_call '{call}' is unknown; use low or high")
        if imgsz % 32:
            raise FdsError(f"fm_fastsam: fastsam_imgsz={imgsz} must be a multiple of 32 (256 in the code, 1024 default)")
        self.model = model
        self.call = call
        self.kw = dict(imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, retina_masks=True,
                       device=str(device), verbose=False, save=False)
        self._warm = False

    def _high(self, bgr: np.ndarray):
        return self.model.predict(source=bgr, **self.kw)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor | None:
        """Masks bool [N, H, W] at the image's size (retina masks), or None when none survives NMS."""
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # ultralytics takes OpenCV-order arrays
        if self.call == "high" or not self._warm:
            res = self._high(bgr)
            self._warm = True
        else:
            pr = self.model.predictor
            x = pr.preprocess([bgr])
            preds = pr.model(x)
            pr.batch = [[""]]  # postprocess reads the paths from batch[0]
            res = pr.postprocess(preds, x, [bgr])
        masks = res[0].masks
        if masks is None or masks.data.shape[0] == 0:
            return None
        return masks.data.bool()


def resolve_weights(size: str, weights: str) -> tuple[Path, str]:
    """(file, sha256) of a FastSAM checkpoint: the table's file (``default``) or an explicit path."""
    name = MODELS[size][0]
    path, prov = W.resolve(name, None if weights in ("default", "", None) else weights)
    return path, prov["sha256"]
