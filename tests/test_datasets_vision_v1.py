"""VISION V1 adapter on fixture trees in the published layout (COCO _annotations.coco.json)."""
import json

import numpy as np
import pytest

from fdsbench.datasets import _testing as T
from fdsbench.episodes import generate, resolve_protocol
from fdsbench.errors import DataError
from fdsbench.registry import get_dataset


def open_ds(root, tmp_path):
    return get_dataset("vision_v1")(root, cache_dir=tmp_path / "cache")


def errors(problems, text=""):
    return [p for p in problems if p.severity == "error" and text in p.message]


@pytest.fixture
def tree(tmp_path):
    return T.make_vision_v1(tmp_path / "vision")


def test_index_merges_train_and_val_and_keys_classes_by_category(tree, tmp_path):
    ds = open_ds(tree, tmp_path)
    assert ds.index.objects == ["Casting", "Groove", "PCB_1"]
    assert ds.index.classes == [f"{o}/{c}" for o in ("Casting", "Groove", "PCB_1") for c in ("1", "2")]
    # per subset 3 images: category 1 in all (second annotation), category 2 in image 1 -> 6 and 2 per object
    assert len(ds.index.images_of["PCB_1/1"]) == 6 and len(ds.index.images_of["PCB_1/2"]) == 2
    ids = ds.index.images_of["PCB_1/2"]
    assert {i.split("/")[1] for i in ids} == {"train", "val"}
    assert ds.test_objects(0) == ["PCB_1"] and ds.test_objects(1) == ["Casting"] and ds.test_objects(2) == ["Groove"]
    assert ds.train_objects(0) == ["Casting", "Groove"]


def test_polygons_truncated_filled_and_classes_kept_apart(tmp_path):
    root = tmp_path / "v"
    T.make_vision_v1(root, objects=("Wood",), per_subset=2)
    p = root / "Wood" / "train" / "_annotations.coco.json"
    data = json.loads(p.read_text())
    # image 0: two polygons of category 1 (one annotation with two polygons) + one of category 2
    data["annotations"] = [
        {"id": 0, "image_id": 0, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
         "segmentation": [[2.7, 2.7, 8.9, 2.7, 8.9, 8.9, 2.7, 8.9], [20, 10, 24, 10, 24, 14, 20, 14]]},
        {"id": 1, "image_id": 0, "category_id": 2, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
         "segmentation": [[10.99, 15.2, 13.5, 15.2, 13.5, 17.9, 10.99, 17.9]]},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
         "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
         "segmentation": [[5, 5, 7, 5, 7, 7, 5, 7]]},
        # two overlapping polygons of one annotation: filled one by one and OR-ed (one fillPoly call
        # with both contours would leave their overlap as a hole)
        {"id": 4, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1,
         "segmentation": [[10, 10, 14, 10, 14, 14, 10, 14], [12, 12, 16, 12, 16, 16, 12, 16]]},
    ]
    p.write_text(json.dumps(data))
    ds = open_ds(root, tmp_path)
    img = "Wood/train/" + data["images"][0]["file_name"]
    m1, m2 = ds.load_mask(img, "1"), ds.load_mask(img, "2")
    expect1 = np.zeros((24, 32), bool)
    expect1[2:9, 2:9] = True  # (2.7 -> 2, 8.9 -> 8), boundary included
    expect1[10:15, 20:25] = True
    expect2 = np.zeros((24, 32), bool)
    expect2[15:18, 10:14] = True  # 10.99 -> 10, 13.5 -> 13, 15.2 -> 15, 17.9 -> 17
    assert np.array_equal(m1, expect1) and np.array_equal(m2, expect2)
    assert not (m1 & m2).any()  # the episode's GT is only its class
    assert np.array_equal(ds.load_mask(img, "*"), expect1 | expect2)
    # two annotations of one category are OR-ed into one mask
    img1 = "Wood/train/" + data["images"][1]["file_name"]
    assert ds.load_mask(img1, "1").sum() == 9 + 9
    overlap = np.zeros((24, 32), bool)
    overlap[10:15, 10:15] = overlap[12:17, 12:17] = True
    assert np.array_equal(ds.load_mask(img1, "2"), overlap)
    assert ds.image_size(img) == (24, 32) and ds.load_image(img).shape == (24, 32, 3)
    # a two-class image is a query once per class, each episode with its own class
    man = generate(ds, 0, 1, 0, resolve_protocol("fss", 1, {"crop_size": 8}))
    classes_of_img = sorted(e["class"] for e in man["episodes"] if img in e["queries"])
    assert classes_of_img == ["Wood/1", "Wood/2"]


