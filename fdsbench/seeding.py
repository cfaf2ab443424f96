"""Seeding: every episode gets its own seed from the manifest, so a result never depends on the
order, batching or sharding of episodes."""
from __future__ import annotations

import functools
import hashlib
import json
import random

import numpy as np


def derive_seed(*keys) -> int:
    """A 31-bit seed from any JSON-able keys (stable across processes and Python versions)."""
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU, CUDA — lazily until CUDA is initialised — and MPS): what
    ``torch.manual_seed`` does for the devices fdsbench runs on, at a third of its cost (it runs
    before every episode, beside the loader's threads)."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.random.default_generator.manual_seed(seed)
    cuda, mps = _accelerators()
    if cuda:  # without CUDA its lazy seeding formats a stack trace per call, for nothing
        torch.cuda.manual_seed_all(seed)
    if mps:
        torch.mps.manual_seed(seed)


def cpu_threads(device: str) -> dict:
    """``{"torch_threads": n}`` on the CPU, else ``{}``. torch's CPU kernels split their float sums by
    thread, so the thread count changes trained weights and thresholded outputs (a 1-thread and a
    2-thread training of one preset can differ by points of mIoU): results are keyed by it."""
    if str(device).split(":")[0] != "cpu":
        return {}
    import torch

    return {"torch_threads": torch.get_num_threads()}


@functools.cache
def _accelerators() -> tuple[bool, bool]:
    import torch

    return torch.cuda.is_available(), torch.backends.mps.is_available()
