"""Timing protocol: warm-up discarded, prepare/predict separate, FPS from predict, mergeable."""
import pickle
import time

import numpy as np
import pytest

from fdsbench.errors import FdsError
from fdsbench.timing import TimingMeter, latency_stats


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def feed(tm, clock, prep, pred):
    for d in prep:
        with tm.prepare():
            clock.t += d
    for d in pred:
        with tm.predict():
            clock.t += d


def test_warmup_fps_and_percentiles():
    clock = FakeClock()
    tm = TimingMeter("cpu", warmup=2, clock=clock)
    feed(tm, clock, [5.0, 1.0, 1.0], [9.0, 9.0, 0.1, 0.2, 0.3, 0.4])
    r = tm.compute()
    assert r["predict"]["n"] == 4 and r["prepare"]["n"] == 1
    assert r["warmup_calls"] == {"prepare": 2, "predict": 2}
    assert r["prepare"]["warmup_total_s"] == pytest.approx(6.0) and not r["prepare"]["includes_warmup"]
    assert r["fps"] == pytest.approx(4 / 1.0)
    assert r["predict"]["p50_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 50))
    assert r["predict"]["p95_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 95))
    assert r["prepare"]["mean_s"] == pytest.approx(1.0)  # support time reported, not in FPS
    assert r["batch_size"] == 1 and r["precision"] == "fp32"
    assert r["peak_memory_bytes"] > 0
    env = r["environment"]
    assert env["torch"] and env["cpu_count"] >= 1 and env["device_name"]


def test_exception_is_not_timed():
    clock = FakeClock()
    tm = TimingMeter("cpu", warmup=0, clock=clock)
    with pytest.raises(ValueError):
        with tm.predict():
            clock.t += 1
            raise ValueError("boom")
    assert tm.compute(environment=False)["predict"]["n"] == 0
    assert tm.compute(environment=False)["fps"] is None


def test_merge_is_order_independent():
    rng = np.random.default_rng(0)
    lat = rng.random(30).tolist()
    parts = []
    for chunk in np.array_split(np.arange(30), 3):
        clock = FakeClock()
        tm = TimingMeter("cpu", warmup=1, clock=clock)
        feed(tm, clock, [0.5, 0.25], [100.0] + [lat[i] for i in chunk])  # 100 s = warm-up
        parts.append(tm)
    a = TimingMeter("cpu", warmup=1)
    for p in parts:
        a.merge(p)
    b = TimingMeter("cpu", warmup=1)
    for p in reversed(parts):
        b2 = TimingMeter("cpu", warmup=1)
        b2.load_state_dict(pickle.loads(pickle.dumps(p.state_dict())))
        b.merge(b2)
    ra, rb = a.compute(environment=False), b.compute(environment=False)
    assert ra["predict"] == rb["predict"] and ra["fps"] == rb["fps"]
    assert ra["predict"]["n"] == 30 and ra["warmup_calls"]["predict"] == 3
    assert ra["fps"] == pytest.approx(30 / sum(lat))
    with pytest.raises(FdsError, match="precision"):
        a.merge(TimingMeter("cpu", precision="bf16"))


def test_real_clock_measures_work():
    tm = TimingMeter("cpu", warmup=1)
    for _ in range(4):
        with tm.predict():
            time.sleep(0.01)
    r = tm.compute(environment=False)
    assert r["predict"]["n"] == 3 and 0.009 < r["predict"]["p50_s"] < 0.5


def test_bad_arguments():
    with pytest.raises(FdsError, match="precision"):
        TimingMeter("cpu", precision="int8")
    with pytest.raises(FdsError, match="warmup"):
        TimingMeter("cpu", warmup=-1)
    assert latency_stats([])["mean_s"] is None


def test_cuda_synchronised_timing():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(FdsError, match="CUDA is not available"):
            TimingMeter("cuda")
        pytest.skip("no CUDA device here")
    tm = TimingMeter("cuda", warmup=1)
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        with tm.predict():
            y = x @ x
    r = tm.compute()
    assert r["peak_memory_bytes"] >= x.numel() * 4 and r["environment"]["cuda"]
    assert r["device_sync"] == "torch.cuda.synchronize" and y.shape == x.shape


def test_resumed_process_warms_up_again():
    clock = FakeClock()
    tm = TimingMeter("cpu", warmup=1, clock=clock)
    feed(tm, clock, [], [5.0, 0.1, 0.1])
    resumed = TimingMeter("cpu", warmup=1, clock=clock)
    resumed.load_state_dict(tm.state_dict())
    feed(resumed, clock, [], [7.0, 0.1])  # 7 s: cold start of the new process
    r = resumed.compute(environment=False)
    assert r["predict"]["n"] == 3 and r["warmup_calls"]["predict"] == 2
    assert r["predict"]["max_s"] == pytest.approx(0.1)


def test_warmup_never_hides_the_only_call_of_a_kind():
    """Per-support fitting: one prepare per object. With warm-up 1 it is the warm-up call, and it
    must still be reported (flagged), not dropped."""
    clock = FakeClock()
    tm = TimingMeter("cpu", warmup=1, clock=clock)
    feed(tm, clock, [30.0], [2.0, 0.5, 0.5])
    r = tm.compute(environment=False)
    assert r["prepare"]["n"] == 1 and r["prepare"]["total_s"] == pytest.approx(30.0)
    assert r["prepare"]["includes_warmup"] is True
    assert r["predict"]["n"] == 2 and not r["predict"]["includes_warmup"]
    assert r["predict"]["warmup_total_s"] == pytest.approx(2.0)


def test_method_precision_labels_map_to_timer_precisions():
    from fdsbench.runner import BenchSpec, _make_timer
    from fdsbench.timing import precision_kind

    assert [precision_kind(p) for p in ("fp32", "bf16-autocast", "bf16-autocast+tf32", "fp16")] == \
        ["fp32", "bf16", "bf16", "fp16"]
    assert _make_timer(BenchSpec(precision="bf16-autocast")).precision == "bf16"
