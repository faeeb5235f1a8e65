"""The label format: the one contract between the teacher side and the student side.

A label dataset is a directory (local path or any fsspec URL) holding::

    manifest.json                      written last; its presence means "complete"
    job-spec.yaml                      the resolved job spec that produced it
    shards/part-UUUUU-SSSSS.parquet    label shards (unit U, shard S), zero-padded
    hidden/part-UUUUU-SSSSS.parquet    hidden-state samples of the same rows (optional)
    _commits/part-UUUUU-SSSSS.json     one record per committed shard (for followers/resume)
    _commits/unit-UUUUU.json           one record per finished work unit

One Parquet row holds one token sequence of length T. Every column is a flat,
non-nullable list (never a list of lists): per-position arrays of width k are
flattened row-major and reshaped with numpy on read.

Position convention: label position t (0 <= t < T-1) holds the teacher's
distribution over token t+1 given tokens 0..t, so it lines up with a causal
student's logits at position t. (vLLM's ``prompt_logprobs`` entry t+1.)

Values are raw log-probabilities at temperature 1. The mass outside the stored
top-k is exact: ``1 - sum(exp(topk_logprobs))``.

This module imports only the standard library, numpy, pyarrow and fsspec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPEC_NAME",
    "SHARDS_DIR",
    "COMMITS_DIR",
    "FormatError",
    "Columns",
    "label_schema",
    "CODECS",
    "COMPACT_STEP",
    "encode_topk",
    "decode_topk_table",
    "topk_column_names",
    "decode_topk",
    "hidden_schema",
    "HIDDEN_DIR",
    "shard_name",
    "ShardRecord",
    "UnitRecord",
    "Manifest",
    "token_hash",
    "tokenizer_fingerprint",
    "read_manifest",
    "check_format_version",
    "join_url",
]

FORMAT_NAME = "labelgen"
FORMAT_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
SPEC_NAME = "job-spec.yaml"
SHARDS_DIR = "shards"
HIDDEN_DIR = "hidden"
COMMITS_DIR = "_commits"


class FormatError(ValueError):
    """A label dataset is missing, incomplete, corrupt or of an unsupported version."""


class Columns:
    """Column names of a label shard, with their per-row lengths."""

    SAMPLE_ID = "sample_id"  # string: "<source>#<record>.<chunk>" of the sequence's first token
    TOKEN_HASH = "token_hash"  # uint64: token_hash(input_ids), to join other products safely
    NUM_TOKENS = "num_tokens"  # int32: T
    INPUT_IDS = "input_ids"  # list<int32> [T]
    LABEL_MASK = "label_mask"  # list<uint8> [T-1]: 1 where token t+1 is a training target
    TOPK_IDS = "topk_ids"  # list<int32> [(T-1) * k], sorted by rank per position
    TOPK_LOGPROBS = "topk_logprobs"  # list<float32> [(T-1) * k], descending per position
    TARGET_LOGPROBS = "target_logprobs"  # list<float32> [T-1]: log p(token t+1)
    # Compact top-k codec ("compact-v1") replaces TOPK_IDS / TOPK_LOGPROBS with:
    TOPK_ID_DELTAS = "topk_id_deltas"  # list<int32> [(T-1) * k]: ids ascending per position, gaps
    TOPK_LOGPROB_Q = "topk_logprob_q"  # list<uint8> [(T-1) * k]: round(-logprob / step), same order
    TOPK_TAIL = "topk_tail_logprob"  # list<float32> [T-1]: exact log of the mass outside the top-k
    # Random-sampling labels (product "draws"): per position t, DRAW_NUM[t] unique ids.
    DRAW_NUM = "draw_num"  # list<uint8> [T-1]
    DRAW_IDS = "draw_ids"  # list<int32> [sum draw_num], ascending per position
    DRAW_COUNTS = "draw_counts"  # list<uint8> [sum draw_num]: times each id was drawn
    # Hidden-state shards (product "hidden"), one row per sequence:
    HIDDEN_POSITIONS = "positions"  # list<int32> [P]: sampled token positions
    HIDDEN_LAYER = "layer_{}"  # binary: P x D little-endian float16/bfloat16/float32


def _flat(name: str, value: pa.DataType) -> pa.Field:
    return pa.field(name, pa.list_(pa.field("element", value, nullable=False)), nullable=False)


def hidden_schema(layers: Iterable[int]) -> pa.Schema:
    """Arrow schema of a hidden-state shard for the given layer ids."""
    return pa.schema(
        [
            pa.field(Columns.SAMPLE_ID, pa.string(), nullable=False),
            pa.field(Columns.TOKEN_HASH, pa.uint64(), nullable=False),
            _flat(Columns.HIDDEN_POSITIONS, pa.int32()),
            *[pa.field(Columns.HIDDEN_LAYER.format(i), pa.binary(), nullable=False) for i in layers],
        ],
        metadata={b"labelgen.format_version": FORMAT_VERSION.encode()},
    )


CODECS = ("plain", "compact-v1")
COMPACT_STEP = 1.0 / 16.0  # nats per quantisation level of compact-v1 log-probs (255 levels)


def encode_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """compact-v1: (n, k) ids/log-probs by rank → (id gaps int32, levels uint8, tail float32).

    Per position the ids are sorted ascending and stored as gaps (the first one absolute);
    log-probs follow the same order as ``round(-lp / COMPACT_STEP)`` clipped to 255 (error
    at most COMPACT_STEP / 2 nats above -15.9). The exact log of the mass outside the
    top-k is kept as float32, so a peaked teacher's small tail survives quantisation.
    """
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids.astype(np.int64), order, 1)
    gaps = np.diff(ids, axis=1, prepend=0).astype(np.int32)
    lps = np.take_along_axis(topk_logprobs.astype(np.float32), order, 1)
    q = np.clip(np.rint(-lps / COMPACT_STEP), 0, 255).astype(np.uint8)
    kept = np.exp(topk_logprobs.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - kept, 0.0, 1.0)).astype(np.float32)
    return gaps, q, tail


def decode_topk(gaps: np.ndarray, q: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_topk`: → (n, k) ids and log-probs by rank.

    The dequantised top-k mass is rescaled to ``1 - exp(tail)``, so the stored tail
    mass is exact.
    """
    ids = np.cumsum(gaps, axis=1, dtype=np.int64).astype(np.int32)
    lps = q.astype(np.float64) * -COMPACT_STEP
    kept = np.log(np.exp(lps).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore"):
        target = np.log1p(-np.exp(tail.astype(np.float64)))[:, None]
    lps = (lps + np.where(np.isfinite(target), target - kept, 0.0)).astype(np.float32)
    order = np.argsort(q, axis=1, kind="stable")  # ascending level = descending log-prob
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


def topk_column_names(codec: str) -> list[str]:
    """The columns that hold the top-k labels under ``codec``."""
    assert codec in CODECS, codec
    if codec == "plain":
        return [Columns.TOPK_IDS, Columns.TOPK_LOGPROBS]
    return [Columns.TOPK_ID_DELTAS, Columns.TOPK_LOGPROB_Q, Columns.TOPK_TAIL]


def _list_values(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    return column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]


def decode_topk_table(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels of a shard table (any codec; detected by its columns) as (N, k) int32
    ids and float32 log-probs by rank, N = label positions of all rows in order."""
    if Columns.TOPK_ID_DELTAS in table.column_names:
        gaps = _list_values(table, Columns.TOPK_ID_DELTAS).reshape(-1, k)
        levels = _list_values(table, Columns.TOPK_LOGPROB_Q).reshape(-1, k)
        ids, lps = decode_topk(gaps, levels, _list_values(table, Columns.TOPK_TAIL))
    else:
        ids = _list_values(table, Columns.TOPK_IDS).reshape(-1, k)
        lps = _list_values(table, Columns.TOPK_LOGPROBS).reshape(-1, k)
    return ids, lps


def label_schema(draws: bool = False, codec: str = "plain") -> pa.Schema:
    """Arrow schema of a label shard (format version ``FORMAT_VERSION``)."""
    flat = _flat
    assert codec in CODECS, codec
    topk = (
        [flat(Columns.TOPK_IDS, pa.int32()), flat(Columns.TOPK_LOGPROBS, pa.float32())]
        if codec == "plain"
        else [
            flat(Columns.TOPK_ID_DELTAS, pa.int32()),
            flat(Columns.TOPK_LOGPROB_Q, pa.uint8()),
            flat(Columns.TOPK_TAIL, pa.float32()),
        ]
    )
    extra = (
        [
            flat(Columns.DRAW_NUM, pa.uint8()),
            flat(Columns.DRAW_IDS, pa.int32()),
            flat(Columns.DRAW_COUNTS, pa.uint8()),
        ]
        if draws
        else []
    )
    return pa.schema(
        [
            pa.field(Columns.SAMPLE_ID, pa.string(), nullable=False),
            pa.field(Columns.TOKEN_HASH, pa.uint64(), nullable=False),
            pa.field(Columns.NUM_TOKENS, pa.int32(), nullable=False),
            flat(Columns.INPUT_IDS, pa.int32()),
            flat(Columns.LABEL_MASK, pa.uint8()),
            *topk,
            flat(Columns.TARGET_LOGPROBS, pa.float32()),
            *extra,
        ],
        metadata={b"labelgen.format_version": FORMAT_VERSION.encode()},
    )


def shard_name(unit: int, shard: int) -> str:
    """Zero-padded shard stem; lexical order equals (unit, shard) order."""
    return f"part-{unit:05d}-{shard:05d}"


def token_hash(input_ids: np.ndarray) -> int:
    """64-bit hash of a token sequence (int32 little-endian bytes, blake2b)."""
    data = np.ascontiguousarray(input_ids, dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over a tokenizer's vocabulary and special tokens.

    Works on any object with ``get_vocab()`` (HF tokenizers). Two tokenizers with the
    same fingerprint map every string to the same ids.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    payload = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def join_url(base: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the scheme of ``base``."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard."""

    path: str  # relative to the dataset root, e.g. "shards/part-00000-00001.parquet"
    unit: int
    index: int  # shard index within the unit
    rows: int
    tokens: int
    label_positions: int
    row_groups: int
    bytes: int
    sha256: str
    first_sequence: int  # unit-local index of the first sequence in the shard
    next_sequence: int  # unit-local index one past the last sequence in the shard
    hidden_path: str = ""  # the matching hidden-state shard, if the product is on
    hidden_bytes: int = 0
    hidden_sha256: str = ""


@dataclass(frozen=True)
class UnitRecord:
    """One finished work unit (one input source)."""

    unit: int
    source: str
    sequences: int
    tokens: int
    shards: int
    rejected: dict[str, int] = field(default_factory=dict)
    source_sha256: str = ""


@dataclass
class Manifest:
    """The index of a complete label dataset; written last."""

    k: int
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    spec_sha256: str
    shards: list[ShardRecord]
    units: list[UnitRecord]
    created_at: str
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    position_convention: str = "position t holds the distribution of token t+1 given tokens <= t"
    logprob_temperature: float = 1.0
    codec: str = "plain"
    """Top-k layout: 'plain' (int32 ids + float32 log-probs by rank) or 'compact-v1'."""
    products: dict[str, Any] = field(default_factory=dict)
    """Optional products: {"draws": {"n", "temperature", "seed"}, "hidden": {"layers",
    "every", "dtype", "dim", "seed"}}; top-k is always present."""

    @property
    def rejected(self) -> dict[str, int]:
        """Rejected input records by reason, summed over units."""
        total: dict[str, int] = {}
        for unit in self.units:
            for reason, count in unit.rejected.items():
                total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    @property
    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "rows": sum(s.rows for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "label_positions": sum(s.label_positions for s in self.shards),
            "bytes": sum(s.bytes for s in self.shards),
        }

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["totals"] = self.totals
        data["rejected"] = self.rejected
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{where} is not valid JSON: {exc}") from exc
        check_format_version(data, where)
        data.pop("totals", None)
        data.pop("rejected", None)
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["shards"] = [ShardRecord(**s) for s in data.get("shards", [])]
        data["units"] = [UnitRecord(**u) for u in data.get("units", [])]
        return cls(**data)


def check_format_version(data: Mapping[str, Any], where: str) -> None:
    """Raise FormatError unless ``data`` is a manifest of a format version we read."""
    if data.get("format") != FORMAT_NAME:
        raise FormatError(f"{where} is not a {FORMAT_NAME} manifest (format={data.get('format')!r})")
    found = str(data.get("format_version"))
    if found.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise FormatError(
            f"{where} has format version {found}, this reader supports {FORMAT_VERSION}; "
            "install the labelgen release that matches the dataset"
        )


def read_manifest(url: str) -> Manifest:
    """Read ``<url>/manifest.json``; raise FormatError naming the URL if absent (incomplete)."""
    import fsspec

    path = join_url(url, MANIFEST_NAME)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        committed = _count_commits(fs, join_url(fs_path.rsplit("/", 1)[0], COMMITS_DIR))
        hint = (
            f"{committed} shard(s) are committed, so a labeling job is still running or was "
            "interrupted; re-run `labelgen run` with the same spec to finish it"
            if committed
            else "check the URL (run `labelgen inspect URL`)"
        )
        raise FormatError(f"no {MANIFEST_NAME} at {url!r}: the dataset is incomplete or absent; {hint}")
    with fs.open(fs_path, "r") as f:
        return Manifest.from_json(f.read(), where=path)


def _count_commits(fs: Any, commits_dir: str) -> int:
    try:
        return sum(1 for p in fs.ls(commits_dir, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    except (FileNotFoundError, OSError):
        return 0
