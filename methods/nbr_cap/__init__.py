"""NBR+CaP U-Net (Lin et al.): per-support fine-tuning of AlbuNet-34 with Normal Background
Regularisation and Crop-and-Paste."""
from .method import ABLATIONS, Fitted, NBRCaP, NBRCaPConfig  # noqa: F401  (registers "nbr_cap")
