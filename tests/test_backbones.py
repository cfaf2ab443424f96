"""Shared encoders: offline random-init builds, feature shapes/strides at the papers' resolutions,
official key names, strict state-dict round trips, the PatchCore layer2+3 merge (SOFS appendix A.2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fdsbench.blocks.backbones import backbone_names, build_backbone, merge_layer23, required_weights
from fdsbench.errors import FdsError, UnknownNameError, WeightsError
from fdsbench.netguard import no_network  # noqa: F401  (pytest fixture)


@pytest.fixture(scope="module")
def vitb14():
    return build_backbone("dinov2_vitb14", weights="random", seed=0)


@pytest.fixture(scope="module")
def rn50():
    return build_backbone("resnet50", weights="random", seed=0)


def official_dinov2_keys(depth):
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def test_dinov2_vitb14_official_keys_and_shapes(vitb14):
    sd = vitb14.state_dict()
    assert set(sd) == official_dinov2_keys(12)
    assert sd["cls_token"].shape == (1, 1, 768)
    assert sd["pos_embed"].shape == (1, 1370, 768)  # built for img_size 518
    assert sd["mask_token"].shape == (1, 768)
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 14, 14)
    assert sd["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert torch.all(sd["blocks.3.ls1.gamma"] == 1.0)  # LayerScale init 1.0
    assert vitb14.provenance == {"name": "dinov2_vitb14", "sha256": "random-init", "path": None, "seed": 0}


def test_dinov2_vitb14_blocks_5_to_10_at_518(vitb14):
    x = torch.randn(1, 3, 518, 518)
    feats = vitb14.forward_features(x, layers=(5, 6, 7, 8, 9, 10))
    assert [tuple(f.shape) for f in feats] == [(1, 768, 37, 37)] * 6
    assert vitb14.strides[5] == 14 and vitb14.channels[10] == 768
    assert vitb14.feature_spec((5, 10), 518, 518) == [(768, 37, 37)] * 2
    assert not feats[0].requires_grad
    # block outputs are the residual stream BEFORE the final norm, CLS dropped, row-major grid
    with torch.no_grad():
        t = vitb14.prepare_tokens(x)
        for blk in vitb14.blocks[:6]:
            t = blk(t)
    ref = t[:, 1:].reshape(1, 37, 37, 768).permute(0, 3, 1, 2)
    assert torch.allclose(feats[0], ref, atol=1e-5)
    assert not torch.allclose(feats[5], feats[4])


def test_frozen_stays_eval_under_parent_train(vitb14):
    parent = torch.nn.Module()
    parent.backbone = vitb14
    parent.train()
    assert parent.training and not vitb14.training
    assert all(not p.requires_grad for p in vitb14.parameters())
    # a SOFS-like parent sees the official names under 'backbone.'
    keys = set(parent.state_dict())
    assert {"backbone.cls_token", "backbone.blocks.11.ls2.gamma", "backbone.norm.bias"} <= keys


def _official_interpolation(pos_embed, h0, w0):
    """facebookresearch/dinov2 interpolate_pos_encoding, written out: bicubic, scale_factor with the
    0.1 offset, no antialias."""
    N = pos_embed.shape[1] - 1
    M = int(math.sqrt(N))
    patch = pos_embed[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M), mode="bicubic")
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], 1)


def test_pos_embed_interpolation_matches_official_rule():
    bb = build_backbone("dinov2_vits14", weights="random", seed=1)
    pe = bb.pos_embed.detach()
    assert bb.interpolate_pos_encoding(1370, 518, 518, torch.float32) is bb.pos_embed  # native: untouched
    for H, W in [(224, 224), (518, 280), (700, 518)]:
        h0, w0 = H // 14, W // 14
        got = bb.interpolate_pos_encoding(1 + h0 * w0, H, W, torch.float32)
        assert torch.allclose(got, _official_interpolation(pe, h0, w0), atol=1e-6)
    # the offset matters: a plain size= resize gives a different embedding
    got224 = bb.interpolate_pos_encoding(257, 224, 224, torch.float32)[:, 1:]
    plain = F.interpolate(pe[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert not torch.allclose(got224, plain.permute(0, 2, 3, 1).reshape(1, 256, -1), atol=1e-6)
    feats = bb.forward_features(torch.randn(1, 3, 280, 518), layers=(-1,))
    assert feats[0].shape == (1, 384, 20, 37)


def test_vit_input_must_be_patch_multiple(vitb14):
    with pytest.raises(FdsError, match="multiple of the patch size"):
        vitb14.forward_features(torch.randn(1, 3, 520, 518), layers=(5,))
    with pytest.raises(FdsError, match="out of range"):
        vitb14.forward_features(torch.randn(1, 3, 518, 518), layers=(12,))


def test_dino_vits8_teacher():
    """FM teacher (GFDS paper §6.1.2): 64x64 tokens at 512; the forward here runs at 256 to stay cheap."""
    bb = build_backbone("dino_vits8", weights="random", seed=0)
    sd = bb.state_dict()
    assert sd["pos_embed"].shape == (1, 785, 384)  # official DINO: built at 224, resized at run time
    assert "mask_token" not in sd and not any(".ls1." in k for k in sd)
    assert bb.feature_spec((-1,), 512, 512) == [(384, 64, 64)]
    x = torch.randn(1, 3, 256, 256)
    tok = bb.forward_tokens(x, (11,))[0]
    assert tok.shape == (1, 1025, 384)  # 1 prefix token
    (last,) = bb.forward_features(x, layers=(-1,))
    (last_norm,) = bb.forward_features(x, layers=(11,), norm=True)
    assert last.shape == last_norm.shape == (1, 384, 32, 32)
    assert torch.allclose(last, tok[:, 1:].reshape(1, 32, 32, 384).permute(0, 3, 1, 2), atol=1e-5)
    assert torch.allclose(last_norm, bb.norm(tok)[:, 1:].reshape(1, 32, 32, 384).permute(0, 3, 1, 2), atol=1e-5)


def test_resnet50_layer2_layer3_and_merge_at_512(rn50):
    x = torch.randn(1, 3, 512, 512)
    l2, l3 = rn50.forward_features(x, layers=("layer2", "layer3"))
    assert l2.shape == (1, 512, 64, 64) and l3.shape == (1, 1024, 32, 32)
    assert rn50.strides["layer2"] == 8 and rn50.strides["layer3"] == 16
    assert rn50.forward_features(x, layers=(2,))[0].shape == l2.shape  # prior_layer_pointer ints
    merged = merge_layer23(l2, l3)
    assert merged.shape == (1, 1024, 64, 64)
    assert torch.equal(merge_layer23((l2, l3)), merged)
    assert rn50.feature_spec(("layer2", "layer3"), 512, 512) == [(512, 64, 64), (1024, 32, 32)]


def _patchcore_reference(l2, l3, out_dim):
    """Literal PatchCore order: unfold 3x3 -> upsample every layer3 neighbourhood map -> per-location
    adaptive_avg_pool1d of the flattened (c,3,3) vector -> concat -> pool again."""
    B, _, H, W = l2.shape
    vecs = []
    for f in (l2, l3):
        c, h, w = f.shape[1:]
        p = F.unfold(f, 3, padding=1).reshape(B, c, 3, 3, h, w)
        if (h, w) != (H, W):
            p = F.interpolate(p.reshape(-1, 1, h, w), size=(H, W), mode="bilinear", align_corners=False)
            p = p.reshape(B, c, 3, 3, H, W)
        p = p.permute(0, 4, 5, 1, 2, 3).reshape(B * H * W, 1, c * 9)
        vecs.append(F.adaptive_avg_pool1d(p, out_dim).squeeze(1))
    stacked = torch.stack(vecs, 1).reshape(B * H * W, 1, 2 * out_dim)
    return F.adaptive_avg_pool1d(stacked, out_dim).reshape(B, H, W, out_dim).permute(0, 3, 1, 2)


def test_merge_layer23_equals_literal_patchcore_order():
    g = torch.Generator().manual_seed(0)
    # channel ratios of the real maps: 512*9/1024 = 4.5 (general path), 1024*9/1024 = 9 (fast path)
    l2 = torch.randn(2, 8, 8, 8, generator=g)
    l3 = torch.randn(2, 16, 4, 4, generator=g)
    got = merge_layer23({"layer2": l2, "layer3": l3}, out_dim=16)
    assert got.shape == (2, 16, 8, 8)
    assert torch.allclose(got, _patchcore_reference(l2, l3, 16), atol=1e-5)


@pytest.mark.parametrize("name,layers,shapes", [
    ("resnet34", ("layer1", "layer2", "layer3", "layer4"),
     [(64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16)]),
    ("resnet18", ("relu", "maxpool", 4), [(64, 256, 256), (64, 128, 128), (512, 16, 16)]),
])
def test_small_resnets_at_512(name, layers, shapes):
    bb = build_backbone(name, weights="random", seed=0)
    feats = bb.forward_features(torch.randn(1, 3, 512, 512), layers=layers)
    assert [tuple(f.shape[1:]) for f in feats] == shapes
    assert bb.feature_spec(layers, 512, 512) == shapes
    with pytest.raises(FdsError, match="unknown feature layer"):
        bb.forward_features(torch.randn(1, 3, 64, 64), layers=("layer5",))


def test_torchvision_key_names_and_trainable_option():
    import torchvision

    bb = build_backbone("resnet34", weights="random", frozen=False)
    assert list(bb.state_dict()) == list(torchvision.models.resnet34(weights=None).state_dict())
    bb.train()  # not forced to eval: NBR+CaP fine-tunes its encoder
    assert bb.training and all(p.requires_grad for p in bb.parameters())
    out = bb.forward_features(torch.randn(1, 3, 64, 64), layers=("layer4",))[0]
    out.sum().backward()
    assert bb.conv1.weight.grad is not None


@pytest.mark.parametrize("name", ["dinov2_vits14", "resnet34"])
def test_state_dict_round_trips_strictly(tmp_path, name, no_network):
    from fdsbench.blocks.backbones import load_backbone_weights

    a = build_backbone(name, weights="random", seed=3)
    path = tmp_path / f"{name}-own.pth"
    torch.save(a.state_dict(), path)
    b = build_backbone(name, weights=str(path))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.provenance["sha256"] != "random-init" and len(b.provenance["sha256"]) == 64
    assert b.provenance["path"] == str(path)
    # one extra or one missing key is refused (strict)
    sd = dict(sa)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_backbone_weights(b, sd)
    sd = dict(sa)
    sd.pop(next(iter(sd)))
    with pytest.raises(WeightsError, match="1 missing"):
        load_backbone_weights(b, sd)


def test_dinov2_official_container_formats_load(tmp_path):
    """Chunked FSDP block names and a 'teacher'/'backbone.' wrapped checkpoint map onto the
    official names; a file without mask_token (timm export) loads with the zero token."""
    a = build_backbone("dinov2_vits14", weights="random", seed=4)
    sd = a.state_dict()
    chunked = {("blocks.0." + k[len("blocks."):]) if k.startswith("blocks.") else k: v for k, v in sd.items()}
    wrapped = {"teacher": {"backbone." + k: v for k, v in chunked.items()}, "iteration": torch.tensor(3)}
    wrapped["teacher"]["head.mlp.weight"] = torch.zeros(2, 2)
    torch.save(wrapped, tmp_path / "train_ckpt.pth")
    b = build_backbone("dinov2_vits14", weights=str(tmp_path / "train_ckpt.pth"))
    assert all(torch.equal(sd[k], b.state_dict()[k]) for k in sd)
    no_mask = {k: v for k, v in sd.items() if k != "mask_token"}
    torch.save(no_mask, tmp_path / "timm.pth")
    c = build_backbone("dinov2_vits14", weights=str(tmp_path / "timm.pth"))
    assert torch.equal(c.state_dict()["blocks.5.mlp.fc1.weight"], sd["blocks.5.mlp.fc1.weight"])


def test_wrong_model_size_is_a_shape_error(tmp_path):
    a = build_backbone("resnet18", weights="random")
    torch.save(a.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="wrong shape|keys do not match"):
        build_backbone("resnet34", weights=str(tmp_path / "r18.pth"))


def test_unknown_names_and_default_lookup_error(tmp_path, monkeypatch):
    with pytest.raises(UnknownNameError):
        build_backbone("vgg16", weights="random")
    assert {"dinov2_vitb14", "dino_vits8", "resnet50", "resnet34", "resnet18"} <= set(backbone_names())
    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("FDSBENCH_CACHE", str(tmp_path / "c"))
    with pytest.raises(WeightsError, match="resnet50-0676ba61.pth.*download.pytorch.org"):
        build_backbone("resnet50")  # no silent random init


def test_required_weights_name_what_the_configuration_loads():
    """A run record's ``requires.weights`` names the encoder weights of its configuration (the
    cpu presets' HED VGG-16, not the paper's DINOv2), nothing for a random init or a user file."""
    from fdsbench.registry import get_method

    assert required_weights("vgg16_hed", "default") == ("vgg16_hed",)
    assert required_weights("dinov2_vitb14", "") == ("dinov2_vitb14",)
    assert required_weights("deep_resnet50", "default") == ("resnet50_v2_deepbase",)
    assert required_weights("resnet18", "random") == ()
    assert required_weights("resnet50", "/my/weights.pth") == ()
    for name in ("proto", "sofs", "pfenet", "hdmnet"):
        cls = get_method(name)
        assert cls.from_preset("test").requires.weights == ()  # random-init test presets
        assert cls.requires.weights  # the class keeps the paper's requirement for listings
