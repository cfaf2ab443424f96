"""FM + FastSAM (method ``fm_fastsam``): selection and the three fusions on hand-made masks, FastSAM
offline through ultralytics (both call paths, under the network guard), outputs and weights errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fdsbench.errors import WeightsError
from fdsbench.methods.fm_fastsam import FMFastSAM, FusionParams, fuse, remove_overlap, select
from fdsbench.types import Query, Shot, SupportSet

S = 256


def box(y, x, h, w):
    m = torch.zeros(S, S, dtype=torch.bool)
    m[y:y + h, x:x + w] = True
    return m


def test_remove_overlap_smaller_masks_win():
    big, small = box(0, 0, 50, 50), box(10, 10, 5, 5)
    out = remove_overlap(torch.stack([big, small]))
    assert torch.equal(out[0], small) and torch.equal(out[1], big & ~small)


def test_selection_overlap_and_area_clause():
    R0 = box(0, 0, 100, 15)
    m15 = box(0, 0, 100, 100)  # 15 % of the mask overlaps R0
    assert select(m15[None], R0, FusionParams()).numel() == 0
    big = box(0, 0, 256, 110)  # 43 % of the image
    half = box(0, 0, 256, 55)  # overlap 0.5
    assert select(big[None], half, FusionParams()).numel() == 0
    assert select(big[None], half, FusionParams(area_clause=False)).numel() == 1  # the paper's rule
    assert select(big[None], box(0, 0, 256, 72), FusionParams()).numel() == 1  # overlap 0.65 > 0.6
    empty = torch.zeros(S, S, dtype=torch.bool)
    assert select(empty[None], R0, FusionParams()).numel() == 0  # 0/0 is never selected


def test_fusion_variants_on_hand_made_masks():
    covered, free = box(50, 50, 30, 30), box(180, 180, 20, 20)
    R0 = covered | free
    m = box(55, 55, 20, 20)  # inside the covered component; its 21x21 dilation covers all of it
    code, info = fuse(R0, m[None], "code")
    assert info == {"masks": 1, "selected": 1, "replaced": 1}
    assert torch.equal(code, m | free)  # trimmed to the mask; the uncovered component survives
    paper, _ = fuse(R0, m[None], "paper")
    assert torch.equal(paper, m | free)  # covered component dropped, R_sam added
    union, _ = fuse(R0, m[None], "union")
    assert torch.equal(union, R0)
    sam_only, _ = fuse(R0, m[None], "sam_only")
    assert torch.equal(sam_only, m)
    # a component sticking out of the dilated mask by > 10 % is kept whole (code and paper)
    long = box(50, 50, 10, 120)
    code, info = fuse(long, box(50, 50, 10, 30)[None], "code")
    assert info["replaced"] == 0 and torch.equal(code, long)
    # the code's ring also erases the pixels of OTHER components inside the ring
    near = box(53, 80, 4, 4)  # 5 px right of m's dilation core, inside the 10-px ring
    code, _ = fuse(covered | near, m[None], "code")
    assert not (code & near).any()
    paper, _ = fuse(covered | near, m[None], "paper")
    assert torch.equal(paper, m)  # eq. 13: the small component is covered by Dil(m) too, so dropped


def test_fallbacks_without_masks():
    R0 = box(10, 10, 5, 5)
    for variant in ("code", "paper", "union"):
        assert torch.equal(fuse(R0, None, variant)[0], R0)  # the code crashes here; fdsbench keeps R0
        assert torch.equal(fuse(R0, box(200, 200, 5, 5)[None], variant)[0], R0)  # nothing selected
    assert not fuse(R0, None, "sam_only")[0].any()


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from fdsbench.netguard import block_network
    with block_network() as guard:
        import numpy as np, torch
        from fdsbench.methods.fm_fastsam import fastsam as FS
        import ultralytics.utils as U
        model = FS.build_random("s", seed=0, class_bias=2.0)
        img = np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)
        high = FS.Everything(model, imgsz=64, conf=0.1, iou=0.5, max_det=300, device="cpu", call="high")
        low = FS.Everything(model, imgsz=64, conf=0.1, iou=0.5, max_det=300, device="cpu", call="low")
        a = high(img); low(img); b = low(img)  # low: first call warms the predictor, second is low level
        try:
            FS.load("FastSAM-s.pt")
            bare = "loaded"
        except Exception as e:
            bare = type(e).__name__
    print(json.dumps({"calls": guard.calls, "online": U.ONLINE, "n": int(a.shape[0]),
                      "same": bool(torch.equal(a, b)), "bare": bare, "dtype": str(a.dtype),
                      "config_dir": os.environ["YOLO_CONFIG_DIR"], "autoinstall": U.AUTOINSTALL,
                      "settings": str(U.SETTINGS.file),
                      "params_M": sum(p.numel() for p in model.model.parameters()) / 1e6}))
""")


