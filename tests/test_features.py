"""Frozen-feature cache: bit-identical features, one entry per (tap, input batch) so tap subsets hit,
byte-bounded memory LRU and disk directory, persistence across stores, keys that separate encoders,
weights content, options and numerics, no pickle, the process-wide store off until enabled."""
import pytest
import torch

from fdsbench.blocks import features as FC
from fdsbench.blocks.backbones import build_backbone
from fdsbench.blocks.features import CachedBackbone, FeatureStore
from fdsbench.errors import FdsError

LAYERS = ("layer2", "layer3")


@pytest.fixture(scope="module")
def bb():
    return build_backbone("resnet18", weights="random", seed=0)


def _imgs(n, seed=0, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def test_same_features_and_counters(bb):
    enc = CachedBackbone(bb, max_bytes=1 << 30)
    x = _imgs(3)
    ref = bb.forward_features(x, LAYERS)
    assert same(enc.forward_features(x, LAYERS), ref)
    got = enc.forward_features(x, LAYERS)  # the same batch again: served from memory, bit for bit
    assert same(got, ref)
    got[0].zero_()  # the caller owns what it gets: the cache keeps its copy
    assert same(enc.forward_features(x, LAYERS), ref)
    s = enc.stats()
    assert (s["hits"], s["misses"], s["forward_calls"], s["images"]) == (2, 1, 1, 3)
    # another batch of the same images is another entry (batch composition changes the rounding)
    enc.forward_features(x[[2, 0]], LAYERS)
    assert enc.stats()["misses"] == 2
    assert enc.strides["layer2"] == 8 and enc.name == "resnet18"  # delegates to the backbone


def test_a_subset_of_taps_hits_and_a_partial_hit_encodes_only_the_rest(bb, monkeypatch):
    enc = CachedBackbone(bb)
    x = _imgs(2, seed=3)
    enc.forward_features(x, LAYERS)
    assert same(enc.forward_features(x, ("layer3",)), bb.forward_features(x, ("layer3",)))
    assert enc.forward_features(x, (2,))[0].shape[1] == 128  # "layer2" once normalised
    asked = []
    real = bb.forward_features
    monkeypatch.setattr(bb, "forward_features", lambda x, layers, **kw: asked.append(layers) or real(x, layers, **kw))
    out = enc.forward_features(x, ("layer4", "layer2"))
    assert asked == [["layer4"]] and same(out, real(x, ("layer4", "layer2")))
    s = enc.stats()
    assert (s["hits"], s["misses"], s["forward_calls"]) == (2, 2, 2)


def test_key_separates_weights_options_and_numerics(bb):
    enc = CachedBackbone(bb)
    x = _imgs(1)
    k = enc.keys_for(x, ("layer2",))[0]
    assert k != enc.keys_for(x + 1e-3, ("layer2",))[0]
    assert k != enc.keys_for(x.double(), ("layer2",))[0]
    assert k != enc.keys_for(x, ("layer3",))[0]
    assert enc.keys_for(x, LAYERS)[0] == k  # one key per tap
    other = CachedBackbone(build_backbone("resnet18", weights="random", seed=1))
    assert other.keys_for(x, ("layer2",))[0] != k  # two random inits never share features
    twin = build_backbone("resnet18", weights="random", seed=0)
    same_weights = CachedBackbone(twin)
    assert same_weights.keys_for(x, ("layer2",))[0] == k  # weights by content: another instance hits
    twin.load_state_dict(other.backbone.state_dict())  # weights loaded later: the key follows them
    assert same_weights.keys_for(x, ("layer2",))[0] == other.keys_for(x, ("layer2",))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # precision is part of the key
        assert enc.keys_for(x, ("layer2",))[0] != k
    threads = torch.get_num_threads()
    try:  # CPU kernels round differently with the thread count
        torch.set_num_threads(threads + 1)
        assert enc.keys_for(x, ("layer2",))[0] != k
    finally:
        torch.set_num_threads(threads)


def test_memory_is_bounded_in_bytes(bb):
    per_entry = 128 * 8 * 8 * 4  # layer2 of one 64x64 input, float32
    enc = CachedBackbone(bb, max_bytes=2 * per_entry)
    xs = [_imgs(1, seed=s) for s in range(3)]
    for x in xs:
        enc.forward_features(x, ("layer2",))
    s = enc.stats()
    assert s["entries"] == 2 and s["bytes"] == 2 * per_entry <= s["max_bytes"]
    enc.forward_features(xs[2], ("layer2",))  # most recent: still there
    assert enc.stats()["hits"] == 1
    enc.forward_features(xs[0], ("layer2",))  # evicted first: recomputed
    assert enc.stats()["misses"] == 4
    tiny = CachedBackbone(bb, max_bytes=10)  # entries larger than the bound are not kept
    tiny.forward_features(xs[0], ("layer2",))
    tiny.forward_features(xs[0], ("layer2",))
    assert tiny.stats()["misses"] == 2 and tiny.stats()["entries"] == 0


def test_disk_layer_persists_and_refuses_what_is_not_a_tensor(bb, tmp_path):
    x = _imgs(2, seed=5)
    first = CachedBackbone(bb, disk_dir=tmp_path)
    a = first.forward_features(x, LAYERS)
    assert len(list(tmp_path.glob("*/*.pt"))) == 2  # one file per tap
    second = CachedBackbone(bb, disk_dir=tmp_path)  # a later run, or another method
    assert same(second.forward_features(x, LAYERS), a)
    assert second.stats()["disk_hits"] == 1 and second.stats()["forward_calls"] == 0
    victim, other = sorted(tmp_path.glob("*/*.pt"))
    victim.write_bytes(b"broken")  # truncated: recomputed, not trusted
    torch.save({"not": "a tensor"}, other)
    third = CachedBackbone(bb, disk_dir=tmp_path)
    assert same(third.forward_features(x, LAYERS), a)
    assert third.stats()["misses"] == 1 and third.stats()["forward_calls"] == 1
    third.clear(disk=True)
    assert not list(tmp_path.glob("*/*.pt"))


def test_disk_is_bounded_and_keeps_what_this_process_uses(bb, tmp_path):
    per_file = len(_saved(bb.forward_features(_imgs(1), ("layer2",))[0]))
    old = CachedBackbone(bb, disk_dir=tmp_path, disk_max_bytes=3 * per_file)
    for s in range(3):
        old.forward_features(_imgs(1, seed=s), ("layer2",))
    assert len(list(tmp_path.glob("*/*.pt"))) == 3
    store = FeatureStore(disk_dir=tmp_path, disk_max_bytes=3 * per_file)
    new = CachedBackbone(bb, store=store)
    new.forward_features(_imgs(1, seed=0), ("layer2",))  # a disk hit: this process uses it
    for s in (10, 11, 12):  # new entries replace the others, never the one in use
        new.forward_features(_imgs(1, seed=s), ("layer2",))
    files = list(tmp_path.glob("*/*.pt"))
    assert sum(p.stat().st_size for p in files) <= 3 * per_file
    keep = new.keys_for(_imgs(1, seed=0), ("layer2",))[0]
    assert keep in {p.stem for p in files}
    assert store.stats()["disk_skipped"] >= 1  # when nothing else can go, a new entry is not written


def _saved(t):
    import io

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_vit_taps_and_options():
    vit = build_backbone("dinov2_vits14", weights="random", seed=0)
    enc = CachedBackbone(vit)
    x = _imgs(1, size=56)
    a = enc.forward_features(x, layers=(5, 6), norm=False)
    b = enc.forward_features(x, layers=(5, 6), norm=True)  # options are part of the key
    assert enc.stats()["misses"] == 2 and not torch.allclose(a[0], b[0])
    assert torch.equal(enc.forward_features(x, layers=(6,))[0], a[1]) and enc.stats()["hits"] == 1
    assert a[0].shape == (1, 384, 4, 4)


def test_refuses_trainable_backbone():
    with pytest.raises(FdsError, match="frozen"):
        CachedBackbone(build_backbone("resnet18", weights="random", frozen=False))


def test_shared_store_is_off_until_enabled(bb, tmp_path, monkeypatch):
    FC.disable_shared()
    enc = CachedBackbone.shared(bb)
    x = _imgs(1, seed=7)
    enc.forward_features(x, LAYERS)
    enc.forward_features(x, LAYERS)
    assert enc.stats()["forward_calls"] == 2 and enc.stats()["entries"] == 0  # pass-through (fps, tests)
    try:
        FC.enable_shared(tmp_path)
        enc.forward_features(x, LAYERS)
        CachedBackbone.shared(build_backbone("resnet18", weights="random", seed=0)).forward_features(x, LAYERS)
        assert enc.stats()["forward_calls"] == 3 and FC.shared_store().stats()["entries"] == 2
        monkeypatch.setenv("FDSBENCH_FEATURE_CACHE", "off")
        assert FC.enable_shared(tmp_path).enabled is False
        monkeypatch.setenv("FDSBENCH_FEATURE_CACHE", "on")
        monkeypatch.setenv("FDSBENCH_FEATURE_CACHE_BYTES", "nonsense")
        with pytest.raises(FdsError, match="FDSBENCH_FEATURE_CACHE_BYTES"):
            FC.enable_shared(tmp_path)
    finally:
        FC.disable_shared()
