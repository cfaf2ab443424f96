"""The deep-base dilated ResNet of PSPNet/PFENet/HDMNet: shapes at output stride 8, official module
names, the ImageNet "v2" file layout (stem conv1/bn1/... + fc) and strict refusals."""
import pytest
import torch

from fdsbench.blocks.backbones import backbone_names, build_backbone, load_backbone_weights
from fdsbench.blocks.backbones.deep_resnet import DeepBaseResNet
from fdsbench.errors import WeightsError


@pytest.fixture(scope="module")
def drn50():
    return build_backbone("deep_resnet50", weights="random", seed=0)


def test_registered():
    assert {"deep_resnet50", "deep_resnet101"} <= set(backbone_names())


def test_shapes_at_473_output_stride_8(drn50):
    x = torch.randn(1, 3, 473, 473)
    feats = drn50.forward_features(x, layers=(0, 1, 2, 3, 4))
    want = [(128, 119, 119), (256, 119, 119), (512, 60, 60), (1024, 60, 60), (2048, 60, 60)]
    assert [tuple(f.shape[1:]) for f in feats] == want
    assert drn50.feature_spec(("layer0", "layer1", "layer2", "layer3", "layer4"), 473, 473) == want
    assert drn50.feature_spec(("layer4",), 512, 518) == [(2048, 64, 65)]
    assert not feats[-1].requires_grad and not drn50.training
    # the layers are plain attributes: chaining them equals the tap
    with torch.no_grad():
        y = x
        for name in ("layer0", "layer1", "layer2", "layer3", "layer4"):
            y = getattr(drn50, name)(y)
    assert torch.equal(y, feats[-1])


def test_dilations_as_the_official_model(drn50):
    for stage, d in (("layer3", 2), ("layer4", 4)):
        for block in getattr(drn50, stage):
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d) and block.conv2.stride == (1, 1)
        assert getattr(drn50, stage)[0].downsample[0].stride == (1, 1)
    assert drn50.layer2[0].conv2.stride == (2, 2)


def test_official_names(drn50):
    sd = drn50.state_dict()
    stem = {k for k in sd if k.startswith("layer0.")}
    assert {k.split(".")[1] for k in stem} == {"0", "1", "3", "4", "6", "7"}
    assert sd["layer0.0.weight"].shape == (64, 3, 3, 3) and sd["layer0.6.weight"].shape == (128, 64, 3, 3)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert len([k for k in sd if k.endswith("conv1.weight")]) == 16
    r101 = DeepBaseResNet("deep_resnet101")
    assert len(r101.layer3) == 23


def imagenet_v2_layout(sd):
    """A state dict in the layout of the ImageNet file resnet50_v2.pth (stem at the top, fc)."""
    names = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
    out = {}
    for k, v in sd.items():
        if k.startswith("layer0."):
            _, idx, rest = k.split(".", 2)
            out[f"{names[idx]}.{rest}"] = v.clone()
        else:
            out[k] = v.clone()
    out["fc.weight"], out["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return out


def test_imagenet_v2_file_loads_strictly(drn50, tmp_path):
    src = build_backbone("deep_resnet50", weights="random", seed=1)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(imagenet_v2_layout(src.state_dict()), path)
    dst = build_backbone("deep_resnet50", weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert dst.provenance["sha256"] != "random-init"


def test_wrong_file_is_refused(drn50):
    sd = imagenet_v2_layout(drn50.state_dict())
    sd["layer4.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(WeightsError, match="wrong shape"):
        load_backbone_weights(DeepBaseResNet("deep_resnet50"), sd)
    sd = imagenet_v2_layout(drn50.state_dict())
    del sd["layer2.0.bn1.running_mean"]
    with pytest.raises(WeightsError, match="missing"):
        load_backbone_weights(DeepBaseResNet("deep_resnet50"), sd)
