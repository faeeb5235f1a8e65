"""Hidden-state join: the teacher's sampled hidden states for the rows of a label row group.

Hidden shards (``ShardRecord.hidden_path``) hold one row per sequence: sampled token
positions and one ``P x D`` little-endian blob per layer. Rows are joined to label rows
by ``(sample_id, token_hash)``, never by row position, so a reordered or partial hidden
shard can never feed one sequence's states to another. The writer aligns row groups
(hidden row group i holds the rows of label row group i), so one row group is read; the
whole hidden shard is read only if a key is missing there. Hidden shards are checksum
verified like label shards (:meth:`students.shards.ShardReader.open_verified`).
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.codecs.base import list_parts
from labelgen.contract.format import (
    Columns,
    FormatError,
    Manifest,
    dataset_file,
    hidden_schema,
    schema_problem,
)
from labelgen.contract.records import decode_hidden
from students.shards import RowGroupRef, Rows, ShardReader

__all__ = ["HiddenRows", "read_hidden", "decode_hidden"]


@dataclass
class HiddenRows:
    """Hidden states aligned with the R rows of a label row group.

    Row j's sampled positions are ``positions[offsets[j]:offsets[j+1]]`` (token positions
    t within the row) and its states ``values[layer][offsets[j]:offsets[j+1]]`` (P_j, D).
    """

    layers: tuple[int, ...]
    offsets: np.ndarray  # (R+1,) int64
    positions: np.ndarray  # (sum P,) int32
    values: dict[int, np.ndarray]  # layer -> (sum P, D) float32

    def row(self, j: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(positions (P,), {layer: (P, D)}) of row j."""
        a, z = self.offsets[j], self.offsets[j + 1]
        return self.positions[a:z], {layer: v[a:z] for layer, v in self.values.items()}


def read_hidden(
    url: str, manifest: Manifest, ref: RowGroupRef, rows: Rows, reader: ShardReader | None = None
) -> HiddenRows | None:
    """Hidden states of the rows of label row group ``ref``, joined by sample_id + token_hash.

    With ``reader`` the hidden shard is checksum-verified under its policy (None: the
    shard failed under 'skip'); without, it is read unverified.

    Raises:
        FormatError: the dataset has no hidden product, or a label row has no hidden row.
        ChecksumError: the hidden shard's size or sha256 differ from its record ('error').
    """
    product = manifest.products.get("hidden")
    record = next((s for s in manifest.shards if s.path == ref.shard), None)
    if not product or record is None or not record.hidden_path:
        raise FormatError(f"{url}: no hidden states for {ref.shard}; label with hidden.layers set")
    layers = tuple(int(x) for x in product["layers"])
    fs, root = fsspec.core.url_to_fs(url)
    path = dataset_file(root, record.hidden_path, f"{url}: hidden shard of {ref.shard}")
    source = reader.open_verified(record.hidden_path) if reader is not None else fs.open(path, "rb")
    if source is None:
        return None
    assert rows.token_hashes is not None  # decode_rows always fills them
    keys = list(zip(rows.sample_ids, rows.token_hashes.tolist(), strict=True))
    try:
        with source as f:
            parquet = pq.ParquetFile(f)
            groups = parquet.num_row_groups
            table = parquet.read_row_group(ref.row_group) if ref.row_group < groups else None
            index = _index(table, layers, path) if table is not None else {}
            if any(key not in index for key in keys):
                table = parquet.read()
                index = _index(table, layers, path)
    except FormatError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
        raise FormatError(f"cannot read {path}: {exc}") from exc
    missing = [key for key in keys if key not in index]
    if missing:
        raise FormatError(f"{path} has no hidden row for {len(missing)} label row(s), e.g. {missing[0]}")
    take = np.array([index[key] for key in keys], np.int64)
    picked = table.take(pa.array(take))
    offsets, positions = list_parts(picked, Columns.HIDDEN_POSITIONS)
    positions = positions.astype(np.int32)
    counts = np.diff(offsets)
    row_tokens = np.repeat(rows.num_tokens.astype(np.int64), counts)
    if positions.size and ((positions < 0).any() or (positions >= row_tokens).any()):
        raise FormatError(f"{path} samples token positions outside their rows; the hidden shard is corrupt")
    values = {}
    for layer in layers:
        blobs = picked.column(Columns.HIDDEN_LAYER.format(layer)).to_pylist()
        parts = [decode_hidden(b, product["dtype"], int(c)) for b, c in zip(blobs, counts, strict=True)]
        nonempty = [p for p in parts if p.size]
        if len({p.shape[1] for p in nonempty}) > 1:
            raise FormatError(f"{path}: layer {layer} holds vectors of several sizes; the shard is corrupt")
        values[layer] = np.concatenate(nonempty) if nonempty else np.zeros((0, 0), np.float32)
    return HiddenRows(layers=layers, offsets=offsets, positions=positions, values=values)


def _index(table: pa.Table, layers: tuple[int, ...], path: str) -> dict[tuple[str, int], int]:
    """(sample_id, token_hash) → row of a hidden table, after checking its columns."""
    table.validate(full=True)
    problem = schema_problem(table, hidden_schema(layers))
    if problem is not None:
        raise FormatError(f"{path} {problem}; the hidden shard is corrupt")
    ids = table.column(Columns.SAMPLE_ID).to_pylist()
    hashes = table.column(Columns.TOKEN_HASH).to_pylist()
    return {key: i for i, key in enumerate(zip(ids, hashes, strict=True))}
