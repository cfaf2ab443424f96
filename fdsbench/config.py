"""Method configurations: a dataclass of paper defaults, named presets on top, ``key=value``
overrides on top of that. The resolved config is hashed into every run record."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import yaml

from .errors import FdsError
from .io import content_hash


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=1e-4", "layers=[2,3]"]`` -> ``{"lr": 1e-4, "layers": [2, 3]}`` (values read as YAML)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise FdsError(f"override '{item}' is not key=value (e.g. --set lr=1e-4)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise FdsError(f"cannot read the value of override '{item}': {e}") from None
    return out


def build_config(cls: type, presets: dict[str, dict], preset: str | None, overrides: dict | None = None):
    """Instantiate config dataclass ``cls`` from its defaults + ``presets[preset]`` + ``overrides``."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in presets:
            raise FdsError(f"unknown config preset '{preset}'; known: {', '.join(sorted(presets))}")
        values.update(presets[preset])
    values.update(overrides or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise FdsError(f"unknown config key(s) {', '.join(unknown)} for {cls.__qualname__}; "
                       f"known: {', '.join(sorted(names))}")
    for key, value in list(values.items()):
        default = getattr(cls, key, None) if names[key].default is not dataclasses.MISSING else None
        if isinstance(default, tuple) and isinstance(value, list):
            values[key] = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif isinstance(default, float) and isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            try:
                values[key] = float(value)
            except ValueError:
                raise FdsError(f"config key '{key}' of {cls.__qualname__} is a number; got {value!r}") from None
    return cls(**values)


def config_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def config_hash(config) -> str:
    return content_hash(config_dict(config))
