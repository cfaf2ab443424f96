"""The episode pipeline: fast decoding equal to the reference decoder, bounded cache, background
loading and scoring that change no number (any worker count, resumed runs), binned scores from the CLI."""
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from fdsbench.cli import main
from fdsbench.errors import FdsError
from fdsbench.io import read_image
from fdsbench.loading import DecodedCache, EpisodeLoader, OrderedWorker, _read_npy, decode_image, host_array
from fdsbench.method import Method
from fdsbench.registry import register_method
import fdsbench.runner as runner_module
from fdsbench.metrics import MeterSet
from fdsbench.metrics.scores import ScoreBuffer
from fdsbench.runner import BenchSpec, run
from fdsbench.timing import BACKGROUND_NICE
from fdsbench.types import Requirements

STOP = {"at": None, "calls": 0, "bad": None}  # interrupt at call "at"; a value above 1 at call "bad"


@register_method("loading_probe")
class LoadingProbe(Method):
    """Test method: mean-colour distance map (cheap, depends on every pixel of support and query)."""

    requires = Requirements()

    @dataclass
    class Config:
        scale: float = 60.0

    def prepare(self, support):
        return np.concatenate([s.image[s.mask] for s in support.shots]).mean(0)

    def predict(self, state, query):
        STOP["calls"] += 1
        if STOP["at"] is not None and STOP["calls"] >= STOP["at"]:
            raise KeyboardInterrupt
        d = np.sqrt(((query.image.astype(np.float32) - state) ** 2).sum(-1))
        out = np.exp(-d / self.config.scale).astype(np.float32)
        if STOP["calls"] == STOP["bad"]:
            out[0, 0] = 1.5
        return out


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation: Pillow's convert("RGB") does not rotate, nor may we
    return exif.tobytes()


def _images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(rgb).resize((53, 37), Image.BILINEAR))
    out = {"rgb.png": (Image.fromarray(rgb), {}), "L.png": (Image.fromarray(rgb[..., 0]), {}),
           "RGBA.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]])), {}),
           "LA.png": (Image.fromarray(rgb[..., :2], "LA"), {}),
           "P.png": (Image.fromarray(rgb).quantize(16), {}), "1.png": (Image.fromarray(rgb[..., 0] > 99), {}),
           "I16.png": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 200), {}),
           "q95.jpg": (Image.fromarray(smooth), {"quality": 95, "subsampling": 0}),
           "q75.jpg": (Image.fromarray(smooth), {"quality": 75, "subsampling": 2}),
           "grey.jpg": (Image.fromarray(smooth[..., 0]), {"quality": 90}),
           "rotated.jpg": (Image.fromarray(smooth), {"quality": 90, "exif": _exif_orientation(6)}),
           "cmyk.jpg": (Image.fromarray(smooth).convert("CMYK"), {"quality": 90}),
           "rgb.bmp": (Image.fromarray(rgb), {}), "rgb.tif": (Image.fromarray(rgb), {})}
    for name, (im, kw) in out.items():
        im.save(tmp_path / name, **kw)
    return [tmp_path / n for n in out]


def test_fast_decoder_gives_the_reference_pixels(tmp_path, synthetic):
    paths = _images(tmp_path) + [synthetic.root / r.path for r in list(synthetic.index.records.values())[:12]]
    for p in paths:
        ref, fast = read_image(p), decode_image(p)
        assert fast.dtype == np.uint8 and fast.flags.writeable and fast.shape == ref.shape, p
        assert np.array_equal(fast, ref), p


def test_decoded_entries_are_read_without_the_python_parser(tmp_path, monkeypatch):
    """Loading threads read .npy entries at once: their headers are matched without ``ast`` (not
    thread-safe in CPython 3.11); a pickled, Fortran-order or cut-short file is refused."""
    import ast

    monkeypatch.setattr(ast, "parse", lambda *a, **k: pytest.fail("ast.parse called"))
    rng = np.random.default_rng(0)
    for i, a in enumerate([rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), rng.random((7, 9)) > 0.5,
                           np.arange(5, dtype=np.float32), np.zeros((0, 3), np.uint8)]):
        np.save(tmp_path / f"{i}.npy", a)
        with open(tmp_path / f"{i}.npy", "rb") as f:
            out = _read_npy(f)
        assert out.dtype == a.dtype and out.shape == a.shape and np.array_equal(out, a) and not out.flags.writeable
    for name, a in (("fortran", np.zeros((3, 4)).T), ("object", np.array([{"a": 1}], dtype=object))):
        np.save(tmp_path / f"{name}.npy", a, allow_pickle=True)
    (tmp_path / "short.npy").write_bytes((tmp_path / "0.npy").read_bytes()[:-3])
    for name in ("fortran", "object", "short"):
        with open(tmp_path / f"{name}.npy", "rb") as f, pytest.raises(ValueError):
            _read_npy(f)


