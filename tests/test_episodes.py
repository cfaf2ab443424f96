import json

import numpy as np
import pytest

from fdsbench.episodes import Manifest, generate, get_manifest, resolve_protocol
from fdsbench.errors import FdsError


def test_manifest_is_deterministic_and_hashed(synthetic):
    proto = resolve_protocol("fss", 1, {}, synthetic.protocol_defaults)
    a = generate(synthetic, 0, 1, 7, proto)
    b = generate(synthetic, 0, 1, 7, proto)
    assert a == b and len(a["hash"]) == 16
    c = generate(synthetic, 0, 1, 8, proto)
    assert c["hash"] != a["hash"]


def test_fss_episodes_follow_the_sofs_protocol(synthetic):
    proto = resolve_protocol("fss", 1, {}, synthetic.protocol_defaults)
    assert proto["crops_per_shot"] == 4 and proto["crop_size"] == 256
    m = Manifest(generate(synthetic, 0, 1, 0, proto))
    test_classes = synthetic.test_classes(0)
    # every image of every test class is a query exactly once for that class
    expected = sorted((c, i) for c in test_classes for i in synthetic.index.images_of[c])
    assert sorted((e.class_key, e.queries[0]) for e in m.episodes) == expected
    for e in m.episodes:
        assert len(e.queries) == 1 and all(s.id != e.queries[0] for s in e.supports)
        assert e.object in synthetic.folds[0]
        for s in e.supports:
            mask = synthetic.load_mask(s.id, e.defect_class)
            if mask.mean() > proto["area_resize_ratio"]:
                assert s.crops is None
                continue
            assert len(s.crops) == 4
            H, W = mask.shape
            for top, left, bottom, right in s.crops:
                assert 0 <= top < bottom <= H and 0 <= left < right <= W
                assert (bottom - top, right - left) == (min(256, H), min(256, W))
    hits = [synthetic.load_mask(s.id, e.defect_class)[t:b, l:r].any()
            for e in m.episodes for s in e.supports if s.crops for (t, l, b, r) in s.crops]
    assert np.mean(hits) > 0.9  # crops are centred on defect pixels


def test_five_shot_uses_one_crop_per_image(synthetic):
    proto = resolve_protocol("fss", 5, {}, synthetic.protocol_defaults)
    m = Manifest(generate(synthetic, 1, 5, 0, proto))
    assert all(len(e.supports) == 5 for e in m.episodes)
    assert all(s.crops is None or len(s.crops) == 1 for e in m.episodes for s in e.supports)


def test_plain_resizing_protocol_has_no_crops(synthetic):
    proto = resolve_protocol("fss", 1, {"crops": False})
    m = Manifest(generate(synthetic, 0, 1, 0, proto))
    assert all(s.crops is None for e in m.episodes for s in e.supports)


def test_fad_and_per_support_protocols(synthetic):
    fad = Manifest(generate(synthetic, 0, 2, 0, resolve_protocol("fad", 2)))
    assert len(fad.episodes) == 3  # one per test object
    for e in fad.episodes:
        assert e.defect_class == "*"
        assert all(synthetic.record(s.id).normal for s in e.supports)
        assert not set(s.id for s in e.supports) & set(e.queries)
        assert any(synthetic.record(q).masks for q in e.queries)
    per = Manifest(generate(synthetic, 0, 1, 3, resolve_protocol("per_support", 1)))
    assert len(per.episodes) == len(synthetic.test_classes(0))
    for e in per.episodes:
        ids = synthetic.index.images_of[e.class_key]
        assert sorted([e.supports[0].id, *e.queries]) == ids


def test_get_manifest_reuses_and_detects_tampering(synthetic, tmp_path):
    proto = resolve_protocol("fss", 1, {}, synthetic.protocol_defaults)
    m1 = get_manifest(tmp_path, synthetic, 2, 1, 0, proto)
    mtime = m1.path.stat().st_mtime_ns
    m2 = get_manifest(tmp_path, synthetic, 2, 1, 0, proto)
    assert m2.hash == m1.hash and m2.path.stat().st_mtime_ns == mtime
    body = json.loads(m1.path.read_text())
    body["episodes"][0]["queries"] = ["weave/scratch_00"]
    m1.path.write_text(json.dumps(body))
    with pytest.raises(FdsError, match="does not match its content hash"):
        Manifest.load(m1.path)


def test_bad_protocol_inputs(synthetic):
    with pytest.raises(FdsError, match="unknown protocol"):
        resolve_protocol("nope", 1)
    with pytest.raises(FdsError, match="no option 'bogus'"):
        resolve_protocol("fss", 1, {"bogus": 1})
    with pytest.raises(FdsError, match="fold 5 does not exist"):
        generate(synthetic, 5, 1, 0, resolve_protocol("fss", 1))
    with pytest.raises(FdsError, match="shot must be"):
        generate(synthetic, 0, 0, 0, resolve_protocol("fss", 1))
