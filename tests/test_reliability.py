"""Bad input and hostile files: every case ends in one of three documented outcomes, never in a
traceback, a silently degenerate run, or code executed from a workdir.

* ``error``   — exit status 2 (1 for ``datasets check``) and one ``error:`` line naming the file or
  value and the fix;
* ``warning`` — the command succeeds and says what it did on stderr (``warning: ...``): a damaged
  resume state or run record is set aside as ``*.damaged`` and recomputed, a pickle is never read;
* ``ok``      — an input that looks odd but is valid (1-bit / palette 0/255 masks, adapter options)
  gives a run with every query scored.

Each case builds its own tiny tree or file under ``tmp_path``; the list is counted and printed
(``pytest -s tests/test_reliability.py -k count``)."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdsbench.datasets import _testing as T
from fdsbench.cli import main
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Requirements


# ---- test methods ----------------------------------------------------------------------------------
@register_method("rel_mean")
class RelMean(Method):
    """Reliability-test method: closeness to the mean colour of the support defects."""

    requires = Requirements()

    @dataclass
    class Config:
        scale: float = 60.0
        image_size: int = 64

    def prepare(self, support):
        return np.concatenate([s.image[s.mask] for s in support.shots]).astype(np.float32).mean(0)

    def predict(self, state, query):
        d = np.sqrt(((query.image.astype(np.float32) - state) ** 2).sum(-1))
        return np.exp(-d / self.config.scale).astype(np.float32)


@register_method("rel_boom")
class RelBoom(RelMean):
    """Reliability-test method whose predict() fails."""

    def predict(self, state, query):
        raise ValueError("boom")


@register_method("rel_trained")
class RelTrained(RelMean):
    """Reliability-test method that is "meta-trained" (its checkpoint is one tensor)."""

    requires = Requirements(training=True)

    def fit(self, train, workdir):
        import torch

        self.w = torch.ones(1)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


@register_method("rel_fad")
class RelFad(RelMean):
    """Reliability-test anomaly detector: distance to the mean colour of defect-free supports."""

    requires = Requirements(fad=True)

    def prepare(self, support):
        return np.concatenate([s.image.reshape(-1, 3) for s in support.shots]).astype(np.float32).mean(0)

    def predict(self, state, query):
        d = np.sqrt(((query.image.astype(np.float32) - state) ** 2).sum(-1))
        return (1 - np.exp(-d / self.config.scale)).astype(np.float32)


class Payload:
    """A pickle that, when loaded, creates ``marker`` — proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- helpers ---------------------------------------------------------------------------------------
OBJ = "severstal_steel"
CASES: dict[str, tuple[str, object]] = {}  # name -> (outcome: error | warning | ok, case function)


def case(outcome: str, name: str | None = None):
    """Register a case ``fn(tmp_path, capsys[, monkeypatch])`` with its expected outcome."""
    assert outcome in ("error", "warning", "ok")

    def deco(fn):
        CASES[name or fn.__name__.removeprefix("case_")] = (outcome, fn)
        return fn
    return deco


def folder(tmp: Path, name: str = "own") -> Path:
    """A tiny folder-layout tree: 2 supports, 3 queries (one scored), a normal image."""
    return T.make_folder(tmp / name)


def support_mask(root: Path, k: int = 1) -> Path:
    return root / OBJ / "support" / "mask" / f"s{k}_mask.png"


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def bench(capsys, root: Path, work: Path, *extra, method: str = "rel_mean") -> tuple[int, str, str]:
    return cli(capsys, "bench", "--method", method, "--dataset", "folder", "--data-root", root,
               "--workdir", work, "--no-progress", "--checkpoint-every", "0", *extra)


def record(work: Path) -> dict:
    (path,) = [p for p in (work / "runs").glob("*.json")]
    return json.loads(path.read_text())


def assert_error(result, pattern: str, status: int = 2) -> None:
    rc, out, err = result
    assert rc == status, (rc, out, err)
    text = err if status == 2 else out
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    assert lines and re.search(pattern, lines[0]), text
    assert "Traceback" not in out + err


