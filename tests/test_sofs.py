"""SOFS: official state_dict names/shapes, fusion, priors, FAD switch, K-shot views,
ablation switches, and an overfitting check on one episode."""
import re

import numpy as np
import pytest
import torch

from fdsbench.registry import get_method
from fdsbench.types import Query, Shot, SupportSet

from fdsbench.methods.sofs.model import abnormal_prior, fusion_attention, semantic_prior

SOFS = get_method("sofs")
P = "feature_recorrect.query_semantic_transformer.mix_transformer."


def spec_head_keys(C=256, C1=256, fea=4608, n_prior=12, stages=2):
    keys = {
        "feature_recorrect.down_query.0.weight": (C, fea, 1, 1),
        "feature_recorrect.down_supp.0.weight": (C, fea, 1, 1),
        "feature_recorrect.down_supp_semantic.0.weight": (C, fea, 1, 1),
        "feature_recorrect.supp_merge_semantic.0.weight": (C1, 2 * C, 1, 1),
        "feature_recorrect.query_merge_semantic.0.weight": (C1, 2 * C + n_prior, 1, 1),
        P + "support_prototype.weight": (C1, C1, 1, 1),
        P + "support_prototype.bias": (C1,),
    }
    for i in range(stages):
        s = f"{P}sa_layers.{i}."
        for n in ("norm1", "norm2"):
            keys[s + n + ".weight"] = (C1,)
            keys[s + n + ".bias"] = (C1,)
        for x in "qkvo":
            keys[s + f"attn.attn.linear_{x}.weight"] = (C1, C1)
        keys[s + "ffn.layers.0.weight"] = (4 * C1, C1, 1, 1)
        keys[s + "ffn.layers.0.bias"] = (4 * C1,)
        keys[s + "ffn.layers.1.weight"] = (4 * C1, 1, 3, 3)
        keys[s + "ffn.layers.1.bias"] = (4 * C1,)
        keys[s + "ffn.layers.4.weight"] = (C1, 4 * C1, 1, 1)
        keys[s + "ffn.layers.4.bias"] = (C1,)
    return keys


def spec_dinov2_keys():
    keys = {"backbone.cls_token": (1, 1, 768), "backbone.pos_embed": (1, 1370, 768), "backbone.mask_token": (1, 768),
            "backbone.patch_embed.proj.weight": (768, 3, 14, 14), "backbone.patch_embed.proj.bias": (768,),
            "backbone.norm.weight": (768,), "backbone.norm.bias": (768,)}
    for i in range(12):
        b = f"backbone.blocks.{i}."
        keys.update({b + "norm1.weight": (768,), b + "norm1.bias": (768,), b + "attn.qkv.weight": (2304, 768),
                     b + "attn.qkv.bias": (2304,), b + "attn.proj.weight": (768, 768), b + "attn.proj.bias": (768,),
                     b + "ls1.gamma": (768,), b + "norm2.weight": (768,), b + "norm2.bias": (768,),
                     b + "mlp.fc1.weight": (3072, 768), b + "mlp.fc1.bias": (3072,),
                     b + "mlp.fc2.weight": (768, 3072), b + "mlp.fc2.bias": (768,), b + "ls2.gamma": (768,)})
    return keys


def test_paper_state_dict_equals_the_official_key_list():
    m = SOFS.from_preset("paper", {"weights": "random"})  # DINOv2 ViT-B/14 @ 518, ~90M params, no forward
    got = {k: tuple(v.shape) for k, v in m.model.state_dict().items()}
    assert got == {**spec_dinov2_keys(), **spec_head_keys()}
    # what fit() saves (and the runner stores) is the head; the backbone is frozen
    assert set(m.state_dict()) == set(spec_head_keys())
    assert not any(p.requires_grad for p in m.model.backbone.parameters())
    assert m.weights_provenance() == {"dinov2_vitb14": "random-init"}


