from pathlib import Path

import pytest

from fdsbench.errors import FdsError, UnknownNameError
from fdsbench.method import Method
from fdsbench.registry import get_dataset, get_method, list_methods, load_plugin, register_method


def test_builtin_methods_and_datasets_are_listed():
    assert "proto" in list_methods()
    assert get_dataset("synthetic").name == "synthetic"


def test_unknown_method_lists_known():
    with pytest.raises(UnknownNameError) as e:
        get_method("no_such_method")
    assert "unknown method 'no_such_method'" in str(e.value) and "proto" in str(e.value)


def test_unknown_dataset_lists_known():
    with pytest.raises(UnknownNameError, match="synthetic"):
        get_dataset("nope")


def test_register_requires_method_subclass():
    with pytest.raises(TypeError):
        register_method("bad")(object)


def test_name_clash_between_different_classes_is_an_error():
    @register_method("clash_a")
    class A(Method):
        pass

    class B(Method):
        pass

    with pytest.raises(FdsError, match="already registered"):
        register_method("clash_a")(B)


def test_plugin_file(tmp_path):
    load_plugin(Path(__file__).parent / "plugins" / "toy_plugin.py")
    assert "toy_color" in list_methods()


def test_broken_plugin_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import numpy\nraise ValueError('boom')\n")
    with pytest.raises(FdsError, match=r"broken.py failed to import \(line 2\): ValueError: boom"):
        load_plugin(bad)
    with pytest.raises(FdsError, match="not found"):
        load_plugin(tmp_path / "missing.py")


def test_entry_point_plugins_are_loaded(monkeypatch):
    import fdsbench.registry as reg

    class EP:
        name, value = "ep_method", "pkg:mod"

        def load(self):
            @register_method("ep_method")
            class EPMethod(Method):
                pass

    monkeypatch.setattr(reg, "entry_points", lambda group: [EP()] if group == "fdsbench.methods" else [])
    reg._load_entry_points()
    assert "ep_method" in list_methods()


def test_every_registered_method_describes_itself():
    """`fdsbench methods` prints the first docstring line: none may be blank."""
    from fdsbench.registry import list_methods

    ours = {n: c for n, c in list_methods().items() if c.__module__.startswith("fdsbench.methods.")}
    assert {"proto", "sofs", "sam2", "nbr_cap"} <= set(ours)
    for name, cls in ours.items():
        assert (cls.__doc__ or "").strip(), f"method '{name}' has no docstring"