def assert_warning(result, pattern: str) -> None:
    rc, out, err = result
    assert rc == 0, (rc, out, err)
    assert re.search(r"warning: .*" + pattern, err), err
    assert "Traceback" not in out + err


def assert_scored(work: Path) -> dict:
    """A complete run where every query with ground truth was scored (no silent degenerate run)."""
    rec = record(work)
    assert rec["metrics"]["n_queries"] >= 1 and rec["episodes"] == rec["episodes_total"]
    return rec


# ---- hostile files in a workdir --------------------------------------------------------------------
@case("warning")
def case_pickle_resume_file_is_never_loaded(tmp, capsys):
    root, work = folder(tmp), tmp / "w"
    assert bench(capsys, root, work)[0] == 0
    rec = record(work)
    (work / "runs" / f"{rec['run_id']}.json").unlink()
    marker = tmp / "PWNED"
    (work / "runs" / f"{rec['run_id']}.partial.pkl").write_bytes(pickle.dumps(Payload(marker)))
    result = bench(capsys, root, work)
    assert not marker.exists(), "a pickle in the workdir ran code"
    assert_warning(result, r"no longer reads pickled resume state")
    assert record(work)["metrics"] == rec["metrics"]


def _plant_state(work: Path, rid: str, chunk: bytes) -> Path:
    folder_ = work / "runs" / f"{rid}.partial"
    folder_.mkdir(parents=True)
    (folder_ / "chunk-00000.npz").write_bytes(chunk)
    import hashlib

    (folder_ / "state.json").write_text(json.dumps({
        "version": 1, "run_id": rid, "manifest_hash": json.loads(
            next((work / "manifests").glob("*.json")).read_text())["hash"],
        "done": [0], "timing": {}, "hist": None,
        "chunks": [{"file": "chunk-00000.npz", "sha256": hashlib.sha256(chunk).hexdigest(), "rows": 1}]}))
    return folder_


def _rerun_with_planted_chunk(tmp, capsys, chunk_of):
    root, work = folder(tmp), tmp / "w"
    assert bench(capsys, root, work)[0] == 0
    rec = record(work)
    (work / "runs" / f"{rec['run_id']}.json").unlink()
    marker = tmp / "PWNED"
    planted = _plant_state(work, rec["run_id"], chunk_of(marker))
    result = bench(capsys, root, work)
    assert not marker.exists(), "a pickle in the resume state ran code"
    assert_warning(result, r"resume state .* is damaged .* set aside")
    assert planted.with_name(planted.name + ".damaged").is_dir()
    assert record(work)["metrics"] == rec["metrics"]


@case("warning")
def case_pickle_disguised_as_meter_chunk(tmp, capsys):
    _rerun_with_planted_chunk(tmp, capsys, lambda m: pickle.dumps(Payload(m)))


@case("warning")
def case_npz_with_pickled_object_array(tmp, capsys):
    def chunk(marker):
        buf = io.BytesIO()
        np.savez(buf, **{"version": np.int64(1), "rows.episode": np.array([Payload(marker)], dtype=object)})
        return buf.getvalue()
    _rerun_with_planted_chunk(tmp, capsys, chunk)


@case("error")
def case_pickle_as_training_checkpoint(tmp, capsys):
    import torch

    from fdsbench.blocks.training import TrainLoop, param_groups
    from fdsbench.errors import FdsError

    model = torch.nn.Linear(2, 1)
    marker = tmp / "PWNED"
    (tmp / "ck").mkdir()
    torch.save(Payload(marker), tmp / "ck" / "epoch_001.pt")
    loop = TrainLoop(model, param_groups(model, [], 1.0), tmp / "ck", epochs=1, iters_per_epoch=1, base_lr=0.1)
    with pytest.raises(FdsError, match=r"cannot read checkpoint .*epoch_001.pt as plain tensors"):
        loop.resume()
    assert not marker.exists(), "a pickled training checkpoint ran code"


