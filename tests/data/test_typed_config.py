from dataclasses import dataclass, field
from typing import Literal

import pytest

from data.typed_config import ConfigError, from_dict, load_yaml


@dataclass
class Lora:
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k")


@dataclass
class Expert:
    timesteps: tuple[int, int]
    sampler: Literal["uniform", "logit_normal"] = "uniform"
    lora: Lora = field(default_factory=Lora)
    lr: float | None = None


def test_builds_nested_and_converts_types():
    e = from_dict(Expert, {"timesteps": [875, 1000], "lora": {"rank": 4, "alpha": 2}}, "r.yaml: experts.high")
    assert e.timesteps == (875, 1000) and e.lora.rank == 4 and e.lora.alpha == 2.0 and isinstance(e.lora.alpha, float)
    assert e.lora.targets == ("q", "k") and e.lr is None


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"r.yaml: experts.high.lora.rnak is not a known key; did you mean 'rank'"):
        from_dict(Expert, {"timesteps": [0, 1], "lora": {"rnak": 4}}, "r.yaml: experts.high")


def test_wrong_type_and_literal_and_missing():
    with pytest.raises(ConfigError, match="lora.rank: expected a whole number, found str"):
        from_dict(Expert, {"timesteps": [0, 1], "lora": {"rank": "big"}})
    with pytest.raises(ConfigError, match="sampler: 'gauss' is not allowed"):
        from_dict(Expert, {"timesteps": [0, 1], "sampler": "gauss"})
    with pytest.raises(ConfigError, match="timesteps is required"):
        from_dict(Expert, {})
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_dict(Expert, {"timesteps": [0, 1, 2]})


def test_load_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: line"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(lst)
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
