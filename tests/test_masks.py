"""Mask downsampling (PFIM vs bilinear/nearest) and masked average pooling (fdsbench.blocks.masks)."""
import pytest
import torch
import torch.nn.functional as F

from fdsbench.errors import FdsError
from fdsbench.blocks.masks import downsample_mask, prototype_intensity_downsample, weighted_gap


def planted(h=56, w=56, pixels=((20, 30), (20, 31), (21, 30))):
    m = torch.zeros(1, 1, h, w)
    for y, x in pixels:
        m[0, 0, y, x] = 1.0
    return m


def test_pfim_is_average_pooling_of_a_planted_3_pixel_defect():
    m = planted()
    l = 14
    pf = prototype_intensity_downsample(m, l)
    assert torch.equal(pf, F.avg_pool2d(m, l, l))
    # the same as the paper's all-ones l x l conv with stride l divided by l^2 (Eq. 1)
    conv = F.conv2d(m, torch.ones(1, 1, l, l), stride=l) / (l * l)
    assert torch.allclose(pf, conv)
    # the defect's mass is kept exactly: 3 pixels / 196 in the cell that holds them, 0 elsewhere
    assert pf.shape == (1, 1, 4, 4)
    assert pf[0, 0, 1, 2].item() == pytest.approx(3 / 196)
    assert pf.sum().item() == pytest.approx(3 / 196)
    assert torch.equal(downsample_mask(m, (4, 4), "pfim"), pf)


def test_pfim_differs_from_bilinear_and_nearest_on_a_small_defect():
    m = planted()
    pf = downsample_mask(m, (4, 4), "pfim")
    bl = downsample_mask(m, (4, 4), "bilinear")
    nn_ = downsample_mask(m, (4, 4), "nearest")
    assert not torch.allclose(pf, bl)
    # bilinear samples 4 points per cell and misses the 3-pixel defect entirely; nearest too
    assert bl.sum().item() == 0.0 and nn_.sum().item() == 0.0
    # a defect on a bilinear sample point is over-estimated instead (intensity 1 for 1 pixel)
    m2 = torch.zeros(1, 1, 56, 56)
    m2[0, 0, 20, 34] = 1  # sample points of a 14-stride bilinear map sit at 14i + 6.5
    m2[0, 0, 20:22, 34:36] = 1
    assert downsample_mask(m2, (4, 4), "bilinear").max() > downsample_mask(m2, (4, 4), "pfim").max()


def test_shapes_and_errors():
    m = torch.zeros(2, 28, 28)
    assert downsample_mask(m, (2, 2), "pfim").shape == (2, 2, 2)
    assert downsample_mask(m[0], (2, 2), "bilinear").shape == (2, 2)
    with pytest.raises(FdsError):
        downsample_mask(m, (3, 3), "pfim", l=14)  # 28 / 14 = 2 cells, not 3
    with pytest.raises(FdsError):
        downsample_mask(m, (2, 2), "bicubic")


def test_weighted_gap_is_masked_average():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[0, 0, 1, 1] = 1.0
    m[1, 0, 2:, 2:] = 0.5
    p = weighted_gap(f, m)
    assert p.shape == (2, 3, 1, 1)
    assert torch.allclose(p[0, :, 0, 0], f[0, :, 1, 1] / (1 + 5e-4))
    exp = (f[1, :, 2:, 2:] * 0.5).sum((1, 2)) / (2.0 + 5e-4)
    assert torch.allclose(p[1, :, 0, 0], exp)
    # empty mask -> zero prototype, no NaN
    assert torch.equal(weighted_gap(f, torch.zeros(2, 1, 4, 4)), torch.zeros(2, 3, 1, 1))
