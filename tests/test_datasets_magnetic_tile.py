"""The magnetic-tile adapter on the real data (../shared/data/magnetic-tile beside the repository;
skipped when absent): index, the four empty Uneven masks, episode manifests and a short benchmark."""
from pathlib import Path

import numpy as np
import pytest

from fdsbench.episodes import generate, resolve_protocol
from fdsbench.registry import get_dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic-tile"
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (DATA / "MT_Free").is_dir(), reason=f"real data absent: {DATA}")]
EMPTY_UNEVEN = {"exp4_num_45057", "exp4_num_352527", "exp3_num_45042", "exp4_num_124690"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return get_dataset("magnetic_tile")(DATA, cache_dir=tmp_path_factory.mktemp("cache"))


def test_index_classes_normals_and_excluded_empty_masks(ds):
    counts = ds.counts()["tile"]
    assert {c: counts[c] for c in ("Blowhole", "Break", "Crack", "Fray", "Uneven")} == \
        {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103 - 4}
    assert counts["normal"] == 952 and ds.index.objects == ["tile"]
    warned = {Path(p.path).stem for p in ds.scan_problems if p.severity == "warning" and "empty" in p.message}
    assert warned == EMPTY_UNEVEN
    assert not any(Path(i).stem in EMPTY_UNEVEN for i in ds.index.records)  # in no episode, not a normal
    assert ds.folds == [["tile"]] and ds.test_objects(0) == ["tile"]


def test_masks_threshold_and_original_sizes(ds):
    from PIL import Image

    img = ds.index.images_of["tile/Crack"][0]
    raw = np.asarray(Image.open(DATA / ds.record(img).masks["Crack"]["png"]))
    m = ds.load_mask(img, "Crack")
    assert np.array_equal(m, raw > 127)
    assert m.shape == ds.load_image(img).shape[:2] == ds.image_size(img)
    sizes = {ds.image_size(i) for i in ds.index.images_of["tile/Blowhole"][:20]}
    assert len(sizes) > 1  # images keep their own size


def test_episode_manifests_fss_and_fad(ds):
    fss = generate(ds, 0, 1, 0, resolve_protocol("fss", 1))
    assert len(fss["episodes"]) == 115 + 85 + 57 + 32 + 99 and not fss["skipped"]
    assert all(e["queries"][0] not in [s["id"] for s in e["supports"]] for e in fss["episodes"])
    fad = generate(ds, 0, 2, 0, resolve_protocol("fad", 2))
    (ep,) = fad["episodes"]
    assert ep["class"] == "tile/*" and all("MT_Free" in s["id"] for s in ep["supports"])
    assert len(ep["queries"]) == 952 - 2 + 388


@pytest.mark.slow
def test_bench_runs_end_to_end_and_writes_a_run_record(tmp_path, monkeypatch):
    from fdsbench.runner import BenchSpec, run

    monkeypatch.setenv("FDSBENCH_CACHE", str(tmp_path / "cache"))
    spec = BenchSpec(method="proto", dataset="magnetic_tile", data_root=str(DATA), fold=0, shot=1,
                     workdir=str(tmp_path / "runs"), max_episodes=2, progress=False)
    (record,) = run(spec)
    assert record["dataset"] == "magnetic_tile"
    assert list((tmp_path / "runs" / "runs").glob("*.json"))
