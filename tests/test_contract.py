"""Every registered method — shipped, entry-point, or the example plugin — passes the contract."""
from pathlib import Path

import numpy as np
import pytest

from fdsbench.loading import host_array
from fdsbench.registry import list_methods, load_plugin

from contract import check_method, make_method, small_episode

load_plugin(Path(__file__).parent / "plugins" / "toy_plugin.py")


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_contract(name, synthetic):
    check_method(list_methods()[name], synthetic)


@pytest.mark.parametrize("name", sorted(n for n, c in list_methods().items() if c.__module__.startswith("fdsbench.methods.")))
def test_shipped_methods_hand_over_a_fresh_map(name, synthetic):
    """A shipped method's map is a new float32 array nothing else refers to: the harness scores it
    while the method predicts the next query without copying it first."""
    cls = list_methods()[name]
    method = make_method(cls)
    support, queries, _, _ = small_episode(synthetic, cls, 1)
    pred = method.predict(method.prepare(support), queries[0])
    assert pred.dtype == np.float32 and host_array(pred) is pred
