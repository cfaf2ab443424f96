"""Non-resizing test procedure: sliding windows at native resolution, window batching and
stitching (SOFS paper §3.2.2), the whole-image resize path (appendix A.2), and the model-input
preparation both use (ResizeLongestSide + ImageNet normalisation + bottom/right zero padding).

Shared by every method that runs the NR protocol (SOFS, PFENet/HDMNet + NR). Predictions always
come back at the ORIGINAL image size; ground truth is never resized.

Window rule (the official SOFS evaluator): c = window size, th = min(c, H), tw = min(c, W), nh = ceil(H/th),
nw = ceil(W/tw); window row a covers [a*th, (a+1)*th) except the last row, which covers
[H - th, H) (shifted to end at the border, overlapping its neighbour); columns likewise. Stride =
window size, so only the last row/column overlap.

Stitching: every window yields a heat map (the model probability) and a binary map
(heat > 0.5); where a window had to be resized/padded to the model input, both are cropped to the
valid region and bilinearly resized (align_corners=True) to the window size and the binary map is
re-thresholded at > 0.9 (official rule). Canvases sum both maps and a coverage count; the result is
sum / coverage. ``heat`` is what a plugin returns to the harness (which binarises at 0.5);
``binary`` is the official averaged binary map (fractional in overlaps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FdsError
from ..types import Box

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ---- model-input preparation --------------------------------------------------------------------
def longest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """ResizeLongestSide target: s = size / max(h, w), (int(h*s + 0.5), int(w*s + 0.5))."""
    s = size / max(h, w)
    return int(h * s + 0.5), int(w * s + 0.5)


def resize_longest_side(array: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize of a uint8 image [H,W,3] or mask [H,W] so its longest side is ``size``
    (identity when it already is; upscales smaller inputs, as the official transform does)."""
    from PIL import Image

    h, w = array.shape[:2]
    nh, nw = longest_side_size(h, w, size)
    if (nh, nw) == (h, w):
        return array
    return np.asarray(Image.fromarray(array).resize((nw, nh), Image.BILINEAR))


