"""NBR+CaP U-Net (methods/nbr_cap): unit tests (CPU, random init, no files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fdsbench.blocks.backbones import build_backbone
from fdsbench.errors import FdsError
from fdsbench.methods.nbr_cap import ABLATIONS, NBRCaP, NBRCaPConfig
from fdsbench.methods.nbr_cap import losses as L
from fdsbench.methods.nbr_cap import train as T
from fdsbench.methods.nbr_cap.model import AlbuNet34, EncoderOutput, count_parameters
from fdsbench.registry import get_method
from fdsbench.types import NormalPool, Query, Shot, SupportSet


def albunet(seed=0, **kw) -> AlbuNet34:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AlbuNet34(build_backbone("resnet34", weights="random", frozen=False, seed=seed), **kw)


# ---- 1. network ----------------------------------------------------------------------------------
def test_parameter_counts_match_spec():
    enc, dec = count_parameters(albunet())
    assert round(enc / 1e6, 2) == 21.28 and round(dec / 1e6, 2) == 13.32
    assert enc == 21_284_672 and dec == 13_320_225


def test_shapes_at_64_and_512_and_output_range():
    model = albunet().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    p = torch.sigmoid(out)
    assert p.min() >= 0 and p.max() <= 1
    # the layer table of methods/nbr_cap/model.py at 512 x 512 (shape inference on the meta device: no compute)
    meta = albunet().to("meta").eval()
    f = meta.encode(torch.empty(1, 3, 512, 512, device="meta"))
    assert f.conv2.shape == (1, 64, 128, 128) and f.conv3.shape == (1, 128, 64, 64)
    assert f.conv4.shape == (1, 256, 32, 32) and f.conv5.shape == (1, 512, 16, 16)
    center = meta.center(meta.pool(f.conv5))
    assert center.shape == (1, 256, 16, 16)
    dec5 = meta.dec5(torch.cat([center, f.conv5], 1))
    dec4 = meta.dec4(torch.cat([dec5, f.conv4], 1))
    dec3 = meta.dec3(torch.cat([dec4, f.conv3], 1))
    dec2 = meta.dec2(torch.cat([dec3, f.conv2], 1))
    dec1 = meta.dec1(dec2)
    assert (dec5.shape[1:], dec4.shape[1:], dec3.shape[1:], dec2.shape[1:], dec1.shape[1:]) == (
        (256, 32, 32), (256, 64, 64), (64, 128, 128), (128, 256, 256), (32, 512, 512))
    assert meta.decode(f).shape == (1, 1, 512, 512)


def test_bad_input_side_is_a_clear_error():
    with pytest.raises(FdsError, match="multiple of 64"):
        albunet().encode(torch.zeros(1, 3, 96, 96))
    with pytest.raises(FdsError, match="multiple of 64"):
        NBRCaP.from_preset("test", {"input_size": 100})


# ---- 2. NBR ----------------------------------------------------------------------------------------
def test_nbr_is_minus_one_on_identical_images_with_empty_mask():
    model = albunet().eval()
    img = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        f_d = model.encode(img).conv5
        f_n = model.encode(img.clone()).conv5
    loss = L.nbr_loss(f_d, f_n, torch.zeros(1, 1, 128, 128))
    assert loss.shape == (1,) and loss.item() == pytest.approx(-1.0, abs=1e-5)
    assert L.nbr_loss(f_d, f_n, torch.zeros(1, 1, 128, 128), distance="euclidean").item() == pytest.approx(0, abs=1e-5)


def test_nbr_all_defect_mask_is_finite_zero_and_masked_mean_equals_gap():
    g = torch.Generator().manual_seed(0)
    f_d, f_n = torch.rand(2, 8, 4, 4, generator=g), torch.rand(2, 8, 4, 4, generator=g)
    full = torch.ones(2, 1, 32, 32)
    loss = L.nbr_loss(f_d, f_n, full)
    assert torch.isfinite(loss).all() and torch.allclose(loss, torch.zeros(2))
    part = torch.zeros(2, 1, 32, 32)
    part[:, :, 3:12, 20:30] = 1
    a = L.nbr_loss(f_d, f_n, part, pooling="gap")
    b = L.nbr_loss(f_d, f_n, part, pooling="masked_mean")
    assert torch.allclose(a, b, atol=1e-6) and (a < 0).all() and (a > -1).all()


def test_nbr_mask_downsampling_rules():
    m = torch.zeros(1, 1, 32, 32)
    m[0, 0, 0, 0] = 1  # one pixel of the first 8 x 8 cell
    assert L.downsample_mask(m, (4, 4), "max")[0, 0, 0, 0] == 1
    assert L.downsample_mask(m, (4, 4), "area")[0, 0, 0, 0] == pytest.approx(1 / 64)
    assert L.downsample_mask(m, (4, 4), "max").sum() == 1
    with pytest.raises(FdsError):
        L.downsample_mask(m, (4, 4), "bogus")


# ---- 3. CaP and λ ----------------------------------------------------------------------------------
def test_cap_image_is_defect_inside_mask_and_normal_outside():
    g = torch.Generator().manual_seed(1)
    i_d, i_n = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    m = (torch.rand(2, 1, 16, 16, generator=g) > 0.7).float()
    cap = L.crop_and_paste(i_d, i_n, m)
    inside = m.expand_as(cap).bool()
    assert torch.equal(cap[inside], i_d[inside]) and torch.equal(cap[~inside], i_n[~inside])


def test_lambda_is_one_for_equal_images_and_carries_no_gradient():
    model = albunet().eval()
    img = torch.rand(1, 3, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:30, 10:30] = 1
    cap = L.crop_and_paste(img, img.clone(), mask)  # I_n = I_d: the pasted image is the original
    f_d = model.encode(img).conv5
    f_cap = model.encode(cap).conv5
    lam = L.realism_weight(f_d, f_cap)
    assert lam.item() == pytest.approx(1.0, abs=1e-5)
    assert f_d.requires_grad and not lam.requires_grad  # detached: a constant weight
    assert L.realism_weight(f_d, f_cap, detach=False).requires_grad  # the option keeps the gradient
    other = model.encode(torch.rand(1, 3, 64, 64)).conv5
    assert 0 <= L.realism_weight(f_d, other).item() <= 1 + 1e-6


def test_bce_reductions():
    logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert torch.allclose(L.bce_per_image(logits, target, "mean"), torch.full((2,), np.log(2)), atol=1e-6)
    assert torch.allclose(L.bce_per_image(logits, target, "sum"), torch.full((2,), 16 * np.log(2)), atol=1e-5)


# ---- 4. the training loop on a stand-in network (fast) --------------------------------------------
class TinyNet(nn.Module):
    """Same encode/decode interface as AlbuNet34, a few thousand parameters; records its calls."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c5 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 1, 1)
        self.encoded: list[tuple[torch.Tensor, EncoderOutput]] = []
        self.decoded: list[EncoderOutput] = []

    def encode(self, x):
        c2 = torch.relu(self.c2(x))
        c3 = torch.relu(self.c3(c2))
        c4 = torch.relu(self.c4(c3))
        out = EncoderOutput(c2, c3, c4, torch.relu(self.c5(c4)) + 0.1)
        self.encoded.append((x.detach(), out))
        return out

    def decode(self, f):
        self.decoded.append(f)
        return self.head(F.interpolate(f.conv2, scale_factor=4))