def test_resnet50_variant_and_ablation_keys():
    m = SOFS.from_preset("paper_resnet50", {"weights": "random"})
    sd = {k: tuple(v.shape) for k, v in m.model.state_dict().items()}
    head = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    # merged layer2+3 map (1024 ch) used twice: fea_dim 2048, 2 + 2 prior channels, C = C1 = 64
    assert head == spec_head_keys(64, 64, 2048, 4)
    assert "backbone.layer3.5.conv3.weight" in sd and "backbone.fc.weight" in sd  # torchvision names
    # ablation switches change exactly the modules the official code does
    t = SOFS.from_preset("test").model.state_dict()
    mlp = SOFS.from_preset("test", {"meta_cls": False}).model.state_dict()
    assert not any("support_prototype" in k for k in mlp)
    assert {re.sub(r"^feature_recorrect\.cls_semantic\.", "", k).split(".")[0] for k in mlp
            if k.startswith("feature_recorrect.cls_semantic.")} == {"0", "1", "2", "3", "4"}
    noapm = SOFS.from_preset("test", {"abnormal_prior": False}).model.state_dict()
    assert noapm["feature_recorrect.query_merge_semantic.0.weight"].shape[1] == \
        t["feature_recorrect.query_merge_semantic.0.weight"].shape[1] - 2
    learn = SOFS.from_preset("test", {"fusion": "learnable"}).model.state_dict()
    assert any(".cross_layers.0.attn.attn.linear_q.weight" in k for k in learn)
    assert not any("cross_layers" in k for k in t)


def test_fusion_softmax_normalises_over_query_positions():
    torch.manual_seed(0)
    q, s = torch.randn(2, 20, 8), torch.randn(2, 30, 8)
    m = (torch.rand(2, 1, 30) > 0.5).float()
    a = fusion_attention(q, s, m, tau=0.1)
    assert a.shape == (2, 20, 30)
    assert torch.allclose(a.sum(1), torch.ones(2, 30), atol=1e-5)  # every support column sums to 1 over queries
    assert not torch.allclose(a.sum(2), torch.ones(2, 20), atol=1e-3)
    # a masked-out column gets logit 0 -> uniform over the query positions
    col = int((m[0, 0] == 0).nonzero()[0])
    assert torch.allclose(a[0, :, col], torch.full((20,), 1 / 20))


def test_priors():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 4, 4)
    s = q[:, None].repeat(1, 2, 1, 1, 1).clone()
    m = torch.zeros(1, 2, 1, 4, 4)
    m[0, 0, 0, 1, 1] = 0.25  # intensity does not scale the semantic prior (cosine is scale-invariant)
    sem = semantic_prior(q, s, m)
    assert sem.shape == (1, 1, 4, 4)
    # crop 0 has the query's own feature at (1,1) -> cos 1; crop 1 has no mask -> 0; mean over crops
    assert sem[0, 0, 1, 1].item() == pytest.approx(0.5, abs=1e-5)
    abn = abnormal_prior(q, s, m)
    # every query feature appears unmasked in crop 1 -> abnormality 0
    assert torch.allclose(abn, torch.zeros_like(abn), atol=1e-5)
    abn_all = abnormal_prior(q, s, torch.ones_like(m))  # all support positions are defect
    assert torch.allclose(abn_all, torch.ones_like(abn_all))


def _support(rng, masks):
    shots = []
    for i, mk in enumerate(masks):
        img = rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)
        shots.append(Shot(f"s{i}", img, mk, ((0, 0, 64, 64), (10, 20, 74, 84), (16, 0, 80, 64), (0, 26, 64, 90))))
    return SupportSet("obj/cls", shots, 0)


