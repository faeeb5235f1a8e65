"""One audit, start to finish: files, tokenizer and weights checked; sampled rows re-scored and compared.

:func:`run_audit` reads the manifest, checks every file against its record
(:func:`labelgen.service.verify.check_integrity`), the job spec against the manifest's
``spec_sha256``, the teacher's weights fingerprint and its tokenizer's fingerprint
against the manifest's, then re-scores a seeded sample of sequences with the teacher
(:mod:`labelgen.audit.reference`), compares each (:mod:`labelgen.audit.compare`), tests
the stored draws (:mod:`labelgen.audit.draws`) and returns the report
(:mod:`labelgen.audit.report`). Rows of shards that fail the file check are not
sampled (they are already a failure).
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from labelgen.audit.compare import CHECK_ORDER, Failure, RowResult, compare_row
from labelgen.audit.draws import pooled_test
from labelgen.audit.reference import Reference, make_reference
from labelgen.audit.report import summary_text
from labelgen.audit.rows import read_rows, sample_rows
from labelgen.audit.tolerances import DRAW_P_VALUE, tolerance_for
from labelgen.contract.commits import CommitLog
from labelgen.contract.config_input import read_yaml
from labelgen.contract.configs import ConfigError, load_config
from labelgen.contract.format import (
    MANIFEST_NAME,
    SPEC_NAME,
    FormatError,
    Manifest,
    dataset_file,
    tokenizer_fingerprint,
)
from labelgen.provenance import check_model_path, load_tokenizer, weights_fingerprint
from labelgen.spec import JobSpec

__all__ = ["AuditOptions", "AuditRefused", "run_audit", "dataset_spec"]


class AuditRefused(ValueError):
    """The audit cannot start (no manifest, no teacher to load, a bad option): exit 2."""


@dataclass(frozen=True)
class AuditOptions:
    rows: int | None = 64
    """Sequences to re-score; None: every row."""
    seed: int | None = None
    """Seed of the row sample; None: a random one (recorded in the report)."""
    reference: str = "vllm"
    """``vllm`` (the labeling path) or ``transformers`` (an fp32 forward)."""
    model: str | None = None
    """Teacher checkpoint to load instead of the manifest's (its fingerprint is still checked);
    its tokenizer is used too."""
    progress: bool = True
    threads: int = 8
    """Files hashed at once."""


def _read(fs: Any, path: str) -> bytes | None:
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        return None


def dataset_spec(manifest: Manifest, spec_text: str | None, url: str) -> tuple[JobSpec, str | None]:
    """The job spec that made the dataset, and a problem with it (None: it is the manifest's).

    From ``job-spec.yaml`` when present (its sha256 must be the manifest's ``spec_sha256``);
    else rebuilt from the manifest's teacher, labels and products (no corpus)."""
    problem = None
    if spec_text is not None:
        data, why = read_yaml(spec_text)
        if isinstance(data, dict):
            data.pop("spec_sha256", None)
            try:
                spec = load_config(JobSpec, data, source=SPEC_NAME)
            except ConfigError as exc:
                problem = f"{SPEC_NAME} is not a valid job spec ({exc})"
            else:
                if manifest.spec_sha256 and spec.content_hash() != manifest.spec_sha256:
                    problem = (
                        f"{SPEC_NAME} hashes to {spec.content_hash()}, the manifest's spec_sha256 is "
                        f"{manifest.spec_sha256}: the spec was changed after the job"
                    )
                return spec, problem
        else:
            problem = f"{SPEC_NAME} is not a YAML mapping ({why or type(data).__name__})"
    t, products = manifest.teacher, manifest.products
    draws, hidden = products.get("draws", {}), products.get("hidden", {})
    labels: dict[str, Any] = {
        "k": manifest.k,
        "codec": manifest.codec,
        "extraction": t.get("extraction", "auto"),
    }
    if draws:
        labels.update(
            draws=draws["n"], draw_temperature=draws.get("temperature", 1.0), seed=draws.get("seed", 0)
        )
    elif hidden:
        labels["seed"] = hidden.get("seed", 0)
    data = {
        "teacher": {
            "model": t.get("model"),
            "revision": t.get("revision"),
            "dtype": t.get("dtype", "auto"),
            "max_model_len": t.get("max_model_len"),
            "engine_args": dict(t.get("engine_args") or {}),
        },
        "corpus": {"sources": [url]},
        "labels": labels,
        "output": {"url": url},
    }
    if hidden:
        data["hidden"] = {
            "layers": hidden["layers"],
            "every": hidden.get("every", 16),
            "dtype": hidden.get("dtype", "float16"),
        }
    try:
        return load_config(JobSpec, data, source=f"{url}/{MANIFEST_NAME}"), problem
    except ConfigError as exc:
        raise AuditRefused(
            f"{url} has no {SPEC_NAME} and its manifest does not describe a teacher to run: {exc}"
        ) from exc


def _check(passed: bool, detail: str, **extra: Any) -> dict[str, Any]:
    return {"passed": bool(passed), "detail": detail, **extra}


def _skipped(detail: str) -> dict[str, Any]:
    return {"passed": True, "skipped": True, "detail": detail}


def run_audit(
    url: str,
    options: AuditOptions = AuditOptions(),
    reference: Reference | None = None,
    ref: str | None = None,
) -> dict[str, Any]:
    """Audit the dataset at ``url``; the report (docs/AUDIT.md).

    Args:
        url: the dataset (local path, any fsspec URL, ``labelgen://``).
        reference: a started reference to re-score with (tests share one); None: start the one
            ``options.reference`` names for the dataset's teacher, and close it at the end.
        ref: the catalog version ``url`` is, for the report.

    Raises:
        AuditRefused: the dataset has no readable manifest, the teacher path is missing, or
            an option is out of range.
    """
    from labelgen.service.verify import PublishRefused, canonical_url, check_integrity

    if options.rows is not None and options.rows < 1:
        raise AuditRefused(f"--rows must be >= 1 (or 'all'), got {options.rows}")
    if options.reference not in ("vllm", "transformers"):
        raise AuditRefused(f"--reference must be vllm or transformers, got {options.reference!r}")
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    url, fs, root = canonical_url(url)
    try:
        raw = _read(fs, dataset_file(root, MANIFEST_NAME))
    except OSError as exc:
        raise AuditRefused(f"cannot read {url}/{MANIFEST_NAME}: {exc}") from exc
    if raw is None:
        committed = CommitLog(fs, root).count_shards()
        raise AuditRefused(
            f"{url} has no {MANIFEST_NAME}: the dataset is incomplete or absent ({committed} shard(s) "
            "committed); audit a finished dataset (check the URL with `labelgen inspect URL`)"
        )
    try:
        manifest = Manifest.from_json(raw, where=f"{url}/{MANIFEST_NAME}")
    except FormatError as exc:
        raise AuditRefused(str(exc)) from exc
    checks: dict[str, dict[str, Any]] = {}
    file_failures: list[dict[str, Any]] = []

    def fail(
        check: str, reason: str, shard: str | None = None, row: int | None = None, position: int | None = None
    ) -> None:
        file_failures.append(
            {"check": check, "shard": shard, "row": row, "position": position, "reason": reason}
        )

    # -- files ----------------------------------------------------------------------------
    bad_paths: set[str] = set()
    spec_text = None
    try:
        integrity = check_integrity(fs, root, manifest, url, options.threads)
        spec_text = integrity.job_spec
        files = len(integrity.files)
        checks["integrity"] = _check(True, f"{files} file(s) match the manifest and the commit records")
    except PublishRefused as exc:
        text = str(exc).replace(f"cannot publish {url}: ", "")
        bad_paths = set(exc.paths)
        checks["integrity"] = _check(False, text, files=sorted(bad_paths))
        fail("integrity", _first_problem(text), exc.path)
        raw_spec = _read(fs, dataset_file(root, SPEC_NAME))
        spec_text = raw_spec.decode("utf-8", "replace") if raw_spec is not None else None
    spec, spec_problem = dataset_spec(manifest, spec_text, url)
    if spec_problem:
        before = checks["integrity"]
        detail = spec_problem if before["passed"] else f"{before['detail']}; {spec_problem}"
        checks["integrity"] = _check(False, detail, files=sorted(bad_paths | {SPEC_NAME}))
        fail("integrity", spec_problem, SPEC_NAME)

    # -- the teacher: weights and tokenizer -------------------------------------------------
    model = options.model or str(manifest.teacher.get("model") or spec.teacher.model)
    try:
        check_model_path(model, "--model" if options.model else "teacher.model")
    except FileNotFoundError as exc:
        raise AuditRefused(
            f"{exc}; the teacher moved? pass --model PATH (its fingerprint is still checked)"
        ) from exc
    teacher = replace(spec.teacher, model=model, tokenizer=None if options.model else spec.teacher.tokenizer)
    spec = replace(spec, teacher=teacher)
    recorded = manifest.teacher.get("weights") if isinstance(manifest.teacher.get("weights"), dict) else {}
    mode = str(recorded.get("mode") or "none")
    if mode in ("sampled", "full"):
        found = weights_fingerprint(model, mode)
        same = found.get("sha256") == recorded.get("sha256")
        detail = (
            f"weights at {model} match the manifest ({mode} sha256 {str(found['sha256'])[:16]}…)"
            if same
            else f"weights at {model} have {mode} sha256 {found.get('sha256')}, the manifest records "
            f"{recorded.get('sha256')}: another checkpoint than the one that labeled the dataset"
        )
        checks["teacher"] = _check(same, detail)
        if not same:
            fail("teacher", detail)
    else:
        checks["teacher"] = _skipped(f"the manifest records no weights fingerprint (mode {mode})")
    tokenizer = load_tokenizer(teacher)
    fingerprint = tokenizer_fingerprint(tokenizer)
    problems = []
    if fingerprint != manifest.tokenizer.get("fingerprint"):
        problems.append(
            f"the teacher's tokenizer ({teacher.tokenizer or model}) has fingerprint {fingerprint[:16]}…, "
            f"the manifest records {str(manifest.tokenizer.get('fingerprint'))[:16]}…: the token ids are "
            "another tokenizer's"
        )
    logged = CommitLog(fs, root).tokenizer() if not bad_paths else None
    if logged is not None and logged.get("fingerprint") != manifest.tokenizer.get("fingerprint"):
        problems.append("the commit log's tokenizer record disagrees with the manifest's")
    checks["tokenizer"] = _check(
        not problems, "; ".join(problems) or f"fingerprint {fingerprint[:16]}… matches the manifest"
    )
    for problem in problems:
        fail("tokenizer", problem)

    # -- rows -------------------------------------------------------------------------------
    tol = tolerance_for(str(manifest.teacher.get("dtype", spec.teacher.dtype)), manifest.codec, manifest.k)
    hidden_dtype = str(manifest.products.get("hidden", {}).get("dtype", "float32"))
    shards = [s for s in manifest.shards if s.path not in bad_paths and s.hidden_path not in bad_paths]
    picks = sample_rows(shards, options.rows, seed)
    results: list[tuple[str, int, str, RowResult]] = []
    row_failures: list[dict[str, Any]] = []
    own = reference is None
    if reference is None:
        reference = make_reference(options.reference, spec, manifest.tokenizer.get("model_vocab_size"))
    batch = max(1, min(spec.teacher.batch_sequences, 64))
    bar = tqdm(
        total=len(picks),
        unit="seq",
        desc="auditing",
        disable=not options.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for index, shard in enumerate(shards):
            wanted = [row for s, row in picks if s == index]
            if not wanted:
                continue
            try:
                stored = read_rows(fs, root, manifest, shard, wanted)
            except FormatError as exc:
                fail("integrity", str(exc), shard.path)
                checks["integrity"] = _check(False, str(exc))
                bar.update(len(wanted))
                continue
            for start in range(0, len(stored), batch):
                part = stored[start : start + batch]
                for row, scored in zip(part, reference.score(part), strict=True):
                    result = compare_row(row, scored, tol, hidden_dtype)
                    results.append((row.shard, row.row, row.sample_id, result))
                    first = result.first()
                    if first is not None:
                        row_failures.append(_failure(first, row.shard, row.row, row.sample_id))
                bar.update(len(part))
                bar.set_postfix_str(
                    f"positions={sum(r[3].positions for r in results)} failed={len(row_failures)}",
                    refresh=False,
                )
    finally:
        bar.close()
        if own:
            reference.close()

    positions = sum(r[3].positions for r in results)
    rows = [r[3] for r in results]
    for name, label in (("topk", "top-k ids and log-probs"), ("target", "target log-probs")):
        bad = [f for r in rows for f in r.failures if f.check == name]
        worst = max((r.worst_topk if name == "topk" else r.worst_target for r in rows), default=0.0)
        detail = f"{label} of {positions} position(s) within tolerance; worst |diff| {worst:.3g} nats"
        if bad:
            detail = f"{len(bad)} of {len(rows)} sequence(s) differ; first: {bad[0].reason}"
        checks[name] = _check(not bad and positions > 0, detail, worst=worst)
    integrity_rows = [f for r in rows for f in r.failures if f.check == "integrity"]
    if integrity_rows:
        checks["integrity"] = _check(
            False, f"{len(integrity_rows)} sampled row(s): {integrity_rows[0].reason}"
        )
    checks["hidden"] = _hidden_check(manifest, rows)
    checks["draws"] = _draw_check(manifest, rows, reference.name if reference else options.reference)
    if not checks["draws"]["passed"]:
        fail("draws", checks["draws"]["detail"])

    ordered = sorted(file_failures, key=lambda f: CHECK_ORDER.index(f["check"]))
    firsts = [f for f in ordered if f["check"] in ("integrity", "tokenizer", "teacher")]
    first_failure = (firsts + row_failures + [f for f in ordered if f["check"] == "draws"] + [None])[0]
    passed = positions > 0 and all(c["passed"] for c in checks.values()) and first_failure is None
    hidden_worst = [r.worst_hidden for r in rows if r.worst_hidden is not None]
    report: dict[str, Any] = {
        "passed": passed,
        "url": url,
        "ref": ref,
        "rows": len(results),
        "positions": positions,
        "seed": seed,
        "reference": reference.name if reference else options.reference,
        "teacher": model,
        "dtype": tol.dtype,
        "tolerance": tol.describe(),
        "worst": {
            "topk_logprob": max((r.worst_topk for r in rows), default=0.0),
            "target_logprob": max((r.worst_target for r in rows), default=0.0),
            "hidden": max(hidden_worst) if hidden_worst else None,
        },
        "first_failure": first_failure,
        "checks": {name: checks[name] for name in CHECK_ORDER if name in checks},
        "sampled": [
            {
                "shard": shard,
                "row": row,
                "sample_id": sample_id,
                "positions": r.positions,
                "worst_topk": r.worst_topk,
                "worst_target": r.worst_target,
                "failure": None if r.first() is None else r.first().reason,
            }
            for shard, row, sample_id, r in results
        ],
    }
    report["summary"] = summary_text(report)
    return report


def _first_problem(text: str) -> str:
    """The first listed problem of a :class:`PublishRefused` message (its first line if none)."""
    lines = text.splitlines()
    listed = [line.strip()[2:] for line in lines if line.strip().startswith("- ")]
    return listed[0] if listed else lines[0]


def _failure(failure: Failure, shard: str, row: int, sample_id: str) -> dict[str, Any]:
    return {
        "check": failure.check,
        "shard": shard,
        "row": row,
        "position": failure.position,
        "reason": f"{failure.reason} (sample {sample_id})",
    }


def _hidden_check(manifest: Manifest, rows: list[RowResult]) -> dict[str, Any]:
    if "hidden" not in manifest.products:
        return _skipped("the dataset has no hidden states")
    bad = [f for r in rows for f in r.failures if f.check == "hidden"]
    vectors = sum(r.hidden_vectors for r in rows)
    worst = max((r.worst_hidden for r in rows if r.worst_hidden is not None), default=0.0)
    if bad:
        return _check(False, f"{len(bad)} sequence(s) differ; first: {bad[0].reason}", worst=worst)
    return _check(
        vectors > 0, f"{vectors} vector(s) within tolerance; worst relative error {worst:.3g}", worst=worst
    )


def _draw_check(manifest: Manifest, rows: list[RowResult], reference: str) -> dict[str, Any]:
    draws = manifest.products.get("draws")
    if not draws:
        return _skipped("the dataset has no draws")
    have = [r for r in rows if r.draw_observed is not None]
    if not have:
        if float(draws.get("temperature", 1.0)) != 1.0 and reference == "vllm":
            return _skipped(
                f"draws at temperature {draws.get('temperature')} need the full distribution: run with "
                "--reference transformers to test them"
            )
        return _check(False, "no draws were compared")
    observed = np.concatenate([r.draw_observed for r in have])
    probs = np.concatenate([r.draw_probs for r in have])
    n = int(draws["n"])
    short = np.flatnonzero(observed.sum(axis=1) != n)
    if short.size:
        return _check(False, f"{short.size} position(s) hold other than {n} draws (draws.n)")
    test = pooled_test(observed, probs, n)
    detail = (
        f"pooled chi-square {test.statistic:.4g} on {test.df} df over {test.positions} positions x {n} "
        f"draws: p = {test.p_value:.3g} (fails below {DRAW_P_VALUE:g})"
    )
    if test.reason:
        detail = f"{test.reason}; {detail}"
    return _check(
        test.p_value >= DRAW_P_VALUE, detail, p_value=test.p_value, statistic=test.statistic, df=test.df
    )