def test_cache_is_bounded_and_shared_arrays_are_read_only():
    cache = DecodedCache(max_bytes=3000)
    for i in range(10):
        a = cache.get(i, lambda: np.zeros(1000, np.uint8))
        assert not a.flags.writeable
    assert len(cache) == 3 and cache.misses == 10
    cache.get(9, lambda: pytest.fail("cached"))
    assert cache.hits == 1


def test_cache_decodes_a_key_in_flight_once():
    """Threads asking for an image another thread is decoding wait for it; a failed decode fails
    every waiter and is not cached."""
    import threading

    cache, started, release, calls = DecodedCache(max_bytes=10_000), threading.Event(), threading.Event(), []

    def slow():
        calls.append(1)
        started.set()
        release.wait(5)
        return np.ones(100, np.uint8)

    out = []
    first = threading.Thread(target=lambda: out.append(cache.get("k", slow)))
    first.start()
    started.wait(5)
    others = [threading.Thread(target=lambda: out.append(cache.get("k", slow))) for _ in range(3)]
    for t in others:
        t.start()
    release.set()
    for t in [first, *others]:
        t.join(5)
    assert len(calls) == 1 and len(out) == 4 and all(o is out[0] for o in out)

    def broken():
        raise ValueError("damaged file")
    with pytest.raises(ValueError):
        cache.get("bad", broken)
    assert cache.get("bad", lambda: np.zeros(3, np.uint8)).shape == (3,)  # retried, not remembered


def test_loader_hands_out_copies_in_manifest_order(synthetic, tmp_path):
    from fdsbench.episodes import get_manifest, resolve_protocol

    m = get_manifest(tmp_path, synthetic, 1, 1, 0, resolve_protocol("fss", 1, {}, synthetic.protocol_defaults))
    loader = EpisodeLoader(synthetic, LoadingProbe, m)
    eps = m.episodes[:6]
    seen = []
    for ep, support, queries in loader.iterate(eps, workers=2):
        support.shots[0].image[:] = 0  # a method scribbling on its input must not reach the cache
        for q, gt in queries:
            assert np.array_equal(q.image, synthetic.load_image(q.id)) and q.image.flags.writeable
            assert np.array_equal(gt, synthetic.load_mask(q.id, ep.defect_class))
            seen.append((ep.index, q.id))
        assert np.array_equal(loader.image(ep.supports[0].id), synthetic.load_image(ep.supports[0].id))
    assert seen == [(e.index, q) for e in eps for q in e.queries]


def test_ordered_worker_keeps_order_and_reports_errors():
    out = []
    w = OrderedWorker(depth=2)
    for i in range(20):
        w.submit(lambda i=i: (time.sleep(0.001 * (i % 3)), out.append(i)))
    w.join()
    assert out == list(range(20))
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.join()
    w.close()
    assert not any(t.name == "fdsbench-score" and t.is_alive() for t in threading.enumerate() if t is w._thread)


def _spec(workdir, **kw):
    base = dict(method="loading_probe", dataset="synthetic", fold=1, workdir=str(workdir), progress=False,
                checkpoint_every_s=1e-9, max_episodes=6)
    return BenchSpec(**{**base, **kw})


def test_same_record_for_any_worker_count_and_after_resume(synthetic, tmp_path, monkeypatch):
    STOP.update(at=None, calls=0)
    recs = {w: run(_spec(tmp_path / f"w{w}", workers=w), log=lambda m: None)[0] for w in (0, 1, 2)}
    assert recs[0]["metrics"] == recs[1]["metrics"] == recs[2]["metrics"]
    with monkeypatch.context() as mp:  # every map measured on the measuring threads, several at once
        mp.setattr(runner_module, "SPLIT_PIXELS", 1)
        for w in (1, 2):
            pooled = run(_spec(tmp_path / f"pool{w}", workers=w), log=lambda m: None)[0]
            assert pooled["metrics"] == recs[0]["metrics"]
    assert recs[0]["metrics"]["n_queries"] == 6
    STOP.update(at=4, calls=0)
    with pytest.raises(KeyboardInterrupt):
        run(_spec(tmp_path / "resumed", workers=2), log=lambda m: None)
    STOP.update(at=None, calls=0)
    resumed = run(_spec(tmp_path / "resumed", workers=2), log=lambda m: None)[0]
    assert STOP["calls"] < 6  # finished episodes were not redone
    assert resumed["metrics"] == recs[0]["metrics"]


