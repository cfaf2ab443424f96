"""Mergeable state: sharded / reordered / resumed runs give bit-identical metrics."""
import json
import pickle

import numpy as np
import pytest

from fdsbench.errors import FdsError
from fdsbench.metrics import MeterSet
from fdsbench.metrics.meterset import state_to_arrays
from fdsbench.metrics.scores import ScoreBuffer


def queries(seed=0, n=18):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 24, 28
        g = np.zeros((h, w), bool)
        if i % 4:
            y, x = rng.integers(0, 16, 2)
            g[y:y + rng.integers(1, 8), x:x + rng.integers(1, 10)] = True
        p = np.clip(rng.random((h, w)) * 0.7 + 0.35 * g, 0, 1).astype(np.float32)
        out.append((p, g, ["a/x", "a/y", "b/*"][i % 3], i // 3, f"img{i:03d}"))
    return out


def run(qs, **kw):
    m = MeterSet(**kw)
    for p, g, c, e, q in qs:
        m.update(p, g, class_key=c, episode=e, query_id=q)
    return m


@pytest.mark.parametrize("pcs", [False, True])
@pytest.mark.parametrize("mode", ["exact", "binned", "off"])
def test_shard_reorder_resume_bit_identical(mode, pcs):
    qs = queries()
    kw = dict(score_mode=mode, bins=64, per_class_scores=pcs)
    ref = run(qs, **kw).compute()
    json.dumps(ref)  # JSON-able
    rng = np.random.default_rng(1)
    for trial in range(3):
        perm = rng.permutation(len(qs))
        shards = np.array_split(perm, 1 + trial * 2)
        parts = [run([qs[i] for i in s], **kw) for s in shards]
        # each shard goes through a pickled state dict, as from another process / a checkpoint
        total = MeterSet(**kw)
        for p in reversed(parts):
            other = MeterSet(**kw)
            other.load_state_dict(pickle.loads(pickle.dumps(p.state_dict())))
            total.merge(other)
        assert total.compute() == ref
        assert json.dumps(total.compute(), sort_keys=True) == json.dumps(ref, sort_keys=True)


@pytest.mark.parametrize("mode", ["exact", "binned", "off"])
def test_measured_on_threads_and_added_in_order_equals_update(mode):
    """The runner measures queries on several threads at once and adds them in order: the state
    and the metrics equal those of ``update`` one query after the other."""
    from concurrent.futures import ThreadPoolExecutor

    qs = queries(seed=5)
    kw = dict(score_mode=mode, bins=64, per_class_scores=True)
    ref = run(qs, **kw)
    m = MeterSet(**kw)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(m.measure, p, g, q, None, False) for p, g, c, e, q in qs]
        assert len(m) == 0  # measuring changes nothing
        for f, (p, g, c, e, q) in zip(futures, qs):
            m.add(f.result(), class_key=c, episode=e, query_id=q)
    assert m.compute() == ref.compute()
    a, b = state_to_arrays(m.state_dict()), state_to_arrays(ref.state_dict())
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    p, g, c, e, q = qs[0]
    with pytest.raises(FdsError, match="scored twice"):
        m.add(m.measure(p, g, q), class_key=c, episode=e, query_id=q)


def test_exact_mode_copies_a_map_when_it_is_added():
    qs = queries(1, n=6)
    ref = run(qs).compute()
    m = MeterSet()
    for p, g, c, e, q in qs:
        p = p.copy()
        measured = m.measure(p, g, q)
        assert np.shares_memory(measured.pixels[0], p)  # measuring copies nothing
        m.add(measured, class_key=c, episode=e, query_id=q)
        p[:] = 0.0  # the caller reuses its buffer
    assert m.compute() == ref


@pytest.mark.parametrize("pcs", [False, True])
def test_consuming_compute_gives_the_same_numbers_and_spends_the_meter(pcs):
    qs = queries(3)
    ref = run(qs, per_class_scores=pcs).compute()
    m = run(qs, per_class_scores=pcs)
    assert m.compute() == ref and m.compute() == ref  # a plain compute leaves the state as it was
    assert m.compute(consume=True) == ref
    p, g, c, e, q = queries(4, n=1)[0]
    for call in (m.compute, m.state_dict, lambda: m.update(p, g, class_key=c, episode=99, query_id=q),
                 lambda: MeterSet(per_class_scores=pcs).merge(m), lambda: m.reserve(10)):
        with pytest.raises(FdsError, match="consume=True"):
            call()


def test_reserved_score_buffer_is_filled_without_regrowing_and_widens_for_float64():
    qs = queries(5, n=8)
    ref = run(qs).compute()
    m = MeterSet()
    m.reserve(sum(p.size for p, *_ in qs))
    buffer = m._scores.data
    for p, g, c, e, q in qs:
        m.update(p, g, class_key=c, episode=e, query_id=q)
    assert m._scores.data is buffer and m._scores.size == buffer.size
    assert m.compute() == ref
    # a float64 map widens every stored score losslessly: the same as storing each map as it came
    wide = [(p.astype(np.float64) * (1 - 1e-12 if i % 2 else 1.0), *rest) for i, (p, *rest) in enumerate(qs)]
    mixed = run([w if i % 3 == 1 else q for i, (w, q) in enumerate(zip(wide, qs))])
    assert mixed._scores.data.dtype == np.float64
    both = MeterSet()
    for part in (run([w for i, w in enumerate(wide) if i % 3 == 1]), run([q for i, q in enumerate(qs) if i % 3 != 1])):
        other = MeterSet()
        other.load_state_dict(part.state_dict())
        both.merge(other)
    assert mixed.compute() == both.compute()


def test_state_dict_is_plain_and_round_trips():
    m = run(queries(2))
    s = m.state_dict()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (int, float, str, bool, np.ndarray))
    assert plain(s)
    m2 = MeterSet()
    m2.load_state_dict(s)
    s2 = m2.state_dict()
    for k in s["pixels"]:
        assert np.array_equal(s["pixels"][k], s2["pixels"][k])
    assert m2.compute() == m.compute()