def tiny_fit(steps=40, k=1, m=2, n_normals=5, seed=0, **cfg):
    cfg = NBRCaPConfig(**{"iterations": steps, "lr": 1e-2, "bn_joint": False, **cfg})
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (k, 3, 32, 32), generator=g, dtype=torch.uint8)
    masks = torch.zeros(k, 1, 32, 32)
    masks[:, :, 8:20, 4:16] = 1
    normals = torch.randint(0, 256, (n_normals, 3, 32, 32), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    net = TinyNet()
    log = T.fit(net, images, masks, lambda i: normals[i], n_normals, cfg, m, np.random.default_rng(seed))
    return net, log, images, masks, cfg


def test_both_branches_exercised_and_minibatch_shares_the_branch():
    net, log, images, masks, cfg = tiny_fit(steps=60)
    assert len(log.loss) == 60 and all(np.isfinite(log.loss))
    n_cap = sum(log.cap)
    assert 18 <= n_cap <= 42  # u ~ U[0, 1] > 0.5: about half (binomial(60, .5): 30 ± 12 at 3.5 sd)
    assert len(log.lam) == n_cap and all(0 <= v <= 1 + 1e-6 for v in log.lam)
    # separate passes: d, n (+ cap) per step; the decoder sees exactly one group of m images
    it = iter(net.encoded)
    for step, used_cap in enumerate(log.cap):
        groups = [next(it) for _ in range(3 if used_cap else 2)]
        dec = net.decoded[step]
        expect = groups[2] if used_cap else groups[0]
        assert dec.conv5 is expect[1].conv5 and dec.conv5.shape[0] == 2
        if used_cap:  # the CaP group = defect inside the mask, normal outside, for the whole minibatch
            x_d, x_n, x_cap = groups[0][0], groups[1][0], groups[2][0]
            inside = masks[[0, 0]].expand_as(x_cap).bool()
            assert torch.allclose(x_cap[inside], x_d[inside]) and torch.allclose(x_cap[~inside], x_n[~inside])


def test_fit_lowers_the_segmentation_loss_and_is_deterministic():
    _, log, *_ = tiny_fit(steps=60, cap="off")
    assert np.mean(log.seg[-10:]) < np.mean(log.seg[:5])
    _, log2, *_ = tiny_fit(steps=60, cap="off")
    assert log.loss == log2.loss


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_switches(name):
    _, log, *_ = tiny_fit(steps=12, **ABLATIONS[name])
    sw = ABLATIONS[name]
    if sw["cap"] == "off":
        assert not any(log.cap)
    else:
        assert any(log.cap)
    if sw["nbr"] == "off":
        assert all(v == 0 for v in log.nbr)
    elif sw["nbr"] == "euclidean":
        assert all(v > 0 for v in log.nbr)
    else:
        assert all(-2 - 1e-6 <= v <= 0 for v in log.nbr)  # m = 2 terms of −cos in [−1, 0]
    if sw["cap"] == "unweighted":
        assert log.lam and all(v == 1.0 for v in log.lam)


def test_defect_window_holds_the_defect():
    rng = np.random.default_rng(0)
    mask = torch.zeros(1, 128, 128)
    mask[0, 100:110, 5:20] = 1  # bounding box fits a 64 window: every draw holds all of it
    for _ in range(50):
        y, x = T.defect_window(mask, 64, rng)
        assert 0 <= y <= 64 and 0 <= x <= 64 and mask[0, y:y + 64, x:x + 64].sum() == mask.sum()
    mask[0, 10:20, 100:120] = 1  # two blobs too far apart: the window keeps at least one defect pixel
    assert all(mask[0, y:y + 64, x:x + 64].sum() > 0 for y, x in (T.defect_window(mask, 64, rng) for _ in range(50)))
    y, x = T.defect_window(torch.zeros(1, 128, 128), 64, rng)  # no defect: any window
    assert 0 <= y <= 64 and 0 <= x <= 64


def test_training_windows_cut_the_same_place_of_defect_normal_and_cap_images():
    cfg = NBRCaPConfig(iterations=12, lr=1e-2, bn_joint=False, crop_size=64, input_norm="none")
    rows, cols = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    images = torch.stack([rows, cols, torch.zeros_like(rows)])[None].to(torch.uint8)  # pixel = its own place
    masks = torch.zeros(1, 1, 128, 128)
    masks[:, :, 90:100, 20:30] = 1
    normals = torch.full((3, 3, 128, 128), 200, dtype=torch.uint8)
    net = TinyNet()
    log = T.fit(net, images, masks, lambda i: normals[i], 3, cfg, 2, np.random.default_rng(0))
    assert any(log.cap) and not all(log.cap)
    assert all(x.shape[-2:] == (64, 64) for x, _ in net.encoded)
    it = iter(net.encoded)
    for used_cap in log.cap:
        groups = [next(it)[0] for _ in range(3 if used_cap else 2)]
        for x_d in groups[0]:  # each pair's window of I_d is a window of the support image holding the defect
            y, x = (round(float(v) * 255) for v in x_d[:2, 0, 0])
            assert torch.equal(x_d, images[0, :, y:y + 64, x:x + 64].float() / 255)
            assert masks[0, 0, y:y + 64, x:x + 64].sum() == masks.sum()
        if used_cap:  # the defect pasted at the same place of the normal window
            x_d, x_n, x_cap = groups
            inside = (x_cap != 200 / 255).any(1, keepdim=True).expand_as(x_cap)
            assert inside.any() and torch.equal(x_cap[inside], x_d[inside])
            assert torch.equal(x_cap[~inside], x_n[~inside])
            for x_c, x_dd in zip(x_cap, x_d):  # the pasted pixels are the defect's place in the support
                y, x = (round(float(v) * 255) for v in x_dd[:2, 0, 0])
                sel = (x_c != 200 / 255).any(0)
                assert torch.equal(sel, masks[0, 0, y:y + 64, x:x + 64].bool())
    with pytest.raises(FdsError, match="crop_size"):
        NBRCaP.from_preset("test", {"crop_size": 100})


def test_schedule_follows_algorithm_1():
    rng = np.random.default_rng(0)
    steps = list(T.schedule(k=1, n=7, m=2, iterations=10, rng=rng))
    assert len(steps) == 10
    assert all(list(d) == [0, 0] for d, _ in steps)  # 1-shot, m = 2: the defect pair drawn with replacement
    first_pass = np.concatenate([n for _, n in steps[:3]])  # ⌊7 / 2⌋ = 3 inner steps per outer one
    assert len(set(first_pass.tolist())) == 6
    five = list(T.schedule(k=5, n=9, m=4, iterations=6, rng=rng))
    assert all(len(set(d.tolist())) == 4 for d, _ in five)  # 5-shot, m = 4: without replacement


# ---- 5. the method: interface, refusal, cache ------------------------------------------------------
def _support(seed=3, ids=("a",), n_normals=3, size=80):
    rng = np.random.default_rng(seed)
    shots = []
    for i in ids:
        img = rng.integers(0, 255, (size, size + 16, 3), dtype=np.uint8)
        mask = np.zeros((size, size + 16), bool)
        mask[20:40, 30:50] = True
        shots.append(Shot(i, img, mask))
    normals = {str(j): rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for j in range(n_normals)}
    return SupportSet("obj/dent", shots, seed, NormalPool(list(normals), normals.__getitem__))


def test_registered_with_requirements_and_protocol():
    cls = get_method("nbr_cap")
    assert cls is NBRCaP
    assert cls.requires.normal_pool and cls.requires.weights == ("resnet34",) and not cls.requires.fad
    assert cls.default_protocol == "per_support"
    assert set(cls.presets) >= {"paper", "cpu", "test"}
    paper = NBRCaP.from_preset("paper").config
    assert (paper.input_size, paper.iterations, paper.lr, paper.batch_size) == (512, 1350, 1e-4, 0)
    m = NBRCaP.from_preset("paper")
    assert (m.batch_size(1), m.batch_size(5)) == (2, 4)
    assert NBRCaP.from_preset("test").weights_provenance() == {"resnet34": "random-init"}


def test_refuses_without_a_normal_pool():
    m = NBRCaP.from_preset("test")
    sup = _support()
    for pool in (None, NormalPool([], lambda i: None)):
        sup.normal_pool = pool
        with pytest.raises(FdsError, match="no normal pool for it"):
            m.prepare(sup)


def test_fitted_weights_are_cached_and_reused(tmp_path, monkeypatch):
    m1 = NBRCaP.from_preset("test", {"cache": True})
    m1.workdir = tmp_path
    sup = _support()
    st1 = m1.prepare(sup)
    assert not st1.from_cache and st1.path.is_file() and st1.log.summary()["steps"] == 3
    q = Query("q", np.random.default_rng(9).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    p1 = m1.predict(st1, q)
    assert p1.shape == (70, 90) and p1.dtype == np.float32 and 0 <= p1.min() and p1.max() <= 1

    def no_fit(*a, **k):
        raise AssertionError("refitted although the fitted weights are cached")

    m2 = NBRCaP.from_preset("test", {"cache": True})
    m2.workdir = tmp_path
    with monkeypatch.context() as mp:
        mp.setattr(T, "fit", no_fit)
        st2 = m2.prepare(_support())  # a second episode with the same supports (and seed)
    assert st2.from_cache and st2.path == st1.path
    assert np.array_equal(m2.predict(st2, q), p1)
    # another support set, seed or config: a new key
    assert m2.cache_path(_support(ids=("b",))) != st1.path
    assert m2.cache_path(_support(seed=4)) != st1.path
    m3 = NBRCaP.from_preset("test", {"cache": True, "cap_prob": 0.25})
    m3.workdir = tmp_path
    assert m3.cache_path(sup) != st1.path
    threads = torch.get_num_threads()  # another CPU thread count: torch's sums differ, so a new key
    try:
        torch.set_num_threads(threads + 1)
        assert m2.cache_path(sup) != st1.path
    finally:
        torch.set_num_threads(threads)
    # the fit itself is deterministic under the episode seed (no cache)
    m4 = NBRCaP.from_preset("test")
    assert np.array_equal(m4.predict(m4.prepare(_support()), q), p1)
