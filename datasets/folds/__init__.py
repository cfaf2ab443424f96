"""Fold files of the shipped dataset adapters: ``<dataset>.json`` = {"source", "folds": [[test objects
of fold 0], ...], "notes"}. Fold k's test objects are listed; its training objects are all others."""
from __future__ import annotations

import json
from pathlib import Path

from fdsbench.errors import FdsError


def load(name: str) -> list[list[str]]:
    path = Path(__file__).with_name(f"{name}.json")
    try:
        data = json.loads(path.read_text())
        folds = data["folds"]
    except (OSError, ValueError, KeyError) as e:
        raise FdsError(f"fold file {path} is missing or damaged ({e}); reinstall fdsbench") from None
    if not (isinstance(folds, list) and all(isinstance(f, list) and all(isinstance(o, str) for o in f)
                                            for f in folds)):
        raise FdsError(f"fold file {path}: 'folds' must be a list of lists of object names")
    return folds
