"""The official FSS training episodes (PFENet loader): the size filter of the class lists, K distinct
supports never the query, 0/1/255 labels, the foreground-keeping crop, padding values, determinism,
and a short PFENet fit on them."""
import numpy as np
import pytest
import torch

from fdsbench.blocks.fss_episodes import (IGNORE, MEAN_255, STD_255, FSSEpisodes, FSSSettings, binarise, normalise,
                                          rand_crop, train_transform)
from fdsbench.errors import FdsError
from fdsbench.registry import get_method
from fdsbench.types import TrainSource


def toy_source(n=6, h=40, w=56, seed=0):
    """Images i0..i{n-1}; class obj/a: a 20x20 square in every image; obj/b: 20x20 in even images,
    3x3 (below any sensible size filter) in odd ones; obj/c only in i0 (alone in its list); image t has only a 3x3 obj/a."""
    rng = np.random.default_rng(seed)
    images = {f"i{k}": rng.integers(0, 120, (h, w, 3), dtype=np.uint8) for k in range(n)}
    masks = {}
    for k in range(n):
        a = np.zeros((h, w), bool)
        a[5:25, 10:30] = True
        b = np.zeros((h, w), bool)
        b[15:35, 30:50] = True if k % 2 == 0 else False
        if k % 2:
            b[30:33, 40:43] = True
        masks[(f"i{k}", "obj/a")], masks[(f"i{k}", "obj/b")] = a, b
    c = np.zeros((h, w), bool)
    c[0:20, 0:20] = True
    masks[("i0", "obj/c")] = c
    for (i, cl), m in masks.items():  # objects visible: one colour per class on the noise
        images[i][m] = {"obj/a": (250, 30, 30), "obj/b": (30, 30, 250), "obj/c": (30, 250, 30)}[cl]
    images["t"] = images["i0"]
    masks[("t", "obj/a")] = np.zeros((h, w), bool)
    masks[("t", "obj/a")][:3, :3] = True
    samples = sorted(masks)
    images_of = {}
    for i, cl in samples:
        images_of.setdefault(cl, []).append(i)
    return TrainSource("toy", 0, seed, samples, images_of, lambda i: images[i], lambda i, cl: masks[(i, cl)])


def settings(**kw):
    return FSSSettings(**{"size": 32, "min_pixels": 100, **kw})


def test_size_filter_of_the_class_lists():
    ep = FSSEpisodes(toy_source(), settings(shot=1))
    assert ep.lists["obj/a"] == [f"i{k}" for k in range(6)]
    assert ep.lists["obj/b"] == ["i0", "i2", "i4"]  # the 3x3 objects (9 px < 100) are not listed
    assert ep.lists["obj/c"] == ["i0"]
    # the query class is drawn among all the image's classes with enough supports (the filter only
    # governs the lists): obj/b stays a query class of i1; obj/c has no support besides i0
    items = dict(ep.items)
    assert items["i1"] == ["obj/a", "obj/b"] and items["i0"] == ["obj/a", "obj/b"]
    # an image without any listed class is dropped
    assert "t" not in ep.lists["obj/a"] and "t" not in items and len(ep) == 6
    with pytest.raises(FdsError, match="min_pixels"):
        FSSEpisodes(toy_source(), settings(min_pixels=10_000))


def test_default_filter_is_2048_pixels():
    assert FSSSettings().min_pixels == 2 * 32 * 32


def test_k_distinct_supports_never_the_query():
    ep = FSSEpisodes(toy_source(), settings(shot=2))
    for pos in range(len(ep)):
        for epoch in range(5):
            e = ep.episode(pos, epoch)
            assert e["query_id"] not in e["support_ids"]
            assert len(set(e["support_ids"])) == 2
            assert all(s in ep.lists[e["class"]] for s in e["support_ids"])
            assert e["supports"].shape == (2, 3, 32, 32) and e["support_masks"].shape == (2, 1, 32, 32)


def test_binarisation_keeps_255():
    m = np.array([[0, 3, 255], [3, 0, 1]], np.uint8)
    assert binarise(m).tolist() == [[0, 1, 255], [1, 0, 1]]
    assert binarise(m.astype(bool) & (m != 255)).tolist() == [[0, 1, 0], [1, 0, 1]]
    # through the whole transform, the labels hold only 0, 1 and 255 (padding / rotation border)
    ep = FSSEpisodes(toy_source(h=24, w=28), settings(min_pixels=50, rotate_p=1.0))
    vals = set()
    for pos in range(len(ep)):
        e = ep.episode(pos, 0)
        vals |= set(torch.unique(e["query_mask"]).tolist()) | set(torch.unique(e["support_masks"]).tolist())
    assert vals <= {0.0, 1.0, 255.0} and {1.0, 255.0} <= vals


