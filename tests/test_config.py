from dataclasses import dataclass

import pytest

from fdsbench.config import build_config, parse_overrides
from fdsbench.errors import FdsError


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    layers: tuple = (2, 3)
    name: str = "a"


def test_overrides_are_typed_like_the_defaults():
    ov = parse_overrides(["lr=3e-4", "steps=5", "layers=[1,2]", "name=3e-4"])
    assert ov["lr"] == "3e-4"  # YAML 1.1 reads an exponent without a dot as a string ...
    c = build_config(Cfg, {"fast": {"steps": 1, "lr": 1}}, "fast", ov)
    assert c.lr == pytest.approx(3e-4) and isinstance(c.lr, float)  # ... build_config makes it the float it is
    assert c.steps == 5 and c.layers == (1, 2) and c.name == "3e-4"
    assert isinstance(build_config(Cfg, {"fast": {"lr": 1}}, "fast").lr, float)


def test_bad_overrides_are_named():
    with pytest.raises(FdsError, match="'lr' of Cfg must be a number, got 'fast'"):
        build_config(Cfg, {}, None, {"lr": "fast"})
    with pytest.raises(FdsError, match="unknown config key.*lrr.*known: layers, lr, name, steps"):
        build_config(Cfg, {}, None, {"lrr": 1})
    with pytest.raises(FdsError, match="unknown config preset 'paperr'"):
        build_config(Cfg, {"paper": {}}, "paperr")
    with pytest.raises(FdsError, match="not key=value"):
        parse_overrides(["lr"])
