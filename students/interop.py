"""Views of a label dataset for other tools: Hugging Face ``datasets``, DuckDB, pyarrow.

Label shards are plain Parquet, so any Parquet reader sees their raw columns::

    datasets.load_dataset("parquet", data_files=shard_files(url), split="train")
    duckdb.sql(f"SELECT count(*), sum(num_tokens) FROM read_parquet({shard_files(url)})")
    pyarrow.dataset.dataset(shard_files(url), format="parquet").count_rows()

With the compact-v1 codec those raw columns are the encoded ones (``topk_id_deltas``,
...). :func:`to_hf_iterable` gives decoded rows (top-k ids and log-probs by rank, any
codec) as a ``datasets.IterableDataset``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import Columns, dataset_file
from students.shards import RowGroupRef, ShardReader

__all__ = ["shard_files", "to_hf_iterable", "hf_features"]


def shard_files(url: str) -> list[str]:
    """URLs of a complete dataset's label shards, in manifest order (keeps the URL's scheme)."""
    return [dataset_file(url, s.path, f"{url}: shard") for s in read_manifest(url).shards]


def hf_features(draws: bool = False) -> Any:
    """``datasets.Features`` of the rows :func:`to_hf_iterable` yields."""
    from datasets import Features, Sequence, Value

    ints, floats = Sequence(Value("int32")), Sequence(Value("float32"))
    features = {
        Columns.SAMPLE_ID: Value("string"),
        Columns.TOKEN_HASH: Value("int64"),  # the uint64 bits, as in batches (torch has no uint64)
        Columns.NUM_TOKENS: Value("int32"),
        Columns.INPUT_IDS: ints,
        Columns.LABEL_MASK: Sequence(Value("uint8")),
        Columns.TOPK_IDS: ints,
        Columns.TOPK_LOGPROBS: floats,
        Columns.TARGET_LOGPROBS: floats,
    }
    if draws:
        features.update({"draw_num": ints, "draw_ids": ints, "draw_counts": ints})
    return Features(features)


def _decoded_rows(url: str, refs: list[tuple[str, int]], verify: str) -> Iterator[dict[str, Any]]:
    manifest = read_manifest(url)
    reader = ShardReader.for_manifest(url, manifest, verify=verify)
    for shard, row_group in refs:
        rows = reader.read(RowGroupRef(shard, row_group))
        if rows is None:
            continue
        assert rows.token_hashes is not None
        for j in range(len(rows)):
            t0, t1 = rows.token_offsets[j], rows.token_offsets[j + 1]
            p0, p1 = rows.label_offsets[j], rows.label_offsets[j + 1]
            row = {
                Columns.SAMPLE_ID: rows.sample_ids[j],
                Columns.TOKEN_HASH: int(rows.token_hashes[j : j + 1].view(np.int64)[0]),
                Columns.NUM_TOKENS: int(rows.num_tokens[j]),
                Columns.INPUT_IDS: rows.input_ids[t0:t1],
                Columns.LABEL_MASK: rows.label_mask[p0:p1],
                Columns.TOPK_IDS: rows.topk_ids[p0:p1].reshape(-1),
                Columns.TOPK_LOGPROBS: rows.topk_logprobs[p0:p1].reshape(-1),
                Columns.TARGET_LOGPROBS: rows.target_logprobs[p0:p1],
            }
            if rows.draw_offsets is not None:
                assert rows.draw_ids is not None and rows.draw_counts is not None
                d0, d1 = rows.draw_offsets[p0], rows.draw_offsets[p1]
                row["draw_num"] = (rows.draw_offsets[p0 + 1 : p1 + 1] - rows.draw_offsets[p0:p1]).astype(
                    "int32"
                )
                row["draw_ids"] = rows.draw_ids[d0:d1]
                row["draw_counts"] = rows.draw_counts[d0:d1].astype("int32")
            yield row


def to_hf_iterable(url: str, verify: str = "error") -> Any:
    """A ``datasets.IterableDataset`` of decoded rows of a complete dataset (any codec).

    Each row: sample_id, token_hash (its uint64 bits as int64), num_tokens, input_ids (T,), label_mask (T-1,),
    topk_ids and topk_logprobs ((T-1)*k, flat, by rank per position; reshape to
    (T-1, k) with the manifest's k), target_logprobs (T-1,); with random-sampling
    labels also draw_num / draw_ids / draw_counts. Row groups are the generator's
    shards, so ``.shard()`` and DataLoader workers split by row group. Example::

        ds = to_hf_iterable("s3://bucket/labels/run-1").with_format("torch")
    """
    from datasets import IterableDataset

    manifest = read_manifest(url)
    fsspec.core.url_to_fs(url)  # fail early on an unknown protocol
    refs = [(s.path, i) for s in manifest.shards for i in range(s.row_groups)]
    return IterableDataset.from_generator(
        _decoded_rows,
        features=hf_features(draws="draws" in manifest.products),
        gen_kwargs={"url": url, "refs": refs, "verify": verify},
    )