class Fixed:
    """A generator stand-in returning preset crop offsets."""

    def __init__(self, offsets):
        self.offsets = list(offsets)

    def integers(self, lo, hi):
        return self.offsets.pop(0)


def test_crop_redraws_until_85_percent_of_the_foreground():
    img = np.zeros((100, 100, 3), np.float32)
    y = np.zeros((100, 100), np.uint8)
    y[70:90, 70:90] = 1  # 400 px
    # first window (0,0) misses the object, the second (10,10) keeps 36 %, the third (60,60) all of it
    _, (yc,) = rand_crop(img, [y], Fixed([0, 0, 10, 10, 60, 60, 0, 0]), 40)
    assert int((yc == 1).sum()) == 400
    # after the last allowed re-draw the window is kept as it is
    _, (yc,) = rand_crop(img, [y], Fixed([0, 0] * 3), 40, redraws=2)
    assert int((yc == 1).sum()) == 0
    # with the real generator (about one window in four keeps the object), every crop keeps >= 85 %;
    # without re-draws many do not
    rng = np.random.default_rng(0)
    kept = [int((rand_crop(img, [y], rng, 80)[1][0] == 1).sum()) for _ in range(50)]
    once = [int((rand_crop(img, [y], rng, 80, redraws=0)[1][0] == 1).sum()) for _ in range(50)]
    assert min(kept) >= 0.85 * 400 and min(once) < 0.85 * 400


def test_padding_values():
    img = np.full((10, 12, 3), 7, np.float32)
    y = np.ones((10, 12), np.uint8)
    ic, (yc,) = rand_crop(img, [y], np.random.default_rng(0), 16)
    assert ic.shape == (16, 16, 3) and yc.shape == (16, 16)
    # centred: 3 rows above / 3 below, 2 columns left / 2 right
    assert (yc[3:13, 2:14] == 1).all() and (yc[:3] == IGNORE).all() and (yc[:, :2] == IGNORE).all()
    assert np.allclose(ic[0, 0], MEAN_255) and np.allclose(ic[5, 5], 7)
    # the mean colour normalises to 0
    assert float(normalise(ic)[:, 0, 0].abs().max()) < 1e-5
    assert np.allclose(normalise(np.full((1, 1, 3), 255.0, np.float32))[:, 0, 0].numpy(),
                       (255 - np.array(MEAN_255)) / np.array(STD_255), atol=1e-5)


def test_train_transform_shapes_and_resize_variant():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    y = np.zeros((30, 50), np.uint8)
    y[5:20, 5:30] = 1
    for final in ("crop", "resize"):
        x, (yt,) = train_transform(img, [y], np.random.default_rng(2), settings(final=final))
        assert x.shape == (3, 32, 32) and yt.shape == (32, 32) and x.dtype == torch.float32


def test_deterministic_for_a_seed():
    a = FSSEpisodes(toy_source(), settings(shot=2), seed=5)
    b = FSSEpisodes(toy_source(), settings(shot=2), seed=5)
    assert a.order(3) == b.order(3) and a.order(3) != a.order(4)
    ea, eb = a.episode(2, 3), b.episode(2, 3)
    assert ea["support_ids"] == eb["support_ids"] and torch.equal(ea["query"], eb["query"])
    assert torch.equal(ea["support_masks"], eb["support_masks"])
    # independent of the batch size (items only depend on seed, epoch and position)
    b4 = next(a.batches(3, 4))
    assert torch.equal(b4["query"][0], a.episode(a.order(3)[0], 3)["query"])
    assert not torch.equal(FSSEpisodes(toy_source(), settings(shot=2), seed=6).episode(2, 3)["query"], ea["query"])


def test_pfenet_official_sampler_fit_reduces_the_loss(tmp_path):
    M = get_method("pfenet")
    m = M.from_preset("test", overrides={"train_sampler": "official", "min_pixels": 100, "dice": "none"})
    ep = m.train_episodes(toy_source(h=64, w=72))
    assert isinstance(ep, FSSEpisodes)
    batch = next(ep.batches(0, 4))
    assert (batch["query_mask"] == IGNORE).any() or (batch["query_mask"] <= 1).all()
    opt = torch.optim.SGD([p for g in m.optimizer_groups() for p in g["params"]], lr=0.01, momentum=0.9)
    m.model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        loss = m.step_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    # and the whole fit runs through the shared training loop
    m2 = M.from_preset("test", overrides={"train_sampler": "official", "min_pixels": 100, "image_size": 32})
    m2.fit(toy_source(), tmp_path)
    assert m2.history


def test_official_preset_uses_the_official_sampler():
    c = get_method("pfenet").presets
    assert c["official"]["train_sampler"] == "official" and c["gfds"]["train_sampler"] == "nr"
