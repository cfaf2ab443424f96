"""The official path, for checking and timing our cached path against it: a fresh
``SAM2VideoPredictor`` state over a folder of ``<int>.jpg`` frames (supports 0…K−1, query K),
``add_new_mask`` on each support, ``propagate_in_video``, read frame K."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def write_frames(folder: str | Path, images: list[np.ndarray], quality: int = 95) -> list[Path]:
    """Write RGB uint8 frames as ``0.jpg, 1.jpg, …`` (the only folder format init_state reads)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{i}.jpg"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB").save(p, format="JPEG", quality=quality)
        paths.append(p)
    return paths


def read_frames(paths) -> list[np.ndarray]:
    """The decoded pixels of written frames (what the official loader sees)."""
    from PIL import Image

    return [np.array(Image.open(p).convert("RGB")) for p in paths]


def official_video_logits(pred, folder: str | Path, masks: list[np.ndarray], return_state: bool = False):
    """Video-resolution logits (1×1×H×W, float32) of the last frame of ``folder`` after prompting
    frames 0…K−1 with ``masks`` — a fresh inference state, exactly the official usage (and the
    state itself with ``return_state``)."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "cannot import name '_C'": fill-holes skipped
        state = pred.init_state(str(folder))
        K = len(masks)
        for k, m in enumerate(masks):
            pred.add_new_mask(state, frame_idx=k, obj_id=1, mask=np.asarray(m, dtype=bool))
        last = None
        for frame_idx, _, video_res in pred.propagate_in_video(state):
            if frame_idx == K:
                last = video_res
    return (last.float().clone(), state) if return_state else last.float().clone()


def official_swap_query(pred, state, image_tensor: torch.Tensor, clear_cache: bool = True) -> torch.Tensor:
    """Frame-swap recipe: put a new query into frame 1 of an existing 2-frame state and re-run
    frame 1 only. ``clear_cache=False`` reproduces the stale-cache bug."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state["images"][1] = image_tensor.to(state["images"].device)
        if clear_cache:
            state["cached_features"] = {}
        state["output_dict_per_obj"][0]["non_cond_frame_outputs"].clear()
        state["frames_tracked_per_obj"][0].pop(1, None)
        out = None
        for frame_idx, _, video_res in pred.propagate_in_video(state, start_frame_idx=1, max_frame_num_to_track=0):
            out = video_res
    return out.float().clone()
