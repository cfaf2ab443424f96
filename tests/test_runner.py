import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fdsbench.errors import FdsError
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.runner import BenchSpec, run
from fdsbench.types import Requirements

CALLS = {"prepare": 0, "predict": 0, "fail_at": None}


@register_method("flaky_mean")
class FlakyMean(Method):
    """Test method: mean-colour distance; can be made to die mid-run (CALLS['fail_at'])."""

    requires = Requirements()

    @dataclass
    class Config:
        scale: float = 60.0

    def prepare(self, support):
        CALLS["prepare"] += 1
        return np.concatenate([s.image[s.mask] for s in support.shots]).mean(0)

    def predict(self, state, query):
        CALLS["predict"] += 1
        if CALLS["fail_at"] is not None and CALLS["predict"] >= CALLS["fail_at"]:
            raise KeyboardInterrupt
        d = np.sqrt(((query.image.astype(np.float32) - state) ** 2).sum(-1))
        return np.exp(-d / self.config.scale).astype(np.float32)


def spec(workdir, **kw):
    base = dict(method="flaky_mean", dataset="synthetic", fold=1, workdir=str(workdir), progress=False,
                checkpoint_every_s=0.0, max_episodes=12)
    return BenchSpec(**{**base, **kw})


def test_interrupted_run_resumes_with_identical_numbers(synthetic, tmp_path):
    CALLS.update(prepare=0, predict=0, fail_at=None)
    reference = run(spec(tmp_path / "ref"))[0]
    assert CALLS["prepare"] == 12

    CALLS.update(prepare=0, predict=0, fail_at=6)
    with pytest.raises(KeyboardInterrupt):
        run(spec(tmp_path / "resume"))
    partial = list((tmp_path / "resume" / "runs").glob("*.partial/state.json"))
    assert len(partial) == 1
    CALLS.update(prepare=0, predict=0, fail_at=None)
    resumed = run(spec(tmp_path / "resume"))[0]
    assert CALLS["prepare"] == 12 - 5  # the 5 finished episodes are not recomputed
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["manifest_hash"] == reference["manifest_hash"]
    assert not list((tmp_path / "resume" / "runs").glob("*.partial*"))


def test_finished_run_is_reused_and_force_recomputes_identically(synthetic, tmp_path):
    CALLS.update(prepare=0, predict=0, fail_at=None)
    first = run(spec(tmp_path))[0]
    n = CALLS["prepare"]
    again = run(spec(tmp_path))[0]
    assert CALLS["prepare"] == n and again == first
    forced = run(spec(tmp_path, force=True))[0]
    assert CALLS["prepare"] == 2 * n
    assert forced["metrics"] == first["metrics"]


def test_run_record_contents(synthetic, tmp_path):
    rec = run(spec(tmp_path, runs=2, seed=3))
    assert [r["seed"] for r in rec] == [3, 4] and rec[0]["manifest_hash"] != rec[1]["manifest_hash"]
    r = json.loads((tmp_path / "runs" / f"{rec[0]['run_id']}.json").read_text())
    for key in ("config", "config_hash", "weights", "dataset_hash", "manifest_hash", "seed", "environment",
                "device", "precision", "metrics", "timing", "protocol"):
        assert key in r, key
    assert r["environment"]["torch"] and r["metrics"]["per_class"]
    assert 0 <= r["metrics"]["miou"] <= 1 and r["timing"]["fps"] > 0


def test_requirements_are_enforced(synthetic, tmp_path):
    @register_method("needs_normals")
    class NeedsNormals(Method):
        requires = Requirements(normal_pool=True)

        def prepare(self, support):
            assert len(support.normal_pool) > 0
            return support.normal_pool[0].mean()

        def predict(self, state, query):
            return np.zeros(query.size, np.float32)

    rec = run(spec(tmp_path, method="needs_normals", max_episodes=2))[0]
    assert rec["episodes"] == 2
    with pytest.raises(FdsError, match="few-shot anomaly detection"):
        run(spec(tmp_path, protocol="fad"))


def test_bad_prediction_is_named(synthetic, tmp_path):
    @register_method("bad_output")
    class Bad(Method):
        def prepare(self, support):
            return None

        def predict(self, state, query):
            return np.full(query.size, 2.0, np.float32)

    with pytest.raises(FdsError, match=r"bad_output.*\[0, 1\]"):
        run(spec(tmp_path, method="bad_output", max_episodes=1))


REPO = Path(__file__).resolve().parents[1]


