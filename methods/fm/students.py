"""The feature extractor E of GFDS feature matching (paper §5.1.1, Table 3): a patch description
network (PDN, EfficientAD) distilled from DINO ViT-S/8, mapping a 3×256×256 image to 384×64×64.

Both students are plain ``nn.Sequential`` stacks in the official module order, so the published
``model_small.pth`` / ``model_large.pth`` (keys ``"<index>.weight/bias"``) load strictly:

* FM-s = PDN-small with c = 128 (Table 3): conv indices 0, 3, 6, 8 — 2.69 M parameters.
* FM-l, ``arch="code"`` = PDN-medium as the released code builds it (1×1 convs, a ReLU before the
  head): conv indices 0, 3, 6, 8, 10, 12 — 8.03 M parameters. ``arch="table3"`` is the paper's
  Table 3 reading (PDN-small with c = 256, 7.62 M); no published weights exist for it.

Student weights are named by ``weights``: ``"default"`` (the published file from the weights table),
``"random"`` (seeded random init, recorded as such), a file path, or a name registered by
``python -m fdsbench.methods.fm.distill`` in the local student registry (:func:`registry_path`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from fdsbench import weights as W
from fdsbench.errors import FdsError, UnknownNameError, WeightsError

#: paper name -> weights-table entry of the published student
PUBLISHED = {"l": "fm_l", "s": "fm_s"}
ARCHS = ("code", "table3")
OUT_CHANNELS = 384


def pdn_small(c: int = 128, out_channels: int = OUT_CHANNELS) -> nn.Sequential:
    """PDN-small (Table 3): 4×4 conv, avg-pool, 4×4 conv, avg-pool, 3×3 conv, 4×4 head (no ReLU)."""
    return nn.Sequential(
        nn.Conv2d(3, c, kernel_size=4, padding=3),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1),
        nn.Conv2d(c, 2 * c, kernel_size=4, padding=3),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1),
        nn.Conv2d(2 * c, 2 * c, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(2 * c, out_channels, kernel_size=4),
    )


def pdn_medium(out_channels: int = OUT_CHANNELS) -> nn.Sequential:
    """PDN-medium (EfficientAD), the FM-l of the released code: two 1×1 convs and a ReLU before the head."""
    return nn.Sequential(
        nn.Conv2d(3, 256, kernel_size=4, padding=3),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1),
        nn.Conv2d(256, 512, kernel_size=4, padding=3),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1),
        nn.Conv2d(512, 512, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, kernel_size=4),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
    )


def build_student(student: str, arch: str = "code") -> nn.Sequential:
    """FM-l (``student="l"``) or FM-s (``"s"``) with PyTorch's default (random) initialisation."""
    if student not in PUBLISHED:
        raise FdsError(f"fm: student '{student}' is unknown; use 'l' (FM-l) or 's' (FM-s)")
    if arch not in ARCHS:
        raise FdsError(f"fm: fm_l_arch '{arch}' is unknown; use 'code' (PDN-medium, loads model_large.pth) "
                       "or 'table3' (the paper's Table 3)")
    if student == "s":
        return pdn_small(128)
    return pdn_medium() if arch == "code" else pdn_small(256)


def student_key(student: str, arch: str = "code") -> str:
    """Identifier of an architecture in registry entries: ``fm_s``, ``fm_l`` or ``fm_l_table3``."""
    return "fm_s" if student == "s" else ("fm_l" if arch == "code" else "fm_l_table3")


# ---- local registry of distilled students --------------------------------------------------------
def registry_path() -> Path:
    """``$FDSBENCH_CACHE/weights/fm_students.json`` (next to the weights cache the table uses)."""
    return W.cache_dir() / "fm_students.json"


def read_registry(path: str | os.PathLike | None = None) -> dict[str, dict]:
    p = Path(path) if path is not None else registry_path()
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"student registry {p} is unreadable ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise WeightsError(f"student registry {p} must map names to entries; fix or delete it")
    return data


def register_student(name: str, entry: dict, path: str | os.PathLike | None = None) -> Path:
    """Add or replace ``name`` in the registry (atomic write)."""
    from fdsbench.io import atomic_write_json

    if name in ("default", "random") or name in W.table():
        raise FdsError(f"student name '{name}' is reserved (weights table or a keyword); choose another --name")
    p = Path(path) if path is not None else registry_path()
    reg = read_registry(p)
    reg[name] = entry
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, reg)
    return p


def resolve_student_weights(weights: str, student: str, arch: str) -> tuple[Path | None, str]:
    """(file or None for random init, provenance string: the file's sha256 or "random-init")."""
    key = student_key(student, arch)
    if weights == "random":
        return None, "random-init"
    if weights in ("default", "", None):
        if key not in PUBLISHED.values():
            raise WeightsError(f"fm: no published weights for {key} (the paper's Table-3 FM-l); distill one with "
                               "`python -m fdsbench.methods.fm.distill` and name it, or use weights=random")
        path, prov = W.resolve(key)
        return path, prov["sha256"]
    reg = read_registry()
    if weights in reg:
        e = reg[weights]
        path = Path(e["file"])
        if not path.is_file():
            raise WeightsError(f"fm: registered student '{weights}' points to {path}, which does not exist; "
                               f"re-run the distillation or remove it from {registry_path()}")
        sha = W.file_sha256(path)
        if sha != e["sha256"]:
            raise WeightsError(f"fm: student file {path} has sha256 {sha}, but the registry ({registry_path()}) "
                               f"recorded {e['sha256']}; the file changed after distillation — re-register it")
        if e.get("arch") != key:
            raise WeightsError(f"fm: registered student '{weights}' is a {e.get('arch')}, but this config builds "
                               f"{key}; set student/fm_l_arch to match")
        return path, sha
    p = Path(weights).expanduser()
    if p.is_file():
        return p, W.file_sha256(p)
    known = ["default", "random", *reg]
    raise UnknownNameError("fm student weights (neither a file nor a registered name)", str(weights), known)


def load_student(module: nn.Module, path: Path) -> None:
    """Strict load of a state dict saved from the Sequential (``torch.load(weights_only=True)``)."""
    W.load_into(module, path, strict=True, source=str(path))


def make_student(student: str, arch: str = "code", weights: str = "default", seed: int = 0) -> tuple[nn.Sequential, str]:
    """Built, loaded and frozen student in eval mode, with its provenance. Random init is drawn from
    its own generator seeded ``seed`` (the same student whatever the global RNG state)."""
    path, prov = resolve_student_weights(weights, student, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_student(student, arch)
    if path is not None:
        load_student(net, path)
    net.eval().requires_grad_(False)
    return net, prov
