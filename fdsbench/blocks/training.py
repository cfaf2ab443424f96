"""A small episodic training loop shared by meta-trained methods: AdamW (or SGD) with named learning-rate
groups, the per-iteration poly schedule, frozen-BatchNorm training mode, per-epoch checkpoints in
the method's workdir and resume from the latest one (the SOFS recipe, paper appendix A.2).

    groups = param_groups(model, base_lr, [("query_semantic_transformer", 1.0)], default_mult=2.0)
    loop = TrainLoop(model, groups, workdir, epochs=50, iters_per_epoch=n, base_lr=1e-5)
    loop.run(lambda epoch: batches(epoch), lambda batch: loss(batch))

Poly schedule: lr_it = base * (1 - it / max_it) ** power with it starting at 1 and
max_it = epochs * iters_per_epoch; each group gets lr_it * its multiple. No warm-up.

Under ``torchrun`` (an initialised torch.distributed group of W processes) the loop trains with
DistributedDataParallel: every process draws the same global batch, takes its contiguous 1/W share
(the batch size must divide by W), and DDP averages the gradients — the gradient of the global batch's
mean loss, so the effective batch and the episode sequence are those of one process (the official SOFS
recipe spreads its batch over 4 GPUs the same way). The logged loss is the mean over processes; rank 0
writes the checkpoints (plain state of the unwrapped model: it loads in one process). ``step_loss``
calls ``loop.module`` (the DDP wrapper, or the model itself in one process) for the forward pass.
"""
from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import FdsError
from ..io import atomic_write_bytes
from ..seeding import seed_everything

CKPT_RE = re.compile(r"^epoch_(\d+)\.pt$")


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    return base_lr * max(0.0, 1.0 - it / max(1, max_it)) ** power


def param_groups(model: nn.Module, rules: Sequence[tuple[str, float]], default_mult: float = 1.0,
                 exclude: Sequence[str] = ("backbone.",)) -> list[dict]:
    """Trainable parameters split into AdamW groups: a parameter whose name contains the substring
    of a rule goes to that rule's group (lr multiple), the rest to a default group; names starting
    with an ``exclude`` prefix (the frozen encoder) and parameters without grad are left out.
    Groups are ordered as the rules, the default group last; each dict carries ``lr_mult``."""
    buckets: list[list] = [[] for _ in rules] + [[]]
    for name, p in model.named_parameters():
        if not p.requires_grad or any(name.startswith(e) for e in exclude):
            continue
        for i, (sub, _) in enumerate(rules):
            if sub in name:
                buckets[i].append(p)
                break
        else:
            buckets[-1].append(p)
    mults = [m for _, m in rules] + [default_mult]
    return [{"params": b, "lr_mult": m} for b, m in zip(buckets, mults) if b]


