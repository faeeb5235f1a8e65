"""The checks a label dataset passes before the catalog registers a version of it, and its card.

:func:`verify_dataset` reads a dataset the way a reader would and refuses it
(:class:`PublishRefused`, naming the file and the fix) unless it is complete (its
manifest is present and of a format version this code reads), its commit log holds
exactly the manifest's shard and unit records, and every label and hidden shard has
the size and sha256 its record gives. Shards are hashed in chunks, in parallel; every
path taken from a record goes through :func:`labelgen.contract.format.dataset_file`,
so nothing outside the dataset is opened. What passes comes back as the files a
reader may open (with sizes and sha256) and the dataset card: what the catalog shows
and filters on. Imports only the standard library, fsspec and labelgen's contract and
summary (no web framework, no database).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from labelgen.contract.commits import CommitLog
from labelgen.contract.format import MANIFEST_NAME, SPEC_NAME, FormatError, Manifest, dataset_file
from labelgen.contract.generation import manifest_generation_shards
from labelgen.contract.storage import MIB, is_local, retry
from labelgen.summary import sample_statistics

__all__ = [
    "DatasetFile",
    "VerifiedDataset",
    "PublishRefused",
    "canonical_url",
    "verify_dataset",
    "check_integrity",
    "Integrity",
    "card_matches",
]

_CHUNK = 4 * MIB
_RERUN = "re-run the labeling job into a new output URL and publish that"
_RESTORE = f"restore the dataset from the job's output, or {_RERUN}"


@dataclass(frozen=True)
class DatasetFile:
    """One file of a verified dataset."""

    path: str
    """Relative to the dataset root, e.g. ``manifest.json``, ``shards/part-00000-00000.parquet``."""
    size: int
    sha256: str
    kind: str
    """``manifest``, ``spec``, ``commit``, ``shard``, ``hidden``, or a generation job's
    ``generation`` and ``rejected`` sample files."""


@dataclass(frozen=True)
class VerifiedDataset:
    """A dataset that passed :func:`verify_dataset`."""

    url: str
    """Canonical URL (:func:`canonical_url`)."""
    manifest_sha256: str
    manifest: dict[str, Any]
    """``manifest.json`` as parsed JSON."""
    files: tuple[DatasetFile, ...]
    """Every file a reader may open: manifest, spec (if present), commit records, shards."""
    card: dict[str, Any]
    job_spec: str | None
    """The text of ``job-spec.yaml`` (the spec that made the dataset), None if absent."""


class PublishRefused(Exception):
    """A dataset the catalog must not register; the message names the file and the fix.

    Attributes:
        path: the (first) offending file relative to the dataset root, None if no one file.
        paths: every offending file (``[path]`` or empty when only one or none is known).
    """

    def __init__(self, message: str, path: str | None = None, paths: list[str] | None = None):
        super().__init__(message)
        self.path = path
        self.paths = list(paths) if paths is not None else ([path] if path else [])


def canonical_url(url: str) -> tuple[str, Any, str]:
    """(canonical URL, fsspec filesystem, root on it) of ``url``: a local path made absolute,
    any other URL as given; neither with a trailing slash."""
    fs, root = fsspec.core.url_to_fs(url)
    if is_local(fs):
        root = os.path.abspath(root)
        return root, fs, root
    return url.rstrip("/"), fs, root.rstrip("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(fs: Any, path: str) -> tuple[int, str]:
    """(size, sha256) of the file at ``path``, read in chunks (transient errors retried)."""

    def once() -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    return retry(once, f"hash {path}")


def _read(fs: Any, path: str) -> bytes | None:
    """The bytes of the file at ``path``, None if absent; a directory is refused."""
    try:
        return bytes(retry(lambda: fs.cat_file(path), f"read {path}"))
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise PublishRefused(f"{path} is a directory, not a file; {_RESTORE}", path) from exc


def _check_commit_log(log: CommitLog, manifest: Manifest, url: str) -> None:
    """Refuse unless the commit log holds exactly the manifest's shard and unit records."""
    try:
        shards, units = log.committed()
        listed_generations = manifest_generation_shards(manifest.generation, f"{url}/{MANIFEST_NAME}")
        generations = log.generations() if manifest.generation else []
    except FormatError as exc:
        raise PublishRefused(f"cannot publish {url}: {exc}") from exc
    problems: list[tuple[str, str]] = []
    pairs: list[tuple[dict[Any, Any], dict[Any, Any], str]] = []
    if manifest.generation:  # label shards are recorded inside the generation shards' records
        pairs.append(({g.path: g for g in listed_generations}, {g.path: g for g in generations}, "shard"))
        labels = [g.labels for g in listed_generations if g.labels is not None]
        if [s.path for s in labels] != [s.path for s in manifest.shards] or labels != manifest.shards:
            problems.append(
                (MANIFEST_NAME, f"{MANIFEST_NAME} lists label shards its generation shards do not record")
            )
    else:
        pairs.append(({s.path: s for s in manifest.shards}, {s.path: s for s in shards}, "shard"))
    pairs.append(({u.unit: u for u in manifest.units}, units, "unit"))
    for listed, logged, what in pairs:
        for key in sorted(listed.keys() | logged.keys()):
            record = listed.get(key) or logged[key]
            name = log.record_file(record)
            if key not in logged:
                problems.append((name, f"{name} (the record of {what} {key}) is missing from the commit log"))
            elif key not in listed:
                problems.append((name, f"{name} records {what} {key}, which the manifest does not list"))
            elif listed[key] != logged[key]:
                values = [
                    (f.name, getattr(logged[key], f.name), getattr(listed[key], f.name))
                    for f in dataclasses.fields(record)
                ]
                diff = [
                    f"{field} {mine!r:.80} (manifest: {theirs!r:.80})"
                    for field, mine, theirs in values
                    if mine != theirs
                ]
                problems.append((name, f"{name} disagrees with the manifest: {'; '.join(diff)}"))
    if problems:
        _refuse(url, f"its commit log disagrees with {MANIFEST_NAME}", problems, _RERUN)


