"""The ``labelgen audit`` verb: its parser and handler (exit 0 passed, 1 failed, 2 refused)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "main", "summary_path"]


def _rows(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes a number >= 1 or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--rows takes a number >= 1 or 'all', got {value}")
    return value


def add_parser(sub: Any) -> None:
    """Add ``audit`` to ``sub`` (the ``labelgen`` subparsers)."""
    from labelgen.catalog.cli_common import SERVICE_HELP

    p = sub.add_parser(
        "audit",
        help="re-score sampled rows with the dataset's teacher; check every file",
        description="Re-score a seeded sample of sequences with the dataset's teacher and compare them with "
        "the stored labels; check every shard's size and sha256, the tokenizer and the weights "
        "(docs/AUDIT.md). Exit 0 passed, 1 failed, 2 refused.",
    )
    p.add_argument("url", help="dataset URL or catalog version team/name@N")
    p.add_argument("--rows", type=_rows, default=64, help="sequences to re-score, or 'all' (default 64)")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the row sample (default: random, recorded)"
    )
    p.add_argument("--reference", choices=("vllm", "transformers"), default="vllm", help="how to re-score")
    p.add_argument("--model", default=None, help="teacher checkpoint to load instead of the manifest's path")
    p.add_argument(
        "--report", default=None, help="write the JSON report here (and a .txt summary next to it)"
    )
    p.add_argument("--attest", action="store_true", help="post the report as an attestation on the version")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--service", default=None, metavar="HOST:PORT", help=SERVICE_HELP)


def summary_path(report_path: str) -> Path:
    """Where the readable summary of a JSON report at ``report_path`` goes."""
    path = Path(report_path)
    return path.with_suffix(".txt") if path.suffix != ".txt" else path.with_name(path.name + ".summary.txt")


def main(args: argparse.Namespace) -> int:
    """Run the audit ``args`` asks for; the exit status (0 passed, 1 failed, 2 refused)."""
    from labelgen.audit.report import attestation_body
    from labelgen.audit.run import AuditOptions, AuditRefused, run_audit
    from labelgen.catalog.cli_common import catalog_url

    url = catalog_url(args.url, args.service)
    ref = None
    if url.startswith("labelgen://"):
        from labelgen.catalog.fs import split_path

        netloc, dataset_ref, _, _ = split_path(url)
        ref = str(dataset_ref)
        if args.attest and dataset_ref.version is None:
            return _refuse(
                f"--attest needs a version number, got {ref}: pin it (team/name@N; "
                "`labelgen datasets show` gives the version an alias points to)"
            )
    elif args.attest:
        return _refuse(f"--attest needs a catalog version (team/name@N), got the URL {args.url!r}")
    options = AuditOptions(
        rows=args.rows,
        seed=args.seed,
        reference=args.reference,
        model=args.model,
        progress=not args.no_progress,
    )
    try:
        report = run_audit(url, options, ref=ref)
    except AuditRefused as exc:
        return _refuse(str(exc))
    print(report["summary"])
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        summary_path(args.report).write_text(report["summary"] + "\n")
    if args.attest:
        from labelgen.catalog.client import CatalogClient

        service = args.service or netloc
        answer = CatalogClient(service).attest(ref, attestation_body(report))
        print(f"attested {ref} (attestation {answer.get('id')})")
    return 0 if report["passed"] else 1


def _refuse(message: str) -> int:
    print(f"labelgen audit: error: {message}", file=sys.stderr)
    return 2
