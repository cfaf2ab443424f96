"""PFENet: shapes at every stage (official 473, industrial 518/512), the prior against a brute-force
loop, K-shot averaging, strict loading of the official checkpoint layout, the hidden 10x learning
rate, the GFDS small-defect mask rule, the official test canvas, a short fit and the contract."""
import numpy as np
import pytest
import torch

from fdsbench.blocks.backbones import IMAGENET_MEAN, IMAGENET_STD
from fdsbench.blocks.masks import downsample_keep_small
from fdsbench.blocks.training import TrainLoop
from fdsbench.errors import FdsError, WeightsError
from fdsbench.registry import get_method
from fdsbench.types import Query, Shot, SupportSet

from fdsbench.methods.pfenet.method import HEAD_GROUPS, canvas_image, canvas_label, canvas_output, canvas_size
from fdsbench.methods.pfenet.model import PFENet, load_official, pfenet_loss, prior_mask

from contract import check_method

M = get_method("pfenet")


def record_shapes(model):
    """Forward hooks: module name -> output shape of the last call."""
    seen = {}
    names = ["down_query", "down_supp", "res1", "res2", "cls"] + [f"{n}.{i}" for n in ("init_merge", "beta_conv", "inner_cls")
                                                                  for i in range(4)] + [f"alpha_conv.{i}" for i in range(3)]
    mods = dict(model.named_modules())
    for n in names + [f"layer{i}" for i in range(5)]:
        if n in mods:
            mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape)))
    return seen


