"""Reading config input in bounded time and memory: files, YAML documents, plain data.

Every function here returns the value or a problem (a message naming what is wrong,
with the line and column PyYAML gives, and the fix); :mod:`labelgen.contract.configs`
turns problems into a ConfigError. Every read is bounded in time and memory,
whatever the bytes:

* a config file is at most :data:`MAX_CONFIG_BYTES` (1 MiB), UTF-8 text (a directory,
  a device, binary data, NUL or other control characters are refused), and one YAML
  document read by PyYAML's *safe* loader (tags such as ``!!python/object`` are
  refused, never run);
* before anything is built, a pass over the parser's events refuses more than
  :data:`MAX_VALUES` nodes, nesting deeper than :data:`MAX_DEPTH` levels (so PyYAML's
  recursive composer never overflows) and a key repeated in one mapping (YAML would
  silently keep the last one);
* the loaded document is then measured *as expanded*, a shared node (a YAML alias
  ``*name``) counted each time it is reached, by an iterative walk that stops at the
  budget: more than :data:`MAX_VALUES` values or :data:`MAX_TEXT_CHARS` characters is
  an alias bomb ("billion laughs"), refused without building the expansion; so is a
  node that contains itself. Merge keys (``<<: *name``) may copy at most
  :data:`MAX_VALUES` keys in all. A few anchors, as legitimate configs use them, load;
* values are plain data: strings (without NUL or lone surrogates), integers (a YAML
  integer of at most 1,000 characters), floats, booleans, null, lists and mappings whose
  keys are all strings or all integers (``on:``, ``null:`` and ``1.5:`` keys are refused
  with the fix). Dates (an unquoted ``2024-01-01``), ``!!binary`` and ``!!set`` are
  refused with the fix (quote it);

The same holds for overrides (each value is YAML, measured the same way) and, through
:func:`plain_problem`, for a mapping built in Python.

Imports only the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_VALUES",
    "MAX_TEXT_CHARS",
    "MAX_DEPTH",
    "BAD_CHARS",
    "show",
    "clip",
    "kind",
    "read_file",
    "read_yaml",
    "plain_problem",
]

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file (and override) read, in bytes: real configs are a few KiB."""
MAX_VALUES = 100_000
"""Most values (mapping keys, list items, scalars) a document may hold once expanded."""
MAX_TEXT_CHARS = 4 << 20
"""Most characters of text (strings, keys, digits) a document may hold once expanded."""
MAX_DEPTH = 100
"""Deepest nesting of lists and mappings in a document."""
_MAX_INT_DIGITS = 1000  # an integer scalar longer than this is refused before int() runs on it
_MERGE_TAG = "tag:yaml.org,2002:merge"
BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


