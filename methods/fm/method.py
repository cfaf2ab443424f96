"""``fm`` — GFDS distilled feature matching, FM-l / FM-s (Liu et al., "Exploring Few-Shot Defect
Segmentation in General Industrial Scenarios with Metric Learning and Vision Foundation Models",
§5.1, Table 3, Table 4).

``prepare`` encodes the support views with the student E and builds the foreground (PatchAvg) and
background (dense) prototypes once per episode; ``predict`` encodes the query, matches every query
cell against both prototype sets and returns softmax(10·[s_b, s_f])[1] at the query's size. Images
are brought to S×S (256) as the GFDS loader does (OpenCV bilinear, ImageNet normalisation); on the
GFDS protocol (``resize=256``) they already are. ``encoder`` = a backbone name replaces the student
by that network's own features (the paper's Fig. 9 "teacher features used directly" variant).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fdsbench.blocks.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from fdsbench.blocks.inference import inference_context, probability_map
from fdsbench.errors import DataError, FdsError
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Query, Requirements, SupportSet

from . import matching as M
from .students import PUBLISHED, make_student, student_key

MASK_THRESHOLD = 30  # GFDS loader: 8-bit mask, bilinear resize, foreground = value > 30


@dataclasses.dataclass
class FMConfig:
    """Defaults = the released code's FM-l (Table 4 row "FM-l"): cosine, f_patch / b_dense."""

    student: str = "l"  # l = FM-l, s = FM-s
    fm_l_arch: str = "code"  # code = PDN-medium (loads model_large.pth) | table3 = the paper's Table 3
    weights: str = "default"  # default (published file) | random | a path | a distilled student's name
    random_seed: int = 0  # seed of the student's random init (weights=random)
    image_size: int = 256  # S: inputs are S×S (the benchmark size; 384×S/4×S/4 features)
    distance: str = "cosine"  # cosine | l2 (code option)
    fg_proto: str = "patch"  # patch (PatchAvg) | dense | pool — ablation rows f_patch / f_dense / f_pool
    bg_proto: str = "dense"  # dense | patch | pool — rows b_dense / b_patch / b_pool
    patch_avg: str = "sequence"  # sequence = code (triples of the row-major list, n > 10) | 2d = paper
    amp: str = "auto"  # auto = bf16 autocast on CUDA (official eval), fp32 on CPU | bf16 | fp32
    similarity_fp32: bool = False  # under bf16: cosine matrix and s_f − s_b in fp32 (student still bf16)
    # E itself: "student" (the PDN above) | a backbone name (Fig. 9: teacher features used directly)
    encoder: str = "student"
    encoder_layers: tuple = ("conv3",)  # backbone taps, concatenated at the finest one's resolution
    encoder_weights: str = "default"  # backbone weights: default (weights table) | random | a path


@dataclasses.dataclass
class FMState:
    """Per-episode support state: prototypes ready for :func:`matching.similarity`."""

    fg: torch.Tensor | None  # [1, C, N_f] (normalised for cosine); None when no support cell is defect
    bg: torch.Tensor | None  # [1, C, N_b]; None when every support cell is defect
    owner: int
    n_fg: int
    n_bg: int


#: the offline matcher of the ``cpu`` presets (fm and fm_fastsam): pretrained VGG-16 (HED) conv3 used
#: directly, at S = 384 (a 96×96 grid: the synthetic defects are small)
CPU_FM = {"encoder": "vgg16_hed", "encoder_layers": ("conv3",), "encoder_weights": "default", "image_size": 384}

PAPER_ROWS = {  # Table 4 rows and the prototype ablation (Table 6) of FM-l
    "fm-l": {},
    "fm-s": {"student": "s"},
    "fm-l-fpatch-bpatch": {"bg_proto": "patch"},
    "fm-l-fdense-bdense": {"fg_proto": "dense"},
    "fm-l-fpool-bdense": {"fg_proto": "pool"},
    "fm-l-fpatch-bpool": {"bg_proto": "pool"},
}


