"""`make bench` end to end on the synthetic data, as a user runs it (offline)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from fdsbench.weights import get_entry

REPO = Path(__file__).resolve().parents[1]


def make(*args, timeout=900):
    env = {**os.environ}
    r = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_make_bench_default_prints_table_and_writes_record(tmp_path, synthetic):
    out = make("bench", f"WORKDIR={tmp_path}", "ARGS=--no-progress")
    assert "| proto [cpu] " in out and "mIoU" in out  # HED weights (vgg16_hed), no †
    records = list((tmp_path / "runs").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["method"] == "proto" and rec["dataset"] == "synthetic" and rec["fold"] == 0
    assert rec["episodes"] == rec["episodes_total"] > 40
    assert rec["weights"] == {"vgg16_hed": get_entry("vgg16_hed").sha256}
    make("leaderboard", f"WORKDIR={tmp_path}", f"LEADERBOARDS={tmp_path / 'lb'}")
    table = (tmp_path / "lb" / "synthetic_fss.md").read_text()
    assert (tmp_path / "lb" / "synthetic_fss.png").stat().st_size > 1000
    assert "proto [cpu] " in table and "1-shot F0" in table


@pytest.mark.slow
def test_plugin_runs_through_make_bench(tmp_path, synthetic):
    plugin = REPO / "tests" / "plugins" / "toy_plugin.py"
    out = make("bench", "METHOD=toy_color", f"PLUGIN={plugin}", "FOLD=2", f"WORKDIR={tmp_path}",
               "ARGS=--no-progress --max-episodes 6")
    assert "toy_color" in out
    rec = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert rec["method"] == "toy_color" and rec["episodes"] == 6