class _ShortRepr(reprlib.Repr):
    """``repr`` bounded in size and time: error messages quote values, which may be huge."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 10
        self.maxstring = self.maxother = 160
        self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 400:  # repr() would be slow, or refused past 4300 digits
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


show = _ShortRepr().repr


def kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --- reading YAML --------------------------------------------------------------------

_BaseLoader: Any = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


def _loader_class(base: Any) -> Any:
    """``base`` (a safe loader) with merge keys bounded and bad scalars reported with their line."""

    class Loader(base):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.merged = 0  # keys copied by merge keys so far, in the whole document
            self.flattening: set[int] = set()

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError, TypeError) as exc:  # 2024-13-45, a float past 1e308...
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read this value ({exc})", node.start_mark
                ) from exc

        def construct_bounded_int(self, node: Any) -> Any:
            if len(node.value) > _MAX_INT_DIGITS:  # int() is quadratic in the digits (and base 60 worse)
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"an integer of {len(node.value):,} characters is too long "
                    f"(at most {_MAX_INT_DIGITS:,}); quote it if it is text",
                    node.start_mark,
                )
            return self.construct_yaml_int(node)

        def flatten_mapping(self, node: Any) -> None:
            # Flatten the mappings merged here first, to count what they copy before it is copied.
            if id(node) in self.flattening:
                return  # a merge that leads back to a mapping being flattened: nothing more to copy
            self.flattening.add(id(node))
            try:
                adding = 0
                for key_node, value_node in node.value:
                    if key_node.tag != _MERGE_TAG:
                        continue
                    subnodes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for sub in subnodes:
                        if isinstance(sub, yaml.MappingNode):
                            self.flatten_mapping(sub)
                            adding += len(sub.value)
                self.merged += adding
                if self.merged > MAX_VALUES:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"merge keys (<<: *name) copy more than {MAX_VALUES:,} keys in all; merge each "
                        "anchored mapping a few times, or write the keys out",
                        node.start_mark,
                    )
                super().flatten_mapping(node)
            finally:
                self.flattening.discard(id(node))

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_bounded_int)
    return Loader


_LOADER = _loader_class(_BaseLoader)
_PY_LOADER = _LOADER if _BaseLoader is yaml.SafeLoader else _loader_class(yaml.SafeLoader)


@dataclasses.dataclass
class _Frame:
    """A mapping or list being parsed, in :func:`_scan_events`."""

    mapping: bool
    expect_key: bool = True
    keys: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)  # (tag, text) -> line


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _scan_events(loader: Any) -> str | None:
    """First pass, over the parser's events only (nothing built): too many nodes, too deep, a
    repeated key. Returns the problem, or None."""
    frames: list[_Frame] = []
    nodes = 0
    while loader.check_event():
        event = loader.get_event()
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_VALUES:
                return (
                    f"holds more than {MAX_VALUES:,} values (at {_mark(event.start_mark)}); a config "
                    "names its data (files, URLs) rather than holding it: is this the right file?"
                )
        if isinstance(event, yaml.CollectionStartEvent):
            if len(frames) >= MAX_DEPTH:
                return (
                    f"is nested too deeply: more than {MAX_DEPTH} levels of lists and mappings at "
                    f"{_mark(event.start_mark)}; a config needs a few levels: check the brackets"
                )
            frames.append(_Frame(isinstance(event, yaml.MappingStartEvent)))
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            frames.pop()
        elif not isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
            continue
        if not frames or not frames[-1].mapping:
            continue
        frame = frames[-1]  # a key or a value of this mapping just ended
        frame.expect_key = not frame.expect_key
        if frame.expect_key or not isinstance(event, yaml.ScalarEvent):
            continue  # a value, or a key that is an alias or a collection
        tag = event.tag
        if tag is None or tag == "!":
            tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _MERGE_TAG:
            continue
        key = (tag, event.value)
        if key in frame.keys:
            return (
                f"repeats the key {show(event.value)} in one mapping at {_mark(event.start_mark)} (first "
                f"at line {frame.keys[key]}); YAML would keep only the last value: delete one of them"
            )
        frame.keys[key] = event.start_mark.line + 1
    return None


def _yaml_problem(exc: Exception, text: str) -> str:
    """A PyYAML error as a phrase following the file's name, with its line, column and a fix."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = clip(exc.problem or exc.context or "unreadable")
        where = f"{_mark(mark)}: " if mark is not None else ""
        context = ""
        if exc.problem and exc.context:
            started = f" at {_mark(exc.context_mark)}" if exc.context_mark is not None else ""
            context = f" ({clip(exc.context)}{started})"
        about = f"{exc.context} {problem}"
        if "could not determine a constructor" in problem:
            fix = (
                "tags such as !!python/object are not allowed (nothing is ever run): a config holds "
                "plain values, strings, numbers, booleans, null, lists and mappings"
            )
        elif "nesting depth" in problem:
            fix = (
                f"it is nested too deeply: a config needs a few levels (at most {MAX_DEPTH}); "
                "check the brackets"
            )
        elif "unhashable" in problem:
            fix = "a list or mapping cannot be a key (`? [a]`, `[a]: b`): keys are strings"
        elif "single document" in about:
            fix = "a config is one YAML document: remove the extra '---'"
        elif problem.startswith(("cannot read this value", "an integer of", "merge keys")):
            fix = ""
        else:
            fix = (
                "fix the YAML there (quote a value holding ': ', ' #', or starting with one of "
                "[ ] { } * & ! | > ' \" % @ `)"
            )
        verb = (
            "cannot be loaded" if isinstance(exc, yaml.constructor.ConstructorError) else "is not valid YAML"
        )
        return f"{verb}: {where}{problem}{context}" + (f"; {fix}" if fix else "")
    if isinstance(exc, yaml.reader.ReaderError):
        at = min(max(exc.position, 0), len(text))
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        return (
            f"is not valid YAML: line {line}, column {column}: the character {code:#06x} ({exc.reason}) "
            "cannot appear in YAML; remove it (NUL and other control characters mean binary data: "
            "is this the right file?)"
        )
    return f"is not valid YAML: {clip(str(exc))}"


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters for an error message (quoted values may be huge)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def read_yaml(text: str) -> tuple[Any, str | None]:
    """(the document, None), or (None, the problem as a phrase following the source's name)."""
    loader = _LOADER
    try:
        scanner = loader(text)
        try:
            problem = _scan_events(scanner)
        finally:
            scanner.dispose()
        if problem is not None:
            return None, problem
        reader = loader(text)
        try:
            return reader.get_single_data(), None
        finally:
            reader.dispose()
    except yaml.YAMLError as exc:
        return None, _yaml_problem(exc, text)
    except UnicodeError as exc:  # lone surrogates (undecodable argv bytes) in an override
        return None, f"is not UTF-8 text ({exc.__class__.__name__}: {show(str(exc))})"
    except RecursionError:  # the event pass bounds the depth; this is the backstop
        return (
            None,
            f"is nested too deeply for YAML to read (more than {MAX_DEPTH} levels); check the brackets",
        )