def to_input(image: np.ndarray, size: int, what: str = "image") -> torch.Tensor:
    """1×3×S×S float32 as the GFDS loader: OpenCV bilinear resize (no antialias, aspect not kept)
    of the uint8 RGB image, /255, ImageNet mean/std."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"{what}: fm expects uint8 RGB images (got {arr.dtype}); decode it with fdsbench.io.read_image")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{what}: expected an [H, W, 3] RGB array, got shape {arr.shape}")
    if arr.shape[:2] != (size, size):
        arr = cv2.resize(arr, (size, size), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)[None]


def to_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bool S×S support mask as the GFDS loader: 0/255, OpenCV bilinear resize, > 30."""
    m = np.asarray(mask).astype(bool)
    if m.shape != (size, size):
        m = cv2.resize(m.astype(np.uint8) * 255, (size, size), interpolation=cv2.INTER_LINEAR) > MASK_THRESHOLD
    return torch.from_numpy(m)


@register_method("fm")
class FeatureMatching(Method):
    """GFDS feature matching (FM-l / FM-s): distilled CNN features matched to support prototypes.

    PatchAvg foreground and dense background prototypes, max cosine similarity, softmax of 10·[s_b, s_f]."""

    requires: ClassVar[Requirements] = Requirements(weights=("fm_l",), fad=False, gpu_recommended=True)
    Config = FMConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        **PAPER_ROWS,
        # offline synthetic benchmark on 2 CPU cores (no DINO, no published student here): Fig. 9's
        # "teacher features used directly" with HED's VGG-16 conv3 (stride 4, like the student)
        "cpu": CPU_FM,
        # contract test: FM-s, random weights, 64×64 inputs (16×16 grid)
        "test": {"student": "s", "weights": "random", "image_size": 64},
    }
    default_preset = "cpu"
    #: preset -> its row in GFDS Table 4 (the FPS table's paper FPS, RTX 3090 Ti)
    speed_reference: ClassVar[dict[str, str]] = {"fm-l": "FM-l", "fm-s": "FM-s"}

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        for key, allowed in (("fg_proto", M.FG_PROTOS), ("bg_proto", M.BG_PROTOS), ("patch_avg", M.PATCH_AVGS),
                             ("distance", M.DISTANCES), ("amp", ("auto", "bf16", "fp32"))):
            if getattr(c, key) not in allowed:
                raise FdsError(f"fm: {key}='{getattr(c, key)}' is unknown; use one of {', '.join(allowed)}")
        if c.image_size % 4 or c.image_size < 32:
            raise FdsError(f"fm: image_size={c.image_size}; use a multiple of 4 (256 in the paper)")
        self.direct = c.encoder != "student"  # Fig. 9: the teacher's own features, no student
        self.arch = c.encoder if self.direct else student_key(c.student, c.fm_l_arch)
        published = (c.encoder_weights in ("default", "", None) if self.direct
                     else c.weights in ("default", "", None) and self.arch in PUBLISHED.values())
        self.requires = dataclasses.replace(type(self).requires, weights=(self.arch,) if published else ())
        on_cuda = str(device).startswith("cuda")
        self.use_bf16 = c.amp == "bf16" or (c.amp == "auto" and on_cuda)
        self.precision = "bf16-autocast" if self.use_bf16 else "fp32"
        if self.use_bf16 and c.similarity_fp32:
            self.precision += " (fp32 similarity)"
        self._student = None
        self._provenance = ""
        self._token = object()
        #: support sets (class, support ids) where a matching edge case fired
        self.edge_cases: dict[str, set] = {"no_fg_cell": set(), "no_bg_cell": set()}

    # ---- model -------------------------------------------------------------------------------
    @property
    def student(self) -> torch.nn.Module:
        """The encoder E: the student network, or the backbone used directly (``encoder``)."""
        if self._student is None:
            c = self.config
            if self.direct:
                net = build_backbone(c.encoder, c.encoder_weights, device=self.device, seed=c.random_seed)
                self._provenance = net.provenance["sha256"]
            else:
                net, self._provenance = make_student(c.student, c.fm_l_arch, c.weights, c.random_seed)
            self._student = net.to(self.device)
        return self._student

    def _ctx(self):
        return inference_context(self.device, self.use_bf16)

    def _sim_ctx(self):
        """The similarity's precision: the surrounding autocast, or fp32 with ``similarity_fp32``."""
        if self.use_bf16 and self.config.similarity_fp32:
            dev = "cuda" if str(self.device).startswith("cuda") else "cpu"
            return torch.autocast(dev, enabled=False)
        return contextlib.nullcontext()

    def encode(self, image: np.ndarray, what: str = "image") -> torch.Tensor:
        """E(I): [1, 384, S/4, S/4] for a student; for a backbone the ``encoder_layers`` maps,
        bilinearly resized to the finest one and concatenated (inside the method's precision context)."""
        x = to_input(image, self.config.image_size, what).to(self.device)
        if not self.direct:
            return self.student(x)
        maps = self.student.forward_features(x, layers=self.config.encoder_layers)
        size = maps[0].shape[-2:]
        return torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                          for m in maps], dim=1)

    # ---- the contract ------------------------------------------------------------------------
    def prepare(self, support: SupportSet) -> FMState:
        """Support features and prototypes, once per episode (support views of the protocol = shots)."""
        c = self.config
        if not support.shots:
            raise FdsError("fm: the support set is empty; an episode needs at least one support image")
        fgs, bgs = [], []
        with self._ctx():
            for shot in support.shots:
                for image, mask in shot.views():
                    if np.asarray(image).shape[:2] != np.asarray(mask).shape[:2]:
                        raise DataError(f"support {shot.id}: mask {np.asarray(mask).shape[:2]} and image "
                                        f"{np.asarray(image).shape[:2]} differ in size; fix the dataset's mask file")
                    feat = self.encode(image, f"support {shot.id}")
                    cells = M.mask_to_grid(to_mask(mask, c.image_size).to(feat.device), feat.shape[-1])
                    fg, bg = M.shot_vectors(feat, cells, c.fg_proto, c.bg_proto, c.patch_avg)
                    fgs.append(fg)
                    bgs.append(bg)
            with self._sim_ctx():
                P_f, P_b = M.combine_shots(fgs, c.fg_proto), M.combine_shots(bgs, c.bg_proto)
                if self.use_bf16 and c.similarity_fp32:
                    P_f, P_b = P_f.float(), P_b.float()
                n_f, n_b = P_f.shape[-1], P_b.shape[-1]
                key = (support.class_key, tuple(s.id for s in support.shots))
                if n_f == 0:
                    self.edge_cases["no_fg_cell"].add(key)
                if n_b == 0:
                    self.edge_cases["no_bg_cell"].add(key)
                fg = M.prepare_prototypes(P_f, c.distance) if n_f else None
                bg = M.prepare_prototypes(P_b, c.distance) if n_b else None
        return FMState(fg, bg, id(self._token), n_f, n_b)

    def logits(self, state: FMState, image: np.ndarray, size: tuple[int, int], what: str = "query") -> torch.Tensor:
        """Upsampled logits L = 10·[s_b, s_f] at ``size`` ([1, 2, H, W]); None-prototype edge cases
        give L = [0, −∞] (no defect cell: p ≡ 0) or [−∞, 0] (no background cell: p ≡ 1)."""
        if not isinstance(state, FMState) or state.owner != id(self._token):
            raise FdsError("fm.predict got a state from another method instance; pass what this instance's prepare() returned")
        with self._ctx():
            if state.fg is None or state.bg is None:
                L = torch.zeros(1, 2, *size, device=self.device)
                L[:, 1 if state.fg is None else 0] = -float("inf")
                return L
            feat = self.encode(image, what)
            with self._sim_ctx():
                if self.use_bf16 and self.config.similarity_fp32:
                    feat = feat.float()
                s_f = M.similarity(feat, state.fg, self.config.distance)
                s_b = M.similarity(feat, state.bg, self.config.distance)
                return M.upsample(M.logits(s_b, s_f), size)

    def predict(self, state: FMState, query: Query) -> np.ndarray:
        """softmax(L)[1] at the query's original size (L upsampled there directly, align_corners=True)."""
        L = self.logits(state, query.image, query.size, f"query {query.id}")
        return probability_map(M.probability(L)[0])

    # ---- provenance --------------------------------------------------------------------------
    def weights_provenance(self) -> dict[str, str]:
        self.student  # noqa: B018 - building resolves (and checks) the weights file
        return {self.arch: self._provenance}

    def runtime_info(self) -> dict[str, Any]:
        """Edge cases of the matcher (episodes whose support grid had no defect / no background cell:
        p ≡ 0 / p ≡ 1 for their queries), precision and parameter count."""
        info = {"precision": self.precision, "student": self.arch,
                "params_M": round(sum(p.numel() for p in self.student.parameters()) / 1e6, 2)}
        for k, v in self.edge_cases.items():
            info[f"episodes_{k}"] = len(v)
            if v:
                info[f"episodes_{k}_examples"] = [f"{cls}: {', '.join(ids)}" for cls, ids in sorted(v)[:5]]
        return info

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["runtime"] = self.runtime_info()
        return d
