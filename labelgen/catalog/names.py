"""Catalog names and dataset refs: the one home of the rules, shared by the client and the service.

A team, dataset, user or alias name matches :data:`NAME_PATTERN` (1-64 characters of
lowercase letters, digits and ``_.-``, starting with a letter or digit), holds no
``..``, and an alias is not all digits (digits name a version). A dataset ref is
``team/name`` (the ``latest`` alias), ``team/name@3`` (version 3) or
``team/name@stable`` (an alias). Imports only the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labelgen.contract.config_input import clip

__all__ = [
    "NAME_PATTERN",
    "LATEST",
    "MAX_REF_CHARS",
    "InvalidName",
    "check_name",
    "DatasetRef",
    "parse_ref",
    "TOKEN_PREFIX",
    "new_token",
]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
"""Team, dataset, user and alias names (plus: no '..'; an alias is not all digits)."""
TOKEN_PREFIX = "lgt_"
"""What every access token starts with (then 43 URL-safe characters: 256 random bits)."""
LATEST = "latest"
"""The alias every dataset has: its newest version (the ref of ``team/name``)."""
MAX_REF_CHARS = 200
"""Longest dataset ref :func:`parse_ref` reads."""
_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
_RULE = (
    "1-64 characters of lowercase letters, digits and '_.-', starting with a letter or digit, with no '..'"
)


class InvalidName(ValueError):
    """A catalog name or dataset ref breaks the rules; the message names it and the rule."""


def _clip(value: object) -> str:
    return clip(repr(value), 80)


def _name_problem(kind: str, value: object) -> str | None:
    """What is wrong with ``value`` as a ``kind`` name (None: nothing)."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value:
        return "it is empty"
    if len(value) > 64:
        return f"it is {len(value)} characters long, more than 64"
    if not NAME_PATTERN.fullmatch(value):
        if value[0] in "_.-":
            return f"it starts with {value[0]!r}"
        bad = sorted({c for c in value if not re.fullmatch(r"[a-z0-9_.-]", c)})
        return f"it holds {', '.join(repr(c) for c in bad[:5])}"
    if ".." in value:
        return "it holds '..'"
    if kind == "alias" and value.isdigit():
        return f"it is all digits, which names version {value}, not an alias"
    return None


def check_name(kind: str, value: object) -> str:
    """``value`` if it is a valid ``kind`` name ('team', 'dataset', 'user', 'alias'), else InvalidName.

    Raises:
        InvalidName: naming the kind, the value (clipped) and the rule.
    """
    problem = _name_problem(kind, value)
    if problem is not None:
        rule = _RULE + (", and not all digits (digits name a version)" if kind == "alias" else "")
        raise InvalidName(f"{kind} name {_clip(value)} is not valid ({problem}); a {kind} name is {rule}")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True)
class DatasetRef:
    """``team/name@ref``: a version number (digits) or an alias of a catalog dataset."""

    team: str
    name: str
    ref: str = LATEST

    def __post_init__(self) -> None:
        check_name("team", self.team)
        check_name("dataset", self.name)
        if isinstance(self.ref, str) and self.ref.isdigit():
            if not _VERSION.fullmatch(self.ref):
                raise InvalidName(
                    f"dataset ref {self.team}/{self.name}@{self.ref:.40} is not valid: a version is a "
                    "positive number without leading zeros, at most 18 digits (e.g. @3)"
                )
        else:
            check_name("alias", self.ref)

    @property
    def version(self) -> int | None:
        """The version number when ``ref`` is one, else None (an alias)."""
        return int(self.ref) if _VERSION.fullmatch(self.ref) else None

    @property
    def dataset(self) -> str:
        """``team/name``."""
        return f"{self.team}/{self.name}"

    def at(self, ref: str | int) -> DatasetRef:
        """The same dataset at another ref (a version number or an alias)."""
        return DatasetRef(self.team, self.name, str(ref))

    def __str__(self) -> str:
        return f"{self.team}/{self.name}@{self.ref}"


def _ref_problem(text: str) -> str | None:
    """What keeps ``text`` from looking like a dataset ref before its names are checked."""
    if not text:
        return "it is empty"
    if len(text) > MAX_REF_CHARS:
        return f"it is {len(text)} characters long, more than {MAX_REF_CHARS}"
    if "://" in text or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):
        return "it is a URL (it has a scheme); a ref names a catalog dataset, not a location"
    if text.startswith(("/", "~", ".")):
        return "it is a path; a ref names a catalog dataset, not a location"
    if ".." in text:
        return "it holds '..'"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        return "it holds whitespace or a control character"
    if text.count("@") > 1:
        return "it holds more than one '@'"
    if text.endswith("@"):
        return "nothing follows '@'"
    if text.split("@", 1)[0].count("/") != 1:
        return "it is not team/name (exactly one '/' before the '@')"
    return None


def parse_ref(text: object) -> DatasetRef:
    """``team/name`` (@latest), ``team/name@3`` or ``team/name@stable`` as a :class:`DatasetRef`.

    Raises:
        InvalidName: anything else (a path, a URL, '..', too long, a bad name), naming the
            text, the problem and the accepted forms.
    """
    forms = "write team/name, team/name@3 (a version) or team/name@stable (an alias)"
    if not isinstance(text, str):
        raise InvalidName(f"dataset ref {_clip(text)} is a {type(text).__name__}, not a string; {forms}")
    problem = _ref_problem(text)
    if problem is not None:
        raise InvalidName(f"dataset ref {_clip(text)} is not valid ({problem}); {forms}")
    dataset, _, ref = text.partition("@")
    team, name = dataset.split("/")
    try:
        return DatasetRef(team, name, ref or LATEST)
    except InvalidName as exc:
        raise InvalidName(f"dataset ref {_clip(text)}: {exc}; {forms}") from None


def new_token() -> str:
    """A fresh access token: :data:`TOKEN_PREFIX` + 256 random bits, URL-safe base64."""
    import secrets

    return TOKEN_PREFIX + secrets.token_urlsafe(32)