# --- measuring a document as expanded -------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][\w-]*")


def _label(key: Any) -> str:
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
        return f".{key}"
    return f"[{show(key)}]"


def _where(chain: list[tuple[int, str]], label: str) -> str:
    labels = [lab for _, lab in chain] + [label]
    labels = [lab for lab in labels if lab]
    if len(labels) > 12:
        labels = [*labels[:12], "..."]
    text = "".join(labels).lstrip(".")
    return text or "the top level"


def _key_problem(where: str, key: Any) -> str:
    if isinstance(key, bool):
        hint = "; YAML reads unquoted yes/no/on/off/true/false as booleans: quote it"
    elif key is None:
        hint = "; an empty, ~ or null key reads as null: name it, or quote it"
    else:
        hint = ": quote it"
    return f"{where} has the key {show(key)} ({kind(key)}); mapping keys must be strings{hint}"


def _value_problem(where: str, value: Any) -> str:
    if isinstance(value, str):
        return (
            f"{where} holds a NUL character or a lone surrogate ({show(value)}); a config holds "
            "text: remove the \\0 or \\ud800-style escape (or the bytes that were not UTF-8)"
        )
    name = kind(value)
    if name in ("date", "datetime"):
        hint = f"; YAML reads an unquoted {value} as a {name}: quote it to make it a string"
    elif isinstance(value, bytes):
        hint = "; !!binary values are not supported"
    elif isinstance(value, set | frozenset):
        hint = "; write a list instead of !!set"
    else:
        hint = ""
    return (
        f"{where} is a {name} ({show(value)}); a config holds plain values (strings, numbers, booleans, "
        f"null, lists and mappings){hint}"
    )


