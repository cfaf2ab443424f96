"""Weights table, offline lookup order, sha256 checks, checkpoint unwrapping, strict loading, CLI."""
import argparse
import hashlib
import re

import pytest
import torch

from fdsbench import weights as W
from fdsbench.errors import UnknownNameError, WeightsError


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    wdir, cache = tmp_path / "weights", tmp_path / "cache"
    wdir.mkdir()
    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(wdir))
    monkeypatch.setenv("FDSBENCH_CACHE", str(cache))
    (cache / "weights").mkdir(parents=True)
    return wdir, cache / "weights"


def _write(path, payload=b"not really weights"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


def test_table_is_complete_and_honest():
    t = W.table()
    need = {"dinov2_vitb14", "dino_vits8", "resnet50", "resnet34", "resnet18", "sofs", "fm_l", "fm_s",
            "fastsam_s", "fastsam_x", "sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus",
            "sam2.1_hiera_large"}
    assert need <= set(t)
    for e in t.values():
        assert e.file and e.url and e.licence and e.publisher and e.kind in ("encoder", "method")
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        assert e.sha256_prefix is None or re.fullmatch(r"[0-9a-f]{8}", e.sha256_prefix)
    # torchvision file names carry the sha256 prefix torch.hub checks
    assert t["resnet50"].sha256_prefix == "0676ba61" and t["resnet50"].file == "resnet50-0676ba61.pth"
    with pytest.raises(UnknownNameError):
        W.get_entry("resnet9000")


def test_lookup_order_explicit_then_env_then_cache(dirs, tmp_path):
    wdir, cache = dirs
    name, file = "dinov2_vitb14", "dinov2_vitb14_pretrain.pth"
    _write(cache / file, b"cache")
    assert W.locate(name) == cache / file
    _write(wdir / file, b"env")
    assert W.locate(name) == wdir / file
    explicit = tmp_path / "elsewhere" / "mine.pth"
    _write(explicit, b"explicit")
    assert W.locate(name, explicit) == explicit
    assert W.locate(name, wdir) == wdir / file  # a directory holding the official file name
    with pytest.raises(WeightsError, match="mine2.pth"):  # explicit but absent: no silent fallback
        W.locate(name, tmp_path / "mine2.pth")
    assert W.weights_where(name)["searched"] == [str(wdir / file), str(cache / file)]


def test_missing_file_names_file_hash_and_url(dirs):
    with pytest.raises(WeightsError) as e:
        W.resolve("sam2.1_hiera_small")
    msg = str(e.value)
    assert "sam2.1_hiera_small.pt" in msg and "no published sha256" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt" in msg
    with pytest.raises(WeightsError, match=r"resnet34-b627a593.pth \(sha256 starting b627a593\)"):
        W.resolve("resnet34")
    assert "\n" not in msg


def test_wrong_sha256_is_refused(dirs, monkeypatch):
    wdir, _ = dirs
    sha = _write(wdir / "resnet34-b627a593.pth")
    # published prefix in the torchvision file name does not match these bytes
    with pytest.raises(WeightsError, match="does not start with the published prefix b627a593"):
        W.resolve("resnet34")
    # a full expected hash (table or caller) that differs
    with pytest.raises(WeightsError, match=f"has sha256 {sha}, expected {'0' * 64}"):
        W.resolve("resnet34", expected_sha256="0" * 64)
    entry = W.get_entry("resnet34")
    monkeypatch.setitem(W.table(), "resnet34", W.WeightsEntry(**{**entry.__dict__, "sha256": sha,
                                                                 "sha256_prefix": None}))
    path, prov = W.resolve("resnet34")
    assert prov == {"name": "resnet34", "sha256": sha, "path": str(path), "check": "ok"}
    monkeypatch.setitem(W.table(), "resnet34", W.WeightsEntry(**{**entry.__dict__, "sha256": "f" * 64}))
    with pytest.raises(WeightsError, match="expected f{64}"):
        W.resolve("resnet34")


def test_unknown_upstream_hash_is_said_and_file_hash_recorded(dirs):
    wdir, _ = dirs
    sha = _write(wdir / "dino_deitsmall8_pretrain.pth")
    path, prov = W.resolve("dino_vits8")
    assert prov["sha256"] == sha and prov["check"] == W.UNVERIFIED
    (c,) = W.weights_verify("dino_vits8")
    assert c.status == W.UNVERIFIED and c.ok and not c.verified and "unverified" in c.message


def test_user_file_under_own_name_is_recorded_not_compared(dirs, tmp_path):
    own = tmp_path / "finetuned-resnet34.pth"
    sha = _write(own)
    path, prov = W.resolve("resnet34", own)
    assert prov["sha256"] == sha and prov["check"].startswith("user file")
    with pytest.raises(WeightsError, match="expected"):
        W.resolve("resnet34", own, expected_sha256="1" * 64)


def test_read_checkpoint_unwraps_containers_and_prefixes(tmp_path):
    sd = {"conv.weight": torch.ones(2, 2), "conv.bias": torch.zeros(2)}
    cases = {
        "plain": sd,
        "state_dict": {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
        "model": {"model": sd, "train_args": {"imgsz": 1024}},
        "compiled": {"_orig_mod." + k: v for k, v in sd.items()},
        "dino_teacher": {"teacher": {**{"backbone." + k: v for k, v in sd.items()}, "head.last.weight": torch.ones(1)},
                         "student": {}, "epoch": torch.tensor(100)},
    }
    for label, obj in cases.items():
        torch.save(obj, tmp_path / f"{label}.pth")
        got = W.read_checkpoint(tmp_path / f"{label}.pth")
        assert set(got) == set(sd), label
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    # a SOFS-like checkpoint keeps its 'backbone.' prefix (other top-level modules exist)
    sofs = {"backbone.cls_token": torch.zeros(1), "feature_recorrect.down_query.0.weight": torch.zeros(1)}
    torch.save(sofs, tmp_path / "sofs.pth")
    assert set(W.read_checkpoint(tmp_path / "sofs.pth")) == set(sofs)


def test_unreadable_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pth"):
        W.read_checkpoint(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "args": "x"}, tmp_path / "notensors.pth")
    with pytest.raises(WeightsError, match="no tensors"):
        W.read_checkpoint(tmp_path / "notensors.pth")
    with pytest.raises(WeightsError, match="not found"):
        W.read_checkpoint(tmp_path / "absent.pth")


def test_load_into_is_strict_with_clear_errors():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    sd = {k: v.clone() + 1 for k, v in m.state_dict().items()}
    W.load_into(m, sd)
    assert torch.equal(m.state_dict()["0.bias"], sd["0.bias"])
    with pytest.raises(WeightsError, match="1 missing .*2.bias"):
        W.load_into(m, {k: v for k, v in sd.items() if k != "2.bias"}, source="ckpt.pth")
    missing, unexpected = W.load_into(m, {k: v for k, v in sd.items() if k != "2.bias"}, strict=False)
    assert missing == ["2.bias"] and unexpected == []
    with pytest.raises(WeightsError, match="wrong shape .*0.weight"):
        W.load_into(m, {**sd, "0.weight": torch.zeros(5, 3, 1, 1)})
    renamed = {k.replace("0.", "first."): v for k, v in sd.items()}
    W.load_into(m, renamed, key_map=lambda d, mod: {k.replace("first.", "0."): v for k, v in d.items()})


def _cli(argv):
    parser = argparse.ArgumentParser(prog="fdsbench")
    sub = parser.add_subparsers(dest="command", required=True)
    W.add_weights_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_verify_where(dirs, capsys):
    wdir, _ = dirs
    sha = _write(wdir / "dinov2_vitb14_pretrain.pth")
    _write(wdir / "resnet18-f37072fd.pth")
    assert _cli(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vitb14" in out and str(wdir / "dinov2_vitb14_pretrain.pth") in out and "missing" in out
    assert _cli(["weights", "verify", "dinov2_vitb14"]) == 0
    assert f"UNVERIFIED: {wdir / 'dinov2_vitb14_pretrain.pth'} sha256 {sha}" in capsys.readouterr().out
    assert _cli(["weights", "verify", "resnet18"]) == 1  # prefix mismatch
    assert "does not start with the published prefix f37072fd" in capsys.readouterr().out
    assert _cli(["weights", "verify", "all"]) == 1
    out = capsys.readouterr().out
    assert "sam2.1_hiera_large: weights 'sam2.1_hiera_large' not found" in out
    assert _cli(["weights", "where", "fm_l"]) == 1
    out = capsys.readouterr().out
    assert "model_large.pth" in out and "liutongkun/GFDS" in out
    assert _cli(["weights", "where", "dinov2_vitb14"]) == 0
    assert "found  " + str(wdir / "dinov2_vitb14_pretrain.pth") in capsys.readouterr().out


def test_load_into_strips_only_prefixes_that_fit(tmp_path):
    """'module.'/'backbone.' wrappers are removed when that makes the keys fit; a module whose own
    names start with 'encoder.' keeps them."""
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)

    m = Wrapped()
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    W.load_into(m, tmp_path / "ddp.pth")  # strips module., keeps encoder.
    assert torch.equal(m.encoder.bias, sd["encoder.bias"])
    lin = torch.nn.Linear(2, 2)
    W.load_into(lin, tmp_path / "ddp.pth")  # here both prefixes go
    assert torch.equal(lin.bias, sd["encoder.bias"])
