"""The one config loader: YAML + ``key.sub=value`` overrides -> a typed ``kw_only`` dataclass.

Every problem is collected (unknown or missing keys, wrong types, errors raised by a section's
``__post_init__``, and the caller's own checks) and raised once as a ``ConfigError`` naming each key,
before any process group, model or stage exists. Training jobs, fine-tuning and corpus builds load
their configs through ``load_config``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Callable, Literal, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError([f"--config: no such file {path!r}"])
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"--config: {path} is not valid YAML: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config: {path} must hold a mapping of sections, got {type(data).__name__}"])
    return data


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Apply ``a.b.c=value`` (value parsed as YAML) in place; returns the errors."""
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r} must look like key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"override {item!r}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return errors


def type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``hint``; ints are accepted (and converted) where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = type_ok(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in typing.get_args(hint), value
    if hint is type(None):
        return value is None, value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (str, bool, dict):
        return isinstance(value, hint), value
    if origin is list:
        return isinstance(value, list), value
    if origin in (set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False, value
        return True, origin(value)
    if origin is tuple:  # YAML has lists; frozen configs keep tuples
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        if len(args) == 2 and args[1] is Ellipsis:
            checked = [type_ok(v, args[0]) for v in value]
            return all(ok for ok, _ in checked), tuple(v for _, v in checked)
        return True, tuple(value)
    return True, value


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def build_dataclass(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    """Instantiate ``cls`` from ``data``, appending one error per bad key (``path.key``)."""
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(f"{_join(path, key)}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: missing (required)")
            continue
        value, hint = data[name], hints[name]
        optional = [a for a in typing.get_args(hint) if a is not type(None)] \
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else []
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):  # ``Section | None``
            if value is None:
                kwargs[name] = None
                continue
            hint = optional[0]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, key, errors)
            continue
        if typing.get_origin(hint) is list and typing.get_args(hint) and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list) or not value:
                errors.append(f"{key}: must be a non-empty list")
                continue
            item_cls = typing.get_args(hint)[0]
            kwargs[name] = [build_dataclass(item_cls, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
            continue
        ok, converted = type_ok(value, hint)
        if not ok:
            errors.append(f"{key}: expected {describe(hint)}, got {value!r}")
            continue
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing fields were reported above
    except ValueError as err:  # a section's own __post_init__ check: named by the section's key
        messages = getattr(err, "errors", None) or [str(err)]
        errors.extend(m if path and m.startswith(path + ".") else f"{path or 'config'}: {m}" for m in messages)
        return None


def build_config(cls: type[T], raw: dict, errors: list[str], *, source: str = "config",
                 check: Callable[[T, list[str]], None] | None = None) -> T:
    """Build ``cls`` from a loaded mapping; ``check(config, errors)`` adds the caller's own checks (it runs
    whenever the top level was built, so its errors come with the structural ones). Raises one
    ``ConfigError`` with every problem, ``errors`` (e.g. from overrides) included."""
    cfg = build_dataclass(cls, raw, "", errors)
    if cfg is not None and check is not None:
        check(cfg, errors)
    if errors or cfg is None:
        raise ConfigError(errors or [f"{source}: could not be built"], source=source)
    return cfg


def load_config(cls: type[T], path: str, overrides: list[str] | tuple[str, ...] = (), *,
                check: Callable[[T, list[str]], None] | None = None) -> T:
    """YAML file + ``key.sub=value`` overrides -> ``cls`` (see ``build_config``)."""
    raw = load_yaml(path)
    errors = apply_overrides(raw, list(overrides))
    return build_config(cls, raw, errors, source=path, check=check)
