"""What a top-k codec is: the interface every codec implements, and Arrow helpers they share.

A codec stores the teacher's top-k labels of a row group — ids and raw log-probs by
rank, ``(N, k)`` for N label positions — in columns of its own, and gives them back.
It owns everything about those columns: their names, Arrow fields, Parquet encodings,
encoder, decoder and how to read ``k`` off a table. Nothing outside
:mod:`labelgen.contract.codecs` knows which codec stores what.

Shapes: R rows, ``positions`` (R,) label positions per row (T - 1), N = sum(positions).

Decoders read bytes from outside: whatever a table holds, they return arrays of the
documented shapes or raise FormatError (the helpers here check column types, nulls and
per-row lengths; each codec checks the values it alone understands).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import pyarrow as pa

from labelgen.contract.columns import Columns
from labelgen.contract.errors import FormatError

__all__ = [
    "Codec",
    "binary_parts",
    "check_positions",
    "flat_field",
    "list_array",
    "list_lengths",
    "list_parts",
    "list_values",
    "offsets_of",
]


class Codec(ABC):
    """One way of storing top-k labels. Subclasses set the class attributes below."""

    name: ClassVar[str]
    """The codec's name in ``labels.codec``, the manifest and the job record."""
    columns: ClassVar[tuple[str, ...]]
    """The columns it stores, in schema order."""
    k_column: ClassVar[str]
    """A column holding k values (or bytes) per label position: how k is read off a table."""
    lossless: ClassVar[bool]
    """True if decoding gives back exactly the encoded ids and log-probs."""
    summary: ClassVar[str]
    """One line for docs and messages: what it stores and at what cost."""

    @abstractmethod
    def fields(self) -> list[pa.Field]:
        """Arrow fields of :attr:`columns` (non-nullable), in order."""

    def column_encodings(self) -> dict[str, str]:
        """Parquet ``column_encoding`` entries for its columns (default: none)."""
        return {}

    @abstractmethod
    def encode(
        self, topk_ids: np.ndarray, topk_logprobs: np.ndarray, positions: np.ndarray
    ) -> dict[str, pa.Array]:
        """Top-k labels of R rows → {column: array with R values}.

        Args:
            topk_ids: (N, k) int ids by rank, distinct per position.
            topk_logprobs: (N, k) float raw log-probs by rank (temperature 1).
            positions: (R,) int label positions of each row, summing to N.
        """

    @abstractmethod
    def decode(self, table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A table holding :attr:`columns` → (N, k) int32 ids and float32 log-probs by rank.

        Raises:
            FormatError: the columns are corrupt or disagree with ``k``.
        """

    def infer_k(self, table: pa.Table, where: str) -> int:
        """The top-k width of a table: entries of :attr:`k_column` per label position."""
        positions = len(list_values(table, Columns.LABEL_MASK))
        if pa.types.is_list(_column(table, self.k_column).type):
            entries = len(list_values(table, self.k_column))
        else:
            offsets = binary_parts(table, self.k_column)[1]
            entries = int(offsets[-1] - offsets[0])
        if positions == 0 or entries == 0 or entries % positions:
            raise FormatError(
                f"{where}: cannot infer k ({entries} {self.name} top-k entries for {positions} positions)"
            )
        return entries // positions

    def value_bound(self, k: int) -> tuple[str, float]:
        """How far a stored top-k value may sit from the same value encoded again:
        ``(space, bound)``, space ``"nats"`` (log-probs) or ``"sqrt_p"`` (square roots of
        probabilities). An audit re-encodes the re-scored values with this codec and allows
        this much on top of the teacher's own numerical tolerance. Lossless: 0."""
        assert self.lossless, f"lossy codec {self.name} must say its bound"
        return "nats", 0.0

    def value_bound_text(self) -> str:
        """:meth:`value_bound` in words, for docs and reports."""
        return "exact (0)"

    def matches(self, column_names: list[str]) -> bool:
        """True if a table with these columns holds this codec's top-k columns."""
        return set(self.columns) <= set(column_names)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


def flat_field(name: str, value: pa.DataType) -> pa.Field:
    """A non-nullable flat list field (never a list of lists)."""
    return pa.field(name, pa.list_(pa.field("element", value, nullable=False)), nullable=False)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(R,) lengths → (R + 1,) int64 offsets."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def list_array(values: np.ndarray, positions: np.ndarray, width: int, value_type: pa.DataType) -> pa.Array:
    """A list array whose row r holds ``positions[r] * width`` consecutive entries of ``values``."""
    offsets = pa.array(offsets_of(np.asarray(positions, np.int64) * width).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).ravel(), value_type))


