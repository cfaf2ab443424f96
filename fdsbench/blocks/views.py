"""Support views of the SOFS test protocol (SOFS appendix A.1), shared by SOFS and the NR variants
of the FSS baselines: with NR every shot gives its manifest crops at native resolution (1-shot = 4
crops of one image, 5-shot = 1 crop per image); a large-defect shot without crops is used whole and
repeated as often as the other shots' crops (``s_in_shot`` when set, else 4 for 1-shot and 1
otherwise). Without NR each shot is one whole image."""
from __future__ import annotations

from ..types import SupportSet


def support_views(support: SupportSet, nr: bool = True, s_in_shot: int = 0) -> tuple[list, bool]:
    """(views, whole): the (image, mask) views and whether queries take the whole-image path
    (every shot without crops, or NR off)."""
    if not nr:
        return [(s.image, s.mask) for s in support.shots], True
    crop_counts = [len(s.crops) for s in support.shots if s.crops is not None]
    reps = s_in_shot or (crop_counts[0] if crop_counts else (4 if support.shot == 1 else 1))
    views = []
    for s in support.shots:
        views += s.views() if s.crops is not None else [(s.image, s.mask)] * reps
    return views, not crop_counts
