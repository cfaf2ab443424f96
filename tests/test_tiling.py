"""Sliding-window tiler, stitching and the whole-image path (fdsbench.blocks.tiling)."""
import math

import numpy as np
import pytest
import torch

from fdsbench.blocks.tiling import (Stitcher, image_to_tensor, longest_side_size, mask_to_tensor, predict_sliding,
                             predict_whole, window_boxes)


def coverage(H, W, boxes):
    c = np.zeros((H, W), int)
    for t, l, b, r in boxes:
        c[t:b, l:r] += 1
    return c


@pytest.mark.parametrize("H,W,c", [(1036, 1554, 518), (1036, 518, 518), (518, 518, 518), (700, 1100, 518),
                                   (519, 1037, 518), (300, 900, 518), (200, 150, 518), (513, 256, 256)])
def test_windows_cover_every_pixel_as_specified(H, W, c):
    boxes = window_boxes(H, W, c)
    th, tw = min(c, H), min(c, W)
    nh, nw = math.ceil(H / th), math.ceil(W / tw)
    assert len(boxes) == nh * nw
    for t, l, b, r in boxes:
        assert (b - t, r - l) == (th, tw)  # every window has the full window size
        assert 0 <= t and b <= H and 0 <= l and r <= W
    rows = sorted({(t, b) for t, _, b, _ in boxes})
    cols = sorted({(l, r) for _, l, _, r in boxes})
    assert rows[:-1] == [(a * th, (a + 1) * th) for a in range(nh - 1)]  # stride = window size
    assert rows[-1] == (H - th, H) and cols[-1] == (W - tw, W)  # last row/col shifted to the border
    cov = coverage(H, W, boxes)
    assert cov.min() >= 1
    if H % th == 0 and W % tw == 0:
        assert cov.max() == 1  # multiples of the window: an exact partition
    else:
        # only the overlap of the last row/column with its neighbour is covered twice (4x at a corner)
        ov_r = (nh - 1) * th - (H - th) if H % th else 0
        ov_c = (nw - 1) * tw - (W - tw) if W % tw else 0
        expect = np.ones((H, W), int)
        if ov_r:
            expect[H - th: H - th + ov_r] *= 2
        if ov_c:
            expect[:, W - tw: W - tw + ov_c] *= 2
        assert np.array_equal(cov, expect)


def test_stitcher_averages_overlaps():
    st = Stitcher(4, 6)
    st.add((0, 0, 4, 4), np.ones((4, 4)), np.ones((4, 4)))
    st.add((0, 2, 4, 6), np.zeros((4, 4)), np.zeros((4, 4)))
    out = st.result()
    assert np.allclose(out.heat[:, 2:4], 0.5) and np.allclose(out.heat[:, :2], 1) and np.allclose(out.heat[:, 4:], 0)
    assert np.array_equal(out.coverage[0], [1, 1, 2, 2, 1, 1])


def test_input_preparation_resizes_longest_side_and_pads():
    img = np.full((100, 50, 3), 255, np.uint8)
    x, valid = image_to_tensor(img, 64)
    assert valid == longest_side_size(100, 50, 64) == (64, 32)
    assert x.shape == (3, 64, 64)
    assert torch.all(x[:, :, 32:] == 0)  # padding after normalisation = zeros
    assert torch.allclose(x[0, 0, 0], torch.tensor((1 - 0.485) / 0.229))
    m = np.zeros((100, 50), bool)
    m[10:20, 10:20] = True
    mt = mask_to_tensor(m, 64)
    assert mt.shape == (1, 64, 64) and set(mt.unique().tolist()) <= {0.0, 1.0} and mt.sum() > 0
    assert mask_to_tensor(np.zeros((100, 50), bool), 64).sum() == 0


def _identity_model(S):
    """A fake model whose probability is the normalised red channel (recovers the image)."""
    def fn(x):
        return ((x[:, 0] * 0.229 + 0.485)).clamp(0, 1)
    return fn


@pytest.mark.parametrize("H,W", [(128, 192), (100, 170), (40, 300)])
def test_sliding_prediction_is_at_original_size_and_recovers_the_input(H, W):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    calls = []
    base = _identity_model(64)

    def fn(x):
        calls.append(x.shape[0])
        return base(x)
    out = predict_sliding(img, fn, input_size=64, batch=4)
    assert out.heat.shape == (H, W) and out.binary.shape == (H, W)
    assert max(calls) <= 4 and sum(calls) == len(window_boxes(H, W, 64))
    red = img[..., 0] / 255.0
    if H >= 64 and W >= 64:  # exact windows: no resizing, the maps are pasted as they are
        assert np.allclose(out.heat, red, atol=1e-5)
        assert np.array_equal(out.binary, (red > 0.5).astype(np.float32))
    else:  # windows resized to the model input and back (align_corners=True)
        assert np.abs(out.heat - red).mean() < 0.2


def test_whole_image_path():
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, 50:, 0] = 255
    out = predict_whole(img, _identity_model(64), 64)
    assert out.heat.shape == (50, 100)
    assert out.heat[:, :45].max() < 0.05 and out.heat[:, 55:].min() > 0.95
    # official binary rule: upsampled 0/1 map kept where > 0.9
    assert set(np.unique(out.binary)) <= {0.0, 1.0}
