"""Typed configs: frozen dataclasses loaded from YAML with every error reported at once.

Both sides (the labeling job spec and the student training config) are frozen
dataclasses whose fields carry a docstring right under them. This module turns a
YAML mapping plus dotted ``key=value`` overrides into such a dataclass, checking
types, rejecting unknown keys and collecting *all* problems, each named by its
dotted path, into one :class:`ConfigError`.

A dataclass may define ``check(self) -> Iterable[tuple[str, str]]`` yielding
``(field, message)`` pairs for cross-field rules; the field is relative to that
dataclass and is prefixed with its dotted path here. Rules run even where a field
has the wrong type, if that field has a default: the rules then see the default, and
their messages about that field (naming it as their field or in their text) are
dropped (its type error is the one reported), so one run lists type errors and rule
violations together.

Bad input never gets further than a :class:`ConfigError` naming the file, what is
wrong and the fix, bounded in time and memory whatever the bytes: files and override
values are read by :mod:`labelgen.contract.config_input` (its docstring lists the
limits), and typed fields add that integers fit in 64 bits, floats are finite and
``dict[K, V]`` fields check their keys and values. A rule (``check``) that raises is
reported as a problem of its config, naming the exception, rather than escaping.

Imports only the standard library and PyYAML, so the student side may use it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from labelgen.contract.config_input import (
    BAD_CHARS,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_TEXT_CHARS,
    MAX_VALUES,
    kind,
    plain_problem,
    read_file,
    read_yaml,
    show,
)

if TYPE_CHECKING:
    import argparse

__all__ = [
    "ConfigError",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_TEXT_CHARS",
    "MAX_VALUES",
    "load_config",
    "load_config_file",
    "parse_overrides",
    "parse_cli_args",
    "config_to_dict",
]

T = TypeVar("T")

_MAX_LISTED = 50  # problems listed in a ConfigError's message (all are in .errors)
_INT64 = 1 << 63


class ConfigError(ValueError):
    """All problems found in a config, one per line, each naming its dotted field."""

    def __init__(self, errors: Sequence[str], source: str = "config"):
        self.errors = list(errors)
        lines = [f"  - {e}" for e in self.errors[:_MAX_LISTED]]
        if len(self.errors) > _MAX_LISTED:
            lines.append(f"  - ... and {len(self.errors) - _MAX_LISTED:,} more")
        joined = "\n".join(lines)
        super().__init__(f"{source} has {len(self.errors)} problem(s):\n{joined}")


# --- overrides and files ----------------------------------------------------------------


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["labels.k=32", "output.url=s3://b/x"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    errors = []
    for item in overrides:
        if not isinstance(item, str):
            errors.append(f"override {show(item)} must be a string like dotted.key=value")
            continue
        if len(item) > MAX_CONFIG_BYTES:
            errors.append(
                f"override {show(item)} is {len(item):,} characters, over the {MAX_CONFIG_BYTES:,} limit; "
                "put large values in the config file (or a file it names)"
            )
            continue
        if BAD_CHARS.search(item):
            errors.append(
                f"override {show(item)} holds a NUL character or a lone surrogate (bytes that were "
                "not UTF-8); an override is text"
            )
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"override {show(item)} must look like dotted.key=value")
            continue
        parts = key.strip().split(".")
        if not all(parts):
            errors.append(f"override {show(item)} has an empty part in its key; write dotted.key=value")
            continue
        if len(parts) > MAX_DEPTH:
            errors.append(f"override {show(item)} has more than {MAX_DEPTH} parts in its key")
            continue
        if raw.strip():
            value, problem = read_yaml(raw)
            if problem is None:
                problem = plain_problem(value, key.strip())
                problem = None if problem is None else f"is refused: {problem}"
            if problem is not None:
                errors.append(f"override {show(item)}: the value {problem}")
                continue
        else:
            value = ""
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"override {show(item)} conflicts with an earlier override of {part!r}")
                break
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors, "overrides")
    return nested


def parse_cli_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with dotted ``key=value`` overrides accepted after flags too.

    argparse gives a ``nargs="*"`` positional only the words before the first flag, so
    ``run SPEC --no-progress labels.k=8`` would be refused (and ``parse_intermixed_args``
    does not support subcommands). Here the words left over that look like overrides
    (contain ``=``, do not start with ``-``) are appended, in order, to ``args.overrides``
    when the chosen command has that argument; anything else is refused as argparse does.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    takes_overrides = isinstance(overrides, list)
    unknown = [w for w in extra if not takes_overrides or w.startswith("-") or "=" not in w]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*(overrides or []), *extra]
    return args


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
    text, problem = read_file(path)
    if problem is not None:
        raise ConfigError([problem], str(path))
    data, problem = read_yaml(text)
    if problem is not None:
        raise ConfigError([f"{path} {problem}"], str(path))
    if data is None:
        data = {}  # an empty file (or only comments): every field takes its default
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                f"the top level must be a mapping of section names to values (`teacher:` on its own line, "
                f"...), got {kind(data)} {show(data)}"
            ],
            str(path),
        )
    return load_config(cls, _deep_merge(data, parse_overrides(overrides)), source=str(path))


def load_config(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping; raises ConfigError listing every problem."""
    problem = plain_problem(data)
    if problem is not None:
        raise ConfigError([problem], source)
    errors: list[str] = []
    replaced: set[str] = set()  # dotted fields whose bad value was replaced by its default
    value = _build(cls, data, "", errors, replaced)
    if value is not None:
        _run_checks(value, "", errors, replaced)
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


