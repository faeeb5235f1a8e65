"""Teacher ensembles over one corpus: other teachers' labels joined to a stream's rows.

Labeling jobs over the same corpus with the same packing and tokenizer produce the same
token sequences. :class:`EnsembleStream` takes the batches of one dataset's stream and
adds, for every other teacher's dataset, that teacher's top-k labels of the *same rows*,
joined by ``token_hash`` (the row's 64-bit token hash; the tokens are compared too, so
a hash collision cannot pass). Batches gain, for teacher j = 1, 2, ...::

    topk_ids@j       (B, T-1, k_j) int64     teacher j's top-k ids (its own k)
    topk_logprobs@j  (B, T-1, k_j) float32   their raw log-probs

Row groups of the other datasets are read (and checksum-verified) through the same
:class:`~students.shards.ShardReader` as the primary's, once per batch that needs them
(its buffer cache keeps recently used shards). The cursor is the primary stream's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.format import Columns, FormatError, Manifest, dataset_file
from students.shards import RowGroupRef, ShardReader
from students.stream import LabelStream, collate

__all__ = ["EnsembleStream", "TeacherIndex"]


class TeacherIndex:
    """Where each row of a dataset lives: token_hash (uint64) → (row group, row).

    Built from the ``token_hash`` column alone (8 bytes per row)."""

    def __init__(self, url: str, manifest: Manifest):
        fs, root = fsspec.core.url_to_fs(url)
        self.url = url
        self.where: dict[int, tuple[RowGroupRef, int]] = {}
        for shard in manifest.shards:  # one read of the hash column per shard file
            path = dataset_file(root, shard.path, f"{url}: shard")
            try:
                with fs.open(path, "rb") as f:
                    parquet = pq.ParquetFile(f)
                    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
                    hashes = parquet.read(columns=[Columns.TOKEN_HASH]).column(0).to_numpy()
            except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
                raise FormatError(f"cannot read the token hashes of {path}: {exc}") from exc
            first = 0
            for group, size in enumerate(sizes):
                ref = RowGroupRef(shard.path, group)
                for row, value in enumerate(hashes[first : first + size].tolist()):
                    self.where.setdefault(int(value), (ref, row))
                first += size

    def locate(self, hashes: np.ndarray) -> list[tuple[RowGroupRef, int]]:
        """(row group, row) of each uint64 hash; raises FormatError naming a missing one."""
        out = []
        for value in hashes.tolist():
            found = self.where.get(int(value))
            if found is None:
                raise FormatError(
                    f"{self.url} has no row with token_hash {int(value):#018x}: an ensemble needs every "
                    "teacher to label the same corpus with the same packing (corpus, packing and "
                    "tokenizer sections of the job specs)"
                )
            out.append(found)
        return out


class EnsembleStream:
    """A primary stream's batches plus the labels of other teachers for the same rows.

    Args:
        primary: the stream that decides order, sharding and the cursor.
        others: ``[(url, manifest), ...]`` of the other teachers' complete datasets.
        verify, cache_mib, log: as in :class:`~students.stream.LabelStream`.
    """

    def __init__(
        self,
        primary: LabelStream,
        others: list[tuple[str, Manifest]],
        verify: str = "error",
        cache_mib: float = 512,
        log: Callable[[str], None] | None = None,
    ):
        if not others:
            raise ValueError("an ensemble needs at least one other teacher's dataset")
        self.primary = primary
        self.indexes = [TeacherIndex(url, m) for url, m in others]
        self.readers = [
            ShardReader.for_manifest(url, m, verify=verify, cache_mib=cache_mib, log=log) for url, m in others
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.primary.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.primary.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """The primary's batches (read in this process) with the other teachers' labels."""
        return self.batches(iter)

    def batches(self, read: Callable[[LabelStream], Iterator[dict[str, np.ndarray]]]) -> Iterator[dict]:
        """Like iterating the ensemble, with the primary's batches from ``read(primary)``."""
        for batch in read(self.primary):
            for j, (index, reader) in enumerate(zip(self.indexes, self.readers, strict=True), start=1):
                batch.update(self._join(batch, j, index, reader))
            yield batch

    @staticmethod
    def _join(
        batch: dict[str, np.ndarray], j: int, index: TeacherIndex, reader: ShardReader
    ) -> dict[str, np.ndarray]:
        """Teacher j's labels of the batch's rows, padded like the batch."""
        hashes = batch["token_hash"].view(np.uint64)
        groups: dict[RowGroupRef, list[tuple[int, int]]] = defaultdict(list)
        for position, (ref, row) in enumerate(index.locate(hashes)):
            groups[ref].append((position, row))
        b, t = batch["input_ids"].shape
        ids: np.ndarray | None = None
        lps: np.ndarray | None = None
        for ref, members in groups.items():
            rows = reader.read(ref)
            if rows is None:
                raise FormatError(
                    f"{index.url}: shard {ref.shard} failed verification; its labels are missing"
                )
            part = collate(rows, [row for _, row in members])
            at = np.array([position for position, _ in members])
            n = part["input_ids"].shape[1]
            if not np.array_equal(part["input_ids"], batch["input_ids"][at, :n]) or (
                n < t and batch["input_ids"][at, n:].any()
            ):
                raise FormatError(f"{index.url}: rows with the same token_hash hold different tokens")
            if ids is None or lps is None:
                k = part["topk_ids"].shape[-1]
                ids = np.zeros((b, t - 1, k), np.int64)
                lps = np.zeros((b, t - 1, k), np.float32)
            ids[at, : n - 1] = part["topk_ids"]
            lps[at, : n - 1] = part["topk_logprobs"]
        assert ids is not None and lps is not None  # a batch has at least one row
        return {f"topk_ids@{j}": ids, f"topk_logprobs@{j}": lps}
