"""YAML config + ``key.sub=value`` overrides -> a validated ``JobConfig``.

Every problem is collected (unknown or missing keys, wrong types, bad values, missing files) and raised
once as a ``ConfigError`` naming each key, before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal

import yaml

from gptforge.launcher.config_schema import JobConfig
from gptforge.model.config import GPTConfig, ModelConfigError
from gptforge.model.presets import PRESETS


class ConfigError(ValueError):
    """All problems of a config, one per line."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        super().__init__(f"{source} has {len(errors)} error(s):\n  - " + "\n  - ".join(errors))


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


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``hint``; ints are accepted (and converted) where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = _type_ok(value, arg)
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
            checked = [_type_ok(v, args[0]) for v in value]
            return all(ok for ok, _ in checked), tuple(v for _, v in checked)
        return True, tuple(value)
    return True, value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
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
        ok, converted = _type_ok(value, hint)
        if not ok:
            errors.append(f"{key}: expected {_describe(hint)}, got {value!r}")
            continue
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing fields were reported above


def model_config_from_section(section: dict, vocab_size: int | None, errors: list[str]) -> GPTConfig | None:
    """``model: {preset: NAME, <GPTConfig field>: value ...}`` -> GPTConfig; the tokenizer fixes the vocab."""
    if not isinstance(section, dict):
        errors.append("model must be a mapping with a 'preset' key")
        return None
    section = dict(section)
    name = section.pop("preset", None)
    if name is None:
        errors.append(f"model.preset: missing (required; one of {', '.join(PRESETS)})")
        return None
    if name not in PRESETS:
        errors.append(f"model.preset: unknown preset {name!r} (choose one of: {', '.join(PRESETS)})")
        return None
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    hints = typing.get_type_hints(GPTConfig)
    overrides = {}
    for key, value in section.items():
        if key not in known:
            errors.append(f"model.{key}: unknown key (known: preset, {', '.join(sorted(known))})")
            continue
        ok, converted = _type_ok(value, hints[key])
        if not ok:
            errors.append(f"model.{key}: expected {_describe(hints[key])}, got {value!r}")
            continue
        overrides[key] = converted
    if vocab_size is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
            errors.append(
                f"model.vocab_size ({overrides['vocab_size']}) does not match the tokenizer's vocabulary "
                f"({vocab_size}); remove model.vocab_size or use the matching tokenizer"
            )
        overrides["vocab_size"] = vocab_size
    fields = PRESETS[name].model | overrides
    try:
        return GPTConfig(**fields)
    except ModelConfigError as err:
        errors.extend(err.errors)
    except TypeError as err:
        errors.append(f"model: {err}")
    return None


def parse_job_config(data: dict, errors: list[str]) -> JobConfig | None:
    return build_dataclass(JobConfig, data, "", errors)
