import hashlib

import numpy as np

from fdsbench.datasets import synthetic as syn


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    a = syn.generate(tmp_path / "a", seed=0, objects=["bolt", "weave"])
    b = syn.generate(tmp_path / "b", seed=0, objects=["bolt", "weave"])
    c = syn.generate(tmp_path / "c", seed=1, objects=["bolt", "weave"])
    assert _digest(a) == _digest(b) != _digest(c)


def test_dataset_shape(synthetic):
    idx = synthetic.index
    assert len(idx.objects) == 9 and len(synthetic.folds) == 3
    assert sorted(o for f in synthetic.folds for o in f) == idx.objects
    kinds = {syn.OBJECTS[o][0] for f in synthetic.folds for o in f}
    assert kinds == {"texture", "part"}
    for obj in idx.objects:
        assert 2 <= len(idx.classes_of(obj)) <= 4
        assert len(idx.normals[obj]) >= 5
    sizes = [max(synthetic.image_size(i)) for i in list(idx.records)[::7]]
    assert min(sizes) <= 400 and max(sizes) >= 700
    ratios = np.array([synthetic.load_mask(i, c.split("/")[1]).mean() for c in idx.classes
                       for i in idx.images_of[c][:2]])
    assert (ratios < 0.01).mean() > 0.8 and ratios.min() < 2e-4 and (ratios > 0).all()


def test_multi_class_images_keep_classes_apart(synthetic):
    multi = [r for r in synthetic.index.records.values() if len(r.masks) > 1]
    assert multi
    r = multi[0]
    a, b = (synthetic.load_mask(r.id, c) for c in r.classes)
    assert a.any() and b.any() and not np.array_equal(a, b)