def _refuse(url: str, what: str, problems: list[tuple[str, str]], fix: str) -> None:
    lines = "".join(f"\n  - {text}" for _, text in problems)
    raise PublishRefused(
        f"cannot publish {url}: {what} ({len(problems)} file(s)):{lines}\n{fix}",
        problems[0][0],
        [path for path, _ in problems],
    )


def _card(manifest: Manifest, stats: dict[str, Any]) -> dict[str, Any]:
    totals, teacher, tok = manifest.totals, manifest.teacher, manifest.tokenizer
    found = teacher.get("weights")
    weights: dict[str, Any] = found if isinstance(found, dict) else {}
    products = copy.deepcopy(manifest.products)
    card: dict[str, Any] = {
        "format_version": manifest.format_version,
        "created_at": manifest.created_at,
        "teacher": {
            "model": teacher.get("model"),
            "dtype": teacher.get("dtype"),
            "vllm_version": teacher.get("vllm_version"),
            "weights": {"mode": weights.get("mode"), "sha256": weights.get("sha256")},
        },
        "tokenizer": {key: tok.get(key) for key in ("fingerprint", "vocab_size", "model_vocab_size")},
        "k": manifest.k,
        "codec": manifest.codec,
        "products": products,
        "draws": int(products.get("draws", {}).get("n", 0)),
        "hidden_layers": [int(i) for i in products.get("hidden", {}).get("layers", [])],
        "sequences": totals["rows"],
        "tokens": totals["tokens"],
        "label_positions": totals["label_positions"],
        "bytes": totals["bytes"],
        "bytes_per_token": totals["bytes"] / max(totals["label_positions"], 1),
        "rejected": manifest.rejected,
        # Means and per-position histograms (20 bins: edges + counts) from a sample of rows.
        "stats": {
            key: stats.get(key)
            for key in ("entropy_nats", "top1_mass", "tail_mass", "sample_rows", "histograms")
        },
    }
    if manifest.spec_sha256:
        card["spec_sha256"] = manifest.spec_sha256
    return card


