"""Method configurations: a dataclass of paper defaults, named presets on top, ``key=value``
overrides on top of that. The resolved config is hashed into every run record.

Overrides are checked against the field's annotation before the config is built (``image_size=64.7``
or ``image_size=abc`` for an ``int`` field is refused in one line naming the key, its type and the
value), so a typo never reaches the model — or silently changes a run's identity."""
from __future__ import annotations

import dataclasses
import types
import typing
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


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list, e.g. [2,3]"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping",
            tuple: "a list, e.g. [2,3]", list: "a list, e.g. [2,3]"}.get(hint, getattr(hint, "__name__", str(hint)))


_NO = object()


def _coerce(value, hint):
    """``value`` as the annotation ``hint`` wants it, or ``_NO``: ints stay ints (64.7 is not an
    int), numbers and YAML-1.1 strings like '3e-4' become floats, lists become tuples."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            out = _coerce(value, arm)
            if out is not _NO:
                return out
        return _NO
    if origin is typing.Literal:
        return value if value in typing.get_args(hint) else _NO
    if hint is type(None):
        return value if value is None else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _NO
        except ValueError:
            return _NO
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _NO
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif args and len(args) != len(value):
            return _NO
        items = [(_coerce(v, a) if args else v) for v, a in zip(value, args or value)]
        if any(v is _NO for v in items):
            return _NO
        return tuple(items) if (hint is tuple or origin is tuple) else list(items)
    if hint is dict or origin is dict:
        return value if isinstance(value, dict) else _NO
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _NO
    return value


def check_overrides(cls: type, overrides: dict) -> dict:
    """Overrides converted to their fields' types; a value of the wrong type is one error naming the
    key, the type it needs and the value given."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved: nothing to check against
        hints = {}
    out = {}
    for key, value in overrides.items():
        hint = hints.get(key, Any)
        coerced = _coerce(value, hint)
        if coerced is _NO:
            raise FdsError(f"config key '{key}' of {cls.__qualname__} must be {_type_name(hint)}, got {value!r} "
                           f"(--set {key}=...)")
        out[key] = coerced
    return out


def build_config(cls: type, presets: dict[str, dict], preset: str | None, overrides: dict | None = None):
    """Instantiate config dataclass ``cls`` from its defaults + ``presets[preset]`` + ``overrides``."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in presets:
            raise FdsError(f"unknown config preset '{preset}'; known: {', '.join(sorted(presets))}")
        values.update(presets[preset])
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((set(values) | set(overrides or {})) - set(names))
    if unknown:
        raise FdsError(f"unknown config key(s) {', '.join(unknown)} for {cls.__qualname__}; "
                       f"known: {', '.join(sorted(names))}")
    values.update(check_overrides(cls, overrides or {}))
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
