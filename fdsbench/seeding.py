"""Seeding: every episode gets its own seed from the manifest, so a result never depends on the
order, batching or sharding of episodes."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np


def derive_seed(*keys) -> int:
    """A 31-bit seed from any JSON-able keys (stable across processes and Python versions)."""
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
