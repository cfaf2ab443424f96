"""Plugin registries for methods and dataset adapters.

Methods come from three places: the packages shipped under ``fdsbench.methods``, installed
distributions that declare a ``fdsbench.methods`` entry point, and files named with ``--plugin``
(:func:`load_plugin`). All of them register through the same decorator::

    @register_method("my_method")
    class MyMethod(Method): ...
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path

from .errors import FdsError, UnknownNameError

_METHODS: dict[str, type] = {}
_DATASETS: dict[str, type] = {}
_UNAVAILABLE: dict[str, str] = {}  # module name -> why it could not be imported
_discovered = {"methods": False, "datasets": False}


def register_method(name: str):
    """Class decorator: register a :class:`fdsbench.method.Method` subclass under ``name``."""
    from .method import Method

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method('{name}') must decorate a subclass of fdsbench.Method")
        if name in _METHODS and _METHODS[name] is not cls:
            old = _METHODS[name]
            if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise FdsError(f"method name '{name}' is already registered by {old.__module__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def register_dataset(name: str):
    """Class decorator: register a :class:`fdsbench.data.DatasetAdapter` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        _DATASETS[name] = cls
        return cls

    return deco


def _import_builtin(package: str, key: str) -> None:
    if _discovered[key]:
        return
    _discovered[key] = True
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        full = f"{package}.{info.name}"
        try:
            importlib.import_module(full)
        except ImportError as e:  # an optional dependency is missing: report it on lookup
            _UNAVAILABLE[info.name] = f"{type(e).__name__}: {e}"


def _load_entry_points() -> None:
    for ep in entry_points(group="fdsbench.methods"):
        try:
            ep.load()
        except Exception as e:  # a broken third-party plugin must not hide the others
            _UNAVAILABLE[ep.name] = f"entry point {ep.value}: {type(e).__name__}: {e}"


def discover_methods() -> None:
    if not _discovered["methods"]:
        _import_builtin("fdsbench.methods", "methods")
        _load_entry_points()


def discover_datasets() -> None:
    _import_builtin("fdsbench.datasets", "datasets")


def load_plugin(path: str | Path) -> None:
    """Import a plugin file; the ``@register_method`` calls in it register its methods."""
    path = Path(path)
    if not path.is_file():
        raise FdsError(f"plugin file not found: {path}")
    mod_name = f"fdsbench_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"line {f.lineno}" for f in reversed(tb) if f.filename == str(path)), "")
        raise FdsError(f"plugin {path} failed to import ({where}): {type(e).__name__}: {e}") from None


def list_methods() -> dict[str, type]:
    discover_methods()
    return dict(sorted(_METHODS.items()))


def unavailable() -> dict[str, str]:
    discover_methods()
    discover_datasets()
    return dict(_UNAVAILABLE)


def get_method(name: str) -> type:
    discover_methods()
    if name in _METHODS:
        return _METHODS[name]
    if name in _UNAVAILABLE:
        raise FdsError(f"method '{name}' is installed but cannot be imported ({_UNAVAILABLE[name]}); "
                       f"install its dependencies (see README, 'Methods')")
    raise UnknownNameError("method", name, _METHODS)


def list_datasets() -> dict[str, type]:
    discover_datasets()
    return dict(sorted(_DATASETS.items()))


def get_dataset(name: str) -> type:
    discover_datasets()
    if name in _DATASETS:
        return _DATASETS[name]
    raise UnknownNameError("dataset", name, _DATASETS)
