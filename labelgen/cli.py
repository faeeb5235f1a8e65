"""``labelgen``: run, validate and inspect labeling jobs, locally or on a Ray cluster.

labelgen validate SPEC [key=value ...]          check a job spec (no model, no GPU)
labelgen run SPEC [key=value ...]               label the corpus on this machine (resumable)
labelgen run-ray SPEC [key=value ...]           the job's driver on a Ray cluster (replicas = actors)
labelgen submit SPEC [key=value ...] --address  send the job to a Ray cluster (Jobs API); prints JOB
labelgen status JOB | logs JOB [--follow] | stop JOB   follow or stop a submitted job
labelgen inspect URL | team/name@N             summarise a label dataset (a URL or a catalog version)
labelgen audit URL | team/name@N [--rows N]     re-score sampled rows with the teacher; check every file
labelgen serve [--db URL] [--host H] [--port P]  the dataset service (catalog, access, reads)
labelgen login | publish | datasets | token | teams | alias | share | unshare | audit-log
        | keys | sign | verify | jobs
                                                the catalog's client verbs (`labelgen VERB --help`)

Ray commands take ``--address http://HEAD:8265`` or the ``RAY_ADDRESS`` environment variable.
"""

from __future__ import annotations

import argparse
import signal
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
    p = sub.add_parser(
        "generate",
        help="run a generation job on this machine: the teacher writes, checks and labels (re-run to resume)",
    )
    p.add_argument("spec", help="job spec YAML with a generate: section")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. generate.n=8")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "run-ray", help="run a labeling or generation job on a Ray cluster (the driver; re-run to resume)"
    )
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. cluster.replicas=4")
    p.add_argument("--address", default=None, help="Ray cluster (default: the job's cluster or a local one)")
    p = sub.add_parser(
        "submit", help="submit a labeling or generation job to a Ray cluster; prints the job id"
    )
    p.add_argument("spec", help="job spec YAML (paths in it are read on the cluster)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. cluster.replicas=4")
    _address(p)
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    p.add_argument(
        "--service",
        default=None,
        metavar="HOST:PORT",
        help="submit through the dataset service instead (its cluster); needs --dataset",
    )
    p.add_argument(
        "--dataset",
        default=None,
        metavar="TEAM/NAME",
        help="with --service: publish the output as this dataset",
    )
    p.add_argument(
        "--alias", action="append", default=[], help="with --service: aliases the published version gets"
    )
    verbs = (("status", "status and progress of a submitted job"), ("stop", "stop a submitted job"))
    for verb, text in verbs:
        p = sub.add_parser(verb, help=text)
        p.add_argument("job", help="job id printed by `labelgen submit`")
        _address(p)
    p = sub.add_parser("logs", help="driver log of a submitted job")
    p.add_argument("job", help="job id printed by `labelgen submit`")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    _address(p)
    p = sub.add_parser("inspect", help="summarise a label dataset")
    p.add_argument("url", help="dataset URL (local path, s3://, gs://, ...)")
    p.add_argument("--sample-rows", type=int, default=2048, help="rows sampled for teacher statistics")
    from labelgen.audit.cli import add_parser as add_audit_parser

    add_audit_parser(sub)
    p = sub.add_parser("serve", help="run the dataset service (catalog, access control, reads)")
    p.add_argument(
        "--db",
        default=None,
        help="catalog database URL: sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB "
        "(default: $LABELGEN_DB, else a SQLite file under --data-dir)",
    )
    p.add_argument(
        "--data-dir", default=None, help="where the default SQLite catalog lives (~/.local/share/labelgen)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--fs-root",
        action="append",
        default=[],
        help="publish local-path datasets only from under this directory (repeatable; default: any)",
    )
    p.add_argument(
        "--url-ttl", type=int, default=900, help="seconds a reader's file URLs stay valid (default 900)"
    )
    p.add_argument(
        "--public-url", default=None, help="base URL readers reach the service at (default: as asked)"
    )
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1; e.g. one per core)")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="URL",
        help="Ray cluster that jobs submitted through the service run on, e.g. http://HEAD:8265 "
        "(default: $LABELGEN_RAY_ADDRESS; none: the service takes no jobs)",
    )
    p.add_argument(
        "--job-poll",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between two looks at the running jobs (progress, end, publish; default 10)",
    )
    from labelgen.catalog.commands import add_commands

    add_commands(sub)
    return parser


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray job server, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
    )


