"""Shared neural building blocks used by several methods.

``backbones`` (frozen ResNet/ViT feature extractors and weight loading), ``features`` (the on-disk
feature cache), ``masks`` (mask downsampling and masked average pooling), ``losses`` (Dice, CE,
mixed normal Dice), ``tiling`` (sliding windows and stitching), ``nr`` (the non-resizing episodic
training sampler), ``fss_episodes`` (the official PFENet/BAM-style training episodes and OpenCV
transform), ``training`` (the resumable meta-training loop) and ``inference`` (inference mode with
the methods' own bf16 autocast). Nothing here knows about the harness (runner, metrics,
leaderboards); methods reach these blocks directly.
"""
