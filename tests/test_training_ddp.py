"""TrainLoop under torchrun (2 processes, gloo on CPU) trains as one process with the same effective
batch: same loss sequence, same weights, and its checkpoint loads in one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parent / "plugins" / "ddp_train.py"


def test_two_process_ddp_training_matches_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one.json"), str(tmp_path / "w1")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path / "two.json"),
                          str(tmp_path / "w2")], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["losses"]) == len(b["losses"]) == 6
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5, atol=1e-6)
    for k in a["state"]:
        np.testing.assert_allclose(b["state"][k], a["state"][k], rtol=1e-4, atol=1e-6)
    # the 2-process checkpoint is the plain trainable state: it loads in one process, strictly
    ck = torch.load(tmp_path / "w2" / "epoch_002.pt", map_location="cpu", weights_only=True)
    assert set(ck["model"]) == {k for k in a["state"] if not k.startswith("backbone.")}
    for k, v in ck["model"].items():
        np.testing.assert_allclose(v.numpy(), a["state"][k], rtol=1e-4, atol=1e-6)
    assert not (tmp_path / "w2" / "epoch_000.pt").exists() and (tmp_path / "w2" / "epoch_001.pt").exists()
