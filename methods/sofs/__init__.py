"""SOFS (Zhang et al., NeurIPS 2024): small object few-shot segmentation; registers ``sofs``."""
from .method import SOFSMethod  # noqa: F401  (registers the method)
