"""The episodic method contract every plugin implements.

A method is a class registered with :func:`fdsbench.registry.register_method`. The harness calls

* ``fit(train)`` once per (fold, seed) if ``requires.training`` — meta-training on the base folds;
* ``prepare(support) -> state`` once per episode — all work that depends only on the support set
  (encoding, support memory, prototypes; per-episode fine-tuning). Timed separately from queries;
* ``predict(state, query) -> probability map`` once per query — float in [0, 1] at the query's
  ORIGINAL size [H, W]. No thresholding: the meters binarise (default 0.5) and rank scores. The
  output is scored while the next query is predicted: one the method keeps is copied first.

Everything a method needs is declared in ``requires`` (training, normal pool, weights, FAD), its
paper defaults live in ``Config`` and its named presets (``paper``, ``cpu``, ``test``) in
``presets``. The ``test`` preset must be tiny: the shared contract test runs every method with it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .config import build_config, config_dict, config_hash
from .types import Query, Requirements, SupportSet, TrainSource


@dataclasses.dataclass
class NoConfig:
    """Config of a method without options."""


class Method:
    name: ClassVar[str] = ""
    requires: ClassVar[Requirements] = Requirements()
    Config: ClassVar[type] = NoConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    default_preset: ClassVar[str | None] = None  # preset used when the user names none

    def __init__(self, config=None, device: str = "cpu"):
        if config is None:
            config = build_config(self.Config, self.presets, self.default_preset)
        elif isinstance(config, dict):
            config = build_config(self.Config, self.presets, None, config)
        self.config = config
        self.device = device
        #: a folder the harness gives the method for its own caches (e.g. fitted weights per support
        #: set); None outside a benchmark run
        self.workdir: Path | None = None

    @classmethod
    def from_preset(cls, preset: str | None = None, overrides: dict | None = None, device: str = "cpu"):
        preset = preset if preset is not None else cls.default_preset
        return cls(build_config(cls.Config, cls.presets, preset, overrides), device=device)

    # ---- the contract ------------------------------------------------------------------------
    def fit(self, train: TrainSource, workdir: Path) -> None:
        """Meta-train on the base folds (only for ``requires.training``). ``workdir`` holds the
        method's per-epoch checkpoints so an interrupted fit resumes."""
        raise NotImplementedError(f"method '{self.name}' declares no training")

    def prepare(self, support: SupportSet) -> Any:
        raise NotImplementedError

    def predict(self, state: Any, query: Query) -> np.ndarray:
        raise NotImplementedError

    # ---- checkpoints and provenance ----------------------------------------------------------
    def state_dict(self) -> dict:
        """Learned parameters after ``fit`` (the harness saves them with the run)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise NotImplementedError(f"method '{self.name}' has no learned state to load")

    def weights_provenance(self) -> dict[str, str]:
        """name -> sha256 of each weights file loaded, or "random-init"."""
        return {}

    def label(self) -> str:
        """The name tables show for this configured method (e.g. which output map a row scored);
        the method name unless a method says more."""
        return self.name

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "config": config_dict(self.config),
                "config_hash": config_hash(self.config), "weights": self.weights_provenance()}
