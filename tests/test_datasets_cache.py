"""The cached index: a second start on a VISION-V1-sized tree (14 objects, ~4k images, ~12k polygon
annotations, tiny images) is well under a second; the cache follows the tree."""
import os
import time

from fdsbench.datasets import _testing as T
from fdsbench.datasets.vision_v1 import OBJECTS
from fdsbench.registry import get_dataset


def start(root, cache):
    t = time.perf_counter()
    ds = get_dataset("vision_v1")(root, cache_dir=cache)
    n = len(ds.index.records)
    ds.dataset_hash
    return time.perf_counter() - t, n, ds


def test_second_start_of_a_vision_v1_sized_tree_is_well_under_a_second(tmp_path):
    root = T.make_vision_v1(tmp_path / "v", objects=OBJECTS, per_subset=145, h=8, w=8, anns_per_image=3,
                            points=12)
    first, n, ds = start(root, tmp_path / "cache")
    assert n == 14 * 2 * 145 and sum(len(v) for v in ds.index.images_of.values()) >= 4060
    second = min(start(root, tmp_path / "cache")[0] for _ in range(3))
    print(f"\nVISION-V1-sized tree ({n} images, {14 * 2 * 145 * 3} annotations): first start {first:.2f} s, "
          f"second start {second:.3f} s")
    assert second < 0.5, f"second start took {second:.3f} s"
    # masks decode from the cached compact polygons exactly as from the JSON
    rid = ds.index.images_of["Wood/1"][0]
    assert ds.load_mask(rid, "1").any()


def test_cache_is_invalidated_when_the_tree_changes(tmp_path):
    root = T.make_vision_v1(tmp_path / "v", objects=("Wood",), per_subset=2)
    _, n, _ = start(root, tmp_path / "cache")
    T.make_vision_v1(root, objects=("Lens",), per_subset=2)  # a new object appears
    _, n2, ds = start(root, tmp_path / "cache")
    assert n2 == 2 * n and "Lens" in ds.index.objects
    ann = root / "Lens" / "val" / "_annotations.coco.json"
    ann.write_text(ann.read_text().replace('"category_id": 2', '"category_id": 1'))
    st = ann.stat()
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, _, ds = start(root, tmp_path / "cache")
    assert "Lens/2" in ds.index.classes and len(ds.index.images_of["Lens/2"]) == 1  # train only now


def test_damaged_cache_is_rebuilt_and_problems_survive_the_cache(tmp_path):
    root = T.make_vision_v1(tmp_path / "v", objects=("Wood",), per_subset=2)
    (root / "Wood" / "train" / "img_0000_jpg.rf.00.jpg").unlink()
    _, n, ds = start(root, tmp_path / "cache")
    assert [p.path for p in ds.scan_problems] == ["Wood/train/img_0000_jpg.rf.00.jpg"]
    _, _, ds2 = start(root, tmp_path / "cache")  # from the cache
    assert [p.path for p in ds2.scan_problems] == ["Wood/train/img_0000_jpg.rf.00.jpg"]
    for f in (tmp_path / "cache").glob("*.json"):
        f.write_text("{broken")
    _, n3, ds3 = start(root, tmp_path / "cache")
    assert n3 == n and len(ds3.scan_problems) == 1


def test_symlinked_folders_are_followed_and_loops_do_not_hang(tmp_path):
    data = T.make_vision_v1(tmp_path / "store", objects=("Wood",), per_subset=1)
    root = tmp_path / "v"
    root.mkdir()
    (root / "Wood").symlink_to(data / "Wood", target_is_directory=True)
    (data / "Wood" / "train" / "loop").symlink_to(data / "Wood", target_is_directory=True)
    _, n, ds = start(root, tmp_path / "cache")
    assert n == 2 and ds.index.objects == ["Wood"]
