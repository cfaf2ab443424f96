"""Thin layer over the official ``sam2`` package (pinned 1.1.0): model table, offline build, the
official frame/mask preprocessing, and the low-level support-memory / query recipe
(built on the official ``sam2_video_predictor.py`` / ``modeling/sam2_base.py``).

This module is ``fdsbench.methods.sam2.official``; ``import sam2`` below is the absolute import of
the official package (never add ``methods/`` to ``sys.path``, or this package would shadow it).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import sam2  # the official package (absolute import; this file's package is fdsbench.methods.sam2)
from sam2.build_sam import build_sam2_video_predictor
from sam2.utils.misc import fill_holes_in_mask_scores

from fdsbench.errors import DataError, FdsError

SAM2_VERSION_PINNED = "1.1.0"

#: paper name -> (hydra config inside the sam2 package, weights-table name)
MODELS: dict[str, tuple[str, str]] = {
    "t": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny"),
    "s": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small"),
    "b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus"),
    "l": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large"),
}
ALIASES = {"tiny": "t", "small": "s", "b": "b+", "base_plus": "b+", "base-plus": "b+", "large": "l"}
RESOLUTIONS = (256, 512, 1024)  # S of the paper (Table 4); any multiple of 32 builds
IMG_MEAN = (0.485, 0.456, 0.406)  # sam2/utils/misc.py load_video_frames defaults
IMG_STD = (0.229, 0.224, 0.225)


def canonical_model(name: str) -> str:
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in MODELS:
        raise FdsError(f"unknown SAM2 model '{name}'; use one of t, s, b+, l (SAM2.1 Hiera tiny/small/base+/large)")
    return key


def sam2_version() -> str:
    try:
        from importlib.metadata import version

        return version("sam2")
    except Exception:  # noqa: BLE001 - metadata missing (source checkout)
        return getattr(sam2, "__version__", "unknown")


def sam2_c_available() -> bool:
    """True when the compiled extension ``sam2._C`` (connected components, used by fill-holes) imports."""
    try:
        importlib.import_module("sam2._C")
        return True
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA/ABI error while loading it
        return False


@contextlib.contextmanager
def _sam2_hydra():
    """Compose the official Hydra configs whatever the global Hydra state is: the state before is
    backed up and restored (``import sam2`` initialises Hydra globally with module "sam2"; another
    library may have initialised it differently)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sam2", version_base="1.2"):
            yield
    finally:
        restore_gh_from_backup(backup)


def build_predictor(model: str, image_size: int, device: str = "cpu", vos_optimized: bool = False):
    """The official SAM2VideoPredictor with random init (no I/O, no network) at resolution S.

    S is set only through ``++model.image_size=S``; the Hiera absolute position embedding,
    sine encodings, prompt-encoder grid and RoPE tables follow from it. apply_postprocessing stays
    on (dynamic multimask, binarised mask for memory, fill_hole_area=8) as in the official usage."""
    cfg, _ = MODELS[canonical_model(model)]
    if image_size % 32:
        raise FdsError(f"SAM2 image_size {image_size} must be a multiple of 32 (paper: 256, 512 or 1024)")
    with _sam2_hydra():
        pred = build_sam2_video_predictor(cfg, ckpt_path=None, device=device, mode="eval",
                                          hydra_overrides_extra=[f"++model.image_size={int(image_size)}"],
                                          vos_optimized=vos_optimized)
    return pred


# ---- inputs exactly as the official loader (``sam2/utils/misc.py``) ----------------------------
def to_pil_rgb(image: np.ndarray, what: str = "image") -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"{what}: SAM2 frames must be uint8 RGB (got {arr.dtype}); decode it with fdsbench.io.read_image")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return Image.fromarray(arr).convert("RGB")
    raise DataError(f"{what}: expected an [H, W, 3] RGB array, got shape {arr.shape}")


def load_frame(image: np.ndarray, image_size: int, what: str = "image") -> torch.Tensor:
    """3×S×S float32 frame as sam2/utils/misc.py ``_load_img_as_tensor`` + ``load_video_frames``:
    PIL RGB → ``resize((S, S))`` (PIL default bicubic) → /255 (float64) → float32 → −mean, /std."""
    pil = to_pil_rgb(image, what)
    arr = np.array(pil.resize((image_size, image_size))) / 255.0
    img = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)
    img -= torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
    img /= torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
    return img


def resize_mask(mask: np.ndarray | torch.Tensor, image_size: int, device: Any = "cpu") -> torch.Tensor:
    """1×1×S×S float {0, 1} support mask as ``SAM2VideoPredictor.add_new_mask``: bilinear,
    antialias, align_corners=False, then ≥ 0.5 (no resize when already S×S)."""
    m = torch.as_tensor(np.asarray(mask).astype(bool)) if not isinstance(mask, torch.Tensor) else mask.bool()
    if m.dim() != 2:
        raise DataError(f"support mask must be 2-D [H, W], got shape {tuple(m.shape)}")
    m = m[None, None].float().to(device)
    if tuple(m.shape[-2:]) != (image_size, image_size):
        m = F.interpolate(m, size=(image_size, image_size), align_corners=False, mode="bilinear", antialias=True)
        m = (m >= 0.5).float()
    return m


# ---- the low-level recipe (K shots = conditioning frames 0..K-1) --------------------------------
@dataclass
class FrameFeatures:
    feats: list
    pos: list
    sizes: list


