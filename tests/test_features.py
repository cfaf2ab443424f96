"""Frozen-feature cache: same features as the backbone, counted hits/misses, byte-bounded LRU,
on-disk persistence across instances, keys that separate encoders, weights, layers and crops."""
import pytest
import torch

from fdsbench.blocks.backbones import build_backbone
from fdsbench.errors import FdsError
from fdsbench.blocks.features import CachedBackbone

LAYERS = ("layer2", "layer3")


@pytest.fixture(scope="module")
def bb():
    return build_backbone("resnet18", weights="random", seed=0)


def _imgs(n, seed=0, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_same_features_and_counters(bb):
    enc = CachedBackbone(bb, max_bytes=1 << 30)
    x = _imgs(3)
    ref = bb.forward_features(x, LAYERS)
    a = enc.forward_features(x, LAYERS)
    assert all(torch.allclose(r, g, atol=1e-5) for r, g in zip(ref, a))
    assert enc.stats()["misses"] == 3 and enc.stats()["forward_calls"] == 1
    b = enc.forward_features(x[[2, 0]], LAYERS)  # reordered subset: all hits, no backbone call
    assert torch.equal(b[0], a[0][[2, 0]]) and torch.equal(b[1], a[1][[2, 0]])
    s = enc.stats()
    assert (s["hits"], s["misses"], s["forward_calls"]) == (2, 3, 1)
    mixed = torch.cat([x[:1], _imgs(1, seed=9)])  # one hit + one miss -> one call for the miss only
    enc.forward_features(mixed, LAYERS)
    s = enc.stats()
    assert (s["hits"], s["misses"], s["forward_calls"]) == (3, 4, 2)
    assert enc.strides["layer2"] == 8 and enc.name == "resnet18"  # delegates to the backbone


def test_duplicate_images_in_one_batch_are_encoded_once(bb):
    enc = CachedBackbone(bb)
    x = _imgs(1).repeat(3, 1, 1, 1)
    out = enc.forward_features(x, ("layer2",))
    assert out[0].shape[0] == 3 and enc.stats()["misses"] == 1
    assert torch.equal(out[0][0], out[0][2])


def test_key_separates_layers_options_crops_and_weights(bb):
    enc = CachedBackbone(bb)
    x = _imgs(1)
    enc.forward_features(x, ("layer2",))
    enc.forward_features(x, ("layer3",))
    enc.forward_features(x, (2,))  # same layer as "layer2" once normalised
    assert enc.stats()["misses"] == 2 and enc.stats()["hits"] == 1
    k = enc.keys_for(x, ("layer2",))[0]
    assert k != enc.keys_for(x, ("layer2",), crop=(0, 0, 64, 64))[0]
    assert k != enc.keys_for(x + 1e-3, ("layer2",))[0]
    assert k != enc.keys_for(x.double(), ("layer2",))[0]
    other = CachedBackbone(build_backbone("resnet18", weights="random", seed=1))
    assert other.keys_for(x, ("layer2",))[0] != k  # two random inits never share features
    same = CachedBackbone(build_backbone("resnet18", weights="random", seed=0))
    assert same.keys_for(x, ("layer2",))[0] == k
    with torch.autocast("cpu", dtype=torch.bfloat16):  # precision is part of the key
        assert enc.keys_for(x, ("layer2",))[0] != k
    # caller-supplied keys (image sha + crop) replace tensor hashing
    a = enc.keys_for(x, ("layer2",), keys=["img-sha"], crop=(0, 0, 8, 8))[0]
    assert a != enc.keys_for(x, ("layer2",), keys=["img-sha"], crop=(0, 8, 8, 16))[0]
    with pytest.raises(FdsError, match="2 keys for a batch of 1"):
        enc.forward_features(x, ("layer2",), keys=["a", "b"])


def test_lru_is_bounded_in_bytes(bb):
    per_image = 128 * 8 * 8 * 4  # layer2 of a 64x64 input, float32
    enc = CachedBackbone(bb, max_bytes=2 * per_image)
    xs = [_imgs(1, seed=s) for s in range(3)]
    for x in xs:
        enc.forward_features(x, ("layer2",))
    s = enc.stats()
    assert s["entries"] == 2 and s["bytes"] == 2 * per_image <= s["max_bytes"]
    enc.forward_features(xs[2], ("layer2",))  # most recent: still there
    assert enc.stats()["hits"] == 1
    enc.forward_features(xs[0], ("layer2",))  # evicted first: recomputed
    assert enc.stats()["misses"] == 4
    tiny = CachedBackbone(bb, max_bytes=10)  # entries larger than the bound are not kept
    tiny.forward_features(xs[0], ("layer2",))
    tiny.forward_features(xs[0], ("layer2",))
    assert tiny.stats()["misses"] == 2 and tiny.stats()["entries"] == 0


def test_disk_cache_persists_across_instances(bb, tmp_path):
    x = _imgs(2, seed=5)
    first = CachedBackbone(bb, disk_dir=tmp_path)
    a = first.forward_features(x, LAYERS)
    assert len(list(tmp_path.glob("*/*.pt"))) == 2
    second = CachedBackbone(bb, disk_dir=tmp_path)  # a later run of the same manifest
    b = second.forward_features(x, LAYERS)
    assert second.stats()["disk_hits"] == 2 and second.stats()["forward_calls"] == 0
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # a truncated file is recomputed, not trusted
    victim = next(tmp_path.glob("*/*.pt"))
    victim.write_bytes(b"broken")
    third = CachedBackbone(bb, disk_dir=tmp_path)
    c = third.forward_features(x, LAYERS)
    assert third.stats()["misses"] == 1 and third.stats()["disk_hits"] == 1
    assert all(torch.allclose(p, q, atol=1e-4) for p, q in zip(a, c))  # batch 1 vs 2: float rounding
    third.clear(disk=True)
    assert not list(tmp_path.glob("*/*.pt"))


def test_vit_features_cached():
    vit = build_backbone("dinov2_vits14", weights="random", seed=0)
    enc = CachedBackbone(vit)
    x = _imgs(1, size=56)
    a = enc.forward_features(x, layers=(5, 6), norm=False)
    b = enc.forward_features(x, layers=(5, 6), norm=True)  # options are part of the key
    assert enc.stats()["misses"] == 2 and not torch.allclose(a[0], b[0])
    assert torch.equal(enc.forward_features(x, layers=(5, 6))[1], a[1])
    assert a[0].shape == (1, 384, 4, 4)


def test_refuses_trainable_backbone():
    with pytest.raises(FdsError, match="frozen"):
        CachedBackbone(build_backbone("resnet18", weights="random", frozen=False))