def verify_dataset(url: str, sample_rows: int = 2048, threads: int = 8) -> VerifiedDataset:
    """Check the dataset at ``url`` for publishing; its files and card if it passes.

    Args:
        url: the dataset (local path or any fsspec URL).
        sample_rows: sequences to sample for the card's teacher statistics.
        threads: files hashed at once.

    Raises:
        PublishRefused: the manifest is absent (incomplete), unreadable or of another format
            version; the commit log disagrees with it; a shard is missing, of another size or
            sha256 (all such files listed, the first in ``path``).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    url, fs, root = canonical_url(url)
    raw = _read(fs, dataset_file(root, MANIFEST_NAME))
    if raw is None:
        committed = CommitLog(fs, root).count_shards()
        raise PublishRefused(
            f"cannot publish {url}: it has no {MANIFEST_NAME}, so the dataset is incomplete or still being "
            f"written ({committed} shard(s) committed so far); wait for its labeling job to finish, or "
            "re-run the job with the same spec (`labelgen run`, or `labelgen generate`) if it stopped, then "
            "publish again",
            MANIFEST_NAME,
        )
    try:
        manifest = Manifest.from_json(raw, where=f"{url}/{MANIFEST_NAME}")
        data = json.loads(raw)
    except FormatError as exc:
        raise PublishRefused(f"cannot publish {url}: {exc}", MANIFEST_NAME) from exc
    integrity = check_integrity(fs, root, manifest, url, threads)
    files = [DatasetFile(MANIFEST_NAME, len(raw), _sha256(raw), "manifest"), *integrity.files]
    try:
        stats = sample_statistics(fs, root, manifest, sample_rows, url)
    except FormatError as exc:
        raise PublishRefused(f"cannot publish {url}: {exc}; {_RERUN}") from exc
    return VerifiedDataset(url, _sha256(raw), data, tuple(files), _card(manifest, stats), integrity.job_spec)


@dataclass(frozen=True)
class Integrity:
    """What :func:`check_integrity` read: every file but the manifest, and the job spec."""

    files: tuple[DatasetFile, ...]
    """Spec (if present), commit records, label, hidden and generation shards, with sizes and sha256."""
    job_spec: str | None
    """The text of ``job-spec.yaml``, None if absent."""


def check_integrity(fs: Any, root: str, manifest: Manifest, url: str, threads: int = 8) -> Integrity:
    """Check a complete dataset's files against its parsed ``manifest``: the commit log holds
    exactly the manifest's shard and unit records, every commit record and the spec (if
    present) can be read, and every label, hidden and generation shard has the size and
    sha256 its record gives. Shards are hashed ``threads`` at a time.

    Args:
        fs, root: the dataset's filesystem and root on it (:func:`canonical_url`).
        url: the dataset, for messages.

    Raises:
        PublishRefused: the commit log disagrees with the manifest, a record or the spec
            cannot be read, or shards are missing or differ (every such file in ``paths``,
            the first in ``path``).
    """
    log = CommitLog(fs, root)
    _check_commit_log(log, manifest, url)
    try:
        names = log.record_files()
    except FormatError as exc:
        raise PublishRefused(f"cannot publish {url}: {exc}") from exc
    files: list[DatasetFile] = []
    spec_raw = _read(fs, dataset_file(root, SPEC_NAME))
    job_spec = None
    if spec_raw is not None:
        try:
            job_spec = spec_raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PublishRefused(
                f"cannot publish {url}: {SPEC_NAME} is not UTF-8 ({exc}); {_RESTORE}", SPEC_NAME
            ) from exc
        files.append(DatasetFile(SPEC_NAME, len(spec_raw), _sha256(spec_raw), "spec"))

    expected = [(s.path, s.bytes, s.sha256, "shard") for s in manifest.shards]
    expected += [
        (s.hidden_path, s.hidden_bytes, s.hidden_sha256, "hidden") for s in manifest.shards if s.hidden_path
    ]
    for g in manifest_generation_shards(manifest.generation, f"{url}/{MANIFEST_NAME}"):
        expected.append((g.path, g.bytes, g.sha256, "generation"))
        if g.rejected_path:
            expected.append((g.rejected_path, g.rejected_bytes, g.rejected_sha256, "rejected"))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        records = list(pool.map(_attempt(lambda p: _read(fs, dataset_file(root, p, url))), names))
        hashed = list(
            pool.map(_attempt(lambda p: _hash_file(fs, dataset_file(root, p, url))), [e[0] for e in expected])
        )
    for name, (body, error) in zip(names, records, strict=True):
        if body is None:
            raise PublishRefused(
                f"cannot publish {url}: cannot read commit record {name} ({error}); {_RESTORE}", name
            )
        files.append(DatasetFile(name, len(body), _sha256(body), "commit"))
    problems: list[tuple[str, str]] = []
    for (path, size, sha, kind), (got, error) in zip(expected, hashed, strict=True):
        if isinstance(error, FileNotFoundError):
            problems.append((path, f"{path} is missing (its record gives {size} bytes)"))
        elif error is not None:
            problems.append((path, f"{path} cannot be read: {error}"))
        elif got[0] != size:
            problems.append(
                (path, f"{path} has {got[0]} bytes, its record gives {size} (truncated or replaced)")
            )
        elif got[1] != sha:
            problems.append(
                (path, f"{path} has sha256 {got[1]}, its record gives {sha} (changed since written)")
            )
        else:
            files.append(DatasetFile(path, size, sha, kind))
    if problems:
        _refuse(url, "shard files do not match their records", problems, _RESTORE)
    return Integrity(tuple(files), job_spec)


def _attempt(fn: Callable[[str], Any]) -> Callable[[str], tuple[Any, BaseException | None]]:
    """``fn`` returning (result, None), or (None, the OSError or PublishRefused it raised)."""

    def run(path: str) -> tuple[Any, BaseException | None]:
        try:
            return fn(path), None
        except (OSError, PublishRefused) as exc:
            return None, exc

    return run


def card_matches(card: dict[str, Any], **filters: Any) -> bool:
    """Whether ``card`` holds every filter value: a key names a card field, ``__`` a nested one
    (``teacher__model="m"``, ``tokenizer__fingerprint=...``); a list field matches a value it
    contains, or an equal list."""
    for key, wanted in filters.items():
        value: Any = card
        for part in key.split("__"):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        if value != wanted and not (
            isinstance(value, list) and not isinstance(wanted, list) and wanted in value
        ):
            return False
    return True