def episode(B, K, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, s_x = torch.randn(B, 3, S, S, generator=g), torch.randn(B, K, 3, S, S, generator=g)
    s_y = torch.zeros(B, K, S, S)
    s_y[..., S // 4: S // 2, S // 3: S // 2] = 1
    return x, s_x, s_y


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return PFENet("deep_resnet50", "random").eval()


def test_official_shapes_at_473(official):
    seen = record_shapes(official)
    x, s_x, s_y = episode(1, 1, 473)
    calls = {}
    for name in ("encode_support", "prior"):  # keep what the forward computes
        fn = getattr(official, name)
        setattr(official, name, lambda *a, fn=fn, name=name: calls.setdefault(name, fn(*a)))
    try:
        with torch.no_grad():
            logits, aux = official(x, s_x, s_y)
    finally:
        del official.encode_support, official.prior
    sup, prior = calls["encode_support"], calls["prior"]
    assert seen["layer0"] == (1, 128, 119, 119) and seen["layer1"] == (1, 256, 119, 119)
    assert seen["layer2"] == (1, 512, 60, 60) and seen["layer3"] == (1, 1024, 60, 60) and seen["layer4"] == (1, 2048, 60, 60)
    assert seen["down_query"] == seen["down_supp"] == (1, 256, 60, 60)
    assert sup["proto"].shape == (1, 256, 1, 1) and prior.shape == (1, 1, 60, 60)
    assert 0 <= prior.min() and prior.max() <= 1 + 1e-6
    for i, b in enumerate((60, 30, 15, 8)):
        assert seen[f"init_merge.{i}"] == seen[f"beta_conv.{i}"] == (1, 256, b, b)
        assert seen[f"inner_cls.{i}"] == (1, 2, b, b) == tuple(aux[i].shape)
    assert [seen[f"alpha_conv.{i}"] for i in range(3)] == [(1, 256, 30, 30), (1, 256, 15, 15), (1, 256, 8, 8)]
    assert seen["res1"] == seen["res2"] == (1, 256, 60, 60) and seen["cls"] == (1, 2, 60, 60)
    assert logits.shape == (1, 2, 473, 473)


def test_official_refuses_non_8k_plus_1(official):
    x, s_x, s_y = episode(1, 1, 64)
    with pytest.raises(FdsError, match="8k\\+1"):
        official(x, s_x, s_y)


def test_official_state_dict_names_a8(official):
    sd = official.state_dict()
    want = {"down_query.0.weight": (256, 1536, 1, 1), "down_supp.0.weight": (256, 1536, 1, 1),
            "res1.0.weight": (256, 1024, 1, 1), "res2.0.weight": (256, 256, 3, 3), "res2.2.weight": (256, 256, 3, 3),
            "cls.0.weight": (256, 256, 3, 3), "cls.3.weight": (2, 256, 1, 1), "cls.3.bias": (2,)}
    for i in range(4):
        want |= {f"init_merge.{i}.0.weight": (256, 513, 1, 1), f"beta_conv.{i}.0.weight": (256, 256, 3, 3),
                 f"beta_conv.{i}.2.weight": (256, 256, 3, 3), f"inner_cls.{i}.0.weight": (256, 256, 3, 3),
                 f"inner_cls.{i}.3.weight": (2, 256, 1, 1), f"inner_cls.{i}.3.bias": (2,)}
    for i in range(3):
        want[f"alpha_conv.{i}.0.weight"] = (256, 512, 1, 1)
    head = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("layer")}
    assert head == want
    assert {k.split(".")[1] for k in sd if k.startswith("layer0.")} == {"0", "1", "3", "4", "6", "7"}
    assert "layer4.0.downsample.1.running_var" in sd
    assert not any(p.requires_grad for n, p in official.named_parameters() if n.startswith("layer"))


def test_industrial_shapes_dinov2_518():
    m = M.from_preset("paper", {"weights": "random"})
    seen = record_shapes(m.model)
    x, s_x, s_y = episode(1, 1, 518)
    with torch.no_grad():
        logits, aux = m.model(x, s_x, s_y)
    assert m.model.down_query[0].weight.shape == (256, 4608, 1, 1)
    assert seen["down_query"] == seen["down_supp"] == (1, 256, 37, 37)
    for i in range(4):
        assert seen[f"init_merge.{i}"] == (1, 256, 37, 37) and tuple(aux[i].shape) == (1, 2, 37, 37)
    assert seen["cls"] == (1, 2, 37, 37) and logits.shape == (1, 2, 518, 518)


def test_industrial_shapes_resnet50_512():
    m = M.from_preset("paper_resnet50_nr_mndl", {"weights": "random"})
    seen = record_shapes(m.model)
    x, s_x, s_y = episode(1, 1, 512)
    with torch.no_grad():
        logits, aux = m.model(x, s_x, s_y)
    assert m.model.down_supp[0].weight.shape == (256, 2048, 1, 1)
    assert seen["down_query"] == (1, 256, 64, 64) and seen["down_supp"] == (1, 256, 64, 64)
    assert [tuple(a.shape) for a in aux] == [(1, 2, 64, 64)] * 4 and logits.shape == (1, 2, 512, 512)
    assert m.config.test_path == "sliding" and m.config.dice == "mndl"


def test_prior_equals_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    q, s = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    s[:, :, 0, 0] = 0  # a masked-out support cell
    got = prior_mask(q, s)
    for b in range(2):
        c = torch.zeros(4, 3)
        for i in range(4):
            for j in range(3):
                best = -2.0
                for u in range(3):
                    for v in range(4):
                        a, e = q[b, :, i, j], s[b, :, u, v]
                        best = max(best, float((a * e).sum() / (a.norm() * e.norm() + 1e-7)))
                c[i, j] = best
        want = (c - c.min()) / (c.max() - c.min() + 1e-7)
        torch.testing.assert_close(got[b, 0], want, atol=1e-6, rtol=0)


def test_k_shot_averages_priors_and_prototypes():
    m = M.from_preset("test")
    model = m.model.eval()
    x, s_x, s_y = episode(1, 2, 64, seed=5)
    s_y[:, 1] = 0
    s_y[:, 1, 5:20, 30:60] = 1
    with torch.no_grad():
        both = model.encode_support(s_x, s_y)
        one = [model.encode_support(s_x[:, k: k + 1], s_y[:, k: k + 1]) for k in range(2)]
        torch.testing.assert_close(both["proto"], (one[0]["proto"] + one[1]["proto"]) / 2)
        q_highs = model.query_features(x)[1]
        p2 = model.prior(q_highs, both, (8, 8))
        p1 = [model.prior(q_highs, o, (8, 8)) for o in one]
        torch.testing.assert_close(p2, (p1[0] + p1[1]) / 2)


def official_checkpoint(model, prefix="module."):
    return {"epoch": 3, "state_dict": {prefix + k: v.clone() for k, v in model.state_dict().items()}, "optimizer": {}}


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_strict_load_round_trip(official, prefix, tmp_path):
    torch.manual_seed(1)
    other = PFENet("deep_resnet50", "random")
    path = tmp_path / "train_epoch_3.pth"
    torch.save(official_checkpoint(official, prefix), path)
    load_official(other, str(path))
    for k, v in official.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_wrong_checkpoint_is_refused_with_every_bad_key(official):
    ck = official_checkpoint(official)
    sd = ck["state_dict"]
    del sd["module.alpha_conv.2.0.weight"]
    sd["module.extra.weight"] = torch.zeros(1)
    sd["module.cls.3.weight"] = torch.zeros(3, 256, 1, 1)
    with pytest.raises(WeightsError) as err:
        load_official(PFENet("deep_resnet50", "random"), ck)
    msg = str(err.value)
    assert "1 missing: alpha_conv.2.0.weight" in msg and "1 unexpected: extra.weight" in msg
    assert "1 mis-shaped: cls.3.weight (3, 256, 1, 1) (model (2, 256, 1, 1))" in msg


def test_hidden_10x_learning_rate_on_the_nine_head_groups(tmp_path):
    m = M.from_preset("test")
    groups = m.optimizer_groups()
    names = {id(p): n for n, p in m.model.named_parameters()}
    assert len(groups) == 9 and all(g["lr_mult"] == 10.0 for g in groups)
    for g, head in zip(groups, HEAD_GROUPS):
        assert all(names[id(p)].startswith(head + ".") for p in g["params"]), head
    assert not any(names[id(p)].startswith("backbone.") for g in groups for p in g["params"])
    loop = TrainLoop(m.model, groups, tmp_path, epochs=2, iters_per_epoch=5, base_lr=0.0025, optimizer="sgd",
                     momentum=0.9, weight_decay=1e-4)
    assert isinstance(loop.optimizer, torch.optim.SGD)
    loop.iteration = 1
    lr = loop.set_lr()
    assert lr == pytest.approx(0.0025 * (1 - 1 / 10) ** 0.9)
    assert all(g["lr"] == pytest.approx(10 * lr) for g in loop.optimizer.param_groups)
    assert loop.optimizer.param_groups[0]["momentum"] == 0.9 and loop.optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_official_backbone_batchnorm_trains_as_the_official_code():
    m = M.from_preset("official", {"weights": "random"})
    assert m.frozen_prefixes == ()  # BN statistics change: the whole model is the checkpoint
    m.model.train()
    from fdsbench.blocks.training import freeze_batchnorm

    freeze_batchnorm(m.model)
    m.backbone_train_mode()
    assert m.model.layer1[0].bn1.training and m.model.layer0[1].training
    m2 = M.from_preset("official", {"weights": "random", "backbone_bn": "eval"})
    m2.model.train()
    assert not m2.model.layer1[0].bn1.training and m2.model.down_query.training
    assert m2.frozen_prefixes == tuple(f"layer{i}." for i in range(5))


def test_gfds_rule_on_a_one_pixel_defect():
    mask = torch.zeros(3, 1, 256, 256)
    mask[0, 0, 100:180, 60:140] = 1  # large: bilinear keeps it
    mask[1, 0, 16, 16] = 1  # on the nearest grid (every 8th pixel) but under 0.5 bilinearly
    mask[2, 0, 3, 5] = 1  # off the nearest grid: only the any-pixel rule keeps it
    out, branches = downsample_keep_small(mask, (32, 32))
    assert branches == ["bilinear", "nearest", "any_pixel"]
    assert out[1, 0, 2, 2] == 1 and out[1].sum() == 1
    assert out[2, 0, 0, 0] == 1 and out[2].sum() == 1
    m = M.from_preset("gfds", {"weights": "random"})
    img = np.full((256, 256, 3), 128, np.uint8)
    one = np.zeros((256, 256), bool)
    one[3, 5] = True
    sup = SupportSet("obj/c", [Shot("s", img, one, None)], 0)
    state = m.prepare(sup)
    assert state["highs"][0][0].abs().sum() > 0  # the defect survived to the prior
    assert m.describe()["mask_branches"] == {"any_pixel": 1}
    assert M.from_preset("official", {"weights": "random"}).model.mask_rule == "bilinear"


def test_official_canvas_padding():
    assert canvas_size(600, 400, 473) == (472, 312) and canvas_size(300, 200, 473) == (300, 200)
    img = np.full((600, 400, 3), 255, np.uint8)
    x = canvas_image(img, 473)
    black = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 400, 400].numpy(), black, atol=1e-6)  # canvas = zeros before normalisation
    np.testing.assert_allclose(x[:, 0, 0].numpy(), (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5)
    y = canvas_label(np.ones((600, 400), bool), 473)
    assert y[0, 0] == 1 and y[471, 311] == 1 and y[472, 0] == 255 and y[0, 312] == 255
    p = canvas_output(torch.rand(473, 473), 600, 400)
    assert p.shape == (600, 400)


def test_official_preset_predicts_through_the_canvas():
    m = M.from_preset("official", {"weights": "random", "image_size": 97})
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (150, 120, 3), dtype=np.uint8)
    mask = np.zeros((150, 120), bool)
    mask[40:90, 30:70] = True
    state = m.prepare(SupportSet("obj/c", [Shot("s", img, mask, None)], 0))
    p = m.predict(state, Query("q", img))
    assert p.shape == (150, 120) and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1


