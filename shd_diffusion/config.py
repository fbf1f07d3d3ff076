"""Typed configuration: dataclasses + YAML files + dotted command-line overrides.

A config is a tree of dataclasses. :func:`load_config` reads a YAML file, applies overrides such
as ``optim.lr=1e-4`` or ``distill.layer_map=[0,2,4]`` (values parsed as YAML), and builds the
dataclass tree. Unknown keys and values of the wrong type raise :class:`ConfigError` naming the dotted key,
before any work starts. YAML is parsed with ``yaml.safe_load``: a config file cannot run code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .cli import BadInput

__all__ = ["ConfigError", "from_dict", "to_dict", "apply_overrides", "load_config", "dump_yaml", "changed_fields"]

T = TypeVar("T")


class ConfigError(BadInput, ValueError):
    """A config value or key is invalid; the message names the dotted key and the fix."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error is the informative one
            return _coerce(value, candidates[0], key)
        for arg in candidates:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept numeric text for float fields.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML .inf / .nan: float settings are finite quantities
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, validating keys and types.

    Args:
        cls: the dataclass type.
        data: mapping of field name to value; missing fields take their defaults.
        prefix: dotted path of this mapping, for error messages.

    Returns:
        The dataclass instance.

    Raises:
        ConfigError: on an unknown key (with the valid ones listed) or a wrongly typed value.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # __post_init__ validation
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(_with_prefix(str(err), prefix or cls.__name__, fields)) from None


def _with_prefix(msg: str, prefix: str, fields: Any) -> str:
    """Name the dotted key: 'num_heads must ...' -> 'student.num_heads must ...' (once)."""
    if msg.startswith(prefix + "."):
        return msg
    if msg.split(" ", 1)[0].split("[", 1)[0] in fields:
        return f"{prefix}.{msg}"
    return f"{prefix}: {msg}"


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form of a config (tuples become lists), ready for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def changed_fields(recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted fields where the config dict ``current`` differs from ``recorded`` (both :func:`to_dict` forms).

    A field the record lacks was added to the schema after the record was made: it counts as
    unchanged when ``current`` holds its default in ``defaults`` (new fields default to the old
    behaviour). A field only the record has was removed since, and counts as changed.
    """
    changed = []
    for key in sorted(set(recorded) | set(current)):
        name = f"{prefix}{key}"
        if key not in current:
            changed.append(name)
        elif key not in recorded:
            if not isinstance(defaults, dict) or key not in defaults or defaults[key] != current[key]:
                changed.append(name)
        elif isinstance(recorded[key], dict) and isinstance(current[key], dict):
            sub = defaults.get(key, {}) if isinstance(defaults, dict) else {}
            changed += changed_fields(recorded[key], current[key], sub, f"{name}.")
        elif recorded[key] != current[key]:
            changed.append(name)
    return changed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested mapping (values parsed as YAML scalars/lists).

    Args:
        data: nested mapping (modified in place and returned).
        overrides: strings of the form ``dotted.key=value``.

    Returns:
        ``data``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read a YAML file (optional), apply dotted overrides, validate into dataclass ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (key order as declared)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
