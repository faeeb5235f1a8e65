"""What a top-k codec is: the interface every codec implements, and Arrow helpers they share.

A codec stores the teacher's top-k labels of a row group — ids and raw log-probs by
rank, ``(N, k)`` for N label positions — in columns of its own, and gives them back.
It owns everything about those columns: their names, Arrow fields, Parquet encodings,
encoder, decoder and how to read ``k`` off a table. Nothing outside
:mod:`labelgen.contract.codecs` knows which codec stores what.

Shapes: R rows, ``positions`` (R,) label positions per row (T - 1), N = sum(positions).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import pyarrow as pa

from labelgen.contract.columns import Columns
from labelgen.contract.errors import FormatError

__all__ = ["Codec", "binary_parts", "flat_field", "list_array", "list_values", "offsets_of"]


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
        column = table.column(self.k_column).combine_chunks()
        if pa.types.is_list(column.type):
            entries = len(list_values(table, self.k_column))
        else:
            offsets = binary_parts(table, self.k_column)[1]
            entries = int(offsets[-1] - offsets[0])
        if positions == 0 or entries % positions:
            raise FormatError(
                f"{where}: cannot infer k ({entries} {self.name} top-k entries for {positions} positions)"
            )
        return entries // positions

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


def list_values(table: pa.Table, name: str) -> np.ndarray:
    """The flat values of list column ``name`` over every row of ``table`` (zero-copy where Arrow allows)."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    return column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]


def binary_parts(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary column → (its data buffer as uint8, (R + 1,) int64 offsets into it)."""
    column = table.column(name).combine_chunks()
    if not pa.types.is_binary(column.type):
        raise FormatError(f"column {name!r} must be binary, got {column.type}")
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], np.int32, len(column) + 1, 4 * column.offset).astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return data, offsets
