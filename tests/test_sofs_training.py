"""NR episodic sampler (fdsbench.blocks.nr), the shared training loop (fdsbench.blocks.training) and SOFS fit/resume."""
import numpy as np
import pytest
import torch
from torch import nn

from fdsbench.errors import FdsError
from fdsbench.blocks.nr import EpisodeSampler, NRSettings, augment
from fdsbench.blocks.training import TrainLoop, latest_checkpoint, param_groups, poly_lr
from fdsbench.types import TrainSource


def toy_source(n_per_class=3, size=(120, 160), area=(6, 6)):
    rng = np.random.default_rng(0)
    images, masks = {}, {}
    images_of = {}
    for c in ("a/x", "b/y"):
        ids = []
        for i in range(n_per_class):
            iid = f"{c}-{i}"
            images[iid] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            m = np.zeros(size, bool)
            t, l = rng.integers(0, size[0] - area[0]), rng.integers(0, size[1] - area[1])
            m[t:t + area[0], l:l + area[1]] = True
            masks[(iid, c)] = m
            ids.append(iid)
        images_of[c] = ids
    samples = sorted((i, c) for c, ids in images_of.items() for i in ids)
    return TrainSource("toy", 0, 0, samples, images_of, images.__getitem__, lambda i, c: masks[(i, c)])


def test_nr_episode_shapes_and_determinism():
    src = toy_source()
    s = EpisodeSampler(src, NRSettings(image_size=64, crop_size=48, shot=1, s_in_shot=4, alpha=0.3), seed=3)
    ep = s.episode(0, epoch=0)
    assert ep["query"].shape == (3, 64, 64) and ep["query_mask"].shape == (1, 64, 64)
    assert ep["supports"].shape == (4, 3, 64, 64) and ep["support_masks"].shape == (4, 1, 64, 64)
    again = s.episode(0, epoch=0)
    assert torch.equal(ep["query"], again["query"]) and torch.equal(ep["supports"], again["supports"])
    assert not torch.equal(ep["supports"], s.episode(0, epoch=1)["supports"])
    five = EpisodeSampler(src, NRSettings(image_size=64, crop_size=48, shot=2, s_in_shot=1), seed=3)
    assert five.episode(1)["supports"].shape[0] == 2
    plain = EpisodeSampler(src, NRSettings(image_size=64, shot=2, s_in_shot=4, nr=False), seed=3)
    assert plain.episode(1)["supports"].shape[0] == 2  # NR off: whole images, one per shot
    b = next(s.batches(0, 2))
    assert b["query"].shape == (2, 3, 64, 64) and b["supports"].shape == (2, 4, 3, 64, 64)
    assert s.n_batches(4) == 1 and sorted(s.order(0)) == list(range(len(s)))


def test_nr_support_crops_contain_defect_and_normal_crops_follow_alpha():
    src = toy_source()
    st = NRSettings(image_size=48, crop_size=48, s_in_shot=4, alpha=0.3, augment=False)
    s = EpisodeSampler(src, st, seed=0)
    img, mask = s.load("a/x-0", "a/x")
    rng = np.random.default_rng(0)
    views = [v for _ in range(50) for v in s.support_views(img, mask, rng)]
    assert len(views) == 200 and all(v[0].shape[:2] == (48, 48) for v in views)  # native resolution
    # centred on a defect pixel; the official bottom/right offsets (dd, dr in 0..c, end exclusive)
    # can leave the centre row/column just outside, so "almost always" rather than always
    assert np.mean([v[1].any() for v in views]) > 0.9
    normal = sum(not s.query_view(img, mask, rng)[1].any() for _ in range(600))
    assert 0.2 < normal / 600 < 0.32  # centred on a non-defect pixel with probability alpha (may still hit it)
    big = np.zeros_like(mask)
    big[:60] = True  # area ratio 0.5 > 0.01: used whole, support repeated s_in_shot times
    assert s.query_view(img, big, rng)[0] is img
    views = s.support_views(img, big, rng)
    assert len(views) == 4 and all(v[0] is img for v in views)
    assert EpisodeSampler(src, NRSettings(alpha=0.0, crop_size=48), seed=0).query_view(img, mask, rng)[1].any()


def test_augment_keeps_shapes_and_mask_alignment():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 50, 3), np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:20, 8:23] = True
    img[mask] = 255
    for _ in range(20):
        a, m = augment(img, mask, rng)
        assert a.shape == img.shape and m.shape == mask.shape and m.dtype == bool
        assert a[..., 0][m].mean() > 3 * a[..., 0][~m].mean() + 50  # the mask still sits on the bright square


def test_sampler_refuses_classes_without_a_second_image():
    with pytest.raises(FdsError):
        EpisodeSampler(toy_source(n_per_class=1), NRSettings())


def test_poly_lr_and_param_groups():
    assert poly_lr(1.0, 0, 10) == 1.0 and poly_lr(1.0, 10, 10) == 0.0
    assert poly_lr(2.0, 5, 10, 0.9) == pytest.approx(2.0 * 0.5 ** 0.9)
    net = nn.ModuleDict({"backbone": nn.Linear(2, 2), "a_transformer_b": nn.Linear(2, 2), "other": nn.Linear(2, 2)})
    groups = param_groups(net, [("transformer", 1.0)], default_mult=2.0)
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0] and [len(g["params"]) for g in groups] == [2, 2]


def test_train_loop_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 1))
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]

    def make(epochs):
        m = nn.Sequential(nn.Linear(3, 1))
        m.load_state_dict(net.state_dict())
        loop = TrainLoop(m, param_groups(m, [], 1.0), tmp_path, epochs=epochs, iters_per_epoch=3, base_lr=0.1, seed=1)
        return m, loop

    step = lambda m: (lambda b: ((m(b[0]) - b[1]) ** 2).mean())  # noqa: E731
    m1, l1 = make(2)
    l1.run(lambda e: iter(data), step(m1))
    assert latest_checkpoint(tmp_path)[0] == 2 and l1.iteration == 6
    assert l1.optimizer.param_groups[0]["lr"] == pytest.approx(poly_lr(0.1, 6, 6))
    # a longer run resumes at epoch 2 (does not redo it) and continues the iteration count
    m2, l2 = make(3)
    seen = []
    l2.run(lambda e: (seen.append(e), iter(data))[1], step(m2))
    assert seen == [2] and l2.iteration == 9 and latest_checkpoint(tmp_path)[0] == 3
    assert len(list(tmp_path.glob("epoch_*.pt"))) == 2  # keep_last


def test_sofs_fit_writes_checkpoints_and_resumes(tmp_path, synthetic):
    from fdsbench.registry import get_method

    cls = get_method("sofs")
    m = cls.from_preset("test", {"epochs": 2, "max_iters_per_epoch": 1})
    m.fit(synthetic.train_source(0, 0), tmp_path)
    assert latest_checkpoint(tmp_path)[0] == 2 and len(m.history) == 2
    sd = m.state_dict()
    assert sd and not any(k.startswith("backbone.") for k in sd)
    again = cls.from_preset("test", {"epochs": 2, "max_iters_per_epoch": 1})
    again.fit(synthetic.train_source(0, 0), tmp_path)  # everything done: resumes, trains nothing
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(FdsError):
        cls.from_preset("test", {"embed_dim": 8}).load_state_dict(sd)
