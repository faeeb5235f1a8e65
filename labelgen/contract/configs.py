"""Typed configs: frozen dataclasses loaded from YAML with every error reported at once.

Both sides (the labeling job spec and the student training config) are frozen
dataclasses whose fields carry a docstring right under them. This module turns a
YAML mapping plus dotted ``key=value`` overrides into such a dataclass, checking
types, rejecting unknown keys and collecting *all* problems, each named by its
dotted path, into one :class:`ConfigError`.

A dataclass may define ``check(self) -> Iterable[tuple[str, str]]`` yielding
``(field, message)`` pairs for cross-field rules; the field is relative to that
dataclass and is prefixed with its dotted path here.

Imports only the standard library and PyYAML, so the student side may use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "load_config", "load_config_file", "parse_overrides", "config_to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """All problems found in a config, one per line, each naming its dotted field."""

    def __init__(self, errors: Sequence[str], source: str = "config"):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} has {len(self.errors)} problem(s):\n{lines}")


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["labels.k=32", "output.url=s3://b/x"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r} must look like dotted.key=value")
            continue
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"override {item!r} conflicts with an earlier override of {part!r}")
                break
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    if errors:
        raise ConfigError(errors, "overrides")
    return nested


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config_file(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file, applying dotted overrides; raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file {str(path)!r} does not exist; pass the path of a YAML file"], "config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {exc}"], str(path)) from exc
    if not isinstance(data, Mapping):
        raise ConfigError([f"the top level must be a mapping, got {type(data).__name__}"], str(path))
    return load_config(cls, _deep_merge(data, parse_overrides(overrides)), source=str(path))


def load_config(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping; raises ConfigError listing every problem."""
    errors: list[str] = []
    value = _build(cls, data, "", errors)
    if not errors:
        _run_checks(value, "", errors)
    if errors:
        raise ConfigError(errors, source)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of a config dataclass, for saving next to outputs."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    where = path or "the top level"
    if not isinstance(data, Mapping):
        errors.append(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
        return None
    before = len(errors)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        errors.append(f"{_join(path, str(key))} is not a known field; expected one of: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], dotted, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, dotted, errors)
            else:
                errors.append(f"{dotted} is required")
    if len(errors) > before:
        # This level failed; still report rule violations of the parts that did build.
        for name, value in kwargs.items():
            if dataclasses.is_dataclass(value):
                _run_checks(value, _join(path, name), errors)
        return None
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, path, errors)
        for option in non_none:
            trial: list[str] = []
            out = _coerce(option, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path} must be one of {hint}, got {value!r}")
        return None
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            errors.append(f"{path} must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, errors)
    if origin in (list, tuple, Sequence, typing.Sequence):
        (item_hint, *_) = get_args(hint) or (Any,)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            errors.append(f"{path} must be a list, got {type(value).__name__} {value!r}")
            return None
        items = [_coerce(item_hint, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{path} must be a mapping, got {type(value).__name__} {value!r}")
            return None
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            errors.append(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path} must be a number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            errors.append(f"{path} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise AssertionError(f"unsupported config type {hint!r} at {path}")


def _run_checks(cfg: Any, path: str, errors: list[str]) -> None:
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            _run_checks(child, _join(path, f.name), errors)
        elif isinstance(child, tuple):
            for i, item in enumerate(child):
                _run_checks(item, f"{_join(path, f.name)}[{i}]", errors)
    check = getattr(cfg, "check", None)
    if callable(check):
        for field, message in check():
            errors.append(f"{_join(path, field)} {message}")
