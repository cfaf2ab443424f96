"""``proto``: the training-free prototype baseline (see method.py)."""
from .method import Proto

__all__ = ["Proto"]
