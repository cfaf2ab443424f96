"""SAM2 video-track: builds, exactness against the official
SAM2VideoPredictor, cached memory for many queries, stale-cache regression, sizes, checkpoints.

CPU, random weights, network blocked (conftest guard + fdsbench.netguard around the episodes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._device import _device_constructors  # noqa: E402

from fdsbench.errors import DataError, FdsError, WeightsError  # noqa: E402
from fdsbench.netguard import block_network  # noqa: E402
from fdsbench.types import Query, Shot, SupportSet  # noqa: E402
from fdsbench.methods.sam2 import Sam2VideoTrack, load_checkpoint  # noqa: E402
from fdsbench.methods.sam2 import official as O  # noqa: E402
from fdsbench.methods.sam2 import reference as R  # noqa: E402

S = 256
H, W = 200, 264  # non-square original size: exercises the loader's resize and the output resize


class _MetaBuild(TorchFunctionMode):
    """Allocate parameters on the meta device (shapes only, no init cost); torch.linspace stays
    real because Hiera calls .item() on it while building its drop-path schedule."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and func is not torch.linspace:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@pytest.mark.parametrize("model", ["t", "s", "b+", "l"])
def test_every_size_builds_at_every_resolution(model):
    """Shapes: image_size, S/16 embedding, S/4 mask input, FPN levels S/4, S/8,
    S/16 and memory 64×(S/16)² — the official build with the S override (meta tensors: shapes only)."""
    for s in O.RESOLUTIONS:
        with _MetaBuild():
            pred = O.build_predictor(model, s, device="meta")
        assert type(pred).__name__ == "SAM2VideoPredictor"
        assert pred.image_size == s
        assert pred.sam_image_embedding_size == s // 16
        assert pred.sam_prompt_encoder.mask_input_size == (s // 4, s // 4)
        assert pred.sam_prompt_encoder.image_embedding_size == (s // 16, s // 16)
        with torch.inference_mode():
            ff = O.encode_frame(pred, torch.empty(1, 3, s, s, device="meta"))
            mem, _ = pred._encode_new_memory(ff.feats, ff.sizes, torch.empty(1, 1, s, s, device="meta"),
                                             torch.empty(1, 1, device="meta"), True)
        assert ff.sizes == [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        assert tuple(ff.feats[-1].shape) == ((s // 16) ** 2, 1, 256)
        assert tuple(mem.shape) == (1, 64, s // 16, s // 16)
    params = sum(p.numel() for p in pred.parameters()) / 1e6
    assert params == pytest.approx({"t": 39.0, "s": 46.1, "b+": 80.9, "l": 224.4}[model], abs=0.06)


# ---- one tiny model + the official predictor with the same weights ----------------------------
@pytest.fixture(scope="module")
def pair():
    """(our method, official SAM2VideoPredictor) with identical random weights; object scores
    forced positive so outputs are not all −1024."""
    torch.manual_seed(0)
    ours = Sam2VideoTrack.from_preset("test", {"image_size": S})
    ours.model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data.fill_(10.0)
    off = O.build_predictor("t", S)
    off.load_state_dict(ours.model.state_dict(), strict=True)
    return ours, off


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Support + two queries written as JPEG frames (what init_state reads) and their decoded pixels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    imgs = []
    for i in range(4):
        base = (rng.integers(0, 255, (H, W, 3)) * 0.5 + 60 * np.sin((xx + 7 * i) / 9.0)[..., None] + 90)
        base[(yy - 90 - 5 * i) ** 2 + (xx - 120 - 9 * i) ** 2 < 30 ** 2] = (200, 40, 40)
        imgs.append(np.clip(base, 0, 255).astype(np.uint8))
    mask = np.zeros((H, W), bool)
    mask[(yy - 90) ** 2 + (xx - 120) ** 2 < 30 ** 2] = True
    mask2 = np.zeros((H, W), bool)
    mask2[(yy - 95) ** 2 + (xx - 129) ** 2 < 30 ** 2] = True
    root = tmp_path_factory.mktemp("sam2frames")
    dec = R.read_frames(R.write_frames(root / "all", imgs))
    return {"root": root, "imgs": dec, "mask": mask, "mask2": mask2}


def _video(frames, order, name):
    """A frame folder holding frames[order] as 0.jpg, 1.jpg, … (re-encoding already-decoded JPEG
    pixels changes them, so the decoded frames are what our path gets too)."""
    folder = frames["root"] / name
    paths = R.write_frames(folder, [frames["imgs"][i] for i in order])
    return folder, R.read_frames(paths)


@pytest.fixture(scope="module")
def runs(pair, frames):
    """Fresh 2-frame official runs for query A and query B against support 0 (logits, pixels, the
    official state of run A), and our path: one prepare, then queries A, B, A on that memory."""
    ours, off = pair
    out = {}
    for name, q in (("A", 1), ("B", 2)):
        folder, px = _video(frames, [0, q], f"v{name}")
        logits, state = R.official_video_logits(off, folder, [frames["mask"]], return_state=True)
        out[name] = (logits, px, state)
    px_a, px_b = out["A"][1], out["B"][1]
    assert np.array_equal(px_a[0], px_b[0])  # same support pixels in both videos
    with block_network():
        st = ours.prepare(SupportSet("obj/defect", [Shot("s0", px_a[0], frames["mask"])], seed=0))
        snap = {k: v.clone() for k, v in st.bank["cond_frame_outputs"][0].items() if isinstance(v, torch.Tensor)}
        out["ours"] = [_ours(ours, st, px) for px in (px_a[1], px_b[1], px_a[1])]
        out["prob_a"] = ours.predict(st, Query("qA", px_a[1]))
        # paper-comparable timing mode: the query's memory-encoder pass runs but changes nothing
        tq = Sam2VideoTrack.from_preset("test", {"image_size": S, "time_query_memory": True})
        tq._model, tq._token, tq._provenance = ours.model, ours._token, ours._provenance
        out["ours_tq"] = _ours(tq, st, px_a[1])
    out["state"], out["snap"] = st, snap
    return out


def _ours(method, state, img):
    return O.logits_to_size(method.query_logits(state, img), (H, W))


def test_cached_path_equals_official_predictor(runs):
    """Cached memory path == SAM2VideoPredictor on the same two frames
    from disk (fp32, max abs diff ≤ 1e-5); many queries against one memory == fresh 2-frame runs;
    the memory is not mutated by queries."""
    ref_a, ref_b = runs["A"][0], runs["B"][0]
    got_a, got_b, got_a2 = runs["ours"]
    assert (ref_a > 0).any() and (ref_a <= 0).any(), "degenerate reference: test would not discriminate"
    assert (ref_a - ref_b).abs().max().item() > 1e-3  # the two queries really differ
    assert (got_a - ref_a).abs().max().item() <= 1e-5
    assert (got_b - ref_b).abs().max().item() <= 1e-5
    assert (got_a2 - ref_a).abs().max().item() <= 1e-5
    assert torch.equal(runs["ours_tq"], got_a)
    state = runs["state"]
    for k, v in runs["snap"].items():
        assert torch.equal(state.bank["cond_frame_outputs"][0][k], v), f"predict mutated the memory ({k})"
    assert not state.bank["non_cond_frame_outputs"]
    assert state.nbytes() < 2e6
    # the harness output: probabilities at the query's original size, p > 0.5 ⇔ official logits > 0
    p = runs["prob_a"]
    assert p.shape == (H, W) and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    assert np.array_equal(p > 0.5, (ref_a > 0)[0, 0].numpy())


def test_stale_cache_regression_cannot_happen(pair, runs):
    """In the official state, swapping the query without clearing cached_features
    returns the OLD query's result; the frame-swap recipe with the clear gives the new one. Our path keeps no
    frame cache (a fresh encoding per predict): after query A, query B gives B's fresh result."""
    _, off = pair
    ref_a, _, st = runs["A"]
    ref_b, px_b, _ = runs["B"]
    xb = O.load_frame(px_b[1], S)
    stale = R.official_swap_query(off, st, xb, clear_cache=False)
    assert (stale - ref_a).abs().max().item() <= 1e-5  # the regression exists in the raw official state
    fresh = R.official_swap_query(off, st, xb, clear_cache=True)
    assert (fresh - ref_b).abs().max().item() <= 1e-5
    _, got_b, _ = runs["ours"]  # computed right after query A on the same memory
    assert (got_b - ref_b).abs().max().item() <= 1e-5
    assert (got_b - ref_a).abs().max().item() > 1e-3


def test_k_shot_equals_official_multi_frame_video(pair, frames):
    """K supports = conditioning frames 0…K−1, query = frame K, num_frames = K+1."""
    ours, off = pair
    folder, px = _video(frames, [0, 3, 1], "vK2")
    ref = R.official_video_logits(off, folder, [frames["mask"], frames["mask2"]])
    state = ours.prepare(SupportSet("obj/defect", [Shot("s0", px[0], frames["mask"]),
                                                   Shot("s1", px[1], frames["mask2"])], seed=0))
    assert state.num_frames == 3 and sorted(state.bank["cond_frame_outputs"]) == [0, 1]
    assert (_ours(ours, state, px[2]) - ref).abs().max().item() <= 1e-5


def test_small_defect_memory_and_deviation_option(pair):
    """At S=256 a 4×4 support defect leaves an EMPTY memory mask by default (the
    official behaviour, kept); mem_mask_from_input=True (recorded deviation) keeps its 16 px."""
    ours, _ = pair
    img = np.full((S, S, 3), 128, np.uint8)
    m4 = np.zeros((S, S), bool)
    m4[100:104, 100:104] = True
    m12 = np.zeros((S, S), bool)
    m12[100:112, 100:112] = True
    sup = SupportSet("o/c", [Shot("a", img, m4), Shot("b", img, m12)], seed=0)
    st = ours.prepare(sup)
    assert st.mem_pixels[0] == 0 and st.mem_pixels[1] > 0
    dev = Sam2VideoTrack.from_preset("test", {"image_size": S, "mem_mask_from_input": True})
    dev._model, dev._token, dev._provenance = ours.model, ours._token, ours._provenance  # same weights
    st2 = dev.prepare(SupportSet("o/c", [Shot("a", img, m4)], seed=0))
    assert st2.mem_pixels == (16,)
    assert dev.describe()["config"]["mem_mask_from_input"] is True
    assert dev.runtime_info()["mem_mask_from_input"] is True


def test_wrong_size_frame_and_bad_inputs_are_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(FdsError, match="S=256"):
        ours.encode_frame(torch.zeros(1, 3, 128, 128))
    with pytest.raises(FdsError, match="S=256"):  # the raw model asserts; our wrapper names the fix
        O.encode_frame(ours.model, torch.zeros(1, 3, 224, 256))
    with pytest.raises(DataError, match="uint8"):
        ours.load_frame(np.zeros((32, 32, 3), np.float32), "query q7")
    with pytest.raises(DataError, match="q8"):
        ours.load_frame(np.zeros((32, 32, 5), np.uint8), "query q8")
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(DataError, match="s9"):
        ours.prepare(SupportSet("o/c", [Shot("s9", img, np.zeros((32, 64), bool))], seed=0))
    # a memory prepared by another model instance / resolution is refused, not silently reused
    other = Sam2VideoTrack.from_preset("test", {"image_size": S})
    other._model, other._token = ours.model, object()
    st = ours.prepare(SupportSet("o/c", [Shot("s", img, np.ones((64, 64), bool))], seed=0))
    with pytest.raises(FdsError, match="prepare"):
        other.predict(st, Query("q", img))
    # grey frames are converted to RGB as PIL's convert("RGB") does in the official loader
    assert torch.equal(ours.load_frame(img[:, :, 0]), ours.load_frame(img))


def test_checkpoint_round_trip_is_strict(tmp_path):
    """A 1024 model's state saved as {"model": sd} loads strictly into S=512 (and into
    the official builder); missing / unexpected keys are WeightsErrors; provenance = file sha256."""
    torch.manual_seed(1)
    src = O.build_predictor("t", 1024)
    sd = src.state_dict()
    ck = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sd}, ck)
    m = Sam2VideoTrack.from_preset("test", {"image_size": 512, "weights": str(ck)})
    got = m.model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    prov = m.weights_provenance()["sam2.1_hiera_tiny"]
    assert len(prov) == 64 and prov != "random-init"
    from sam2.build_sam import _load_checkpoint

    _load_checkpoint(m.model, str(ck))  # the official (strict) loader reads our file format too
    extra = dict(sd, bogus=torch.zeros(1))
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match="unexpected"):
        load_checkpoint(m.model, tmp_path / "extra.pt")
    missing = {k: v for k, v in sd.items() if not k.startswith("obj_ptr_tpos_proj")}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="missing"):
        load_checkpoint(m.model, tmp_path / "missing.pt")
    # the small model's weights in a tiny model: shape mismatch is named
    torch.save({"model": {**sd, "image_encoder.trunk.pos_embed": torch.zeros(1, 1, 1, 1)}}, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match="shape"):
        load_checkpoint(m.model, tmp_path / "shape.pt")


def test_default_weights_missing_is_a_clear_error_and_random_is_flagged(monkeypatch, tmp_path):
    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(tmp_path))
    m = Sam2VideoTrack.from_preset("paper")
    assert m.requires.weights == ("sam2.1_hiera_small",) and m.requires.gpu_recommended and not m.requires.fad
    with pytest.raises(WeightsError, match="sam2.1_hiera_small.pt"):
        m.weights_provenance()
    r = Sam2VideoTrack.from_preset("cpu")
    assert r.config.weights == "random" and r.requires.weights == ("sam2.1_hiera_tiny",)
    assert r.weights_provenance() == {"sam2.1_hiera_tiny": "random-init"}
    info = r.runtime_info()
    assert info["precision"] == "fp32" and info["fill_holes_applied"] == info["sam2_C_available"]
    for name, (model, s) in {"sam2-b-1024": ("b+", 1024), "sam2-s-256": ("s", 256)}.items():
        c = Sam2VideoTrack.from_preset(name).config
        assert (c.model, c.image_size) == (model, s)
    with pytest.raises(FdsError, match="t, s, b\\+, l"):
        Sam2VideoTrack.from_preset("test", {"model": "xl"})


def test_random_init_does_not_depend_on_when_the_model_is_built():
    """The runner asks for weights provenance (which builds the model) before any episode is seeded:
    the random init must not take the caller's RNG state (results once differed run to run)."""
    a = Sam2VideoTrack.from_preset("test")
    torch.manual_seed(123)
    torch.rand(7)
    a.weights_provenance()
    b = Sam2VideoTrack.from_preset("test")
    torch.manual_seed(5)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