def _build(cls: type, data: Any, path: str, errors: list[str], replaced: set[str]) -> Any:
    """``cls`` built from ``data``, appending problems to ``errors``.

    A level with problems still returns a stand-in, whose bad fields hold their defaults
    (their dotted paths are added to ``replaced``), so that the rules of this level and
    of the levels above it run too; None where a bad field has no default, after running
    the rules of the parts below that did build.
    """
    where = path or "the top level"
    if not isinstance(data, Mapping):
        errors.append(f"{where} must be a mapping, got {kind(data)} {show(data)}")
        return None
    before = len(errors)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    expected = ", ".join(fields)
    # Keys are hashable but of any type (1, null, a date): sort by kind and text, never mixing types.
    unknown = sorted(
        (k for k in data if k not in fields), key=lambda k: (0, k) if isinstance(k, str) else (1, show(k))
    )
    for key in unknown:
        if isinstance(key, str):
            errors.append(f"{_join(path, key)} is not a known field; expected one of: {expected}")
        else:
            errors.append(
                f"{where} has the key {show(key)} ({kind(key)}), not a field name; "
                f"expected one of: {expected}"
            )
    kwargs: dict[str, Any] = {}
    bad: list[str] = []  # fields whose value (or something inside it) has a problem
    buildable = True
    for name, f in fields.items():
        dotted = _join(path, name)
        start = len(errors)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], dotted, errors, replaced)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, dotted, errors, replaced)
            else:
                errors.append(f"{dotted} is required")
                buildable = False
        if len(errors) > start and name in kwargs:
            bad.append(name)
    if len(errors) == before:
        return cls(**kwargs)
    for name in bad:
        value = kwargs[name]
        if _is_built(value):
            continue  # a nested config (or a list of them) that stands in for itself
        dotted = _join(path, name)
        _check_parts(value, dotted, errors, replaced)  # the items of a list that did build
        replaced.add(dotted)
        del kwargs[name]
        f = fields[name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            buildable = False
    if buildable:
        return cls(**kwargs)
    # No stand-in for this level: check the parts that did build, nobody above will.
    for name, value in kwargs.items():
        _check_parts(value, _join(path, name), errors, replaced)
    return None


def _is_built(value: Any) -> bool:
    """A config dataclass, or a non-empty list of them (possibly stand-ins)."""
    if isinstance(value, tuple):
        return bool(value) and all(_is_built(item) for item in value)
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _coerce(hint: Any, value: Any, path: str, errors: list[str], replaced: set[str]) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, path, errors, replaced)
        for option in non_none:
            trial: list[str] = []
            out = _coerce(option, value, path, trial, set())
            if not trial:
                return out
        errors.append(f"{path} must be one of {hint}, got {show(value)}")
        return None
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            errors.append(f"{path} must be one of {choices}, got {show(value)}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path, errors, replaced)
    if origin in (list, tuple, Sequence, typing.Sequence):
        (item_hint, *_) = get_args(hint) or (Any,)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            errors.append(f"{path} must be a list, got {kind(value)} {show(value)}")
            return None
        items = [_coerce(item_hint, v, f"{path}[{i}]", errors, replaced) for i, v in enumerate(value)]
        return tuple(items)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{path} must be a mapping, got {kind(value)} {show(value)}")
            return None
        key_hint, item_hint = get_args(hint) or (Any, Any)
        mapping: dict[Any, Any] = {}
        for key, item in value.items():
            key_errors: list[str] = []
            _coerce(key_hint, key, "key", key_errors, set())
            errors.extend(f"{path} has the key {show(key)}: its {e}" for e in key_errors)
            label = _join(path, key) if isinstance(key, str) else f"{path}[{show(key)}]"
            mapping[key] = _coerce(item_hint, item, label, errors, replaced)
        return mapping
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            errors.append(f"{path} must be true or false, got {show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path} must be an integer, got {show(value)}")
        elif not -_INT64 <= value < _INT64:
            errors.append(f"{path} must be an integer that fits in 64 bits, got {show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path} must be a number, got {show(value)}")
            return value
        try:
            number = float(value)
        except OverflowError:
            errors.append(f"{path} must be a number that fits in a float, got {show(value)}")
            return value
        if not math.isfinite(number):
            errors.append(f"{path} must be a finite number, got {show(value)}")
            return value
        return number
    if hint is str:
        if not isinstance(value, str):
            errors.append(f"{path} must be a string, got {kind(value)} {show(value)}")
        return value
    raise AssertionError(f"unsupported config type {hint!r} at {path}")


def _check_parts(value: Any, path: str, errors: list[str], replaced: set[str]) -> None:
    """Run the rules of ``value`` if it is a config, or of each config in it if it is a list."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_parts(item, f"{path}[{i}]", errors, replaced)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _run_checks(value, path, errors, replaced)


def _run_checks(cfg: Any, path: str, errors: list[str], replaced: set[str]) -> None:
    """Run ``cfg.check()`` and its nested configs' rules, skipping messages about ``replaced`` fields.

    A rule that raises is a bug in the rule, met on this config: it is reported as a problem
    of this config (naming the exception), so that the caller still gets a ConfigError.
    """
    for f in dataclasses.fields(cfg):
        _check_parts(getattr(cfg, f.name), _join(path, f.name), errors, replaced)
    check = getattr(cfg, "check", None)
    if not callable(check):
        return
    found: list[tuple[str, str]] = []
    failure = None
    try:
        found.extend(check())
    except Exception as exc:
        failure = (
            f"{path or 'the top level'} could not be checked: its rules raised {kind(exc)} "
            f"({show(str(exc))}) on this config; a value here is probably malformed (please report it)"
        )
    for field, message in found:
        dotted = _join(path, field)
        if not any(_about(dotted, message, r) for r in replaced):
            errors.append(f"{dotted} {message}")
    if failure is not None:
        errors.append(failure)


def _about(dotted: str, message: str, replaced: str) -> bool:
    """True if a rule's message concerns a field whose bad value was replaced by its default:
    the rule names it (or a field inside it) as its field, or mentions it in its text, as
    cross-field rules do ("data.url xor data.mixture must be set")."""
    return (
        dotted == replaced
        or dotted.startswith((f"{replaced}.", f"{replaced}["))
        or re.search(rf"(?<![\w.]){re.escape(replaced)}(?![\w])", message) is not None
    )
