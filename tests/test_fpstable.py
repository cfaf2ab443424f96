"""`fdsbench fps-table` on CPU with tiny presets; the GPU-aware timing options of a run."""
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fdsbench.cli import main
from fdsbench.fpstable import paper_presets
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.runner import BenchSpec, run
from fdsbench.timing import output_difference
from fdsbench.types import Requirements

CALLS = {"predict": 0}


@register_method("fps_probe")
class FpsProbe(Method):
    """Test method: a 1x1 conv of the query under the declared precision (bf16 autocast or fp32)."""

    requires = Requirements()

    @dataclass
    class Config:
        amp: str = "bf16"
        weights: str = "default"
        image_size: int = 32

    presets = {"paper": {}, "paper_alias": {}, "fm-s-like": {"image_size": 48}, "test": {"image_size": 16}}
    speed_reference = {"fm-s-like": "FM-s"}

    def __init__(self, config=None, device="cpu"):
        super().__init__(config, device)
        self.precision = "bf16-autocast" if self.config.amp == "bf16" else "fp32"
        self.net = torch.nn.Conv2d(3, 1, 1)
        with torch.no_grad():  # the same weights in every instance
            self.net.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
            self.net.bias.fill_(0.1)

    def prepare(self, support):
        return None

    @torch.no_grad()
    def predict(self, state, query):
        CALLS["predict"] += 1
        x = torch.from_numpy(query.image).permute(2, 0, 1)[None].float() / 255
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
            y = torch.sigmoid(self.net(x))
        return y[0, 0].float()


def test_paper_presets_are_distinct_configurations():
    assert paper_presets(FpsProbe) == ["fm-s-like", "paper"]  # alias of 'paper' dropped, cpu/test excluded


def test_fps_table_on_cpu_with_tiny_presets(synthetic, tmp_path, capsys):
    out = tmp_path / "boards"
    assert main(["fps-table", "--device", "cpu", "--presets", "test,fm-s-like", "--methods", "fps_probe,proto",
                 "--episodes", "2", "--warmup", "1", "--compare-fp32", "2", "--workdir", str(tmp_path),
                 "--out", str(out)]) == 0
    folder = next(out.iterdir())
    assert folder.name.endswith(f"-bf16-torch{torch.__version__}".lower()) or "-mixed-torch" in folder.name
    assert {p.name for p in folder.iterdir()} >= {"fps_table.md", "fps_table.csv", "fps_table.json", "fps_table.png"}
    table = pd.read_csv(folder / "fps_table.csv")
    assert set(zip(table["method"], table["preset"])) == {("fps_probe", "test"), ("fps_probe", "fm-s-like"),
                                                          ("proto", "test")}
    rows = {(r["method"], r["preset"]): r for r in json.loads((folder / "fps_table.json").read_text())["rows"]}
    r = rows[("fps_probe", "fm-s-like")]
    assert r["paper_row"] == "FM-s" and r["paper_fps"] == 588.2
    assert abs(r["ratio_to_paper"] - r["fps"] / 588.2) < 1e-12
    assert r["input_size"] == 48 and r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["peak_memory_mib"] > 0
    assert r["queries"] >= 1 and r["weights"].startswith("random-init")
    diff = r["autocast_vs_fp32"]  # bf16 autocast vs the fp32 config on the same queries
    assert diff["queries"] == 2 and 0 < diff["max_abs"] < 0.05
    assert rows[("proto", "test")]["autocast_vs_fp32"] is None  # an fp32 row has nothing to compare
    assert "| fps_probe | fm-s-like | FM-s | 48 | bf16-autocast |" in capsys.readouterr().out


def test_speed_options_are_recorded_and_per_shape_warmup_changes_no_number(synthetic, tmp_path):
    base = dict(method="fps_probe", dataset="synthetic", fold=1, progress=False, max_episodes=4, workers=1,
                overrides={"amp": "fp32"})
    CALLS["predict"] = 0
    plain = run(BenchSpec(workdir=str(tmp_path / "a"), **base), log=lambda m: None)[0]
    assert CALLS["predict"] == 4
    CALLS["predict"] = 0
    warm = run(BenchSpec(workdir=str(tmp_path / "b"), warmup_per_shape=True, **base), log=lambda m: None)[0]
    assert CALLS["predict"] > 4  # an untimed call before each new query size
    assert warm["metrics"] == plain["metrics"] and warm["speed_options"]["warmup_per_shape"]
    assert warm["loader"]["workers"] == 1
    cl = run(BenchSpec(workdir=str(tmp_path / "b"), channels_last=True, **base), log=lambda m: None)[0]
    assert cl["speed_options"]["channels_last"] and cl["speed_options"]["modules"] == ["Conv2d"]
    assert not plain["speed_options"]["channels_last"]
    assert cl["run_id"] != plain["run_id"]  # channels_last can change numbers: part of the run identity


def test_output_difference():
    a, b = [np.array([[0.2, 0.6]])], [np.array([[0.25, 0.4]])]
    d = output_difference(a, b)
    assert abs(d["max_abs"] - 0.2) < 1e-12 and abs(d["mean_abs"] - 0.125) < 1e-12 and d["flipped_fraction"] == 0.5