def _cli(args, workdir, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fdsbench.cli", "bench", "--workdir", str(workdir),
                             "--no-progress", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


SLOW_PLUGIN = """
import time
import numpy as np
from fdsbench.method import Method
from fdsbench.registry import register_method


@register_method("slow_mean")
class SlowMean(Method):
    def prepare(self, support):
        return np.concatenate([s.image[s.mask] for s in support.shots]).mean(0)

    def predict(self, state, query):
        time.sleep(0.4)  # keeps the run alive long enough to be killed mid-way on any machine
        d = np.sqrt(((query.image.astype(np.float32) - state) ** 2).sum(-1))
        return np.exp(-d / 60.0).astype(np.float32)
"""


def test_killed_cli_run_resumes(synthetic, tmp_path):
    """SIGKILL mid-run (no chance to clean up), then the same command resumes and matches a clean run."""
    plugin = tmp_path / "slow_plugin.py"
    plugin.write_text(SLOW_PLUGIN)
    args = ["--method", "slow_mean", "--plugin", str(plugin), "--fold", "2", "--max-episodes", "16",
            "--checkpoint-every", "0"]
    p = _cli(args, tmp_path / "a")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not list((tmp_path / "a" / "runs").glob("*.partial/state.json")):
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed: " + p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list((tmp_path / "a" / "runs").glob("*.partial/state.json")), "no progress was saved before the kill"
    out, err = _cli(args, tmp_path / "a").communicate(timeout=300)
    assert "resuming" in err, err
    clean_out, clean_err = _cli(args, tmp_path / "b").communicate(timeout=300)
    rec_a = json.loads(next((tmp_path / "a" / "runs").glob("*.json")).read_text())
    rec_b = json.loads(next((tmp_path / "b" / "runs").glob("*.json")).read_text())
    assert rec_a["episodes"] == rec_b["episodes"] == 16
    assert rec_a["metrics"] == rec_b["metrics"]


def test_folder_dataset_with_predict_only_queries(tmp_path):
    """User folders: supports only from support/, a query with a mask is scored, the others are
    predicted and saved as PNG."""
    from fdsbench.datasets._testing import make_folder

    root = make_folder(tmp_path / "data", h=40, w=48)
    rec = run(BenchSpec(method="flaky_mean", dataset="folder", data_root=str(root), workdir=str(tmp_path / "w"),
                        progress=False))[0]
    assert rec["episodes"] == 3 and rec["metrics"]["n_queries"] == 1
    saved = sorted(p.name for p in (tmp_path / "w" / "predictions" / rec["run_id"]).glob("*.png"))
    assert len(saved) == 2


FITS = []


@register_method("fit_recorder")
class FitRecorder(FlakyMean):
    """Test method: 'meta-trains' by remembering which objects it saw."""

    requires = Requirements(training=True)

    def fit(self, train, workdir):
        self.seen = sorted({c.split("/", 1)[0] for c in train.classes})
        FITS.append((train.dataset, train.fold, self.seen))

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_cross_dataset_training(synthetic, tmp_path):
    """--train-dataset: meta-train on all objects of another dataset (SOFS domain shift), recorded
    and labelled as such; training on the test fold's own objects is refused."""
    from fdsbench.datasets._testing import make_folder
    from fdsbench.leaderboard import label

    FITS.clear()
    root = make_folder(tmp_path / "data", h=40, w=48)
    s = BenchSpec(method="fit_recorder", dataset="folder", data_root=str(root), workdir=str(tmp_path / "w"),
                  progress=False, train_dataset="synthetic")
    rec = run(s)[0]
    assert FITS == [("synthetic", -1, sorted(synthetic.index.objects))]
    assert rec["trained_on"]["dataset"] == "synthetic" and rec["trained_on"]["objects"] == "all"
    assert rec["run_id"].endswith("_from-synthetic") and "trained on synthetic" in label(rec)
    run(BenchSpec(**{**s.__dict__, "force": True}))
    assert len(FITS) == 1  # the fitted checkpoint is reused

    with pytest.raises(FdsError, match="would train on test objects of fold 0"):
        run(spec(tmp_path / "w2", method="fit_recorder", fold=0, train_dataset="synthetic"))
    with pytest.raises(FdsError, match="would train on test objects of fold 0"):
        run(spec(tmp_path / "w2", method="fit_recorder", fold=0, train_dataset="synthetic", train_fold=1))
    rec = run(spec(tmp_path / "w2", method="fit_recorder", fold=0))[0]  # the usual base folds
    assert FITS[-1][:2] == ("synthetic", 0) and "trained on" not in label(rec)
    assert rec["trained_on"]["objects"] == "base folds"
    with pytest.raises(FdsError, match="not trained: --train-dataset does not apply"):
        run(spec(tmp_path / "w3", train_dataset="synthetic"))


@pytest.mark.parametrize("scores", ["exact", "binned"])
def test_method_failure_mid_episode_resumes_with_identical_numbers(synthetic, tmp_path, scores):
    """A method that raises on the second query of an episode: the queries of that episode scored
    before the failure must not enter the saved state (the episode is redone on resume)."""
    kw = dict(protocol="per_support", max_episodes=3, score_mode=scores, workers=2)
    CALLS.update(prepare=0, predict=0, fail_at=None)
    reference = run(spec(tmp_path / "ref", **kw), log=lambda m: None)[0]
    per_episode = CALLS["predict"] // 3
    assert per_episode >= 2
    fail = {"at": per_episode + 2}  # second query of the second episode, once

    @register_method("flaky_raise")
    class Raises(FlakyMean):
        def predict(self, state, query):
            if CALLS["predict"] + 1 == fail["at"]:
                fail["at"] = None
                raise RuntimeError("boom")
            return super().predict(state, query)

    CALLS.update(prepare=0, predict=0, fail_at=None)
    with pytest.raises(FdsError, match="boom"):
        run(spec(tmp_path / "resume", **{**kw, "method": "flaky_raise"}), log=lambda m: None)
    CALLS.update(prepare=0, predict=0, fail_at=None)
    resumed = run(spec(tmp_path / "resume", **{**kw, "method": "flaky_raise"}), log=lambda m: None)[0]
    assert resumed["metrics"] == reference["metrics"]
    assert CALLS["prepare"] == 2  # the first episode was saved; the failed one is redone
