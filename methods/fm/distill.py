"""Distil an FM student (FM-s / FM-l) from DINO ViT-S/8 (GFDS paper §5.1.1; EfficientAD-style recipe).

Paper facts: teacher DINO ViT-S/8, patch tokens of the LAST block at 512×512 input (64×64 tokens)
aligned with the student's 64×64 output at 256×256; L2 loss; Adam lr 1e-4, weight decay 1e-5;
160 000 iterations, batch 12; ImageNet images. Unpublished choices (◊, inherited from EfficientAD's
pre-training script, which GFDS acknowledges) are flags, recorded in the output JSON:

* ``grayscale_p`` (◊ 0.1): RandomGrayscale applied once per sample, shared by both views;
* ``teacher_norm`` (◊ True): target after DINO's final LayerNorm (``get_intermediate_layers(n=1)``);
* ``standardize`` (◊ True): per-channel standardisation of the target with mean/std estimated on
  ``norm_images`` (◊ 10 000) training images before training.

The teacher is fdsbench's DINO ViT-S/8 (official parameter names and DINO's own position-embedding
interpolation to 512×512), with the official ``dino_deitsmall8_pretrain.pth`` from a local file.
Samples are drawn from any folder of images (searched recursively): sample g of the run is image
``perm_e[g mod N]`` with a permutation per pass e seeded by ``seed``, and its grayscale draw is seeded
by (seed, g), so a resumed run continues the same sequence. Checkpoints (student, Adam state, step,
standardisation statistics; tensors only) are written every ``checkpoint_every`` steps.

The result is ``<out>/<name>.pth`` (the Sequential's state dict, loadable strictly by ``fm``), a
``<name>.json`` record, and an entry ``name -> {file, sha256, arch, recipe}`` in the local student
registry (``$FDSBENCH_CACHE/weights/fm_students.json``), so that ``--set weights=<name>`` selects it.

    python -m fdsbench.methods.fm.distill --images /data/imagenet/train --student s --name fm_s_mine \\
        --device cuda                        # the full 160k-step recipe
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from fdsbench.blocks.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from fdsbench.errors import DataError, FdsError
from fdsbench.io import atomic_write_bytes, atomic_write_json, read_image
from fdsbench import weights as W
from fdsbench.weights import file_sha256

from .students import build_student, register_student, student_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
TEACHER = "dino_vits8"


@dataclasses.dataclass
class DistillConfig:
    images: str = ""  # folder of training images (recursive)
    name: str = ""  # registry name of the result
    student: str = "s"  # s = FM-s | l = FM-l
    fm_l_arch: str = "code"  # code | table3
    teacher_weights: str = "default"  # default = dino_deitsmall8_pretrain.pth from the weights table | path | random
    teacher_impl: str = "fdsbench"  # fdsbench (DINO's run-time pos-embed interpolation) | timm (resampled at load)
    steps: int = 160_000
    batch_size: int = 12
    lr: float = 1e-4
    weight_decay: float = 1e-5  # Adam's (L2) weight decay, as torch.optim.Adam
    student_size: int = 256
    teacher_size: int = 512
    grayscale_p: float = 0.1  # ◊
    teacher_norm: bool = True  # ◊ final LayerNorm on the last block's tokens
    standardize: bool = True  # ◊ per-channel target standardisation
    norm_images: int = 10_000  # ◊ images used to estimate the standardisation statistics
    seed: int = 0
    checkpoint_every: int = 1000
    device: str = "cpu"
    workers: int = 0  # DataLoader processes decoding images (the sample sequence does not depend on it)


class Samples(torch.utils.data.Dataset):
    """Deterministic, resumable sample stream over an image folder (see the module doc)."""

    def __init__(self, folder: str | Path, seed: int, student_size: int, teacher_size: int, grayscale_p: float):
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataError(f"distill: image folder {root} does not exist; pass --images DIR (ImageNet train or your own images)")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"distill: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.seed, self.grayscale_p = int(seed), float(grayscale_p)
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.teacher_view = transforms.Compose([transforms.Resize((teacher_size, teacher_size)),
                                                transforms.ToTensor(), norm])
        self.student_view = transforms.Compose([transforms.Resize((student_size, student_size)),
                                                transforms.ToTensor(), norm])
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, g: int) -> int:
        n = len(self.files)
        e = g // n
        if e not in self._perms:
            self._perms = {e: np.random.default_rng([self.seed, e]).permutation(n)}
        return int(self._perms[e][g % n])

    def sample(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher view 3×512×512, student view 3×256×256) of global sample ``g``."""
        image = Image.fromarray(read_image(self.files[self._index(g)]))
        if np.random.default_rng([self.seed, 1, g]).random() < self.grayscale_p:
            image = image.convert("L").convert("RGB")  # RandomGrayscale: 3 equal channels
        return self.teacher_view(image), self.student_view(image)

    def __len__(self) -> int:
        return 2 ** 62  # an endless stream; the loader's sampler says which samples to draw

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(g)


