"""GFDS feature matching (method ``fm``): students, mask-to-grid rule, PatchAvg, matching, edge
cases, the GFDS metric, and a distilled student loaded by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdsbench.errors import FdsError, UnknownNameError, WeightsError
from fdsbench.methods.fm import FeatureMatching, build_student, matching as M
from fdsbench.methods.fm.method import to_input
from fdsbench.metrics.segmentation import confusion, segmentation_metrics
from fdsbench.types import Query, Shot, SupportSet


KEYS = {
    ("s", "code"): ["0", "3", "6", "8"],
    ("l", "code"): ["0", "3", "6", "8", "10", "12"],
    ("l", "table3"): ["0", "3", "6", "8"],
}


@pytest.mark.parametrize("student,arch", list(KEYS))
def test_students_shapes_keys_and_sizes(student, arch):
    net = build_student(student, arch)
    assert list(net.state_dict()) == [f"{i}.{w}" for i in KEYS[student, arch] for w in ("weight", "bias")]
    params = sum(p.numel() for p in net.parameters()) / 1e6
    assert round(params, 2) == {("s", "code"): 2.69, ("l", "code"): 8.03, ("l", "table3"): 7.62}[student, arch]
    meta = net.to("meta")  # shapes only: no arithmetic
    assert meta(torch.zeros(1, 3, 256, 256, device="meta")).shape == (1, 384, 64, 64)
    assert meta(torch.zeros(1, 3, 512, 512, device="meta")).shape == (1, 384, 128, 128)


def test_student_weights_load_strictly_and_mismatch_is_clear(tmp_path):
    net = build_student("s")
    torch.save(net.state_dict(), tmp_path / "model_small.pth")
    m = FeatureMatching({"student": "s", "weights": str(tmp_path / "model_small.pth")})
    for k, v in net.state_dict().items():
        assert torch.equal(m.student.state_dict()[k], v)
    assert m.weights_provenance()["fm_s"] != "random-init"
    bad = dict(net.state_dict())
    bad.pop("8.bias")
    torch.save(bad, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="missing"):
        FeatureMatching({"student": "s", "weights": str(tmp_path / "broken.pth")}).student
    with pytest.raises(UnknownNameError, match="no_such_student"):
        FeatureMatching({"student": "s", "weights": "no_such_student"}).student
    with pytest.raises(WeightsError, match="model_large.pth"):
        FeatureMatching({"student": "l"}).student  # published file absent here: names it and its URL
    with pytest.raises(WeightsError, match="Table-3"):
        FeatureMatching({"student": "l", "fm_l_arch": "table3"}).student


def test_any_pixel_rule():
    for y, x in [(0, 0), (5, 9), (130, 77), (255, 3), (254, 255)]:
        m = torch.zeros(256, 256, dtype=torch.bool)
        m[y, x] = True
        cells = M.mask_to_grid(m, 64)
        assert cells.sum() == 1 and cells[y // 4, x // 4]
    m = torch.zeros(256, 256, dtype=torch.bool)
    m[255, 100] = True
    assert M.mask_to_grid(m, 64)[63].any()
    rnd = torch.rand(256, 256) > 0.995
    pooled = F.adaptive_max_pool2d(rnd[None, None].float(), 64)[0, 0] > 0
    assert torch.equal(M.mask_to_grid(rnd, 64), pooled)
    with pytest.raises(FdsError, match="square"):
        M.mask_to_grid(torch.zeros(10, 20), 4)


def _feat_and_cells(n_fg, grid=16, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(1, C, grid, grid, generator=g)
    cells = torch.zeros(grid, grid, dtype=torch.bool)
    cells.view(-1)[torch.randperm(grid * grid, generator=g)[:n_fg]] = True
    return feat, cells


def test_patch_average_sequence_counts_and_values():
    feat, cells = _feat_and_cells(11)
    fg, bg = M.shot_vectors(feat, cells, "patch", "dense", "sequence")
    dense = feat[:, :, cells]  # row-major list
    assert fg.shape[-1] == 9 and bg.shape[-1] == 16 * 16 - 11
    torch.testing.assert_close(fg[0, :, 0], dense[0, :, :3].mean(-1))
    feat, cells = _feat_and_cells(10)
    fg, _ = M.shot_vectors(feat, cells, "patch", "dense", "sequence")
    assert torch.equal(fg, feat[:, :, cells])  # n_f <= 10: no averaging
    # row-major order: (0, 15) precedes (1, 0), so a triple may straddle rows
    cells = torch.zeros(16, 16, dtype=torch.bool)
    cells[0, 13:16] = cells[1, 0:9] = True
    fg, _ = M.shot_vectors(feat, cells, "patch", "dense", "sequence")
    torch.testing.assert_close(fg[0, :, 1], (feat[0, :, 0, 14] + feat[0, :, 0, 15] + feat[0, :, 1, 0]) / 3)


def test_patch_average_2d_and_bg_patch_and_pool():
    feat, cells = _feat_and_cells(20, seed=1)
    fg, _ = M.shot_vectors(feat, cells, "patch", "dense", "2d")
    assert fg.shape[-1] == 20
    i, j = [int(v) for v in cells.nonzero()[0]]
    nb = [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
          if 0 <= a < 16 and 0 <= b < 16 and cells[a, b]]
    torch.testing.assert_close(fg[0, :, 0], torch.stack([feat[0, :, a, b] for a, b in nb]).mean(0))
    _, bg = M.shot_vectors(feat, cells, "patch", "patch", "sequence")
    assert bg.shape[-1] == 256 - 20 - 2
    P = M.combine_shots([feat[:, :, cells], feat[:, :, cells][:, :, :3]], "pool")
    assert P.shape == (1, 8, 1)


def _method(**kw):
    return FeatureMatching({"student": "s", "weights": "random", "image_size": 64, "amp": "fp32", **kw})


def _noise(seed, size=64):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_query_equal_to_support_matches_its_defect(distance):
    """Query = support (noise image), n_f <= 10: every support-fg cell has s_f = 1 >= s_b."""
    m = _method(distance=distance)
    img = _noise(0)
    mask = np.zeros((64, 64), bool)
    mask[20:26, 30:38] = True  # 2 x 2 cells of the 16 x 16 grid... plus a straddling column
    st = m.prepare(SupportSet("o/c", [Shot("s", img, mask)], seed=0))
    assert st.n_fg <= 10
    with torch.no_grad():
        feat = m.encode(img)
        s_f = M.similarity(feat, st.fg, distance)[0, 0]
        s_b = M.similarity(feat, st.bg, distance)[0, 0]
    cells = M.mask_to_grid(torch.from_numpy(mask), 16)
    if distance == "cosine":
        torch.testing.assert_close(s_f[cells], torch.ones(int(cells.sum())))
    assert (s_f[cells] >= s_b[cells]).all()
    L = m.logits(st, img, (16, 16))  # align_corners=True: the grid itself
    p = M.probability(L)[0]
    assert (p[cells] >= 0.5).all()
    full = m.predict(st, Query("q", img))
    assert full.shape == (64, 64) and full.dtype == np.float32


def test_k_shot_concatenates_and_edge_cases_are_counted():
    m = _method()
    imgs = [_noise(i) for i in range(3)]
    masks = [np.zeros((64, 64), bool) for _ in range(3)]
    masks[0][3:5, 3:5] = True
    masks[1][40:60, 10:50] = True
    st = m.prepare(SupportSet("o/c", [Shot(f"s{i}", imgs[i], masks[i]) for i in range(3)], seed=0))
    per = [int(M.mask_to_grid(torch.from_numpy(k), 16).sum()) for k in masks]
    assert st.n_fg == per[0] + (per[1] - 2) + 0 and st.n_bg == 3 * 256 - sum(per)
    empty = m.prepare(SupportSet("o/c", [Shot("e", imgs[2], masks[2])], seed=0))
    assert (m.predict(empty, Query("q", imgs[0])) == 0).all()
    full = m.prepare(SupportSet("o/c", [Shot("f", imgs[2], np.ones((64, 64), bool))], seed=0))
    assert (m.predict(full, Query("q", imgs[0])) == 1).all()
    info = m.describe()["runtime"]
    assert info["episodes_no_fg_cell"] == 1 and info["episodes_no_bg_cell"] == 1
    assert info["episodes_no_fg_cell_examples"] == ["o/c: e"]


def test_inputs_as_the_gfds_loader_and_other_sizes():
    img = _noise(3, 100)
    x = to_input(img, 64)
    import cv2

    ref = cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    ref = (ref - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    m = _method()
    mask = np.zeros((100, 100), bool)
    mask[10:30, 40:70] = True
    st = m.prepare(SupportSet("o/c", [Shot("s", img, mask)], seed=0))
    p = m.predict(st, Query("q", _noise(4, 80)[:, :70]))
    assert p.shape == (80, 70) and np.isfinite(p).all()


def test_config_checks_and_precision():
    with pytest.raises(FdsError, match="fg_proto"):
        _method(fg_proto="mean")
    assert _method().precision == "fp32"
    assert FeatureMatching({"student": "s", "weights": "random", "amp": "bf16", "similarity_fp32": True}).precision \
        == "bf16-autocast (fp32 similarity)"
    assert FeatureMatching.presets["fm-s"] == {"student": "s"}
    assert FeatureMatching({"weights": "random"}).requires.weights == ()
    assert FeatureMatching({}).requires.weights == ("fm_l",)


def test_backbone_used_directly_as_the_encoder():
    """Fig. 9 variant (the cpu preset's): VGG-16 conv3 (stride 4) gives the S/4 grid; several taps are
    concatenated at the finest one's resolution; provenance and requirements name the backbone."""
    m = _method(encoder="vgg16_hed", encoder_weights="random")
    assert m.requires.weights == () and m.weights_provenance() == {"vgg16_hed": "random-init"}
    with torch.inference_mode():
        assert m.encode(_noise(0)).shape == (1, 256, 16, 16)
        both = _method(encoder="vgg16_hed", encoder_weights="random", encoder_layers=("conv3", "conv4"))
        assert both.encode(_noise(0)).shape == (1, 768, 16, 16)
    img, mask = _noise(1), np.zeros((64, 64), bool)
    mask[8:24, 8:24] = True
    p = m.predict(m.prepare(SupportSet("o/c", [Shot("s", img, mask)], seed=0)), Query("q", img))
    assert p.shape == (64, 64) and p[mask].mean() > p[~mask].mean()
    assert FeatureMatching({"encoder": "vgg16_hed"}).requires.weights == ("vgg16_hed",)
    assert FeatureMatching.presets["cpu"] == {"encoder": "vgg16_hed", "encoder_layers": ("conv3",),
                                              "encoder_weights": "default", "image_size": 384}


def test_bf16_autocast_runs_on_cpu_and_stays_close():
    img, mask = _noise(5), np.zeros((64, 64), bool)
    mask[10:20, 10:30] = True
    sup = SupportSet("o/c", [Shot("s", img, mask)], seed=0)
    q = Query("q", _noise(6))
    m32, m16 = _method(), _method(amp="bf16", similarity_fp32=True)
    p32 = m32.predict(m32.prepare(sup), q)
    p16 = m16.predict(m16.prepare(sup), q)
    assert np.abs(p32 - p16).max() < 0.2


def test_gfds_metric_from_pooled_confusion():
    """Per product, GFDS pools one (n_cls+1)^2 confusion matrix over its episodes; IoU_c, IoU_bg,
    FB-IoU (code = ½(mean_c IoU_c + IoU_bg), merged = ½(IoU_fg + IoU_bg)) from fdsbench's rows."""
    rng = np.random.RandomState(0)
    queries = []
    for c, cls in enumerate(["p/a", "p/b"], start=1):
        for e in range(3):
            gt = np.zeros((32, 32), bool)
            gt[rng.randint(0, 20):, rng.randint(0, 25):][:6, :5] = True
            pred = np.roll(gt, rng.randint(-3, 4), axis=1) | (rng.rand(32, 32) > 0.98)
            queries.append((cls, c, e, pred, gt))
    hist = np.zeros((3, 3))
    for _, c, _, pred, gt in queries:  # the official _fast_hist with labels c / 0
        lp, lt = pred.astype(int).ravel() * c, gt.astype(int).ravel() * c
        hist += np.bincount(3 * lt + lp, minlength=9).reshape(3, 3)
    iu = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    rows = {"class_key": [], "episode": [], "tp": [], "fp": [], "fn": [], "tn": []}
    for cls, c, e, pred, gt in queries:
        for k, v in zip(("tp", "fp", "fn", "tn"), confusion(pred, gt)):
            rows[k].append(v)
        rows["class_key"].append(cls)
        rows["episode"].append(10 * c + e)
    out = segmentation_metrics(rows)
    assert out["per_class"]["p/a"]["iou"] == pytest.approx(iu[1])
    assert out["per_class"]["p/b"]["iou"] == pytest.approx(iu[2])
    assert out["iou_bg"] == pytest.approx(iu[0])
    assert out["miou"] == pytest.approx(np.nanmean(iu[1:]))
    assert out["fbiou_classmean"] == pytest.approx((np.nanmean(iu[1:]) + iu[0]) / 2)
    tp = sum(r for r in rows["tp"])
    merged_fg = tp / (tp + sum(rows["fp"]) + sum(rows["fn"]))
    assert out["fbiou"] == pytest.approx((merged_fg + iu[0]) / 2)


def test_distilled_student_reduces_loss_resumes_and_loads_by_name(tmp_path, monkeypatch):
    from PIL import Image

    from fdsbench.methods.fm.distill import DistillConfig, distill
    from fdsbench.methods.fm.students import registry_path

    monkeypatch.setenv("FDSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(4):
        base = rng.rand(8, 8, 3) * 255
        Image.fromarray(np.kron(base, np.ones((8, 8, 1))).astype(np.uint8)).save(folder / f"{i}.png")
    cfg = DistillConfig(images=str(tmp_path / "images"), name="tiny_s", student="s", teacher_weights="random",
                        steps=3, batch_size=2, lr=1e-3, student_size=32, teacher_size=64, norm_images=4,
                        checkpoint_every=2)
    first = distill(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    assert first["steps_done"] == 3 and first["recipe"]["grayscale_p"] == 0.1
    assert first["recipe"]["standardize"] and first["recipe"]["teacher_norm"]
    logs = []
    done = distill(dataclasses_replace(cfg, steps=8), tmp_path / "out", progress=False, log=logs.append)
    assert any("resumed tiny_s at step 3" in s for s in logs)
    assert done["steps_done"] == 8 and done["losses"][:3] == first["losses"]
    assert np.mean(done["losses"][-3:]) < np.mean(done["losses"][:3])
    reg = json.loads(registry_path().read_text())
    assert reg["tiny_s"]["arch"] == "fm_s" and reg["tiny_s"]["sha256"] == done["sha256"]
    m = FeatureMatching({"student": "s", "weights": "tiny_s", "image_size": 64})  # any S: a fully convolutional net
    assert m.weights_provenance() == {"fm_s": done["sha256"]}
    mask = np.zeros((64, 64), bool)
    mask[5:20, 5:20] = True
    p = m.predict(m.prepare(SupportSet("o/c", [Shot("s", _noise(1), mask)], seed=0)), Query("q", _noise(2)))
    assert p.shape == (64, 64)
    with pytest.raises(WeightsError, match="is a fm_s"):
        FeatureMatching({"student": "l", "weights": "tiny_s"}).student


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_timm_and_fdsbench_teachers_agree_at_the_native_grid(tmp_path, monkeypatch):
    """The same DINO-named file loads strictly into both teacher implementations; at 224² (no
    position-embedding resampling) their last-block targets agree, with and without the final norm."""
    from fdsbench.blocks.backbones import build_backbone
    from fdsbench.methods.fm.distill import Teacher

    sd = build_backbone("dino_vits8", "random", seed=3).state_dict()
    torch.save(sd, tmp_path / "dino_deitsmall8_pretrain.pth")
    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(tmp_path))
    x = torch.randn(1, 3, 224, 224)
    ours = Teacher("default", True, "cpu", "fdsbench", 224)
    timm_t = Teacher("default", True, "cpu", "timm", 224)
    assert ours.provenance == timm_t.provenance
    for norm in (True, False):
        ours.norm = timm_t.norm = norm
        a, b = ours.raw(x), timm_t.raw(x)
        assert a.shape == b.shape == (1, 384, 28, 28)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    assert Teacher("random", True, "cpu", "timm", 64).raw(torch.zeros(1, 3, 64, 64)).shape == (1, 384, 8, 8)