def test_short_fit_reduces_the_loss():
    m = M.from_preset("test")
    x, s_x, s_y = episode(2, 1, 64, seed=7)
    batch = {"query": x, "supports": s_x, "support_masks": s_y[:, :, None], "query_mask": (s_y[:, :1] > 0).float()}
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
    y = torch.zeros(1, 8, 8, dtype=torch.long)
    y[0, 0, 0] = 255
    lo = torch.zeros(1, 2, 8, 8)
    assert float(pfenet_loss(lo, [], y)) == pytest.approx(np.log(2), abs=1e-6)


def test_vgg16_hed_split_as_the_official_vgg():
    """layer2 = pool3, layer3 = pool4, layer4 = conv5_3 of HED's trunk; no BatchNorm -> not stored."""
    import torch.nn.functional as F
    from fdsbench.blocks.backbones import build_backbone

    m = M.from_preset("cpu")
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c3, c4, c5 = build_backbone("vgg16_hed").forward_features(x, layers=(3, 4, 5))
        f2, f3 = m.model._trunk(x)
        f4 = m.model.layer4(f3)
    assert torch.equal(f2, F.max_pool2d(c3, 2, 2, ceil_mode=True)) and torch.equal(f3, F.max_pool2d(c4, 2, 2, ceil_mode=True))
    assert torch.equal(f4, c5) and tuple(f4.shape) == (1, 512, 8, 8)
    assert m.model.down_query[0].in_channels == 512 + 256
    assert not any(k.startswith("layer") for k in m.state_dict()) and m.weights_provenance() == {
        "vgg16_hed": m.model.backbone_provenance["sha256"]}


#: the cpu preset (official model on HED's VGG-16, MNDL, SGD with the hidden x10) on the toy episodes of
#: test_learning (whole 64-px images at 128 px: no NR crops / windows), 32 steps of 2 at 2x the preset's lr
#: and MNDL x1 (the preset's x3, set for defects far below a feature cell, leaves these 2-6 % stains at 0.000).
#: Measured: pooled IoU 0.631 after training vs 0.000 untrained; 0.000 with every optimiser step a no-op.
PFENET_RECIPE = {"nr": False, "test_path": "resize", "image_size": 128, "epochs": 4, "max_iters_per_epoch": 8,
                 "batch_size": 2, "lr": 0.005, "dice_weight": 1.0, "augment": False, "cache_images": 32}
PFENET_MARGIN = 0.3


def test_pfenet_learns(tmp_path):
    from test_learning import meta_trained_pair

    before, after = meta_trained_pair(M, PFENET_RECIPE, tmp_path)
    assert after > before + PFENET_MARGIN, f"pfenet: pooled IoU {after:.3f} after training vs {before:.3f} untrained"


class TestPFENetContract:
    def test_contract(self, synthetic):
        check_method(M, synthetic)