@case("error")
def case_pickle_as_trained_method_checkpoint(tmp, capsys):
    import torch

    root, work = T.make_vision_v1(tmp / "v1"), tmp / "w"
    args = ["bench", "--method", "rel_trained", "--dataset", "vision_v1", "--data-root", root, "--workdir", work,
            "--no-progress"]
    assert cli(capsys, *args)[0] == 0
    (ckpt,) = (work / "checkpoints").glob("*.pt")
    assert torch.load(ckpt, weights_only=True)["w"].tolist() == [1.0]
    marker = tmp / "PWNED"
    torch.save(Payload(marker), ckpt)
    assert_error(cli(capsys, *args, "--force"), r"cannot read the trained checkpoint .*\.pt as plain tensors.*delete it")
    assert not marker.exists(), "a pickled method checkpoint ran code"


@case("error")
def case_mvtec_all_zero_mask(tmp, capsys):
    root = T.make_mvtec(tmp / "mvtec")
    mask = sorted((root / "bottle" / "ground_truth").rglob("*_mask.png"))[0]
    T.write_mask(mask, np.zeros((16, 16)))
    rel = str(mask.relative_to(root))
    rc, out, err = cli(capsys, "datasets", "check", "mvtec_ad", root)
    assert rc == 1 and f"error: {rel}: mask of class" in out, out
    for method, protocol in (("rel_mean", "fss"), ("rel_fad", "fad")):
        assert_error(cli(capsys, "bench", "--method", method, "--dataset", "mvtec_ad", "--data-root", root,
                         "--protocol", protocol, "--workdir", tmp / "w", "--no-progress"),
                     re.escape(rel) + ".*is empty")


@case("warning")
def case_truncated_resume_state(tmp, capsys):
    root, work = folder(tmp), tmp / "w"
    assert bench(capsys, root, work)[0] == 0
    rec = record(work)
    (work / "runs" / f"{rec['run_id']}.json").unlink()
    state = work / "runs" / f"{rec['run_id']}.partial" / "state.json"
    state.parent.mkdir()
    state.write_text('{"version": 1, "run_id": "')
    assert_warning(bench(capsys, root, work), r"resume state .* is damaged .* restarts")
    assert record(work)["metrics"] == rec["metrics"]


@case("warning")
def case_resume_claims_all_done_with_empty_meters(tmp, capsys):
    root, work = folder(tmp), tmp / "w"
    assert bench(capsys, root, work)[0] == 0
    rec = record(work)
    (work / "runs" / f"{rec['run_id']}.json").unlink()
    folder_ = work / "runs" / f"{rec['run_id']}.partial"
    folder_.mkdir()
    (folder_ / "state.json").write_text(json.dumps({
        "version": 1, "run_id": rec["run_id"], "manifest_hash": rec["manifest_hash"],
        "done": list(range(rec["episodes_total"])), "timing": {}, "chunks": [], "hist": None}))
    assert_warning(bench(capsys, root, work), r"the meters hold 0 scored queries")
    assert assert_scored(work)["metrics"] == rec["metrics"]


@case("warning")
def case_truncated_run_record_on_rerun(tmp, capsys):
    root, work = folder(tmp), tmp / "w"
    assert bench(capsys, root, work)[0] == 0
    rec = record(work)
    path = work / "runs" / f"{rec['run_id']}.json"
    path.write_text(path.read_text()[:100])
    assert_warning(bench(capsys, root, work), r"run record .* is damaged or truncated .* set aside")
    assert path.with_name(path.name + ".damaged").is_file()
    assert record(work)["metrics"] == rec["metrics"]


@case("warning")
def case_leaderboard_reports_a_truncated_record(tmp, capsys):
    root, work = folder(tmp), tmp / "w"
    assert bench(capsys, root, work)[0] == 0
    (work / "runs" / "broken.json").write_text('{"run_id": "x", "metr')
    assert_warning(cli(capsys, "leaderboard", "--workdir", work, "--out", tmp / "lb"),
                   r"run record .*broken.json is damaged")


