"""GFDS distilled feature matching, FM-l / FM-s (registers method ``fm``); the students and their
distillation from DINO ViT-S/8 (``python -m fdsbench.methods.fm.distill``)."""
from __future__ import annotations

from .method import PAPER_ROWS, FeatureMatching, FMConfig, FMState, to_input, to_mask
from .students import build_student, make_student, pdn_medium, pdn_small

__all__ = ["FeatureMatching", "FMConfig", "FMState", "PAPER_ROWS", "to_input", "to_mask", "build_student",
           "make_student", "pdn_small", "pdn_medium"]
