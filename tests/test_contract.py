"""Every registered method — shipped, entry-point, or the example plugin — passes the contract."""
from pathlib import Path

import pytest

from fdsbench.registry import list_methods, load_plugin

from contract import check_method

load_plugin(Path(__file__).parent / "plugins" / "toy_plugin.py")


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_contract(name, synthetic):
    check_method(list_methods()[name], synthetic)
