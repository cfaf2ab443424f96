"""``fdsbench datasets list | check | stats`` (exit codes, report content, PNG + JSON)."""
import json

import pytest

from fdsbench.datasets import _testing as T
from fdsbench.datasets_cli import main


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDSBENCH_CACHE", str(tmp_path / "cache"))


def test_list_names_every_adapter(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("vision_v1", "defect_spectrum", "mvtec_ad", "visa", "gfds", "aebad", "magnetic_tile", "folder",
                 "synthetic"):
        assert name in out


def test_check_clean_tree_prints_counts_and_folds_and_exits_0(tmp_path, capsys):
    root = T.make_mvtec(tmp_path / "mvtec")
    assert main(["datasets", "check", "mvtec_ad", str(root)]) == 0
    out = capsys.readouterr().out
    assert "bottle" in out and "combined=3" in out and "crack=3" in out
    assert "fold 0: bottle, cable (ABSENT)" in out
    assert "0 error(s)" in out


def test_check_reports_errors_with_files_and_exits_1(tmp_path, capsys):
    root = T.make_folder(tmp_path / "own")
    (root / "severstal_steel" / "support" / "mask" / "s1_mask.png").unlink()
    T.write_mask(root / "severstal_steel" / "support" / "mask" / "s0_mask.png", T.box_mask(10, 20, 1, 1, 4))
    assert main(["datasets", "check", "folder", str(root)]) == 1
    out = capsys.readouterr().out
    assert "error: severstal_steel/support/image/s1.jpg: support image has no mask" in out
    assert "error: severstal_steel/support/mask/s0_mask.png: mask of class defect is 20x10" in out
    assert "2 error(s)" in out


def test_check_of_an_unreadable_tree_exits_1(tmp_path, capsys):
    (tmp_path / "visa").mkdir()
    assert main(["datasets", "check", "visa", str(tmp_path / "visa")]) == 1
    assert "split_csv/1cls.csv not found" in capsys.readouterr().out
    assert main(["datasets", "check", "visa", str(tmp_path / "nope")]) == 1


def test_stats_writes_png_json_and_table(tmp_path, capsys):
    root = T.make_gfds(tmp_path / "gfds")
    out_dir = tmp_path / "stats"
    assert main(["datasets", "stats", "gfds", str(root), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "tile/tile_crack" in out and "classes by median area proportion" in out
    png = out_dir / "gfds_defect_sizes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((out_dir / "gfds_defect_sizes.json").read_text())
    c = stats["classes"]["DAGM/Class1_bad"]
    assert c["n"] == 3 and c["median_px"] == 12 and abs(c["median_prop"] - 12 / 256) < 1e-12
    assert c["prop_bucket"] == ">2%" and c["px_bucket"] == "<900px"
    assert stats["summary"]["classes_by_median_px"]["<900px"] == 1.0


def test_option_is_passed_to_the_adapter(tmp_path, capsys):
    root = T.make_aebad(tmp_path / "AeBAD")
    assert main(["datasets", "check", "aebad", str(root), "-o", "domain=view"]) == 0
    out = capsys.readouterr().out
    assert "ablation=2" in out and "groove=2" in out
    assert main(["datasets", "check", "aebad", str(root), "-o", "colour=red"]) == 1
    assert "dataset 'aebad' has no option 'colour'; options: domain" in capsys.readouterr().out