def plain_problem(data: Any, prefix: str = "") -> str | None:
    """Why ``data`` is not plain config data of a bounded size once expanded, or None.

    An iterative depth-first walk that reaches a shared node (a YAML alias) once per
    reference, as every later consumer (error messages, hashing, ``config_to_dict``)
    would, and stops as soon as a budget is spent: an alias bomb costs at most
    :data:`MAX_VALUES` steps and nothing is copied.
    """
    values = 0
    text = 0
    shared = False
    seen: set[int] = set()  # containers met so far
    chain: list[tuple[int, str]] = []  # the containers above the current value: (id, label)
    above: set[int] = set()  # their ids
    stack: list[tuple[Any, int, str]] = [(data, 0, prefix)]  # (value, its depth, its label)

    def too_much(what: str, where: str) -> str:
        if shared:
            return (
                f"{where}: the document expands to more than {what} once its YAML aliases (*name) are "
                "replaced by what their anchors (&name) mark; aliases repeated in anchored lists that "
                "are themselves repeated multiply (an alias bomb, 'billion laughs'): refer to each "
                "anchor a few times, or write the values out"
            )
        return (
            f"{where}: the document holds more than {what}; a config names its data (files, URLs) "
            "rather than holding it"
        )

    while stack:
        value, depth, label = stack.pop()
        while len(chain) > depth:
            above.discard(chain.pop()[0])
        if isinstance(value, str):
            text += len(value)
            if len(value) > 64:  # a long string reached twice is an alias too
                shared = shared or id(value) in seen
                seen.add(id(value))
            if (not value.isascii() or "\0" in value) and BAD_CHARS.search(value):
                return _value_problem(_where(chain, label), value)
        elif value is None or isinstance(value, bool | float):
            pass
        elif isinstance(value, int):
            text += value.bit_length() // 3  # about its digits
        elif isinstance(value, Mapping | list | tuple):
            where = _where(chain, label)
            ident = id(value)
            if ident in above:
                return (
                    f"{where} contains itself (a YAML alias *name inside the node that its anchor &name "
                    "marks), which never ends when expanded: remove that alias"
                )
            shared = shared or ident in seen
            seen.add(ident)
            if depth >= MAX_DEPTH:
                return (
                    f"{where} is nested too deeply (more than {MAX_DEPTH} levels of lists and mappings); "
                    "a config needs a few levels"
                )
            values += len(value)
            if values > MAX_VALUES:
                return too_much(f"{MAX_VALUES:,} values", where)
            chain.append((ident, label))
            above.add(ident)
            if isinstance(value, Mapping):
                kinds: dict[type, Any] = {}
                for key, item in value.items():
                    if isinstance(key, str):
                        text += len(key)
                        if BAD_CHARS.search(key):
                            return _value_problem(f"{where} has a key that", key)
                    elif not isinstance(key, int) or isinstance(key, bool):
                        return _key_problem(where, key)
                    kinds.setdefault(type(key), key)
                    stack.append((item, depth + 1, _label(key)))
                if len(kinds) > 1:
                    return (
                        f"{where} mixes string and integer keys (such as {show(kinds[int])}); quote the "
                        "integers so that every key is a string"
                    )
            else:
                stack.extend((item, depth + 1, f"[{i}]") for i, item in enumerate(value))
        else:
            return _value_problem(_where(chain, label), value)
        if text > MAX_TEXT_CHARS:
            return too_much(f"{MAX_TEXT_CHARS:,} characters of text", _where(chain, label))
    return None


def read_file(path: Path) -> tuple[str, str | None]:
    """(the text of a config file, None), or ("", the problem naming the file and the fix)."""
    name = str(path)
    too_big = (
        f"{MAX_CONFIG_BYTES:,}-byte (1 MiB) limit for a config file; a config names its data "
        "(files, URLs) rather than holding it: is this the right file?"
    )
    try:
        if not path.exists():
            return "", f"file {name!r} does not exist; pass the path of a YAML file"
        if path.is_dir():
            return "", f"{name} is a directory; pass the path of a YAML file"
        if not path.is_file():
            return (
                "",
                f"{name} is not a regular file (a device, pipe or socket); pass the path of a YAML file",
            )
        with path.open("rb") as f:
            size = path.stat().st_size
            if size > MAX_CONFIG_BYTES:
                return "", f"{name} is {size:,} bytes, over the {too_big}"
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded even where the size lied (/proc, a growing file)
    except (OSError, ValueError) as exc:  # permissions, a NUL in the path, a name too long...
        return "", f"{name} cannot be read ({show(str(exc))}); pass the path of a readable YAML file"
    if len(raw) > MAX_CONFIG_BYTES:
        return "", f"{name} is more than {MAX_CONFIG_BYTES:,} bytes, over the {too_big}"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        hint = "; it looks like UTF-16: save it as UTF-8" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        return "", (
            f"{name} is not UTF-8 text: byte {raw[exc.start]:#04x} at line {line} (offset {exc.start:,}) is "
            f"an {exc.reason}{hint}; a config is a YAML text file: is this the right file?"
        )