def test_clean_tree_has_no_problem_but_absent_fold_objects(tree, tmp_path):
    ds = open_ds(tree, tmp_path)
    probs = ds.check()
    assert all("named in fold" in p.message for p in errors(probs))
    assert len(errors(probs)) == 14 - 3
    assert not [p for p in probs if p.severity == "warning"]


def test_malformed_annotations_are_reported_with_their_file(tree, tmp_path):
    p = tree / "PCB_1" / "train" / "_annotations.coco.json"
    data = json.loads(p.read_text())
    name0 = data["images"][0]["file_name"]
    data["annotations"][0]["category_id"] = 7  # unknown category id
    data["images"].append(dict(data["images"][1], id=99))  # file_name listed twice
    data["images"].append({"id": 100, "file_name": "gone.jpg", "height": 24, "width": 32})  # missing file
    data["annotations"].append({"id": 50, "image_id": 100, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 4]]})
    data["images"].append({"id": 101, "file_name": "no_ann.jpg", "height": 24, "width": 32})
    T.write_image(tree / "PCB_1" / "train" / "no_ann.jpg")
    data["images"][2]["height"] = 30  # size in the JSON differs from the file
    data["annotations"].append({"id": 51, "image_id": 1, "category_id": 2, "segmentation": [[1, 2, 3]]})
    p.write_text(json.dumps(data))
    # a duplicate image file (same bytes) in val
    (tree / "PCB_1" / "val" / data["images"][0]["file_name"]).write_bytes((tree / "PCB_1" / "train" / name0).read_bytes())
    ds = open_ds(tree, tmp_path)
    probs = ds.check()
    by = {(p.severity, p.path, p.message.split(":")[0][:40]) for p in probs}
    unknown = errors(probs, "unknown category id 7")
    assert len(unknown) == 1 and unknown[0].path == f"PCB_1/train/{name0}"
    assert any(p.path.endswith(data["images"][1]["file_name"]) and "listed twice" in p.message for p in errors(probs))
    assert any(p.path == "PCB_1/train/gone.jpg" and "missing" in p.message for p in errors(probs))
    assert any(p.path == "PCB_1/train/no_ann.jpg" and p.severity == "warning" for p in probs)
    assert any("annotation says 32x30" in p.message for p in errors(probs))
    assert any("malformed polygon" in p.message for p in errors(probs))
    assert any(p.severity == "warning" and "duplicate file" in p.message for p in probs), by
    # the entries concerned are out of the index
    assert "PCB_1/train/gone.jpg" not in ds.index.records and "PCB_1/train/no_ann.jpg" not in ds.index.records


def test_category_outside_official_slots_warns(tree, tmp_path):
    p = tree / "Groove" / "val" / "_annotations.coco.json"
    data = json.loads(p.read_text())
    data["categories"].append({"id": 9, "name": "late", "supercategory": "defect"})
    data["annotations"][0]["category_id"] = 9
    p.write_text(json.dumps(data))
    ds = open_ds(tree, tmp_path)
    assert any("outside 0..3" in q.message for q in ds.scan_problems)
    assert "Groove/9" in ds.index.classes


@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"),
                                            ('{"images": [], "categories": []}', "'annotations'"),
                                            ('{"images": [{"id": 1}], "annotations": [], "categories": []}',
                                             "lacks 'id' or 'file_name'")])
def test_broken_json_is_one_clear_error(tree, tmp_path, text, fragment):
    (tree / "Casting" / "val" / "_annotations.coco.json").write_text(text)
    with pytest.raises(DataError, match=fragment) as e:
        open_ds(tree, tmp_path).index
    assert "Casting/val/_annotations.coco.json" in str(e.value)


def test_wrong_root_says_what_layout_is_expected(tmp_path):
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match="_annotations.coco.json"):
        open_ds(tmp_path / "empty", tmp_path).index