def image_to_tensor(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 [H,W,3] -> normalised float tensor [3, size, size] (longest side ``size``,
    zero-padded bottom/right AFTER normalisation) and the valid (h, w)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise FdsError(f"expected an RGB image [H,W,3], got shape {image.shape}")
    im = resize_longest_side(np.ascontiguousarray(image, dtype=np.uint8), size)
    h, w = im.shape[:2]
    x = (im.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    out = torch.zeros(3, size, size)
    out[:, :h, :w] = torch.from_numpy(x).permute(2, 0, 1)
    return out, (h, w)


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Binary mask [H,W] -> float 0/1 tensor [1, size, size]: PIL bilinear resize of the 0/255
    mask, divided by its max, zero-padded, kept where > 0.1. An empty mask stays empty."""
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    r = resize_longest_side(m, size).astype(np.float32)
    peak = r.max()
    out = torch.zeros(1, size, size)
    if peak > 0:
        h, w = r.shape
        out[0, :h, :w] = torch.from_numpy((r / peak > 0.1).astype(np.float32))
    return out


# ---- windows -----------------------------------------------------------------------------------
def window_boxes(height: int, width: int, size: int) -> list[Box]:
    """Sliding-window boxes (top, left, bottom, right) covering an H x W image (module docstring)."""
    if size < 1 or height < 1 or width < 1:
        raise FdsError(f"window size and image size must be positive (got {size} for {height}x{width})")
    th, tw = min(size, height), min(size, width)
    nh, nw = math.ceil(height / th), math.ceil(width / tw)
    rows = [(a * th, (a + 1) * th) if a < nh - 1 else (height - th, height) for a in range(nh)]
    cols = [(b * tw, (b + 1) * tw) if b < nw - 1 else (width - tw, width) for b in range(nw)]
    return [(t, l, btm, r) for (t, btm) in rows for (l, r) in cols]


def restore_output(out: torch.Tensor, valid: tuple[int, int], target: tuple[int, int],
                   quantize: bool = False) -> torch.Tensor:
    """Crop a model-size map [S,S] to its valid region and resize it (bilinear, align_corners=True)
    to ``target`` (h, w); with ``quantize`` return (resized > 0.9) as float (official binary rule)."""
    oav = out[: valid[0], : valid[1]].float()
    if tuple(oav.shape) != tuple(target):
        oav = F.interpolate(oav[None, None], size=tuple(target), mode="bilinear", align_corners=True)[0, 0]
        if quantize:
            oav = (oav > 0.9).float()
    return oav


@dataclass
class Stitched:
    heat: np.ndarray  # float32 [H, W]: mean of window probabilities over coverage
    binary: np.ndarray  # float32 [H, W]: mean of window binary maps over coverage (official)
    coverage: np.ndarray  # int32 [H, W]: number of windows covering each pixel


class Stitcher:
    """Full-size canvases for heat, binary and coverage; ``add`` pastes one window's maps."""

    def __init__(self, height: int, width: int):
        self.heat = np.zeros((height, width), np.float64)
        self.binary = np.zeros((height, width), np.float64)
        self.count = np.zeros((height, width), np.int32)

    def add(self, box: Box, heat: np.ndarray, binary: np.ndarray) -> None:
        t, l, b, r = box
        if heat.shape != (b - t, r - l) or binary.shape != heat.shape:
            raise FdsError(f"window map shape {heat.shape} does not match box {box}")
        self.heat[t:b, l:r] += heat
        self.binary[t:b, l:r] += binary
        self.count[t:b, l:r] += 1

    def result(self) -> Stitched:
        if (self.count == 0).any():
            raise FdsError("stitching left pixels without any window (window boxes do not cover the image)")

        def mean(total: np.ndarray) -> np.ndarray:  # float64 sums over the coverage, stored as float32
            return np.divide(total, self.count, out=np.empty(total.shape, np.float32), casting="same_kind")
        return Stitched(mean(self.heat), mean(self.binary), self.count.copy())


ModelFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of prepared inputs [n, 3, S, S] to probabilities [n, S, S] (any device)."""


def predict_sliding(image: np.ndarray, model_fn: ModelFn, input_size: int, window: int | None = None,
                    batch: int = 4) -> Stitched:
    """Run ``model_fn`` on sliding windows of side ``window`` (default ``input_size``) at native
    resolution, ``batch`` windows per call, and stitch the maps back to the image size."""
    H, W = image.shape[:2]
    window = int(window or input_size)
    boxes = window_boxes(H, W, window)
    st = Stitcher(H, W)
    for i in range(0, len(boxes), max(1, int(batch))):
        chunk = boxes[i: i + batch]
        prepared = [image_to_tensor(image[t:b, l:r], input_size) for (t, l, b, r) in chunk]
        probs = model_fn(torch.stack([p[0] for p in prepared])).detach().float().cpu()
        for (t, l, b, r), (_, valid), prob in zip(chunk, prepared, probs):
            size_hw = (b - t, r - l)
            exact = valid == size_hw == (input_size, input_size)
            if exact:
                heat, binary = prob, (prob > 0.5).float()
            else:
                heat = restore_output(prob, valid, size_hw)
                binary = restore_output((prob > 0.5).float(), valid, size_hw, quantize=True)
            st.add((t, l, b, r), heat.numpy(), binary.numpy())
    return st.result()


def predict_whole(image: np.ndarray, model_fn: ModelFn, input_size: int) -> Stitched:
    """Whole-image path: one forward at longest side ``input_size`` + padding, output cropped
    to the valid region and resized to H x W (align_corners=True); binary = resized 0/1 map > 0.9."""
    H, W = image.shape[:2]
    x, valid = image_to_tensor(image, input_size)
    prob = model_fn(x[None]).detach().float().cpu()[0]
    heat = restore_output(prob, valid, (H, W))
    binary = restore_output((prob > 0.5).float(), valid, (H, W), quantize=True)
    return Stitched(heat.numpy(), binary.numpy(),
                    np.ones((H, W), np.int32))