@case("error")
def case_episodes_show_on_a_json_list(tmp, capsys):
    (tmp / "list.json").write_text("[1, 2, 3]")
    assert_error(cli(capsys, "episodes", "show", tmp / "list.json"), r"is not an episode manifest")


@case("error")
def case_episodes_show_on_a_truncated_manifest(tmp, capsys):
    (tmp / "m.json").write_text('{"episodes": [')
    assert_error(cli(capsys, "episodes", "show", tmp / "m.json"), r"cannot read manifest .*m.json")


# ---- datasets that `check` rejects: bench and episodes make refuse them, naming the file ----------
def _bad_mask(arr_or_image):
    def build(root: Path) -> Path:
        path = support_mask(root)
        if isinstance(arr_or_image, Image.Image):
            arr_or_image.save(path)
        else:
            Image.fromarray(arr_or_image).save(path)
        return path
    return build


BOX = T.box_mask(20, 20, 2, 2, 5)
BAD_MASKS = {
    "empty": _bad_mask(np.zeros((20, 20), np.uint8)),
    "zero_one": _bad_mask((BOX > 0).astype(np.uint8)),
    "soft_grey": _bad_mask((BOX > 0).astype(np.uint8) * 128),
    "16bit": _bad_mask(Image.fromarray((BOX > 0).astype(np.uint16) * 65535)),
    "red_rgb": _bad_mask(np.stack([BOX, np.zeros_like(BOX), np.zeros_like(BOX)], -1)),
    "wrong_size": _bad_mask(T.box_mask(10, 20, 1, 1, 4)),
}


def _bench_refuses(name):
    def run(tmp, capsys):
        root = folder(tmp)
        path = BAD_MASKS[name](root)
        rel = str(path.relative_to(root))
        assert_error(bench(capsys, root, tmp / "w"), re.escape(rel) + r".*(fix or remove these files|re-export)")
        assert not list((tmp / "w" / "runs").glob("*.json")), "a run record was written"
        assert_error(cli(capsys, "episodes", "make", "--dataset", "folder", "--data-root", root,
                         "--workdir", tmp / "w"), re.escape(rel))
    return run


def _check_names(name):
    def run(tmp, capsys):
        root = folder(tmp)
        path = BAD_MASKS[name](root)
        rc, out, err = cli(capsys, "datasets", "check", "folder", root)
        assert rc == 1 and f"error: {path.relative_to(root)}" in out and "Traceback" not in out + err, out
    return run


@case("ok")
def case_zero_one_masks_run_with_the_documented_option(tmp, capsys):
    root = folder(tmp)
    for k in range(2):
        Image.fromarray((np.asarray(Image.open(support_mask(root, k))) > 0).astype(np.uint8)).save(support_mask(root, k))
    q = root / OBJ / "query" / "mask" / "q0_mask.png"
    Image.fromarray((np.asarray(Image.open(q)) > 0).astype(np.uint8)).save(q)
    assert bench(capsys, root, tmp / "w", "--dataset-opt", "mask_threshold=0")[0] == 0
    rec = assert_scored(tmp / "w")
    assert rec["dataset_options"] == {"mask_threshold": 0}


def _mask_encoding(encode):
    def run(tmp, capsys):
        """A 0/255 support mask saved in another encoding reads as OpenCV reads it: the same mask."""
        import cv2

        from fdsbench.registry import get_dataset

        root = folder(tmp)
        for k in range(2):
            path = support_mask(root, k)
            reference = np.asarray(Image.open(path)) == 255
            encode(np.asarray(Image.open(path))).save(path)
            assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) == 255, reference)
            mask = get_dataset("folder")(root).load_mask(str(path.relative_to(root)).replace(
                "mask/", "image/").replace("_mask.png", ".jpg"), "defect")
            assert np.array_equal(mask, reference)
        assert bench(capsys, root, tmp / "w")[0] == 0
        assert_scored(tmp / "w")
    return run


def _palette(arr):
    im = Image.fromarray((arr > 0).astype(np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 255, 255])
    return im


