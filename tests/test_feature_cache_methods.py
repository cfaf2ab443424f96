"""SOFS, PFENet and HDMNet through the shared frozen-feature cache: outputs equal (``==``) without the
cache, with a cache another method filled, and from the disk layer in a fresh store; identical
inputs hit across methods; training never goes through the cache; the run record says it was used."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fdsbench.blocks import features as FC
from fdsbench.config import build_config
from fdsbench.registry import get_method
from contract import small_episode

METHODS = ("sofs", "pfenet", "hdmnet")


def build(name, preset="test", **overrides):
    cls = get_method(name)
    return cls(build_config(cls.Config, cls.presets, preset, overrides), device="cpu")


@pytest.fixture(scope="module")
def episode(synthetic):
    support, queries, _, _ = small_episode(synthetic, get_method("sofs"), 1)
    return support, queries


@pytest.fixture(autouse=True)
def _store_off():
    FC.disable_shared()
    yield
    FC.disable_shared()


def outputs(method, episode):
    support, queries = episode
    state = method.prepare(support)
    return [method.predict(state, q) for q in queries]


def cache_of(method):
    return method.model.feature_cache


def test_outputs_bit_identical_with_and_without_the_cache(episode, tmp_path):
    plain = {n: outputs(build(n), episode) for n in METHODS}  # store off: the backbone itself
    FC.enable_shared(tmp_path, max_bytes=1 << 30)
    for order in (METHODS, METHODS[::-1]):  # each method after the others filled the cache
        for n in order:
            m = build(n)
            got = outputs(m, episode)
            assert all(np.array_equal(a, b) for a, b in zip(plain[n], got)), n
    FC.shared_store().clear()  # memory dropped: everything comes back from the disk layer
    for n in METHODS:
        m = build(n)
        got = outputs(m, episode)
        s = cache_of(m).stats()
        assert s["forward_calls"] == 0 and (n != "sofs" or s["disk_hits"] > 0), (n, s)
        assert all(np.array_equal(a, b) for a, b in zip(plain[n], got)), n


def test_identical_inputs_hit_across_methods(episode):
    FC.enable_shared(None)
    sofs, hdm = build("sofs"), build("hdmnet")
    outputs(sofs, episode)
    first = cache_of(sofs).stats()
    assert first["forward_calls"] > 0 and first["misses"] == first["forward_calls"]
    outputs(hdm, episode)  # HDMNet + NR: the same support crops and windows, batched alike
    s = cache_of(hdm).stats()
    assert s["forward_calls"] == 0 and s["hits"] == first["misses"] + first["hits"]
    # PFENet's test preset resizes whole images (the plain protocol): other inputs, no hit with SOFS
    pf = build("pfenet")
    outputs(pf, episode)
    assert cache_of(pf).stats()["hits"] == 0
    # PFENet + NR on SOFS's window (its default window is image_size, SOFS's the support crop size):
    # every window batch hits; its supports are encoded one view per call (the official per-shot
    # loop), so they are other batches and miss
    pf_nr = build("pfenet", test_path="sliding", nr=True, window=episode[0].crop_size)
    outputs(pf_nr, episode)
    s = cache_of(pf_nr).stats()
    views = len(pf_nr.support_views(episode[0]))
    assert s["hits"] == first["misses"] - 1 and s["forward_calls"] == views == 4


def test_training_forward_bypasses_the_cache(episode):
    FC.enable_shared(None)
    m = build("sofs")
    x = torch.zeros(2, 3, 64, 64)
    m.model.train()
    m.model.encode(x)
    assert cache_of(m).stats()["forward_calls"] == 0 and FC.shared_store().stats()["entries"] == 0
    m.model.eval()
    m.model.encode(x)
    assert cache_of(m).stats()["forward_calls"] == 1 and FC.shared_store().stats()["entries"] == 2


def test_checkpoint_keys_unchanged_and_recorded(tmp_path):
    for n in METHODS:
        m = build(n)
        assert not any("feature_cache" in k for k in m.model.state_dict()), n
        rec = FC.share_features(m, tmp_path / "features")
        assert rec["used"] is True and rec["encoders"] == ["resnet18"], (n, rec)
    official = build("hdmnet", "test_official", base_classes=2)
    assert FC.share_features(official, None)["used"] is False  # its PSPNet encoder is not a shared tap


def test_bench_records_the_cache_and_keeps_the_run_identity(synthetic, tmp_path, monkeypatch):
    from fdsbench.runner import BenchSpec, run

    spec = dict(method="sofs", preset="test", dataset="synthetic", fold=0, progress=False, max_episodes=2,
                workers=0, workdir=str(tmp_path))
    on = run(BenchSpec(**spec), log=lambda m: None)[0]
    assert on["speed_options"]["feature_cache"]["used"] is True
    assert list((tmp_path / "cache" / "features").glob("*/*.pt"))  # the workdir's shared disk layer
    monkeypatch.setenv("FDSBENCH_FEATURE_CACHE", "off")
    off = run(BenchSpec(force=True, **spec), log=lambda m: None)[0]
    assert off["speed_options"]["feature_cache"]["used"] is False
    assert on["run_id"] == off["run_id"] and on["metrics"] == off["metrics"]  # not identity: no number changes
