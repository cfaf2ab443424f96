"""PFENet (Tian et al., TPAMI 2020): official model and industrial variants; registers ``pfenet``."""
from .method import PFENetMethod  # noqa: F401  (registers the method)
