"""NBR+CaP overfitting check: fitted on ONE support image of 128 px
(random-init AlbuNet-34, the full method: NBR + weighted CaP), the support itself is segmented with
IoU > 0.8. About 30 s on 2 idle cores (30 steps, m = 1, lr 1e-3; at the paper's lr 1e-4 it needs
~10x more steps)."""
from __future__ import annotations

import numpy as np

from fdsbench.datasets.synthetic import _texture
from fdsbench.methods.nbr_cap import NBRCaP
from fdsbench.types import NormalPool, Query, Shot, SupportSet

S = 128


def weave(seed: int) -> np.ndarray:
    """A defect-free image of the synthetic dataset's 'weave' texture."""
    return (np.clip(_texture("weave", S, S, np.random.default_rng(seed)), 0, 1) * 255).astype(np.uint8)


def test_overfits_one_support_image():
    img = weave(0).copy()
    yy, xx = np.mgrid[:S, :S]
    mask = ((yy - 0.45 * S) / (0.17 * S)) ** 2 + ((xx - 0.5 * S) / (0.23 * S)) ** 2 <= 1  # a drawn stain
    img[mask] = (img[mask] * 0.3).astype(np.uint8)
    normals = {str(i): weave(i) for i in range(1, 6)}
    support = SupportSet("weave/stain", [Shot("stain_00", img, mask)], 0,
                         NormalPool(list(normals), normals.__getitem__))
    method = NBRCaP.from_preset("cpu", {"input_size": S, "crop_size": 0, "iterations": 30, "batch_size": 1,
                                        "lr": 1e-3, "cache": False})
    state = method.prepare(support)
    log = state.log.summary()
    assert log["steps"] == 30 and 0 < log["cap_steps"] < 30  # both branches, NBR on
    assert all(np.isfinite(state.log.loss)) and min(state.log.nbr) < -0.5
    p = method.predict(state, Query("stain_00", img)) > 0.5
    iou = (p & mask).sum() / (p | mask).sum()
    assert iou > 0.8, f"support IoU {iou:.3f} after {log}"