def _column(table: pa.Table, name: str) -> pa.Array:
    """Column ``name`` as one array; FormatError if it is missing or holds nulls."""
    if name not in table.column_names:
        raise FormatError(f"the table has no column {name!r} (columns: {', '.join(table.column_names)})")
    chunked = table.column(name)
    column = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()  # no copy of one
    if column.null_count:
        raise FormatError(f"column {name!r} holds {column.null_count} null(s); every column is non-nullable")
    return column


def list_parts(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A flat list column → ((R + 1,) int64 offsets from 0, its values over every row).

    Raises:
        FormatError: the column is missing, not a list column, or holds nulls.
    """
    column = _column(table, name)
    if not pa.types.is_list(column.type):
        raise FormatError(f"column {name!r} must be a list column, got {column.type}")
    values = column.flatten()  # the rows' values only, also of a sliced array
    if values.null_count:
        raise FormatError(f"column {name!r} holds {values.null_count} null value(s); lists are non-nullable")
    offsets = column.offsets.to_numpy().astype(np.int64)
    if len(offsets) == 0:  # an empty array may carry no offsets at all
        offsets = np.zeros(1, np.int64)
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


def list_values(table: pa.Table, name: str) -> np.ndarray:
    """The flat values of list column ``name`` over every row of ``table`` (zero-copy where
    Arrow allows); FormatError as in :func:`list_parts`."""
    return list_parts(table, name)[1]


def list_lengths(table: pa.Table, name: str) -> np.ndarray:
    """(R,) int64 entries per row of list or binary column ``name``."""
    if name in table.column_names and pa.types.is_list(table.schema.field(name).type):
        return np.diff(list_parts(table, name)[0])
    return np.diff(binary_parts(table, name)[1])


def binary_parts(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary column → (its data buffer as uint8, (R + 1,) int64 offsets into it).

    Raises:
        FormatError: the column is missing, not binary, or holds nulls.
    """
    column = _column(table, name)
    if not pa.types.is_binary(column.type):
        raise FormatError(f"column {name!r} must be binary, got {column.type}")
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], np.int32, len(column) + 1, 4 * column.offset).astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return data, offsets


def check_positions(table: pa.Table, codec: str, k: int, widths: dict[str, int]) -> np.ndarray:
    """(R,) label positions per row that a codec's columns hold, checked to agree.

    Args:
        codec: the codec's name (for messages).
        widths: column → entries (or bytes) it stores per label position.

    Raises:
        FormatError: a row's length is not a multiple of its column's width, the columns
            disagree on a row's positions, or (when the table has ``label_mask``) they
            disagree with it: the shard is corrupt, or ``k`` is not its top-k width.
    """
    if k < 1:
        raise FormatError(f"{codec}: k must be >= 1, got {k}")
    positions: np.ndarray | None = None
    first = ""
    for name, width in widths.items():
        lengths = list_lengths(table, name)
        if (lengths % width).any():
            raise FormatError(
                f"{codec} columns disagree on the number of label positions (k={k}): column {name!r} has "
                f"a row of {int(lengths[(lengths % width) != 0][0])} entries, not a multiple of {width}; "
                "the shard is corrupt or k is wrong"
            )
        if positions is None:
            positions, first = lengths // width, name
        elif not np.array_equal(lengths // width, positions):
            raise FormatError(
                f"{codec} columns {first!r} and {name!r} disagree on the number of label positions "
                f"(k={k}): the shard is corrupt"
            )
    assert positions is not None, "widths names at least one column"
    if Columns.LABEL_MASK in table.column_names and not np.array_equal(
        list_lengths(table, Columns.LABEL_MASK), positions
    ):
        raise FormatError(
            f"{codec} top-k columns hold other label positions than {Columns.LABEL_MASK!r} (k={k}): "
            "the shard is corrupt or k is wrong"
        )
    return positions
