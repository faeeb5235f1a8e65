"""``labelgen``: run, validate and inspect labeling jobs.

labelgen validate SPEC [key=value ...]   check a job spec (no model, no GPU)
labelgen run SPEC [key=value ...]        label the corpus on this machine (resumable)
labelgen inspect URL                     summarise a label dataset
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelgen",
        description="Offline teacher labels (top-k log-probs) with vLLM, stored as sharded Parquet.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("validate", help="check a job spec without loading a model")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. labels.k=32")
    p = sub.add_parser("run", help="run a labeling job on this machine (re-run to resume)")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output.url=/tmp/x")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("inspect", help="summarise a label dataset")
    p.add_argument("url", help="dataset URL (local path, s3://, gs://, ...)")
    p.add_argument("--sample-rows", type=int, default=2048, help="rows sampled for teacher statistics")
    return parser


def _validate(args: argparse.Namespace) -> int:
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    print(f"{args.spec}: OK (spec sha256 {spec.content_hash()[:16]}…)")
    print(f"  teacher {spec.teacher.model}, k={spec.labels.k}, seq_len={spec.packing.seq_len}")
    print(f"  {len(spec.corpus.sources)} corpus pattern(s) → {spec.output.url}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from labelgen.runner import run_job
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    manifest = run_job(spec, show_progress=not args.no_progress)
    t = manifest.totals
    print(
        f"labeled {t['rows']} sequences / {t['tokens']} tokens into {t['shards']} shard(s) "
        f"({t['bytes'] / 2**20:.2f} MiB) at {spec.output.url}; rejected: "
        f"{', '.join(f'{k}={v}' for k, v in manifest.rejected.items()) or 'none'}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from labelgen.inspect import format_report, inspect_dataset

    print(format_report(inspect_dataset(args.url, sample_rows=args.sample_rows)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from labelgen.contract.configs import ConfigError
    from labelgen.contract.format import FormatError
    from labelgen.corpus import CorpusError
    from labelgen.provenance import ModelPathError

    args = build_parser().parse_args(argv)
    handler = {"validate": _validate, "run": _run, "inspect": _inspect}[args.command]
    try:
        return handler(args)
    except (ConfigError, CorpusError, ModelPathError, FormatError) as exc:
        print(f"labelgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from labelgen.runner import JobError

        if isinstance(exc, JobError):
            print(f"labelgen {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
