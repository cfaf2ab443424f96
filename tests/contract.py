"""The shared method contract: every registered method must pass these checks.

``tests/test_contract.py`` runs them for every method in the registry automatically; a plugin's own
test can call :func:`check_method` for its method. Methods run with their ``test`` preset (tiny,
random weights)."""
from __future__ import annotations

import numpy as np

from fdsbench.config import build_config
from fdsbench.episodes import generate, resolve_protocol
from fdsbench.runner import EpisodeLoader, validate_prediction
from fdsbench.episodes import Manifest
from fdsbench.seeding import seed_everything
from fdsbench.types import Shot, SupportSet

CROP = 96  # small support crops keep the contract fast


def make_method(cls, device="cpu"):
    preset = "test" if "test" in cls.presets else cls.default_preset
    return cls(build_config(cls.Config, cls.presets, preset), device=device)


def episodes(ds, shot: int, protocol: str = "fss") -> tuple[Manifest, EpisodeLoader]:
    proto = resolve_protocol(protocol, shot, {"crop_size": CROP} if protocol == "fss" else {})
    body = generate(ds, 0, shot, 0, proto)
    return Manifest(body), None


def small_episode(ds, method_cls, shot: int, protocol: str = "fss"):
    """(support, [queries], loader) of the first usable episode of fold 0, smallest images first."""
    m, _ = episodes(ds, shot, protocol)
    loader = EpisodeLoader(ds, method_cls, m)
    area = lambda e: sum(np.prod(ds.image_size(i)) for i in (*[s.id for s in e.supports], *e.queries[:1]))  # noqa
    ep = min(m.episodes[:12], key=area)
    return loader.support(ep), [loader.query(q) for q in ep.queries[:1]], loader, ep


def run_once(method, support, queries, seed=0):
    seed_everything(seed)
    state = method.prepare(support)
    return [validate_prediction(method.predict(state, q), q, method.name)[0] for q in queries]


def check_method(cls, ds) -> None:
    """Output shape/range/dtype, no NaN, determinism under a seed, K=1 and K=5, FAD if declared,
    fit + strict state round trip for meta-trained methods."""
    method = make_method(cls)
    method.workdir = None
    if cls.requires.training:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            seed_everything(0)
            method.fit(ds.train_source(0, 0), Path(tmp))
        clone = make_method(cls)
        clone.load_state_dict(method.state_dict())
    for shot in (1, 5):
        support, queries, loader, ep = small_episode(ds, cls, shot, getattr(cls, "default_protocol", "fss"))
        assert len(support.shots) == shot
        first = run_once(method, support, queries, seed=support.seed)
        again = run_once(method, support, queries, seed=support.seed)
        for a, b, q in zip(first, again, queries):
            assert a.shape == q.size
            assert a.dtype == np.float32
            assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"{cls.name} is not deterministic under a seed")
        if cls.requires.training:
            for a, b in zip(first, run_once(clone, support, queries, seed=support.seed)):
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{cls.name}: state_dict round trip")
    if cls.requires.fad:
        support, queries, loader, ep = small_episode(ds, cls, 1)
        empty = SupportSet(ep.object + "/*", [Shot(s.id, s.image, np.zeros_like(s.mask), None) for s in support.shots],
                           support.seed, support.normal_pool, ep.index)
        assert empty.is_normal
        for a, q in zip(run_once(method, empty, queries, seed=1), queries):
            assert a.shape == q.size and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
