"""GFDS FM + FastSAM fusion (registers method ``fm_fastsam``). Needs ``ultralytics==8.4.190``
(installed with ``--no-deps``: requirements-ultralytics.txt); it is always run offline."""
from __future__ import annotations

from .fusion import FUSIONS, FusionParams, fuse, remove_overlap, select
from .method import FUSION_ROWS, FMFastSAM, FMFastSAMConfig

__all__ = ["FMFastSAM", "FMFastSAMConfig", "FUSION_ROWS", "FUSIONS", "FusionParams", "fuse", "remove_overlap",
           "select"]
