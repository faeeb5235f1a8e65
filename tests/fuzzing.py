"""Shared pieces of the fuzz targets (``tests/test_fuzz_*.py``): profiles and byte mutations.

Every fuzz target is a hypothesis test marked ``fuzz``. Two profiles:

* ``ci`` (the default): a fixed number of examples per target
  (``LABELGEN_FUZZ_EXAMPLES``, default 100), derandomized, so a CI run is bounded
  and repeatable;
* ``long`` (``make fuzz``, or ``LABELGEN_FUZZ=long``): many more examples
  (``LABELGEN_FUZZ_EXAMPLES``, default 5000) from a fresh random seed each run, with
  hypothesis's example database keeping what it found.

A target passes when every input ends in a value or in the reader's documented error
(FormatError, ChecksumError, ConfigError, a counted rejection), never in another
exception, a hang (each example is bounded by pytest's timeout) or wrong rows.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ["mutations", "mutate"]

_LONG = os.environ.get("LABELGEN_FUZZ") == "long"
_EXAMPLES = int(os.environ.get("LABELGEN_FUZZ_EXAMPLES", 5000 if _LONG else 100))
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]

settings.register_profile(
    "ci", max_examples=_EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=_QUIET
)
settings.register_profile("long", max_examples=_EXAMPLES, deadline=None, suppress_health_check=_QUIET)
settings.load_profile("long" if _LONG else "ci")


def mutations(max_edits: int = 8) -> st.SearchStrategy[list[tuple[str, float, int]]]:
    """Edits to apply to a byte string with :func:`mutate`: (kind, where in [0, 1), byte)."""
    edit = st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
        st.integers(min_value=0, max_value=255),
    )
    return st.lists(edit, min_size=1, max_size=max_edits)


def mutate(data: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    """``data`` with ``edits`` applied in order (bit flips, byte sets, inserts, deletes, a cut)."""
    out = bytearray(data)
    for kind, where, byte in edits:
        if not out and kind != "insert":
            continue
        at = int(where * len(out))
        if kind == "flip":
            out[at] ^= 1 << (byte % 8)
        elif kind == "set":
            out[at] = byte
        elif kind == "insert":
            out[at:at] = bytes([byte])
        elif kind == "delete":
            del out[at]
        else:
            del out[at:]
    return bytes(out)