def timm_teacher(weights: str, size: int) -> tuple[torch.nn.Module, str]:
    """timm's ``vit_small_patch8_224.dino`` built for ``size``² input (random init, seed 0), the DINO
    file loaded strictly with its position embedding resampled once at load (timm's bicubic with
    antialias — unlike DINO's own run-time interpolation)."""
    import timm
    from timm.layers import resample_abs_pos_embed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("vit_small_patch8_224.dino", pretrained=False, img_size=size, num_classes=0)
    prov = "random-init"
    if weights != "random":
        path, p = W.resolve(TEACHER, None if weights in ("default", "", None) else weights)
        sd = W.read_checkpoint(path)
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [size // 8, size // 8], num_prefix_tokens=1)
        W.load_into(vit, sd, strict=True, source=str(path))
        prov = p["sha256"]
    return vit.eval().requires_grad_(False), prov


class Teacher(torch.nn.Module):
    """DINO ViT-S/8: last-block patch tokens (CLS dropped) as 384×h×w, optionally standardised.

    ``impl="fdsbench"``: fdsbench's ViT (official DINO names, DINO's run-time position-embedding
    interpolation, as ``torch.hub`` DINO); ``impl="timm"``: timm's model (:func:`timm_teacher`)."""

    def __init__(self, weights: str, norm: bool, device: str, impl: str = "fdsbench", size: int = 512):
        super().__init__()
        if impl == "fdsbench":
            self.vit = build_backbone(TEACHER, weights, device=device, seed=0)
            self._provenance = self.vit.provenance["sha256"]
        elif impl == "timm":
            self.vit, self._provenance = timm_teacher(weights, size)
            self.vit.to(device)
        else:
            raise FdsError(f"distill: teacher implementation '{impl}' is unknown; use fdsbench or timm")
        self.impl, self.norm = impl, norm
        self.register_buffer("mean", torch.zeros(1, 384, 1, 1, device=device))
        self.register_buffer("std", torch.ones(1, 384, 1, 1, device=device))

    @property
    def provenance(self) -> str:
        return self._provenance

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "timm":
            return self.vit.forward_intermediates(x, indices=1, norm=self.norm, intermediates_only=True)[0]
        return self.vit.forward_features(x, layers=(-1,), norm=self.norm)[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.mean) / self.std

    @torch.no_grad()
    def estimate_standardization(self, samples: Samples, n_images: int, batch: int, progress: bool) -> None:
        """Per-channel mean, then std, of the raw targets over the first ``n_images`` samples."""
        from tqdm import tqdm

        n = max(1, min(n_images, len(samples.files)))
        device = self.mean.device
        s1 = torch.zeros(384, dtype=torch.float64, device=device)
        s2 = torch.zeros(384, dtype=torch.float64, device=device)
        count = 0
        for start in tqdm(range(0, n, batch), desc="teacher statistics", disable=not progress, file=sys.stderr):
            x = torch.stack([samples.sample(g)[0] for g in range(start, min(n, start + batch))]).to(device)
            t = self.raw(x).double()
            s1 += t.sum(dim=(0, 2, 3))
            s2 += (t * t).sum(dim=(0, 2, 3))
            count += t.shape[0] * t.shape[2] * t.shape[3]
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp(min=0) * count / max(1, count - 1)
        self.mean.copy_(mean.float().view(1, -1, 1, 1))
        self.std.copy_(var.sqrt().clamp(min=1e-6).float().view(1, -1, 1, 1))


def _save_checkpoint(path: Path, student, optimizer, step: int, teacher: Teacher, losses: list[float]) -> None:
    buf = io.BytesIO()
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "mean": teacher.mean.cpu(), "std": teacher.std.cpu(), "losses": torch.tensor(losses)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def recipe(cfg: DistillConfig, teacher_sha: str) -> dict:
    """What the result depends on (recorded in the JSON and the registry; without ``steps``, the resume key)."""
    d = dataclasses.asdict(cfg)
    for k in ("name", "checkpoint_every", "device", "workers"):
        d.pop(k)
    d["images"] = str(Path(cfg.images).expanduser().resolve())
    d["teacher"] = TEACHER
    d["teacher_sha256"] = teacher_sha
    return d


def distill(cfg: DistillConfig, out: str | Path, *, progress: bool = True,
            log=lambda s: print(s, file=sys.stderr)) -> dict:
    """Train (or resume) a student; write weights + JSON, register it. Returns the JSON record."""
    from tqdm import tqdm

    if not cfg.name:
        raise FdsError("distill: give the student a --name (the name `fm` will use: --set weights=<name>)")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    arch = student_key(cfg.student, cfg.fm_l_arch)
    samples = Samples(cfg.images, cfg.seed, cfg.student_size, cfg.teacher_size, cfg.grayscale_p)
    teacher = Teacher(cfg.teacher_weights, cfg.teacher_norm, cfg.device, cfg.teacher_impl, cfg.teacher_size)
    rec = recipe(cfg, teacher.provenance)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        student = build_student(cfg.student, cfg.fm_l_arch).to(cfg.device)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt, meta = out / f"{cfg.name}.ckpt.pt", out / f"{cfg.name}.ckpt.json"
    key = {k: v for k, v in rec.items() if k != "steps"}  # a longer run continues a shorter one
    step, losses = 0, []
    if ckpt.is_file() and meta.is_file() and json.loads(meta.read_text()).get("resume_key") == key:
        state = torch.load(ckpt, map_location=cfg.device, weights_only=True)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        teacher.mean.copy_(state["mean"])
        teacher.std.copy_(state["std"])
        step, losses = int(state["step"]), [float(v) for v in state["losses"]]
        log(f"distill: resumed {cfg.name} at step {step}/{cfg.steps} from {ckpt}")
    elif ckpt.is_file():
        log(f"distill: {ckpt} was made with another recipe; starting again")
    if step == 0 and cfg.standardize:
        teacher.estimate_standardization(samples, cfg.norm_images, cfg.batch_size, progress)
    atomic_write_json(meta, {"resume_key": key})
    student.train()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"distill {cfg.name}", disable=not progress, file=sys.stderr)
    loader = torch.utils.data.DataLoader(samples, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         sampler=range(step * cfg.batch_size, cfg.steps * cfg.batch_size))
    for x_t, x_s in loader:
        target = teacher(x_t.to(cfg.device))
        loss = ((student(x_s.to(cfg.device)) - target) ** 2).mean()
        if not torch.isfinite(loss):
            raise FdsError(f"distill: loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, student, optimizer, step, teacher, losses)
    bar.close()
    student.eval()
    weights = out / f"{cfg.name}.pth"
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, buf)
    atomic_write_bytes(weights, buf.getvalue())
    sha = file_sha256(weights)
    record = {"name": cfg.name, "file": str(weights.resolve()), "sha256": sha, "arch": arch, "recipe": rec,
              "steps_done": step, "seconds_this_session": round(time.time() - t0, 1),
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "losses": losses, "target_mean": teacher.mean.flatten().tolist(),
              "target_std": teacher.std.flatten().tolist(), "device": cfg.device}
    atomic_write_json(out / f"{cfg.name}.json", record)
    reg = register_student(cfg.name, {k: record[k] for k in ("file", "sha256", "arch", "recipe")})
    log(f"distill: wrote {weights} (sha256 {sha}); registered '{cfg.name}' in {reg}; use `--set weights={cfg.name}`")
    return record