def trainable_state(model: nn.Module, exclude: Sequence[str] = ("backbone.",)) -> dict:
    """state_dict without the frozen encoder's entries (what checkpoints and runs store)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not any(k.startswith(e) for e in exclude)}


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode (the official fix_bn: statistics never update)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        torch.distributed.barrier()


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    world = _world()[1]
    if world == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x / world


def shard_batch(batch, rank: int, world: int):
    """This process's contiguous 1/``world`` share of a collated batch (tensors and lists along the
    first axis, dicts recursively); the whole batch in one process."""
    if world == 1:
        return batch
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (torch.Tensor, list, tuple)):
        n = len(batch)
        if n % world:
            raise FdsError(f"a batch of {n} does not split over {world} processes; use a batch size divisible "
                           f"by the number of processes (the effective batch stays the configured one)")
        part = batch[rank * n // world:(rank + 1) * n // world]
        return type(batch)(part) if isinstance(batch, tuple) else part
    return batch


def latest_checkpoint(workdir: Path) -> tuple[int, Path] | None:
    best = None
    for p in Path(workdir).glob("epoch_*.pt"):
        mt = CKPT_RE.match(p.name)
        if mt and (best is None or int(mt.group(1)) > best[0]):
            best = (int(mt.group(1)), p)
    return best


class TrainLoop:
    """Epoch loop with AdamW + poly lr, checkpoints ``workdir/epoch_NNN.pt`` (NNN = completed epochs)
    holding the trainable state, optimizer and iteration; ``run`` resumes from the latest one."""

    def __init__(self, model: nn.Module, groups: list[dict], workdir: Path | str, *, epochs: int,
                 iters_per_epoch: int, base_lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), power: float = 0.9, seed: int = 0,
                 keep_last: int = 2, grad_clip: float | None = None, log: Callable[[str], None] | None = None,
                 exclude: Sequence[str] = ("backbone.",), fingerprint: str = "", optimizer: str = "adamw",
                 momentum: float = 0.9):
        if not groups:
            raise FdsError("nothing to train: the model has no trainable parameters outside the encoder")
        self.model = model
        self.workdir = Path(workdir)
        self.epochs, self.iters_per_epoch = int(epochs), max(1, int(iters_per_epoch))
        self.max_it = self.epochs * self.iters_per_epoch
        self.base_lr, self.power, self.seed = float(base_lr), float(power), int(seed)
        self.keep_last, self.grad_clip = int(keep_last), grad_clip
        self.exclude = tuple(exclude)
        self.fingerprint = fingerprint  # e.g. the config hash: a checkpoint of another config is not resumed
        self.log = log or (lambda s: None)
        groups = [{"params": g["params"], "lr": self.base_lr * g["lr_mult"], "lr_mult": g["lr_mult"]} for g in groups]
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, betas=betas, weight_decay=weight_decay)
        elif optimizer == "sgd":  # PFENet/PSPNet recipe: SGD with momentum
            self.optimizer = torch.optim.SGD(groups, lr=self.base_lr, momentum=momentum, weight_decay=weight_decay)
        else:
            raise FdsError(f"unknown optimizer '{optimizer}'; use adamw or sgd")
        self.iteration = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.rank, self.world = _world()
        #: what ``step_loss`` calls for the forward pass: DDP-wrapped under torch.distributed
        self.module = model
        if self.world > 1:
            dev = next(model.parameters()).device
            self.module = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev] if dev.type == "cuda" else None)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        path = self.workdir / f"epoch_{self.epoch:03d}.pt"
        if self.rank != 0:
            _barrier()  # rank 0 writes; everyone continues once the file is complete
            return path
        buf = io.BytesIO()
        torch.save({"epoch": self.epoch, "iteration": self.iteration, "model": trainable_state(self.model, self.exclude),
                    "optimizer": self.optimizer.state_dict(), "history": self.history,
                    "fingerprint": self.fingerprint}, buf)
        atomic_write_bytes(path, buf.getvalue())
        if self.keep_last > 0:
            olds = sorted((int(CKPT_RE.match(p.name).group(1)), p) for p in self.workdir.glob("epoch_*.pt")
                          if CKPT_RE.match(p.name))
            for _, p in olds[:-self.keep_last]:
                p.unlink(missing_ok=True)
        _barrier()
        return path

    def resume(self) -> bool:
        found = latest_checkpoint(self.workdir)
        if not found:
            return False
        _, path = found
        try:  # plain tensors and containers only: a crafted pickle in a shared workdir cannot run code
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint names the file
            raise FdsError(f"cannot read checkpoint {path} as plain tensors ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is damaged or was not written "
                           f"by fdsbench: delete it to restart from the previous epoch") from None
        if not isinstance(ck, dict) or not {"epoch", "iteration", "model", "optimizer"} <= set(ck):
            raise FdsError(f"checkpoint {path} is not a training checkpoint of fdsbench (keys: "
                           f"{', '.join(map(str, ck)) if isinstance(ck, dict) else type(ck).__name__}); delete it "
                           f"to restart from the previous epoch")
        if ck.get("fingerprint", "") != self.fingerprint:
            self.log(f"ignoring checkpoint {path}: made with another configuration")
            return False
        missing, unexpected = self.model.load_state_dict(ck["model"], strict=False)
        bad = [k for k in missing if not any(k.startswith(e) for e in self.exclude)] + list(unexpected)
        if bad:
            raise FdsError(f"checkpoint {path} does not fit the model (keys {bad[:3]}...); delete the workdir "
                           f"{self.workdir} to train from scratch")
        self.optimizer.load_state_dict(ck["optimizer"])
        self.epoch, self.iteration = int(ck["epoch"]), int(ck["iteration"])
        self.history = list(ck.get("history", []))
        self.log(f"resumed from {path} (epoch {self.epoch}/{self.epochs})")
        return True

    # ---- loop --------------------------------------------------------------------------------
    def set_lr(self) -> float:
        lr = poly_lr(self.base_lr, self.iteration, self.max_it, self.power)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        return lr

    def run(self, batches: Callable[[int], Iterable], step_loss: Callable[[object], torch.Tensor],
            train_mode: Callable[[], None] | None = None) -> list[dict]:
        """Train the remaining epochs. ``batches(epoch)`` yields the epoch's batches,
        ``step_loss(batch)`` returns the scalar loss. Returns per-epoch {epoch, loss, seconds}."""
        self.resume()
        while self.epoch < self.epochs:
            seed_everything(self.seed + self.epoch)  # official: RNG_SEED + rank + epoch
            self.model.train()
            freeze_batchnorm(self.model)
            if train_mode:
                train_mode()
            t0, losses = time.time(), []
            for batch in batches(self.epoch):
                self.iteration += 1
                self.set_lr()
                loss = step_loss(shard_batch(batch, self.rank, self.world))
                mean = _mean_over_ranks(loss.detach())  # the global batch's loss, the same on every rank
                if not torch.isfinite(mean):
                    raise FdsError(f"training loss became {mean.item()} at iteration {self.iteration}; "
                                   f"lower the learning rate")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                                   self.grad_clip)
                self.optimizer.step()
                losses.append(float(mean))
            self.epoch += 1
            n = len(losses)
            rec = {"epoch": self.epoch, "loss": sum(losses) / max(1, n), "iterations": n,
                   "seconds": time.time() - t0, "losses": losses}
            self.history.append(rec)
            self.log(f"epoch {self.epoch}/{self.epochs}: loss {rec['loss']:.4f} ({n} it, {rec['seconds']:.1f}s)")
            self.save()
        self.model.eval()
        return self.history
