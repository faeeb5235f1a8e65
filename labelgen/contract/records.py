"""Parsing records read from a dataset: JSON, typed record dataclasses, the label layout.

Every record a reader takes from outside bytes (a manifest, a commit record) goes
through :func:`parse_json` and :func:`parse_record`, so any input ends in the record or
in a :class:`FormatError` naming the file and the field, never another exception;
:func:`check_layout` refuses a k, codec or products no reader can decode. The record
dataclasses themselves live in :mod:`labelgen.contract.format` and
:mod:`labelgen.contract.commits`.

Imports only the standard library and the codec registry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from labelgen.contract.codecs import CODEC_NAMES
from labelgen.contract.errors import FormatError

__all__ = ["REWRITE", "parse_json", "parse_record", "check_layout", "decode_hidden"]

REWRITE = "the file is corrupt or was not written by labelgen: re-run the labeling job to rewrite it"
"""The fix every message about a damaged record ends with."""
_MAX_INT = 2**63 - 1  # counts and indices are int64 wherever they are used
_MAX_DEPTH = 64  # nesting of the free-form objects (teacher, tokenizer, corpus, products)
_HIDDEN_DTYPES = ("float16", "bfloat16", "float32")


def decode_hidden(blob: bytes, dtype: str, count: int) -> np.ndarray:
    """One hidden-state layer blob of ``count`` positions → (count, D) float32 (the blob is
    little-endian float16, bfloat16 or float32; ``hidden/`` shards, docs/FORMAT.md).

    Raises:
        FormatError: an unknown dtype, or a blob that is not ``count`` whole vectors.
    """
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 1)
    if len(blob) % width or (count and (len(blob) // width) % count) or (not count and blob):
        raise FormatError(
            f"a hidden-state blob of {len(blob)} bytes is not {count} {dtype} vectors: the shard is corrupt"
        )
    if dtype == "float32":
        flat = np.frombuffer(blob, "<f4")
    elif dtype == "float16":
        flat = np.frombuffer(blob, "<f2").astype(np.float32)
    elif dtype == "bfloat16":
        flat = (np.frombuffer(blob, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise FormatError(f"hidden dtype {dtype!r} is not one of {', '.join(_HIDDEN_DTYPES)}")
    return flat.reshape(count, -1) if count else flat.reshape(0, 0)


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads(text)``, with every way it fails (bad syntax or UTF-8, nesting too deep,
    an integer too long) as one FormatError naming ``where``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(
            f"{where} is not valid JSON ({type(exc).__name__}: {reason:.200}); the file is corrupt: "
            "restore it or re-run the labeling job"
        ) from exc


R = TypeVar("R")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _depth_ok(value: Any, limit: int) -> bool:
    """True if ``value`` (parsed JSON) nests at most ``limit`` levels of arrays and objects."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _check_value(value: Any, kind: Any, where: str, name: str) -> Any:
    """``value`` as field ``name`` (of a record at ``where``) of type ``kind`` needs it;
    FormatError naming both otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _check_value(value, inner, where, name)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return parse_record(kind, value, f"{where} {name}")
    if kind is int:
        if _count(value):
            return value
        expected = f"an integer in [0, {_MAX_INT}]"
    elif kind is float:
        if type(value) in (int, float) and math.isfinite(value):
            return float(value)
        expected = "a finite number"
    elif kind is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    elif origin is dict and args == (str, int):
        if isinstance(value, dict) and all(_count(v) for v in value.values()):
            return dict(value)
        expected = f"an object of integers in [0, {_MAX_INT}]"
    elif origin is dict:
        if isinstance(value, dict) and _depth_ok(value, _MAX_DEPTH):
            return value
        expected = f"a JSON object nested at most {_MAX_DEPTH} deep"
    elif origin is list and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        if isinstance(value, list):
            return [parse_record(args[0], item, f"{where} {name}[{i}]") for i, item in enumerate(value)]
        expected = f"a list of {args[0].__name__} objects"
    else:  # a field type this parser does not know: a bug in the record's definition
        raise TypeError(f"parse_record cannot check field {name!r} of type {kind}")
    raise FormatError(f"{where} field {name!r} must be {expected}, got {_show(value)}; {REWRITE}")


def _show(value: Any) -> str:
    """A short description of a parsed JSON value for error messages."""
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"


def parse_record(cls: type[R], data: object, where: str) -> R:
    """A record dataclass ``cls`` (shard, unit, job record, manifest) from parsed JSON
    ``data``, every field's type checked, FormatError naming ``where`` and the field otherwise.

    Fields typed ``int`` take JSON integers in [0, 2**63) (not booleans: every integer of
    a record is a count, an index or a size), ``float`` finite numbers, ``str`` strings,
    ``dict[str, int]`` objects of such integers, ``dict[str, Any]`` objects nested at most
    64 deep, ``list[<record>]`` arrays of records parsed alike, ``<record>`` an object parsed alike,
    ``X | None`` null or an X. A field's ``metadata``
    ``check`` (e.g. :func:`check_dataset_path`) runs on its value. A missing field takes
    its default (an error if it has none). Keys ``cls`` does not define are ignored, for
    forward compatibility: a later minor format version may add fields, and a reader of
    the same major version (checked before this) reads on without them.
    """
    name = getattr(cls, "__name__", "record")
    if not isinstance(data, dict):
        raise FormatError(f"{where} must be a JSON object ({name}), got {_show(data)}; {REWRITE}")
    hints = _field_types(typing.cast(type, cls))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FormatError(f"{where} has no field {f.name!r} ({name}); {REWRITE}")
            continue
        values[f.name] = _check_value(data[f.name], hints[f.name], where, f.name)
        check: Callable[[Any, str], None] | None = f.metadata.get("check")
        if check is not None:
            check(values[f.name], f"{where} field {f.name!r}")
    return typing.cast(Callable[..., R], cls)(**values)


def _positive(value: Any) -> bool:
    return _count(value) and value >= 1


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


# product → {key: (the check its value passes when present, what it must be)}: the fields
# readers use (students.compatibility, students.hidden, the trainer), of the types they use.
_PRODUCT_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "draws": {
        "n": (_positive, "an integer >= 1"),
        "temperature": (_positive_number, "a number > 0"),
        "seed": (lambda v: type(v) is int, "an integer"),
    },
    "hidden": {
        "layers": (
            lambda v: isinstance(v, list) and bool(v) and all(_count(x) for x in v),
            "a non-empty list of layer numbers",
        ),
        "every": (_positive, "an integer >= 1"),
        "dtype": (lambda v: v in _HIDDEN_DTYPES, f"one of {', '.join(_HIDDEN_DTYPES)}"),
        "dim": (lambda v: v is None or _positive(v), "an integer >= 1 or null"),
        "seed": (lambda v: type(v) is int, "an integer"),
    },
}


def check_layout(k: int, codec: str, products: Mapping[str, Any], where: str) -> None:
    """Raise FormatError naming ``where`` unless k, the codec and the products (of a manifest
    or job record) are ones a reader can decode: k >= 1, a registered codec, every product
    a JSON object, and the product fields readers use, where present, of the types they
    need (products and fields this reader does not know are allowed)."""
    if k < 1:
        raise FormatError(f"{where} field 'k' must be >= 1, got {k}; {REWRITE}")
    if codec not in CODEC_NAMES:
        raise FormatError(
            f"{where} field 'codec' is {codec!r:.80}, not a codec this reader knows "
            f"({', '.join(CODEC_NAMES)}); install the labelgen release that wrote the dataset"
        )
    problems = []
    for name, product in products.items():
        if not isinstance(product, dict):
            problems.append(f"products[{name!r}] must be a JSON object, got {_show(product)}")
            continue
        for key, (ok, expected) in _PRODUCT_FIELDS.get(name, {}).items():
            if key in product and not ok(product[key]):
                problems.append(f"products[{name!r}][{key!r}] must be {expected}, got {_show(product[key])}")
    if problems:
        raise FormatError(f"{where}: {'; '.join(problems)}; {REWRITE}")