def test_runs_that_reuse_the_score_memory_of_the_run_before_equal_runs_alone(synthetic, tmp_path, monkeypatch):
    """Each run's exact scores fill one buffer sized ahead (the query sizes are known before
    decoding), in the memory of the run before."""
    STOP.update(at=None, calls=0)
    sizes, memory = [], []
    resize = ScoreBuffer._resize

    def sized(self, n):
        resize(self, n)
        sizes.append(n)
        memory.append(self.data.__array_interface__["data"][0])
    monkeypatch.setattr(ScoreBuffer, "_resize", sized)
    resized = {"resize": [192, 256], "crops": False}
    together = run(_spec(tmp_path / "together", runs=3, workers=2, protocol_options=resized), log=lambda m: None)
    assert sizes == [6 * 192 * 256] * 3 == [r["metrics"]["n_pixels"] for r in together]  # never regrown
    assert len(set(memory)) == 1  # runs 2 and 3 in the memory of run 1
    for i, rec in enumerate(together):
        alone = run(_spec(tmp_path / f"alone{i}", seed=i, workers=2, protocol_options=resized), log=lambda m: None)[0]
        assert rec["metrics"] == alone["metrics"] and rec["metrics"]["n_queries"] == 6


@register_method("reusing_probe")
class ReusingProbe(LoadingProbe):
    """The probe's maps, returned in one buffer that the method keeps, fills again for the next query
    and starts overwriting at once (``view``: the buffer is [1, H, W] and a view of it is returned)."""
    view = False

    def predict(self, state, query):
        buf = getattr(self, "buf", None)
        if buf is not None:
            buf[:] = 0.5
            time.sleep(0.002)  # the scorer may read the previous output meanwhile
        out = super().predict(state, query)
        shape = (1, *out.shape) if self.view else out.shape
        if buf is None or buf.shape != shape:
            self.buf = buf = np.empty(shape, np.float32)
        buf[...] = out
        return buf[0] if self.view else buf


@pytest.mark.parametrize("view", [False, True])
def test_a_method_that_reuses_its_output_buffer_is_scored_on_what_it_returned(synthetic, tmp_path, monkeypatch, view):
    """Outputs are scored in the background while the method computes the next query: an array the
    method keeps (or a view of one) is copied when it is returned, a fresh one is not."""
    STOP.update(at=None, calls=0)
    ref = run(_spec(tmp_path / "ref", workers=0), log=lambda m: None)[0]["metrics"]
    monkeypatch.setattr(ReusingProbe, "view", view)
    for w in (0, 2):
        got = run(_spec(tmp_path / f"reuse{w}", method="reusing_probe", workers=w), log=lambda m: None)[0]["metrics"]
        assert got == ref


def test_host_array_copies_what_the_method_still_refers_to():
    kept = np.zeros((4, 5), np.float32)
    pred = kept
    assert host_array(pred) is not kept and np.array_equal(host_array(pred), kept)  # the method keeps it
    pred = kept[1:]
    assert not np.shares_memory(host_array(pred), kept)  # a view of a kept array
    del kept
    pred = np.ones((4, 5), np.float32)
    assert host_array(pred) is pred  # a fresh array only the caller holds: handed over as it is


def test_probability_map_is_handed_over_without_a_second_copy():
    import torch

    from fdsbench.blocks.inference import probability_map

    kept = torch.linspace(-0.5, 1.5, 35).reshape(5, 7)  # the method's own tensor, values outside [0, 1] too
    pred = kept.numpy()
    assert host_array(pred) is not pred  # a tensor's .numpy() view: copied (its memory is the method's)
    maps = []
    for source in (kept[1:4], kept.to(torch.bfloat16)[1:4], kept.double().numpy()[1:4]):
        pred = probability_map(source)
        assert pred.dtype == np.float32 and pred.flags.c_contiguous and pred.flags.writeable
        ref = source.float().numpy() if isinstance(source, torch.Tensor) else source.astype(np.float32)
        assert np.array_equal(pred, np.clip(ref, 0, 1))
        assert host_array(pred) is pred  # nothing else refers to it
        maps.append(pred)
    before = maps[0].copy()
    kept.fill_(0.25)  # the method writes its tensor again: the map handed over from a view of it does not change
    assert np.array_equal(maps[0], before) and before.min() == 0 and before.max() == 1


