"""Metrics engine: segmentation (mIoU, FB-IoU, per-image IoU/Dice, size breakdown) and score
metrics (image/pixel AUROC, pixel F1-max, AUPRO), exact or binned, with mergeable state.

Usage (the runner)::

    meters = MeterSet(threshold=0.5, score_mode="exact", image_score="max", logits=False)
    meters.update(prob, gt, class_key="obj/scratch", episode=3, query_id="obj/img_001")
    state = meters.state_dict(); other.load_state_dict(state); meters.merge(other)
    result = meters.compute()
"""
from .meterset import MeterSet
from .scores import BinnedScores, aupro_exact, auroc_exact, f1max_exact
from .segmentation import confusion, segmentation_metrics

__all__ = ["MeterSet", "BinnedScores", "auroc_exact", "f1max_exact", "aupro_exact", "confusion",
           "segmentation_metrics"]