def _run(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env.update(FDSBENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fastsam_offline_both_call_paths_under_the_network_guard(tmp_path):
    r = _run(OFFLINE_SCRIPT, tmp_path)
    assert r["calls"] == [] and r["online"] is False and r["autoinstall"] is False
    assert r["n"] > 0 and r["same"] and r["dtype"] == "torch.bool"
    assert round(r["params_M"], 1) == 11.8  # FastSAM-s = YOLOv8s-seg (FastSAM-x builds the same way: 71.8 M)
    assert r["bare"] == "WeightsError"  # a bare name would make ultralytics download it
    assert r["config_dir"] == str(tmp_path / "cache" / "ultralytics")
    assert r["settings"].startswith(str(tmp_path / "cache" / "ultralytics"))


def test_the_guard_sees_ultralytics_probe_without_the_offline_switch(monkeypatch):
    """Control: without YOLO_OFFLINE, ultralytics' import-time probe is a DNS lookup (the guard records it)."""
    from ultralytics.utils import is_online

    from fdsbench.netguard import block_network

    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    with block_network() as guard:
        assert is_online() is False
    assert any("one.one.one.one" in c for c in guard.calls)


def test_method_outputs_binary_and_soft_fusion_keeps_it():
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    sup = SupportSet("o/c", [Shot("s", img, mask)], seed=0)
    hard = FMFastSAM.from_preset("test")
    p = hard.predict(hard.prepare(sup), Query("q", img))
    assert set(np.unique(p)) <= {0.0, 1.0}
    soft = FMFastSAM.from_preset("test", {"soft_fusion": True})
    s = soft.predict(soft.prepare(sup), Query("q", img))
    assert np.array_equal(s > 0.5, p > 0.5) and len(np.unique(s)) > 2
    info = hard.describe()["runtime"]
    assert info["fusion_counts"]["queries"] == 1 and info["ultralytics_version"] == "8.4.190"
    assert hard.weights_provenance() == {"fm_s": "random-init", "fastsam_s": "random-init"}


def test_missing_fastsam_weights_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(tmp_path))
    m = FMFastSAM({"weights": "random", "student": "s"})
    assert m.requires.weights == ("fastsam_x",)
    with pytest.raises(WeightsError, match="FastSAM-x.pt"):
        m.everything
    assert FMFastSAM({}).requires.weights == ("fm_l", "fastsam_x")
    assert FMFastSAM.presets["fm-l-fastsam-s"] == {"fastsam": "s"}
    assert FMFastSAM({**FMFastSAM.presets["cpu"], "fastsam_weights": "default"}).requires.weights \
        == ("vgg16_hed", "fastsam_s")  # the cpu preset's matcher is fm's cpu encoder


def test_cpu_preset_matches_with_fms_cpu_encoder():
    from fdsbench.methods.fm import FeatureMatching

    fm_cpu = FeatureMatching.presets["cpu"]
    assert {k: FMFastSAM.presets["cpu"][k] for k in fm_cpu} == fm_cpu


@pytest.mark.parametrize("method", ["fm", "fm_fastsam"])
def test_gfds_protocol_runs_offline_and_records(method, tmp_path):
    """GFDS benchmark protocol (256×256 decoding, official pairing) end to end, a few episodes."""
    from fdsbench.datasets._testing import make_gfds
    from fdsbench.runner import BenchSpec, run

    root = make_gfds(tmp_path / "gfds", 40, 40)
    spec = BenchSpec(method=method, dataset="gfds", data_root=str(root), fold=2, preset="test",
                     protocol_options={"resize": 256, "draw": "gfds"}, workdir=str(tmp_path / "runs"),
                     max_episodes=2, progress=False)
    rec = run(spec, log=lambda s: None)[0]
    assert rec["protocol"]["draw"] == "gfds" and rec["protocol"]["resize"] == [256, 256]
    assert rec["metrics"]["miou"] is not None and "runtime" in rec
    assert all(v == "random-init" for v in rec["weights"].values())


def test_listing_methods_imports_no_ultralytics_and_keeps_pillow():
    """Discovery must not import ultralytics (it patches PIL.Image.open process-wide); the module that
    does import it restores Pillow's own open."""
    import subprocess
    import sys

    code = ("import PIL.Image as I; o = I.open\n"
            "from fdsbench.registry import list_methods; assert 'fm_fastsam' in list_methods()\n"
            "import sys; assert 'ultralytics' not in sys.modules, 'discovery imported ultralytics'\n"
            "from fdsbench.methods.fm_fastsam import fastsam\n"
            "assert 'ultralytics' in sys.modules and I.open is o, 'Pillow patched'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
