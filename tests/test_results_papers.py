"""Paper-shaped tables: documented rows/columns on synthetic records; reference numbers = papers' text."""
import re
from pathlib import Path

import pytest
from synthetic_records import make_record

from fdsbench.papers import (gfds_speed_references, gfds_table4, nbr_cap_table, paper_tables, reference,
                             sofs_fad_table, sofs_fss_table)
from fdsbench.results import results_frame

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
FAD = {"image_auroc": (0.9, 0.8), "pixel_auroc": (0.95, 0.9), "pixel_f1_max": (0.5, 0.4), "aupro": (0.7, 0.6)}


@pytest.fixture(scope="module")
def frame():
    recs = [make_record("sofs", "vision_v1", fold=f, shot=s, seed=seed,
                        per_class={"a/x": 0.1 * (f + 1) + 0.01 * seed, "a/y": 0.3})
            for f in range(3) for s in (1, 5) for seed in range(2)]
    recs.append(make_record("sofs", "vision_v1", fold=0, per_class={"a/x": 0.99}, episodes=2))  # incomplete
    recs.append(make_record("sofs", "mvtec_ad", "fad", per_class={"bottle/*": None}, fad=FAD))
    recs.append(make_record("sam2", "gfds", fold=2, per_class={"tile/tile_crack": 0.7, "tile/tile_oil": 0.5,
                                                              "Phone/Phone_oil": 0.3}))
    recs.append(make_record("nbr_cap", "mvtec_ad", "per_support", per_class={"bottle/*": 0.6, "metal_nut/*": 0.4}))
    return results_frame(recs)


def test_sofs_table1_shape_and_our_row(frame):
    t = sofs_fss_table(frame, "vision_v1")
    cols = [f"{m} {s}-shot {st}" for m in ("mIoU", "FB-IoU") for s in (1, 5) for st in ("F0", "F1", "F2", "Mean")]
    assert list(t.table.columns) == ["source"] + cols
    refs = t.table[t.table["source"] == "paper Table 1"]
    assert len(refs) == 12 and refs.loc["SOFS (DINOv2-B)", "mIoU 1-shot F0"] == "22.9"
    assert (refs["FB-IoU 1-shot F0"] == "–").all()  # the paper reports no FB-IoU
    ours = t.table.loc["sofs [cpu]†"]
    assert ours["source"] == "ours (12 runs)"  # the incomplete run is not in it
    assert ours["mIoU 1-shot F0"] == "20.2 ± 0.4" and ours["mIoU 1-shot Mean"] == "25.2"
    assert ours["FB-IoU 5-shot F2"] != "–" and len(t.run_ids) == 12


def test_sofs_fad_gfds_nbr_tables(frame):
    fad = sofs_fad_table(frame)
    assert list(fad.table.columns)[:2] == ["shot", "source"] and "VisA pixel F1-max" in fad.table.columns
    ours = fad.table.loc["sofs [cpu]†"]
    assert ours["MVTec AD image AUROC"] == "90.0" and ours["VisA image AUROC"] == "–"
    assert fad.table.loc["SOFS"].iloc[0]["MVTec AD image AUROC"] == "93.3 ± 0.4"

    g = gfds_table4(frame)
    assert list(g.table.columns)[-2:] == ["Average", "FPS"] and "R_small" in g.table.columns
    assert g.table.loc["SAM2-s(1024)", "Average"] == "47.9, 74.3" and g.table.loc["SAM2-s(1024)", "FPS"] == "32.3"
    ours = g.table.loc["sam2 [cpu]†"]
    assert ours["Tile"] == "60.0, –" and ours["MSD"] == "30.0, –"
    assert ours["Grid"] == "–" and ours["FPS"] == "10.0"

    n = nbr_cap_table(frame, "per_image_iou")
    col = "nbr_cap [cpu]† (ours, 1 runs)"
    assert col in n.table.columns and "B+NBR+CaP (paper)" in n.table.columns
    one = n.table[n.table["shot"] == "1-shot"]
    assert one.loc["Bottle", col] == "0.5400" and one.loc["Metal nut", col] == "0.3600"
    assert one.loc["Mean", col] == "0.4500" and one.loc["Bottle", "B+NBR+CaP (paper)"] == "0.6763 (0.0152)"
    assert "Toothbrush" not in one.index and "Toothbrush" in n.table[n.table["shot"] == "5-shot"].index
    assert [t.has_runs for t in paper_tables(frame)] == [True, False, True, True, True, True]


@pytest.mark.skipif(not PAPERS.is_dir(), reason="papers' text not available")
def test_reference_numbers_match_the_papers_text():
    """Every transcribed row, rebuilt as the paper prints it, is in the paper's text."""
    sofs = (PAPERS / "sofs-small-object-fss.txt").read_text()
    ref = reference("sofs")
    for (table, backbone, method), g in ref[ref["table"].isin(["Table 1", "Table 2"])].groupby(
            ["table", "backbone", "method"]):
        printed = " ".join(g.sort_values(["shot", "setting"], key=lambda c: c.map(
            {"F0": 0, "F1": 1, "F2": 2, "Mean": 3}) if c.name == "setting" else c)["value"])
        assert any(method in line and line.endswith(printed) for line in sofs.splitlines()), (table, method)
    t3 = ref[ref["table"] == "Table 3"]
    assert len(t3) == 66
    for r in t3.itertuples():
        assert f"{r.value} ±plus-or-minus\\pm± {r.std}" in sofs

    gfds = (PAPERS / "gfds-fm-fastsam-sam2.txt").read_text().replace("H5Net", "HSNet")
    ref = reference("gfds")
    for method, g in ref.groupby("method", sort=False):
        cells = [f"{a}, {b}" for a, b in zip(g[g["metric"] == "miou"]["value"], g[g["metric"] == "fbiou"]["value"])]
        line = "\t".join([method, *cells, g[g["metric"] == "fps"]["value"].iloc[0]])
        assert line in gfds, method

    nbr = (PAPERS / "nbr-cap-unet.txt").read_text()
    ref = reference("nbr_cap")
    assert len(ref) == 2 * 31 * 7
    for (table, shot, cat), g in ref.groupby(["table", "shot", "setting"]):
        cells = [f"{v}\\s?\\({s}\\)" if s else v for v, s in zip(g["value"], g["std"])]
        assert re.search(r"\s+".join(cells), nbr), (table, shot, cat)
    spot = ref[(ref["table"] == "Table III") & (ref["shot"] == 5) & (ref["setting"] == "Zipper")
               & (ref["method"] == "B+NBR+CaP")].iloc[0]
    assert (spot["value"], spot["std"]) == ("0.7977", "0.0058")


def test_gfds_speed_references():
    refs = gfds_speed_references().set_index("method")
    assert refs.loc["FM-s", "fps"] == 588.2 and refs.loc["FM-s", "accuracy"] == 34.6 and len(refs) == 20
