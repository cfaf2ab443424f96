"""An external method plugin, as a user would write it in their own file (see README, 'Plugins').

Run it with: make bench METHOD=toy_color PLUGIN=path/to/toy_plugin.py
"""
from dataclasses import dataclass

import numpy as np

from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Requirements


@register_method("toy_color")
class ToyColor(Method):
    """Colour-distance baseline: probability that a pixel has the support defect's mean colour."""

    requires = Requirements(fad=False)

    @dataclass
    class Config:
        sigma: float = 40.0  # colour distance (0–255 scale) at which the probability falls to 1/e

    presets = {"test": {}}

    def prepare(self, support):
        pixels = np.concatenate([s.image[s.mask] for s in support.shots]).astype(np.float32)
        return pixels.mean(axis=0)

    def predict(self, state, query):
        d2 = ((query.image.astype(np.float32) - state) ** 2).sum(-1)
        return np.exp(-d2 / self.config.sigma ** 2).astype(np.float32)
