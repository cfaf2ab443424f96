"""SAM2 video-track few-shot defect segmentation (GFDS paper §5.2, §6.1.2).

Registers method ``sam2``. Needs the official package: ``SAM2_BUILD_CUDA=0 pip install
--no-build-isolation sam2==1.1.0`` (imported absolutely as ``sam2``; this package is
``fdsbench.methods.sam2``)."""
from __future__ import annotations

from .method import PAPER_ROWS, Sam2Config, Sam2VideoTrack, load_checkpoint

__all__ = ["Sam2VideoTrack", "Sam2Config", "PAPER_ROWS", "load_checkpoint"]
