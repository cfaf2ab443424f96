"""Resizing-protocol decoding (GFDS 256x256: OpenCV-style bilinear, then the adapter's threshold) and
per-fold protocol defaults."""
import numpy as np

from fdsbench.data import resize_bilinear, resize_nearest
from fdsbench.datasets import _testing as T
from fdsbench.registry import get_dataset


def test_bilinear_matches_opencv_half_pixel_rule_by_hand():
    a = (np.arange(16, dtype=np.uint8) * 10).reshape(4, 4)
    assert resize_bilinear(a, (2, 2)).tolist() == [[25, 45], [105, 125]]  # 2x2 block means
    up = resize_bilinear(a, (8, 8))[0].astype(float)
    exact = np.array([0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30])  # x = (j + .5) / 2 - .5, clamped at the edges
    assert np.abs(up - exact).max() <= 0.5  # uint8 output: OpenCV's fixed-point rounding of the exact value
    assert up.tolist() == [0, 2, 7, 12, 17, 22, 27, 30]  # (it rounds these exact halves down)
    assert resize_nearest(a, (2, 2)).tolist() == [[0, 20], [80, 100]]
    rgb = np.zeros((5, 7, 3), np.uint8)
    assert resize_bilinear(rgb, (3, 4)).shape == (3, 4, 3)


def test_gfds_masks_resized_then_thresholded(tmp_path):
    root = T.make_gfds(tmp_path / "gfds")
    m = np.zeros((16, 16), np.uint8)
    m[5, 5] = 255  # one pixel: at 8x8 the 2x2 block mean is 63.75 -> 64 > 30
    m[10:12, 10] = 100  # two pixels of 100: block mean 50 > 30
    m[2, 12] = 100  # one pixel of 100: block mean 25 -> not > 30
    T.write_mask(root / "Steel" / "ground_truth" / "Am" / "0000_mask.png", m)
    ds = get_dataset("gfds")(root, cache_dir=tmp_path / "cache")
    small = ds.load_mask("Steel/images/Am/0000.png", "Steel_Am", size=(8, 8))
    expect = np.zeros((8, 8), bool)
    expect[2, 2] = expect[5, 5] = True
    assert np.array_equal(small, expect)
    assert ds.load_mask("Steel/images/Am/0000.png", "*", size=(8, 8)).sum() == 2
    assert ds.load_image("Steel/images/Am/0000.png", size=(256, 256)).shape == (256, 256, 3)
    assert ds.load_mask("Steel/images/Am/0000.png", "Steel_Am").shape == (16, 16)  # exact by default


def test_class_index_masks_resize_nearest(tmp_path):
    root = T.make_defect_spectrum(tmp_path / "ds")
    ds = get_dataset("defect_spectrum")(root, cache_dir=tmp_path / "cache")
    m = ds.load_mask("grid/image/glue/000.png", "1", size=(10, 10))  # 5x5 box of value 2 at (2, 2)
    assert m.sum() == 9 and m[1:4, 1:4].all()  # source rows/cols 2, 4, 6 = floor(2i)


def test_vision_v1_area_resize_ratio_per_fold(tmp_path):
    ds = get_dataset("vision_v1")(T.make_vision_v1(tmp_path / "v", objects=("Wood",), per_subset=1),
                                  cache_dir=tmp_path / "cache")
    assert [ds.protocol_defaults_for(k)["fss"]["area_resize_ratio"] for k in range(3)] == [0.01, 0.005, 0.01]
    assert ds.protocol_defaults_for(1)["fss"]["crop_size"] == 518
    mv = get_dataset("mvtec_ad")(T.make_mvtec(tmp_path / "m", categories=("tile",)), cache_dir=tmp_path / "cache")
    assert mv.protocol_defaults_for(0) == mv.protocol_defaults


def test_nearest_equals_opencv_inter_nearest():
    import cv2

    rng = np.random.default_rng(0)
    for (H, W), (h, w) in [((512, 512), (256, 256)), ((1000, 700), (256, 256)), ((37, 100), (256, 300)),
                           ((7, 9), (3, 4))]:
        a = rng.integers(0, 5, (H, W), dtype=np.uint8)
        assert np.array_equal(resize_nearest(a, (h, w)), cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST))
