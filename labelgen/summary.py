"""What a label dataset holds, with teacher statistics: the report ``labelgen inspect URL`` prints.

Reads the manifest (or, for a dataset still being written, the commit records) and
a sample of rows to report mean teacher entropy and top-1 mass, and their histograms
over label positions (the dataset card keeps them; the web catalog plots them).
Entropy counts the mass outside the top-k as one bucket, so it is a lower bound on the
full entropy.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.codecs import get_codec
from labelgen.contract.commits import CommitLog
from labelgen.contract.dataset import read_manifest_if_complete
from labelgen.contract.format import MANIFEST_NAME, FormatError, Manifest, dataset_file
from labelgen.contract.storage import MIB

__all__ = [
    "inspect_dataset",
    "sample_statistics",
    "format_report",
    "topk_statistics",
    "topk_histograms",
    "HISTOGRAM_BINS",
]

HISTOGRAM_BINS = 20
"""Bins of the card's per-position histograms (entropy, top-1 mass)."""


def _per_position(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entropy, top-1 mass, tail mass) of each position, each (N,) float64.

    Args:
        topk_logprobs: (N, k) raw teacher log-probs.
    """
    lps = topk_logprobs.astype(np.float64)
    p = np.exp(lps)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(p * lps).sum(axis=1) - np.where(tail > 0, tail * np.log(tail), 0.0)
    return ent, p[:, 0], tail


def topk_statistics(topk_logprobs: np.ndarray) -> dict[str, float]:
    """Mean entropy (top-k + tail bucket), top-1 mass and tail mass over positions.

    Args:
        topk_logprobs: (N, k) raw teacher log-probs.
    """
    ent, top1, tail = _per_position(topk_logprobs)
    return {
        "entropy_nats": float(ent.mean()),
        "top1_mass": float(top1.mean()),
        "tail_mass": float(tail.mean()),
    }


def topk_histograms(topk_logprobs: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, dict[str, list]]:
    """Histograms over positions of the entropy (top-k + tail bucket, nats) and the top-1
    mass: ``{"entropy_nats": {"edges", "counts"}, "top1_mass": {...}}``, ``bins`` counts and
    ``bins + 1`` edges each. The ranges are fixed so that two datasets' histograms of the
    same k compare bin by bin: entropy over [0, ln(k + 1)] (its largest value with k + 1
    buckets), top-1 mass over [0, 1].

    Args:
        topk_logprobs: (N, k) raw teacher log-probs.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    ent, top1, _ = _per_position(topk_logprobs)
    k = topk_logprobs.shape[1]
    out = {}
    for name, values, high in (("entropy_nats", ent, float(np.log(k + 1))), ("top1_mass", top1, 1.0)):
        finite = np.clip(values[np.isfinite(values)], 0.0, high)
        counts, edges = np.histogram(finite, bins=bins, range=(0.0, high))
        out[name] = {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
    return out


def inspect_dataset(url: str, sample_rows: int = 2048) -> dict[str, Any]:
    """Summary of the dataset at ``url`` (manifest required) plus sampled teacher statistics."""
    fs, root = fsspec.core.url_to_fs(url)
    manifest = read_manifest_if_complete(fs, root)
    if manifest is None:
        commits = CommitLog(fs, root)
        shards, units = commits.committed()
        if not shards:
            raise FormatError(f"no label dataset at {url!r} (no {MANIFEST_NAME}, no committed shards)")
        job = commits.job()
        return {
            "complete": False,
            "url": url,
            "labels": f"top-{job.k} ({job.codec})" if job is not None else "unknown (no job record)",
            "committed_shards": len(shards),
            "finished_units": len(units),
            "rows": sum(s.rows for s in shards),
            "tokens": sum(s.tokens for s in shards),
        }
    return {
        "complete": True,
        "url": url,
        "manifest": manifest,
        **sample_statistics(fs, root, manifest, sample_rows, url),
    }


def sample_statistics(fs: Any, root: str, manifest: Manifest, sample_rows: int, where: str) -> dict[str, Any]:
    """Teacher statistics (:func:`topk_statistics`, and :func:`topk_histograms` under
    ``"histograms"``) over row group 0 of the manifest's shards, in manifest order, until at
    least ``sample_rows`` sequences are read: ``sample_rows`` (the count read) plus the
    statistics (absent when no row was read).

    Args:
        fs: an fsspec filesystem; root: the dataset root on it; where: the dataset, for errors.

    Raises:
        FormatError: a shard's row group 0 cannot be read or decoded (names the file).
    """
    codec = get_codec(manifest.codec)
    rows_seen, chunks = 0, []
    for shard in manifest.shards:
        if rows_seen >= sample_rows:
            break
        path = dataset_file(root, shard.path, f"{where}: shard")
        try:
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(0, columns=list(codec.columns))
            table.validate(full=True)
        except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
            raise FormatError(f"cannot read row group 0 of {path}: {exc}") from exc
        try:
            chunks.append(codec.decode(table, manifest.k)[1])
        except FormatError as exc:
            raise FormatError(f"row group 0 of {path}: {exc}") from exc
        rows_seen += table.num_rows
    if not chunks:
        return {"sample_rows": rows_seen}
    lps = np.concatenate(chunks)
    return {"sample_rows": rows_seen, **topk_statistics(lps), "histograms": topk_histograms(lps)}


def format_report(info: dict[str, Any]) -> str:
    if not info["complete"]:
        return (
            f"{info['url']}: INCOMPLETE (no manifest yet): {info['committed_shards']} shard(s) committed, "
            f"{info['finished_units']} unit(s) finished, {info['rows']} sequences, {info['tokens']} tokens, "
            f"labels {info['labels']}"
        )
    m: Manifest = info["manifest"]
    t = m.totals
    teacher, tok = m.teacher, m.tokenizer
    weights = teacher.get("weights", {})
    lines = [
        f"dataset     {info['url']}",
        f"format      {m.format} {m.format_version}, created {m.created_at}",
        f"teacher     {teacher.get('model')} ({teacher.get('dtype')}, vLLM {teacher.get('vllm_version')}, "
        f"{teacher.get('logprobs_mode')})",
        f"weights     {weights.get('mode')} sha256 {weights.get('sha256')}",
        f"tokenizer   {tok.get('fingerprint', '')[:16]}…  vocab {tok.get('vocab_size')} "
        f"(model vocab {tok.get('model_vocab_size')})",
        f"labels      top-{m.k} raw log-probs + target log-prob ({m.codec}); {m.position_convention}",
        f"extraction  {teacher.get('extraction', 'public')}; products: "
        + (", ".join(f"{name} {value}" for name, value in m.products.items()) or "top-k only"),
        f"shards      {t['shards']} ({t['bytes'] / MIB:.2f} MiB), {t['rows']} sequences, "
        f"{t['tokens']} tokens, {t['label_positions']} label positions",
        f"bytes/tok   {t['bytes'] / max(t['label_positions'], 1):.1f} per label position",
        f"units       {len(m.units)} from {len(m.corpus.get('sources', []))} source(s)",
        f"engine      busy {_busy(m.labeling['engine_busy_fraction'])} "
        f"({m.labeling['engine_s']:.0f} s of {m.labeling['wall_s']:.0f} s of labeling)",
        f"rejected    {', '.join(f'{k}={v}' for k, v in m.rejected.items()) or 'none'}",
    ]
    if m.generation:
        g, stats = m.generation, m.generation.get("stats", {})
        rejected = {k: v for k, v in stats.get("rejected", {}).items() if v}
        lines.append(
            f"generation  {stats.get('prompts')} prompts x n={g.get('sampling', {}).get('n')}: "
            f"{stats.get('samples')} samples, {stats.get('passed')} passed, {stats.get('kept')} kept "
            f"(keep {g.get('keep')}); pass@1 {stats.get('pass@1')}, pass@n {stats.get('pass@n')}; "
            f"rejected samples {', '.join(f'{k}={v}' for k, v in rejected.items()) or 'none'}"
        )
    if "entropy_nats" in info:
        lines.append(
            f"teacher     mean entropy {info['entropy_nats']:.3f} nats (top-k + tail bucket), "
            f"top-1 mass {info['top1_mass']:.3f}, tail mass {info['tail_mass']:.3f} "
            f"(over {info['sample_rows']} sampled sequences)"
        )
    return "\n".join(lines)


def _busy(fraction: float | None) -> str:
    return "n/a (not recorded)" if fraction is None else f"{fraction:.1%}"
