"""HDMNet (Peng et al., CVPR 2023): hierarchical dense correlation distillation; registers ``hdmnet``."""
from .method import HDMNetMethod  # noqa: F401  (registers the method)
