"""The inference context of methods that run their own autocast (GFDS FM and SAM2 with ``amp``)."""
from __future__ import annotations

import contextlib

import torch


def inference_context(device: str | torch.device, bf16: bool) -> contextlib.ExitStack:
    """``torch.inference_mode``, plus bf16 autocast on ``device``'s type when ``bf16``."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if bf16:
        stack.enter_context(torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16))
    return stack
