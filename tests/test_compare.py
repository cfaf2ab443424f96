"""``fdsbench compare A B``: paired by manifest, same numbers as fdsbench.stats, refuses other manifests."""
import json

import pytest
from synthetic_records import make_record

from fdsbench.cli import main
from fdsbench.compare import compare
from fdsbench.errors import FdsError
from fdsbench.stats import paired_comparison

CLASSES = [f"o/{k}" for k in range(6)]


def pc(offset, seed):
    return {c: 0.05 * k + offset + 0.01 * seed for k, c in enumerate(CLASSES)}


def records():
    a = [make_record("sofs", seed=s, per_class={**pc(0.1, s), "o/0": 0.02 * s}, fps=5.0) for s in range(3)]
    b = [make_record("proto", seed=s, per_class=pc(0.0, -s)) for s in range(3)]
    other = [make_record("proto", seed=9, per_class=pc(0.0, 0))]  # a manifest sofs never ran on
    return a, b, other


def test_same_numbers_as_stats():
    a, b, other = records()
    comps, unpaired = compare(a + b + other, "sofs", "proto", n_boot=3000, seed=1)
    assert len(comps) == 1 and unpaired == [other[0]["run_id"]]
    ref = paired_comparison([{c: v["iou"] for c, v in r["metrics"]["per_class"].items()} for r in a],
                            [{c: v["iou"] for c, v in r["metrics"]["per_class"].items()} for r in b],
                            "iou", n_boot=3000, seed=1)
    got = comps[0].result
    for key in ("mean_diff", "ci_low", "ci_high", "p_value", "wins", "losses", "ties", "per_class_diff"):
        assert got[key] == ref[key], key
    assert comps[0].shot == 1 and len(comps[0].manifests) == 3


def test_refuses_different_manifests():
    a = make_record("sofs", per_class=pc(0.1, 0))
    b = make_record("proto", seed=1, per_class=pc(0.0, 0))
    with pytest.raises(FdsError, match="share no manifest"):
        compare([a, b], "sofs", "proto")
    with pytest.raises(FdsError, match="no complete run record matches 'nope'"):
        compare([a, b], "nope", "proto")
    cut = make_record("proto", per_class=pc(0.0, 0), episodes=2)
    with pytest.raises(FdsError, match="no complete run record"):
        compare([a, cut], "sofs", "proto")  # an incomplete run is never compared


def test_shots_are_compared_apart():
    recs = [make_record(m, shot=s, per_class=pc(off, 0)) for m, off in (("a", 0.2), ("b", 0.0)) for s in (1, 5)]
    comps, _ = compare(recs, "a", "b", n_boot=200)
    assert [c.shot for c in comps] == [1, 5]


def test_cli_writes_table_and_plot(tmp_path, capsys):
    a, b, _ = records()
    runs = tmp_path / "runs"
    runs.mkdir()
    for r in a + b:
        (runs / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert main(["compare", a[0]["run_id"][:20], "proto", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--n-boot", "500"]) == 0
    out = capsys.readouterr().out
    assert "sofs [cpu]† − proto [cpu]†" in out and "sign-flip" in out
    assert (tmp_path / "out" / f"compare_{a[0]['run_id'][:20]}_vs_proto_0.png").stat().st_size > 5000
    mismatch = make_record("sam2", seed=7)
    (runs / "x.json").write_text(json.dumps(mismatch))
    assert main(["compare", "sam2", "proto", "--workdir", str(tmp_path)]) == 2
    assert "share no manifest" in capsys.readouterr().err
