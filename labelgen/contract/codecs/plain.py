"""The ``plain`` top-k codec: int32 ids and float32 log-probs by rank, stored exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelgen.contract.codecs.base import Codec, check_positions, flat_field, list_array, list_values
from labelgen.contract.columns import Columns

__all__ = ["PlainCodec", "CODEC"]


class PlainCodec(Codec):
    """``topk_ids`` list<int32> [(T-1)·k] and ``topk_logprobs`` list<float32> [(T-1)·k], by rank."""

    name = "plain"
    columns = (Columns.TOPK_IDS, Columns.TOPK_LOGPROBS)
    k_column = Columns.TOPK_IDS
    lossless = True
    summary = "int32 ids + float32 log-probs by rank, exact"

    def fields(self) -> list[pa.Field]:
        return [flat_field(Columns.TOPK_IDS, pa.int32()), flat_field(Columns.TOPK_LOGPROBS, pa.float32())]

    def column_encodings(self) -> dict[str, str]:
        return {f"{Columns.TOPK_LOGPROBS}.list.element": "BYTE_STREAM_SPLIT"}

    def encode(
        self, topk_ids: np.ndarray, topk_logprobs: np.ndarray, positions: np.ndarray
    ) -> dict[str, pa.Array]:
        k = topk_ids.shape[1]
        return {
            Columns.TOPK_IDS: list_array(topk_ids.astype(np.int32), positions, k, pa.int32()),
            Columns.TOPK_LOGPROBS: list_array(topk_logprobs.astype(np.float32), positions, k, pa.float32()),
        }

    def decode(self, table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_positions(table, self.name, k, {Columns.TOPK_IDS: k, Columns.TOPK_LOGPROBS: k})
        ids = list_values(table, Columns.TOPK_IDS).reshape(-1, k)
        lps = list_values(table, Columns.TOPK_LOGPROBS).reshape(-1, k)
        return ids, lps


CODEC = PlainCodec()