def _validate(args: argparse.Namespace) -> int:
    from labelgen.contract.codecs import get_codec
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    print(f"{args.spec}: OK (spec sha256 {spec.content_hash()[:16]}…)")
    gen = spec.generate
    if gen is None:
        print(
            f"  labeling job (labelgen run): teacher {spec.teacher.model}, k={spec.labels.k}, "
            f"seq_len={spec.packing.seq_len}"
        )
    else:
        from labelgen.checks import Checker

        Checker(gen)  # the user's check and score import
        checks = [name for name, on in _checks_on(gen) if on]
        labels = f"top-{spec.labels.k} labels of kept samples" if gen.labels else "no labels"
        print(
            f"  generation job (labelgen generate): teacher {spec.teacher.model}, n={gen.n}, "
            f"temperature={gen.temperature}, max_tokens={gen.max_tokens}, keep={gen.keep}, {labels}"
        )
        print(f"  checks: {', '.join(checks) or 'none'}")
    print(f"  top-k codec {spec.labels.codec}: {get_codec(spec.labels.codec).summary}")
    print(f"  {len(spec.corpus.sources)} corpus pattern(s) → {spec.output.url}")
    gpus = spec.cluster.gpus_per_replica
    gpus_text = f"{gpus:g}" if gpus is not None else f"auto ({spec.model_parallel_size()} on GPU clusters)"
    print(f"  on Ray: {spec.cluster.replicas} replica(s) x {gpus_text} GPU(s)")
    return 0


def _checks_on(gen) -> list[tuple[str, bool]]:
    c = gen.checks
    return [
        ("finished", c.finished),
        (f"length >= {c.min_tokens}" + (f", <= {c.max_tokens}" if c.max_tokens else ""), True),
        ("format", c.format is not None),
        (
            f"reference ({c.reference.field}, {c.reference.extract})" if c.reference else "reference",
            bool(c.reference),
        ),
        (f"user {c.user}", c.user is not None),
        (f"dedup {c.dedup}", c.dedup != "none"),
    ]


def _run(args: argparse.Namespace) -> int:
    from labelgen.contract.storage import MIB
    from labelgen.runner import JobError, run_job
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if spec.generate is not None:
        raise JobError(
            f"{args.spec} has a generate: section, so it is a generation job; run it with "
            f"`labelgen generate {args.spec}` (or remove the section to label the corpus as it is)"
        )
    manifest = run_job(spec, show_progress=not args.no_progress)
    t = manifest.totals
    print(
        f"labeled {t['rows']} sequences / {t['tokens']} tokens into {t['shards']} shard(s) "
        f"({t['bytes'] / MIB:.2f} MiB) at {spec.output.url}; rejected: "
        f"{', '.join(f'{k}={v}' for k, v in manifest.rejected.items()) or 'none'}"
    )
    skipped = manifest.corpus.get("skipped_sources") or {}
    if skipped:
        print(f"left out {len(skipped)} unreadable source(s): {', '.join(skipped)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from labelgen.runner import JobError, run_job
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if spec.generate is None:
        raise JobError(
            f"{args.spec} has no generate: section, so there is nothing to generate; add one "
            f"(docs/GENERATE.md), or label the corpus with `labelgen run {args.spec}`"
        )
    manifest = run_job(spec, show_progress=not args.no_progress)
    print(_generation_summary(manifest, spec.output.url))
    return 0


def _generation_summary(manifest, url: str) -> str:
    gen = manifest.generation
    stats, totals = gen["stats"], gen["totals"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.get("rejected", {}).items()) if v) or "none"
    labels = (
        f"; labels: {manifest.totals['rows']} sequences / {manifest.totals['label_positions']} positions"
        if gen.get("labels")
        else ""
    )
    return (
        f"generated {stats['samples']} sample(s) for {stats['prompts']} prompt(s), kept {stats['kept']} "
        f"(pass@1 {stats['pass@1']:.3f}, pass@{gen['sampling']['n']} {stats['pass@n']:.3f}) into "
        f"{totals['shards']} shard(s) at {url}{labels}; rejected samples: {reasons}; rejected prompts: "
        f"{', '.join(f'{k}={v}' for k, v in manifest.rejected.items()) or 'none'}"
    )