def encode_frame(pred, x: torch.Tensor) -> FrameFeatures:
    """Image encoder on one normalised 1×3×S×S frame (forward_image + _prepare_backbone_features)."""
    S = pred.image_size
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S) or x.shape[0] != 1:
        raise FdsError(f"SAM2 frame has shape {tuple(x.shape)} but this model is built for S={S} and takes "
                       f"1x3x{S}x{S}; resize frames with load_frame(image, {S}) (the official loader) or build "
                       f"the model with image_size={x.shape[-1]}")
    try:
        bo = pred.forward_image(x)
        _, feats, pos, sizes = pred._prepare_backbone_features(bo)
    except AssertionError as e:  # the SAM heads assert the stride-16 map is S/16 wide
        raise FdsError(f"SAM2 rejected a {tuple(x.shape)} frame for S={S} ({e or 'size assertion'}); "
                       f"frames must be {S}x{S}") from None
    return FrameFeatures(feats, pos, sizes)


@dataclass
class SupportMemory:
    """The cached memory bank of one episode: one conditioning entry per support frame k = 0…K−1
    (maskmem_features stored bf16 as the predictor does, maskmem_pos_enc, obj_ptr, object score);
    the query is frame K of a K+1-frame "video". Never mutated by queries."""

    bank: dict
    num_frames: int
    image_size: int
    owner: int  # id of the model token that built it (a bank from another model is refused)
    support_ids: tuple = ()
    empty: tuple = ()  # per support: True when its mask (at S) is empty (flagged)
    mem_pixels: tuple = ()  # per support: foreground pixels of the binarised memory mask at S
    extra: dict = field(default_factory=dict)

    @property
    def shots(self) -> int:
        return self.num_frames - 1

    def nbytes(self) -> int:
        n = 0
        for out in self.bank["cond_frame_outputs"].values():
            for v in out.values():
                for t in (v if isinstance(v, list) else [v]):
                    if isinstance(t, torch.Tensor):
                        n += t.numel() * t.element_size()
        return n


def _fill(x: torch.Tensor, area: int, enabled: bool) -> torch.Tensor:
    if not enabled or area <= 0:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fill_holes_in_mask_scores(x, area)


def encode_support(pred, frames: list[torch.Tensor], masks: list[torch.Tensor], *, owner: int,
                   fill_holes: bool, fill_hole_area: int = 8, mem_mask_from_input: bool = False,
                   support_ids: tuple = ()) -> SupportMemory:
    """Recipe B, support side: for each support k, image encoder → ``track_step`` as an initial
    conditioning frame with the mask prompt (mask used as output, pointer from the SAM decoder) →
    (fill holes on the S/4 logits, as the predictor stores them) → upsample to S → memory encoder
    with is_mask_from_pts=True (binarised). ``mem_mask_from_input`` encodes the S×S input mask
    directly instead (a deliberate deviation)."""
    K = len(frames)
    num_frames = K + 1
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    S = pred.image_size
    empty, mem_pixels = [], []
    for k, (x, m) in enumerate(zip(frames, masks)):
        ff = encode_frame(pred, x)
        out = pred.track_step(frame_idx=k, is_init_cond_frame=True, current_vision_feats=ff.feats,
                              current_vision_pos_embeds=ff.pos, feat_sizes=ff.sizes, point_inputs=None,
                              mask_inputs=m, output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                              num_frames=num_frames, run_mem_encoder=False)
        low = _fill(out["pred_masks"], fill_hole_area, fill_holes)
        if mem_mask_from_input:
            high = out["pred_masks_high_res"]  # 20·M − 10 at S×S: the input mask itself
        else:
            high = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
        mem, mem_pos = pred._encode_new_memory(current_vision_feats=ff.feats, feat_sizes=ff.sizes,
                                               pred_masks_high_res=high,
                                               object_score_logits=out["object_score_logits"],
                                               is_mask_from_pts=True)
        bank["cond_frame_outputs"][k] = {
            "maskmem_features": mem.to(torch.bfloat16),
            "maskmem_pos_enc": [p[0:1].clone() for p in mem_pos],
            "pred_masks": low,
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }
        empty.append(not bool(m.any()))
        mem_pixels.append(int((high > 0).sum()))
    return SupportMemory(bank, num_frames, S, owner, tuple(support_ids), tuple(empty), tuple(mem_pixels))


def query_logits(pred, memory: SupportMemory, x: torch.Tensor, *, fill_holes: bool, fill_hole_area: int = 8,
                 run_query_memory: bool = False) -> torch.Tensor:
    """Recipe B, query side: image encoder → memory attention on the cached bank → SAM decoder
    (3 masks, best predicted IoU) → fill holes → the S/4 logits (1×1×S/4×S/4). With
    ``run_query_memory`` the memory encoder also runs on the query (what propagate_in_video does;
    its result does not change the output, it is only there for paper-comparable timing)."""
    ff = encode_frame(pred, x)
    K = memory.num_frames - 1
    out = pred.track_step(frame_idx=K, is_init_cond_frame=False, current_vision_feats=ff.feats,
                          current_vision_pos_embeds=ff.pos, feat_sizes=ff.sizes, point_inputs=None,
                          mask_inputs=None, output_dict=memory.bank, num_frames=memory.num_frames,
                          run_mem_encoder=False)
    if run_query_memory:
        mem, _ = pred._encode_new_memory(current_vision_feats=ff.feats, feat_sizes=ff.sizes,
                                         pred_masks_high_res=out["pred_masks_high_res"],
                                         object_score_logits=out["object_score_logits"], is_mask_from_pts=False)
        mem.to(torch.bfloat16)
    return _fill(out["pred_masks"], fill_hole_area, fill_holes)


def logits_to_size(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """S/4 logits → H×W, bilinear, align_corners=False (SAM2VideoPredictor._get_orig_video_res_output)."""
    if tuple(low.shape[-2:]) == tuple(size):
        return low
    return F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)
