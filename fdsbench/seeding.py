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


@functools.cache
def _accelerators() -> tuple[bool, bool]:
    import torch

    return torch.cuda.is_available(), torch.backends.mps.is_available()