def test_merge_refuses_duplicates_and_config_mismatch():
    qs = queries()
    a, b = run(qs[:10]), run(qs[5:])
    with pytest.raises(FdsError, match="both"):
        a.merge(b)
    with pytest.raises(FdsError, match="threshold"):
        run(qs[:2]).merge(run(qs[2:4], threshold=0.4))
    with pytest.raises(FdsError, match="score_mode"):
        MeterSet().load_state_dict(run(qs[:2], score_mode="binned").state_dict())


@pytest.mark.parametrize("kw", [dict(score_mode="exact"), dict(score_mode="binned", per_class_scores=True),
                                dict(score_mode="binned", logits=True, image_score="area"),
                                dict(score_mode="exact", image_score="top1%")])
def test_large_maps_scored_in_halves_give_the_same_numbers(kw, monkeypatch):
    """Maps of SPLIT_PIXELS and more are counted and binned in two halves on two threads; with the
    split moved out of reach the same queries give equal metrics (== on every value)."""
    import fdsbench.metrics.meterset as ms

    rng = np.random.default_rng(3)
    qs = []
    for i in range(3):
        g = np.zeros((640, 900), bool)  # 576,000 px >= SPLIT_PIXELS
        g[300 + 10 * i:340, 400:470 + i] = True  # a region across the halves' border (row 320)
        g[5:9, 5:9] = i > 0
        p = np.clip(rng.random(g.shape) * 0.6 + 0.3 * g, 0, 1).astype(np.float32)
        if kw.get("logits"):
            p = (p - 0.5) * 20
        qs.append((p, g, "a/x" if i else "a/y", i, f"q{i}"))
    assert qs[0][0].size >= ms.SPLIT_PIXELS
    split = run(qs, **kw).compute()
    monkeypatch.setattr(ms, "SPLIT_PIXELS", 10 ** 12)
    whole = run(qs, **kw).compute()
    assert split == whole


def test_large_maps_are_scored_in_a_forked_child():
    """The helper thread of the split scoring does not survive a fork: a child gets its own."""
    import multiprocessing as mp

    import fdsbench.metrics.meterset as ms

    g = np.zeros((800, 800), bool)
    g[100:120, 300:340] = True
    p = np.where(g, 0.9, 0.2).astype(np.float32)
    parent = run([(p, g, "a/x", 0, "q")]).compute()  # starts the parent's helper thread
    assert p.size >= ms.SPLIT_PIXELS
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_score_one, (p, g)).get(timeout=60)
    assert child == parent


def _score_one(p, g):
    return run([(p, g, "a/x", 0, "q")]).compute()


def test_score_memory_is_handed_on_only_inside_reusing():
    def filled(n):
        b = ScoreBuffer()
        b.reserve(n)
        b.append(np.linspace(0, 1, n, dtype=np.float32))
        return b
    first = filled(100)
    memory = first.data
    first.release()
    assert not np.shares_memory(filled(50).data, memory)  # outside reusing: back to the system
    with ScoreBuffer.reusing():
        ScoreBuffer().release()  # a binned or empty meter's buffer: nothing to hand on
        assert ScoreBuffer._spare is None
        first = filled(100)
        memory = first.data
        first.release()
        assert first.size == 0
        wide = ScoreBuffer()
        wide.append(np.zeros(1))  # float64 from now on
        wide.reserve(50)
        assert not np.shares_memory(wide.data, memory)  # another dtype: not taken
        second = filled(80)
        assert np.shares_memory(second.data, memory)
        assert np.array_equal(second.stored(), np.linspace(0, 1, 80, dtype=np.float32))
        assert not np.shares_memory(filled(80).data, memory)  # taken once, not twice
        second.release()
    assert ScoreBuffer._spare is None  # nothing is held after the block