@pytest.mark.parametrize("split_pixels", [None, 1])
def test_an_output_outside_0_1_stops_the_run_naming_method_and_query(synthetic, tmp_path, monkeypatch, split_pixels):
    """The contract's check holds whether a map is measured by the scorer or on the measuring threads."""
    if split_pixels:
        monkeypatch.setattr(runner_module, "SPLIT_PIXELS", split_pixels)
    STOP.update(at=None, calls=0, bad=3)
    try:
        with pytest.raises(FdsError, match=r"method 'loading_probe' returned values in \[.*, 1\.5\] for query "):
            run(_spec(tmp_path, workers=2), log=lambda m: None)
    finally:
        STOP.update(bad=None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority is Linux's")
def test_decoding_measuring_and_scoring_threads_yield_the_cores_to_the_method(synthetic, tmp_path, monkeypatch):
    """Every thread the harness runs beside the method is niced below the method's thread."""
    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapped(*a, **k):
            seen.setdefault(threading.current_thread().name.rsplit("_", 1)[0], set()).add(nice())
            return real(*a, **k)
        monkeypatch.setattr(owner, name, wrapped)
    spy(EpisodeLoader, "gt")  # the loading threads
    spy(runner_module, "validate_prediction")  # the measuring threads
    spy(MeterSet, "add")  # the scorer thread
    monkeypatch.setattr(runner_module, "SPLIT_PIXELS", 1)  # every map measured on the measuring threads
    STOP.update(at=None, calls=0)
    main_nice = nice()
    run(_spec(tmp_path, workers=2, max_episodes=2), log=lambda m: None)
    assert seen.keys() == {"fdsbench-load", "fdsbench-measure", "fdsbench-score"}
    assert all(v == {min(19, main_nice + BACKGROUND_NICE)} for v in seen.values()) and nice() == main_nice


def test_binned_scores_from_the_cli(synthetic, tmp_path, capsys):
    args = ["bench", "--method", "proto", "--preset", "test", "--fold", "1", "--max-episodes", "3",
            "--no-progress", "--workdir", str(tmp_path), "--scores", "binned", "--workers", "1"]
    assert main(args) == 0
    rec = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert rec["metrics"]["score_mode"] == "binned" and rec["metrics"]["bins"] > 0
    assert rec["metrics"]["pixel_auroc_error_bound"] > 0


def test_decoded_images_and_masks_persist_on_disk_for_the_next_process(tmp_path, monkeypatch, synthetic):
    """A later process (a new adapter: empty memory cache) reads the decoded pixels from disk,
    equal to decoding; other dataset content, a damaged entry or FDSBENCH_DECODED_CACHE=off decode."""
    import fdsbench.loading as loading
    from fdsbench.episodes import get_manifest, resolve_protocol
    from fdsbench.registry import get_dataset

    monkeypatch.setenv("FDSBENCH_DECODED_CACHE_DIR", str(tmp_path / "decoded"))
    proto = resolve_protocol("fss", 1, {"resize": [48, 40], "crops": False}, synthetic.protocol_defaults)
    m = get_manifest(tmp_path, synthetic, 1, 1, 0, proto)
    ep = m.episodes[0]
    ids = [ep.supports[0].id, *ep.queries]
    first = EpisodeLoader(get_dataset("synthetic")(None), LoadingProbe, m)
    images = {i: first.image(i) for i in ids}
    masks = {i: first._mask(i, ep.defect_class) for i in ids}
    assert images[ids[0]].shape == (48, 40, 3)
    assert len(list((tmp_path / "decoded").glob("*/*.npy"))) == 2 * len(ids)

    decode, load_mask = loading.decode_image, type(synthetic).load_mask
    calls = []
    monkeypatch.setattr(loading, "decode_image", lambda p: calls.append(p) or decode(p))
    later = EpisodeLoader(get_dataset("synthetic")(None), LoadingProbe, m)
    monkeypatch.setattr(type(synthetic), "load_mask", lambda *a, **k: calls.append(a) or load_mask(*a, **k))
    for i in ids:
        assert np.array_equal(later.image(i), images[i]) and later.image(i).flags.writeable
        assert np.array_equal(later._mask(i, ep.defect_class), masks[i])
    assert calls == []  # nothing decoded
    from fdsbench.metrics.meterset import _immutable
    assert _immutable(later._mask(ids[0], ep.defect_class))  # its regions are labelled once

    other = get_dataset("synthetic")(None)
    other.__dict__["dataset_hash"] = "0" * 16  # another content (an edited file): other keys
    assert np.array_equal(EpisodeLoader(other, LoadingProbe, m).image(ids[0]), images[ids[0]]) and len(calls) == 1
    for f in (tmp_path / "decoded").glob("*/*.npy"):
        f.write_bytes(f.read_bytes()[:40])  # cut short
    assert np.array_equal(EpisodeLoader(get_dataset("synthetic")(None), LoadingProbe, m).image(ids[1]), images[ids[1]])
    assert len(calls) == 2

    monkeypatch.setenv("FDSBENCH_DECODED_CACHE", "off")
    monkeypatch.setenv("FDSBENCH_DECODED_CACHE_DIR", str(tmp_path / "off"))
    assert EpisodeLoader(get_dataset("synthetic")(None), LoadingProbe, m).disk is None
    EpisodeLoader(get_dataset("synthetic")(None), LoadingProbe, m).image(ids[0])
    assert not (tmp_path / "off").exists()
