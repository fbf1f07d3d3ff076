"""Typed config machinery (shd_diffusion.config)."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from shd_diffusion.config import ConfigError, apply_overrides, dump_yaml, from_dict, load_config


@dataclass
class Inner:
    lr: float = 1e-4  # learning rate
    betas: tuple[float, float] = (0.9, 0.99)
    layers: list[int] | None = None
    kind: Literal["kl", "mse"] = "kl"


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    amp: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  kind: mse\n")
    cfg = load_config(Outer, path, ["inner.lr=3e-4", "inner.layers=[0, 2]", "amp=true"])
    assert cfg.steps == 5 and cfg.amp is True
    assert cfg.inner == Inner(lr=3e-4, betas=(0.9, 0.99), layers=[0, 2], kind="mse")
    # int is accepted where a float is declared, and becomes a float.
    assert isinstance(load_config(Outer, overrides=["inner.lr=1"]).inner.lr, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Outer, overrides=["inner.layers=[1]"])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.lrr=1", "unknown config key inner.lrr"),
        ("steps=1.5", "steps: expected an integer"),
        ("amp=1", "amp: expected true/false"),
        ("inner.kind=l1", "inner.kind: 'l1' is not one of 'kl', 'mse'"),
        ("inner.betas=[0.9]", "inner.betas: expected 2 items"),
        ("inner.layers=[a]", r"inner.layers\[0\]"),
        ("steps", "dotted.key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, overrides=[override])


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, bad)


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_changed_fields_counts_a_new_field_unchanged_only_at_its_default():
    from shd_diffusion.config import changed_fields

    defaults = {"a": 1, "sub": {"x": 0, "y": "k"}, "new": 3}
    current = {"a": 1, "sub": {"x": 0, "y": "k"}, "new": 3}
    assert changed_fields(current, current, defaults) == []
    assert changed_fields({"a": 1, "sub": {"x": 0, "y": "k"}}, current, defaults) == []  # "new" added, at default
    assert changed_fields({"a": 1, "sub": {"x": 0, "y": "k"}}, {**current, "new": 4}, defaults) == ["new"]
    assert changed_fields({"a": 1, "sub": {"x": 0}}, {**current, "sub": {"x": 0, "y": "j"}}, defaults) == ["sub.y"]
    assert changed_fields({**current, "gone": 5}, current, defaults) == ["gone"]  # removed from the schema
    assert changed_fields({**current, "a": 2, "sub": {"x": 1, "y": "k"}}, current, defaults) == ["a", "sub.x"]
    assert changed_fields({"a": 1, "sub": {"x": 0, "y": "k"}}, {**current, "extra": None}, defaults) == ["extra"]  # no default known