def test_fad_switch_triggers_exactly_when_all_support_masks_are_empty():
    m = SOFS.from_preset("test", {"window": 0})
    rng = np.random.default_rng(0)
    empty = np.zeros((80, 90), bool)
    one_px = empty.copy()
    one_px[40, 45] = True  # inside every crop: at least one crop mask is non-empty
    q = Query("q", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    x = torch.from_numpy(((q.image / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32))
    x = x.permute(2, 0, 1)[None]
    for masks, fad in (([empty], True), ([one_px], False)):
        st = m.prepare(_support(rng, masks))
        sup = st["support"]
        assert sup.weight.tolist() == [0.0 if fad else 1.0]
        z, m_a = m.model.logits(m.model.encode(x), sup)
        p = m.model.probability(z, (64, 64))
        a = torch.nn.functional.interpolate(m_a, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        out = m.model.predict(x, sup)
        assert torch.allclose(out, a if fad else p)
        assert not torch.allclose(a, p)
        pred = m.predict(st, q)
        assert pred.shape == (64, 64) and pred.dtype == np.float32
        np.testing.assert_allclose(pred, np.clip((a if fad else p)[0].detach().numpy(), 0, 1), atol=1e-5)


def test_k_shot_views():
    m = SOFS.from_preset("test")
    rng = np.random.default_rng(1)
    mk = np.zeros((80, 90), bool)
    mk[30:40, 30:40] = True
    one = _support(rng, [mk])  # 1-shot: 4 crops of one image
    views, whole = m.support_views(one)
    assert len(views) == 4 and not whole and all(v[0].shape == (64, 64, 3) for v in views)
    five = SupportSet("o/c", [Shot(f"s{i}", s.image, s.mask, s.crops[:1]) for i, s in
                              enumerate(_support(rng, [mk] * 5).shots)], 0)
    views, whole = m.support_views(five)  # 5-shot: one crop each
    assert len(views) == 5 and not whole
    large = SupportSet("o/c", [Shot("s", one.shots[0].image, mk, None)], 0)
    views, whole = m.support_views(large)  # large defect: whole image repeated s_in_shot = 4 times
    assert len(views) == 4 and whole and all(v[0] is large.shots[0].image for v in views)
    mixed = SupportSet("o/c", [five.shots[0], Shot("L", one.shots[0].image, mk, None)], 0)
    views, whole = m.support_views(mixed)  # a large support next to cropped ones: as many copies as crops
    assert len(views) == 2 and not whole
    assert m.prepare(one)["support"].feats[0].shape[:2] == (1, 4)
    plain = SOFS.from_preset("test", {"nr": False})
    views, whole = plain.support_views(five)  # NR off: whole images, one per shot
    assert len(views) == 5 and whole and views[0][0].shape == (80, 90, 3)


def test_overfits_one_episode():
    """Trained on one episode, SOFS segments that episode's query (pixel IoU > 0.9 at the original
    size). The logits live on the stride-8 grid and are upsampled bilinearly, so the boundary can
    move by up to ~4 px; the defect is made large enough (144 px) for that not to dominate."""
    from fdsbench.blocks.losses import dice_ce_loss
    from fdsbench.blocks.tiling import image_to_tensor, mask_to_tensor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is much faster on a shared 2-core machine
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        S = 256

        def image(defect):
            img = (rng.normal(120, 12, (S, S, 3))).clip(0, 255).astype(np.uint8)
            mask = np.zeros((S, S), bool)
            t, l, b, r = defect
            mask[t:b, l:r] = True
            img[mask] = (rng.normal(40, 10, (int(mask.sum()), 3))).clip(0, 255).astype(np.uint8)
            img[mask, 0] = 200
            return img, mask

        s_img, s_mask = image((64, 48, 208, 192))
        q_img, q_mask = image((40, 80, 184, 232))
        method = SOFS.from_preset("test", {"image_size": S, "window": 0, "reduce_dim": 64, "embed_dim": 32,
                                           "merge_dim": 64, "heads": 2, "s_in_shot": 1})
        model = method.model
        qx, qy = image_to_tensor(q_img, S)[0][None], mask_to_tensor(q_mask, S)[None]
        sx, sy = image_to_tensor(s_img, S)[0][None, None], mask_to_tensor(s_mask, S)[None, None]
        q_feats, s_feats = model.encode(qx), model.encode(sx.flatten(0, 1))
        opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("backbone.")], lr=3e-3)
        steps = 300
        model.train()  # Dropout2d / Dropout active, as in the official training
        for i in range(steps):
            sup = model.encode_support(sx, sy, feats=s_feats)
            z, _ = model.logits(q_feats, sup)
            x = model.feature_probability(z)
            y = (model.down(qy, tuple(x.shape[-2:])) > 0.1).float()[:, 0]
            loss = dice_ce_loss(x, y, eta=1.0)
            opt.zero_grad()
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = 3e-3 * (1 - i / steps) ** 0.9
            opt.step()
        model.eval()
        support = SupportSet("o/c", [Shot("s", s_img, s_mask, None)], 0)
        pred = method.predict(method.prepare(support), Query("q", q_img)) > 0.5
        iou = (pred & q_mask).sum() / (pred | q_mask).sum()
        assert iou > 0.9, iou
    finally:
        torch.set_num_threads(threads)


def test_released_checkpoint_round_trip_and_provenance(tmp_path):
    """A full SOFS state dict (backbone included, as the released SOFS_model.pth) loads strictly and
    the run record's provenance then names that file for the backbone too."""
    a = SOFS.from_preset("test")
    with torch.no_grad():  # differ from a fresh model everywhere, backbone included
        for v in a.model.state_dict().values():
            if v.is_floating_point():
                v.add_(0.01)
    torch.save({"state_dict": {"module." + k: v for k, v in a.model.state_dict().items()}}, tmp_path / "mine.pth")
    b = SOFS.from_preset("test")
    b.load_checkpoint(str(tmp_path / "mine.pth"))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    prov = b.weights_provenance()
    assert set(prov) == {b.config.backbone, "sofs"} and prov["sofs"] == prov[b.config.backbone] != "random-init"
    torch.save({"bogus.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="bogus|missing|unexpected"):
        b.load_checkpoint(str(tmp_path / "bad.pth"))