def main(argv=None) -> int:
    from fdsbench.netguard import offline_from_env

    d = DistillConfig()
    p = argparse.ArgumentParser(prog="python -m fdsbench.methods.fm.distill",
                                description="Distil a GFDS FM student from DINO ViT-S/8 (resumable).")
    p.add_argument("--images", required=True, help="folder of training images (searched recursively)")
    p.add_argument("--name", required=True, help="registry name of the result (fm: --set weights=NAME)")
    p.add_argument("--out", default=None, help="output folder (default: $FDSBENCH_CACHE/weights/fm_students)")
    p.add_argument("--student", choices=("s", "l"), default=d.student)
    p.add_argument("--fm-l-arch", choices=("code", "table3"), default=d.fm_l_arch)
    p.add_argument("--teacher-impl", choices=("fdsbench", "timm"), default=d.teacher_impl,
                   help="fdsbench's ViT (DINO's own position-embedding interpolation) or timm's vit_small_patch8_224.dino")
    p.add_argument("--teacher-weights", default=d.teacher_weights,
                   help="dino_deitsmall8_pretrain.pth path, 'default' (weights table lookup) or 'random' (tests)")
    for name in ("steps", "batch_size", "student_size", "teacher_size", "norm_images", "seed", "checkpoint_every",
                 "workers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "grayscale_p"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--teacher-norm", action=argparse.BooleanOptionalAction, default=d.teacher_norm)
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d.standardize)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = DistillConfig(**{k: v for k, v in vars(a).items() if k in fields})
    from fdsbench.weights import cache_dir

    out = a.out or cache_dir() / "fm_students"
    try:
        with offline_from_env():
            distill(cfg, out, progress=not a.no_progress)
    except FdsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