def _run_ray(args: argparse.Namespace) -> int:
    from labelgen.cluster import run_job_ray
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    # `labelgen stop` (and Kubernetes) send SIGTERM: exit through the finally blocks so the
    # replicas are released and _progress.json says "failed" rather than "running".
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    manifest = run_job_ray(spec, address=args.address)
    t = manifest.totals
    if spec.generate is not None:
        print(_generation_summary(manifest, spec.output.url), flush=True)
        return 0
    print(
        f"labeled {t['rows']} sequences / {t['tokens']} tokens into {t['shards']} shard(s) at "
        f"{spec.output.url} with {spec.cluster.replicas} replica(s)",
        flush=True,
    )
    return 0


def _submit(args: argparse.Namespace) -> int:
    if args.service is not None or args.dataset is not None:
        from labelgen.catalog.job_commands import resolve_spec_text, submit_through_service
        from labelgen.spec import load_spec

        def checked(path: str, overrides: list[str]) -> str:
            load_spec(path, overrides)  # `labelgen validate`'s checks, before anything is sent
            return resolve_spec_text(path, overrides)

        return submit_through_service(args, resolve=checked)
    from labelgen.cluster import submit_job
    from labelgen.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    job_id = submit_job(spec, address=args.address, submission_id=args.job_id)
    print(job_id)
    print(
        f"submitted: {spec.cluster.replicas} replica(s) → {spec.output.url}; follow with "
        f"`labelgen status {job_id}` or `labelgen logs {job_id} --follow`",
        file=sys.stderr,
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from labelgen.cluster import format_status, job_status

    print(format_status(job_status(args.job, address=args.address)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from labelgen.cluster import job_logs

    job_logs(args.job, address=args.address, follow=args.follow)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from labelgen.cluster import stop_job

    stopped = stop_job(args.job, address=args.address)
    print(f"job {args.job}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from labelgen.audit.cli import main as audit_main

    return audit_main(args)


def _inspect(args: argparse.Namespace) -> int:
    from labelgen.catalog.commands import catalog_url
    from labelgen.summary import format_report, inspect_dataset

    print(format_report(inspect_dataset(catalog_url(args.url), sample_rows=args.sample_rows)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from labelgen.service.server import serve, settings_from_env

    try:
        settings = settings_from_env(
            args.db,
            args.data_dir,
            tuple(args.fs_root),
            args.url_ttl,
            args.public_url,
            args.host,
            ray_address=args.ray_address,
            job_poll_s=args.job_poll,
        )
        serve(settings, host=args.host, port=args.port, workers=args.workers)
    except ValueError as exc:
        print(f"labelgen serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from labelgen.checks import CheckError
    from labelgen.contract.configs import ConfigError, parse_cli_args
    from labelgen.contract.format import FormatError
    from labelgen.corpus import CorpusError
    from labelgen.credentials import CredentialError
    from labelgen.provenance import ModelPathError

    args = parse_cli_args(build_parser(), argv)  # overrides may also follow flags
    handler = {
        "validate": _validate,
        "run": _run,
        "generate": _generate,
        "run-ray": _run_ray,
        "submit": _submit,
        "status": _status,
        "logs": _logs,
        "stop": _stop,
        "inspect": _inspect,
        "serve": _serve,
        "audit": _audit,
    }.get(args.command)
    from labelgen.catalog import commands

    if handler is None:
        assert args.command in commands.COMMANDS, args.command
        handler = commands.run
    USER_ERRORS = commands.USER_ERRORS  # noqa: N806

    user_errors = (ConfigError, CorpusError, ModelPathError, FormatError, CredentialError, CheckError)
    try:
        return handler(args)
    except (*user_errors, *USER_ERRORS) as exc:
        print(f"labelgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from labelgen.runner import JobError

        if isinstance(exc, JobError):
            print(f"labelgen {args.command}: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ImportError) and "pip install" in str(exc):
            print(f"labelgen {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