case("ok", "one_bit_mask_reads_as_255")(_mask_encoding(lambda a: Image.fromarray(a).convert("1")))
case("ok", "palette_mask_reads_as_255")(_mask_encoding(_palette))


@case("error")
def case_corrupt_image(tmp, capsys):
    root = folder(tmp)
    (root / OBJ / "support" / "image" / "s1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert_error(bench(capsys, root, tmp / "w"), r"s1.jpg.*re-export or remove the file")


@case("warning")
def case_self_referencing_symlink(tmp, capsys):
    root = folder(tmp)
    os.symlink("loop.png", root / OBJ / "query" / "image" / "loop.png")
    os.symlink("loopdir", root / OBJ / "loopdir")
    rc, out, err = cli(capsys, "datasets", "check", "folder", root)
    assert rc == 0 and "warning: severstal_steel/loopdir: symbolic link that cannot be followed" in out, out + err
    assert bench(capsys, root, tmp / "w")[0] == 0
    assert_scored(tmp / "w")


@case("warning")
def case_shot_larger_than_the_pool_warns(tmp, capsys):
    root = folder(tmp)
    assert_warning(bench(capsys, root, tmp / "w", "--shot", "5"), r"drawn with replacement")
    assert_scored(tmp / "w")


@case("error")
def case_unknown_dataset_option(tmp, capsys):
    assert_error(bench(capsys, folder(tmp), tmp / "w", "--dataset-opt", "colour=red"),
                 r"has no option 'colour'; options: mask_threshold")


@case("error")
def case_bad_dataset_option_value(tmp, capsys):
    assert_error(bench(capsys, folder(tmp), tmp / "w", "--dataset-opt", "mask_threshold=abc"),
                 r"does not accept the options .*mask_threshold")


@case("error")
def case_dataset_option_not_key_value(tmp, capsys):
    assert_error(bench(capsys, folder(tmp), tmp / "w", "--dataset-opt", "mask_threshold"), r"is not key=value")


# ---- bad values on the command line --------------------------------------------------------------
def _bad_value(args, pattern, method="rel_mean"):
    def run(tmp, capsys):
        assert_error(bench(capsys, folder(tmp), tmp / "w", *args, method=method), pattern)
    return run


BAD_VALUES = {
    "crop_size_abc": (["--protocol-opt", "crop_size=abc"], r"crop_size='abc' is not a positive integer"),
    "crop_size_negative": (["--protocol-opt", "crop_size=-5"], r"crop_size=-5 is not a positive integer"),
    "resize_abc": (["--protocol-opt", "resize=abc"], r"resize='abc' is not a positive integer or \[height, width\]"),
    "resize_with_crop_boxes": (["--protocol-opt", "resize=64"], r"resize=\[64, 64\] with crop boxes.*crops=false"),
    "image_size_abc": (["--set", "image_size=abc"], r"'image_size' .* must be an integer, got 'abc'"),
    "image_size_float": (["--set", "image_size=64.7"], r"'image_size' .* must be an integer, got 64.7"),
    "max_episodes_zero": (["--max-episodes", "0"], r"max_episodes must be >= 1"),
    "max_episodes_negative": (["--max-episodes", "-1"], r"max_episodes must be >= 1"),
    "runs_zero": (["--runs", "0"], r"runs must be >= 1"),
    "shot_zero": (["--shot", "0"], r"shot must be >= 1"),
    "threshold_above_one": (["--threshold", "2"], r"threshold must be in \[0, 1\]"),
    "runs_not_an_integer": (["--runs", "two"], r"argument --runs: invalid int value: 'two'"),
    "layers_the_resnet_does_not_tap": (["--preset", "test", "--set", "layers=[1]"],
                                       r"layers=\[1\] for backbone 'resnet18': the ResNet taps are layer2 and "
                                       r"layer3 .* use layers=\[2,3\]", "sofs"),
}


@case("error")
def case_unknown_layer_name(tmp, capsys):
    assert_error(bench(capsys, folder(tmp), tmp / "w", "--preset", "test", "--set", "layers=[layer9]",
                       method="proto"), r"unknown feature layer 'layer9'; use one of .*layer1")


@case("error")
def case_layers_not_a_list(tmp, capsys):
    assert_error(bench(capsys, folder(tmp), tmp / "w", "--preset", "test", "--set", "layers=layer1",
                       method="proto"), r"'layers' .* must be a list")


@case("error")
def case_plugin_predict_raises(tmp, capsys):
    assert_error(bench(capsys, folder(tmp), tmp / "w", method="rel_boom"),
                 r"method 'rel_boom' raised ValueError in predict\(\) on episode 0 \(severstal_steel/defect\), "
                 r"query severstal_steel/query/image/q0.png at .*test_reliability.py:\d+: boom")


@case("error")
def case_workdir_is_a_file(tmp, capsys, monkeypatch):
    from fdsbench.data import DatasetAdapter

    def no_index(self):
        raise AssertionError("indexed before checking the workdir")
    monkeypatch.setattr(DatasetAdapter, "index", property(no_index))
    (tmp / "afile").write_text("x")
    assert_error(bench(capsys, folder(tmp), tmp / "afile"), r"workdir .*afile is a file, not a folder")
    assert_error(bench(capsys, folder(tmp, "own2"), tmp / "afile" / "sub"), r"workdir .*afile/sub is not writable")


@case("error")
def case_disk_full(tmp, capsys, monkeypatch):
    real = os.fsync

    def full(fd):
        if os.fstat(fd).st_size > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", full)
    assert_error(bench(capsys, folder(tmp), tmp / "w"), r"cannot write .*: No space left on device; free some space")


@case("warning")
def case_weights_without_published_hash_are_unverified(tmp, capsys, monkeypatch):
    wdir = tmp / "weights"
    wdir.mkdir()
    (wdir / "dino_deitsmall8_pretrain.pth").write_bytes(b"not the real file")
    monkeypatch.setenv("FDSBENCH_WEIGHTS", str(wdir))
    rc, out, err = cli(capsys, "weights", "verify", "dino_vits8")
    assert rc == 0 and "dino_vits8: UNVERIFIED" in out and "ok:" not in out, out + err


@case("error")
def case_episodes_make_on_a_workdir_file(tmp, capsys):
    (tmp / "afile").write_text("x")
    assert_error(cli(capsys, "episodes", "make", "--dataset", "folder", "--data-root", folder(tmp),
                     "--workdir", tmp / "afile"), r"workdir .*afile is a file")


# ---- outputs are readable by others ----------------------------------------------------------------
@case("ok")
def case_outputs_are_mode_0644(tmp, capsys):
    root, work = folder(tmp), tmp / "w"
    old = os.umask(0o077)
    try:
        assert bench(capsys, root, work)[0] == 0
        assert cli(capsys, "leaderboard", "--workdir", work, "--out", tmp / "lb")[0] == 0
    finally:
        os.umask(old)
    files = [*work.glob("runs/*.json"), *work.glob("manifests/*.json"), *(tmp / "lb").rglob("*.md")]
    assert len(files) >= 3
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f"{f} is {oct(f.stat().st_mode & 0o777)}"


# ---- the suite -------------------------------------------------------------------------------------
for _n in BAD_MASKS:
    case("error", f"bench_refuses_{_n}_support_mask")(_bench_refuses(_n))
    case("error", f"check_names_{_n}_support_mask")(_check_names(_n))
for _n, _v in BAD_VALUES.items():
    case("error", f"bad_value_{_n}")(_bad_value(*_v))

EXPECTED_CASES = 54


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name, tmp_path, capsys, monkeypatch):
    fn = CASES[name][1]
    kwargs = {"monkeypatch": monkeypatch} if "monkeypatch" in fn.__code__.co_varnames[:fn.__code__.co_argcount] else {}
    fn(tmp_path, capsys, **kwargs)


def test_count_of_cases():
    kinds = Counter(outcome for outcome, _ in CASES.values())
    print(f"\nreliability suite: {len(CASES)} cases ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})")
    assert len(CASES) == EXPECTED_CASES
