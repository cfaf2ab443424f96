"""``fm_fastsam`` — GFDS feature matching refined by FastSAM (paper §5.1, Table 4 rows
"FM-l+FastSAM-s" and "FM-l+FastSAM", Table 7).

Per query: R0 = FM's binary mask at S×S (argmax of the upsampled logits); FastSAM segments
"everything" in the same S×S query; masks overlapping R0 are selected and fused with R0
(:mod:`.fusion`; default = the released code's boundary refinement). The output is the fused
binary map as {0, 1} (``soft_fusion`` keeps FM's ranking inside each side of the threshold),
brought back to the query's size by nearest-neighbour resizing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from fdsbench.blocks.inference import probability_map
from fdsbench.errors import FdsError
from fdsbench.registry import register_method
from fdsbench.types import Query, Requirements

from fdsbench.methods.fm.method import CPU_FM, FeatureMatching, FMConfig, FMState
from fdsbench.methods.fm.method import PAPER_ROWS as FM_ROWS

from .fusion import FUSIONS, FusionParams, fuse

#: FastSAM size -> (weights-table name, ultralytics model yaml of the same architecture)
MODELS = {"s": ("fastsam_s", "yolov8s-seg.yaml"), "x": ("fastsam_x", "yolov8x-seg.yaml")}


def _fastsam():
    """The ultralytics-backed FastSAM module, imported on first use: listing or running other methods
    never imports ultralytics (heavy, and it must be made offline before its first import)."""
    from . import fastsam

    return fastsam


@dataclasses.dataclass
class FMFastSAMConfig(FMConfig):
    """Defaults = the released code with useSAM and useBoundary (Table 4 row "FM-l+FastSAM")."""

    fastsam: str = "x"  # x = FastSAM (YOLOv8x-seg, "FastSAM.pt") | s = FastSAM-s
    fastsam_weights: str = "default"  # default (table file) | random | a path
    fastsam_imgsz: int = 256  # code: the benchmark size; 1024 = FastSAM's own default
    conf: float = 0.1
    iou: float = 0.5
    max_det: int = 300
    fastsam_call: str = "low"  # low = predictor.model + postprocess (GFDS) | high = FastSAM.predict
    random_class_bias: float = 0.0  # fastsam_weights=random only: objectness bias so masks appear
    fusion: str = "code"  # code | paper (eqs. 13–14) | union (R0 ∪ R_sam) | sam_only (R_sam)
    tau1: float = 0.2
    area_clause: bool = True  # code-only selection clause (area < 0.4·S² or overlap > 0.6)
    area_cap: float = 0.4
    big_overlap: float = 0.6
    dilation: int = 21
    tau2: float = 0.9
    soft_fusion: bool = False  # p = max(p_fm, 0.51) inside R, min(p_fm, 0.49) outside (same binary)


FUSION_ROWS = {  # Table 4 rows with FastSAM and the fusion ablation (Table 7), FM-l
    "fm-l-fastsam": {},
    "fm-l-fastsam-s": {"fastsam": "s"},
    "fm-l-fastsam-union": {"fusion": "union"},
    "fm-l-fastsam-sam-only": {"fusion": "sam_only"},
    "fm-l-fastsam-paper-fusion": {"fusion": "paper", "area_clause": False},
    # prototype ablation (Table 6, "with FastSAM" column)
    **{f"{k.replace('fm-l-', 'fm-l-fastsam-')}": v for k, v in FM_ROWS.items() if k.startswith("fm-l-")},
}


@register_method("fm_fastsam")
class FMFastSAM(FeatureMatching):
    """FM-l + FastSAM (GFDS): FM's mask refined by FastSAM's "everything" masks.

    Masks are selected by their overlap with FM's mask and fused with its connected components
    (the released code's boundary refinement by default)."""

    requires: ClassVar[Requirements] = Requirements(weights=("fm_l", "fastsam_x"), fad=False, gpu_recommended=True)
    Config = FMFastSAMConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        **FUSION_ROWS,
        # offline synthetic benchmark on 2 CPU cores: fm's cpu encoder (HED VGG-16 conv3 used directly)
        # + FastSAM-s with random weights (flagged †); the objectness bias makes the untrained FastSAM
        # emit masks so that the fusion runs
        "cpu": {**CPU_FM, "fastsam": "s", "fastsam_weights": "random", "random_class_bias": 2.0},
        "test": {"student": "s", "weights": "random", "image_size": 64, "fastsam": "s",
                 "fastsam_weights": "random", "fastsam_imgsz": 64, "random_class_bias": 2.0},
    }
    default_preset = "cpu"
    #: preset -> its row in GFDS Table 4 (the FPS table's paper FPS, RTX 3090 Ti)
    speed_reference: ClassVar[dict[str, str]] = {"fm-l-fastsam": "FM-l+FastSAM", "fm-l-fastsam-s": "FM-l+FastSAM-s"}

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        if c.fusion not in FUSIONS:
            raise FdsError(f"fm_fastsam: fusion '{c.fusion}' is unknown; use one of {', '.join(FUSIONS)}")
        if c.fastsam not in MODELS:
            raise FdsError(f"fm_fastsam: fastsam '{c.fastsam}' is unknown; use s (FastSAM-s) or x (FastSAM-x)")
        if c.dilation % 2 == 0:
            raise FdsError(f"fm_fastsam: dilation={c.dilation} must be odd (21 in the code)")
        fs_name = MODELS[c.fastsam][0]
        table = c.fastsam_weights in ("default", "", None)
        self.requires = dataclasses.replace(self.requires, weights=self.requires.weights + ((fs_name,) if table else ()))
        self.params = FusionParams(c.tau1, c.area_cap, c.big_overlap, c.dilation, c.tau2, c.area_clause)
        self._fastsam = None
        self._fastsam_prov = ""
        self.fusion_stats = {"queries": 0, "no_masks": 0, "none_selected": 0, "selected": 0, "replaced": 0}

    @property
    def everything(self):
        if self._fastsam is None:
            c = self.config
            if c.fastsam_weights == "random":
                model = _fastsam().build_random(c.fastsam, seed=c.random_seed, class_bias=c.random_class_bias)
                self._fastsam_prov = "random-init"
            else:
                path, self._fastsam_prov = _fastsam().resolve_weights(c.fastsam, c.fastsam_weights)
                model = _fastsam().load(path)
            self._fastsam = _fastsam().Everything(model, imgsz=c.fastsam_imgsz, conf=c.conf, iou=c.iou, max_det=c.max_det,
                                          device=self.device, call=c.fastsam_call)
        return self._fastsam

    def fused(self, state: FMState, image: np.ndarray, what: str = "query") -> tuple[torch.Tensor, torch.Tensor]:
        """(fused binary R, FM probability) at S×S for one query image."""
        S = self.config.image_size
        L = self.logits(state, image, (S, S), what)
        R0 = L[0, 1] > L[0, 0]  # argmax, ties → background
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)
        if rgb.shape[:2] != (S, S):
            rgb = cv2.resize(rgb, (S, S), interpolation=cv2.INTER_LINEAR)
        everything = self.everything  # built outside inference mode (ultralytics fuses layers in place)
        with self._ctx():
            masks = everything(rgb)
        R, info = fuse(R0, None if masks is None else masks.to(R0.device), self.config.fusion, self.params)
        st = self.fusion_stats
        st["queries"] += 1
        st["no_masks"] += info["masks"] == 0
        st["none_selected"] += info["masks"] > 0 and info["selected"] == 0
        st["selected"] += info["selected"]
        st["replaced"] += info["replaced"]
        p = torch.softmax(L.float(), dim=1)[0, 1]
        return R, p

    def predict(self, state: FMState, query: Query) -> np.ndarray:
        R, p = self.fused(state, query.image, f"query {query.id}")
        out = torch.where(R, p.clamp(min=0.51), p.clamp(max=0.49)) if self.config.soft_fusion else R.float()
        out = probability_map(out)
        H, W_ = query.size
        if out.shape != (H, W_):
            out = cv2.resize(out, (W_, H), interpolation=cv2.INTER_NEAREST)
        return out

    def weights_provenance(self) -> dict[str, str]:
        prov = super().weights_provenance()
        self.everything  # noqa: B018 - building resolves (and checks) the weights file
        prov[MODELS[self.config.fastsam][0]] = self._fastsam_prov
        return prov

    def runtime_info(self) -> dict[str, Any]:
        info = super().runtime_info()
        info.update({"ultralytics_version": _fastsam().version(), "ultralytics_pinned": _fastsam().ULTRALYTICS_PINNED,
                     "fusion_counts": dict(self.fusion_stats)})
        return info
