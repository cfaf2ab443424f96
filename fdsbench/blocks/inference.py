"""What the methods share at test time: the inference context of methods that run their own
autocast (GFDS FM and SAM2 with ``amp``), and the probability map ``predict`` hands to the harness."""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def inference_context(device: str | torch.device, bf16: bool) -> contextlib.ExitStack:
    """``torch.inference_mode``, plus bf16 autocast on ``device``'s type when ``bf16``."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if bf16:
        stack.enter_context(torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16))
    return stack


def probability_map(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """A query's map as ``predict`` returns it: float32 probabilities clipped to [0, 1], written once
    into a new array that nothing else refers to. A tensor (any device, any float dtype) is clipped
    where it lives and copied to the host straight into that array, converted on the way. The
    harness scores such an array while the method works on the next query without copying it again
    (a tensor's ``.numpy()`` view it must copy: the tensor's memory may be the method's)."""
    out = np.empty(tuple(m.shape), np.float32)
    if isinstance(m, torch.Tensor):
        torch.from_numpy(out).copy_(m.detach().clamp(0, 1))
    else:
        np.clip(m, 0.0, 1.0, out=out, casting="same_kind")
    return out
