"""The top-k codec registry: every way of storing top-k labels, by name.

Each module of this package (but :mod:`~labelgen.contract.codecs.base`) defines one
codec as its ``CODEC``; they are found here at import, so adding a codec is one new
file (plus its tests). Everything that writes, reads or describes top-k columns asks
:func:`get_codec` (by the name in the spec, the manifest or the job's commit record)
instead of knowing codec names itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from labelgen.contract.codecs.base import Codec

__all__ = ["Codec", "CODECS", "CODEC_NAMES", "DEFAULT_CODEC", "get_codec", "codec_for_columns"]


def _discover() -> dict[str, Codec]:
    found: dict[str, Codec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        codec = importlib.import_module(f"{__name__}.{info.name}").CODEC
        assert isinstance(codec, Codec) and codec.name not in found, (info.name, codec)
        found[codec.name] = codec
    return found


CODECS: dict[str, Codec] = _discover()
"""name → codec, every registered codec."""
CODEC_NAMES: tuple[str, ...] = tuple(sorted(CODECS))
DEFAULT_CODEC = "plain"
"""The codec of datasets whose manifest names none (and the spec's default)."""


def get_codec(name: str) -> Codec:
    """The codec called ``name``; ValueError naming the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown top-k codec {name!r}; known: {', '.join(CODEC_NAMES)}") from None


def codec_for_columns(column_names: list[str]) -> Codec:
    """The codec whose columns a table holds (datasets whose writer recorded no codec)."""
    for codec in CODECS.values():
        if codec.matches(column_names):
            return codec
    raise ValueError(
        f"no top-k codec matches columns {sorted(column_names)}; known: {', '.join(CODEC_NAMES)}"
    )
