"""The ``labelgen`` job verbs: jobs the dataset service runs on its Ray cluster::

    labelgen submit SPEC [key=value ...] --service HOST --dataset team/name [--alias A ...]
    labelgen jobs list [--team T] [--json]
    labelgen jobs show ID [--json] [--follow]

``submit --service`` applies the overrides and checks the spec here, sends the resolved
YAML to the service (``POST /v1/jobs``), which checks it again, runs it on its cluster
and, once the manifest lands, publishes the output as the next version of
``team/name``; it prints the job id, and the job's page (``/ui/jobs/ID``) on stderr.
``jobs show --follow`` prints the job's state and progress until it ends, and exits 0
if it was published, 1 if it failed or was stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from labelgen.catalog.cli_common import client_of, group, leaf, print_json, service_of, table
from labelgen.catalog.client import CatalogClient, CatalogError, parse_service
from labelgen.contract.config_input import kind, read_file, read_yaml, show
from labelgen.contract.configs import ConfigError, parse_overrides

__all__ = ["add_commands", "submit_through_service", "resolve_spec_text", "progress_text"]

LIVE = ("submitting", "running", "publishing")
"""Job states that are not final."""
FOLLOW_EVERY_S = 2.0


def add_commands(sub: Any) -> None:
    """Add the job verbs to ``sub`` (argparse subparsers)."""
    verbs = group(sub, "jobs", "jobs the service runs on its Ray cluster and publishes")
    p = leaf(verbs, "list", _jobs_list, "jobs of your teams (org admins: all), newest first")
    p.add_argument("--team", default=None, help="only this team's jobs")
    p.add_argument("--json", action="store_true", help="print the service's JSON")
    p = leaf(verbs, "show", _jobs_show, "one job: state, progress, error, the version it published")
    p.add_argument("id", type=int, help="the job's id (printed by `labelgen submit --service`)")
    p.add_argument("--json", action="store_true", help="print the service's JSON")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="print its state and progress until it ends (exit 0: published, 1: failed or stopped)",
    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def resolve_spec_text(path: str, overrides: list[str]) -> str:
    """The spec file at ``path`` with dotted ``overrides`` applied, as YAML text.

    Only the YAML is checked here (size, syntax, plain data, the overrides' form); the
    spec's own rules are checked by the ``resolve`` :func:`submit_through_service` is
    given (``labelgen submit`` passes ``labelgen validate``'s), and always by the service.

    Raises:
        ConfigError: the file or an override is not what a spec can be made of.
    """
    text, problem = read_file(Path(path))
    if problem is not None:
        raise ConfigError([problem], path)
    data, problem = read_yaml(text)
    if problem is not None:
        raise ConfigError([f"{path} {problem}"], path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the top level must be a mapping of section names to values, got {kind(data)} {show(data)}"],
            path,
        )
    extra = parse_overrides(overrides)
    if not extra:
        return text
    return yaml.safe_dump(_merge(data, extra), sort_keys=False)


def submit_through_service(
    args: argparse.Namespace, resolve: Callable[[str, list[str]], str] | None = None
) -> int:
    """``labelgen submit SPEC --service HOST --dataset team/name``: send the job to the service.

    Args:
        args: the parsed ``submit`` arguments (spec, overrides, service, dataset, alias).
        resolve: ``(path, overrides) -> YAML text`` of the checked, resolved spec (the
            ``labelgen validate`` rules); default :func:`resolve_spec_text`.
    """
    if not args.dataset:
        raise CatalogError(
            None,
            "no_dataset",
            "labelgen submit --service needs --dataset team/name: the dataset the job's output is "
            "published as (its next version)",
        )
    for flag, value in (
        ("--address", getattr(args, "address", None)),
        ("--job-id", getattr(args, "job_id", None)),
    ):
        if value:
            raise CatalogError(
                None,
                "conflicting_flags",
                f"{flag} is for a job sent to a Ray cluster directly; through --service the job runs "
                "on the service's cluster: drop one of them",
            )
    service = service_of(args)
    text = (resolve or resolve_spec_text)(args.spec, list(args.overrides or []))
    job = CatalogClient(service).submit_job(args.dataset, text, args.alias or [])
    print(job["id"])
    page = f"{parse_service(service).base_url}/ui/jobs/{job['id']}"
    if job.get("state") == "failed":
        print(f"labelgen submit: error: job {job['id']} failed: {job.get('error')}", file=sys.stderr)
        print(f"  see {page}", file=sys.stderr)
        return 2
    print(
        f"job {job['id']}: {job['state']} on the service's Ray cluster ({job.get('ray_job_id')}) → "
        f"{job['output_url']}; published as {job['team']}/{job['dataset']} when done.\n"
        f"  follow it at {page} or with `labelgen jobs show {job['id']} --follow`",
        file=sys.stderr,
    )
    return 0


def progress_text(progress: Any) -> str:
    """A job's ``_progress.json`` in a few words (``units 3/10, tokens 1,234, 567 tok/s, eta 40 s``)."""
    if not isinstance(progress, dict):
        return "-"
    parts = []
    if isinstance(progress.get("units_done"), int) and isinstance(progress.get("units_total"), int):
        parts.append(f"units {progress['units_done']}/{progress['units_total']}")
    if isinstance(progress.get("tokens"), int):
        parts.append(f"tokens {progress['tokens']:,}")
    if isinstance(progress.get("tokens_per_s"), int | float):
        parts.append(f"{progress['tokens_per_s']:,.0f} tok/s")
    if isinstance(progress.get("eta_s"), int | float):
        parts.append(f"eta {progress['eta_s']:,.0f} s")
    return ", ".join(parts) or "-"


def _jobs_list(args: argparse.Namespace) -> int:
    jobs = client_of(args).list_jobs(args.team)
    if args.json:
        print_json({"jobs": jobs})
        return 0
    if not jobs:
        print("no jobs you may see (`labelgen submit SPEC --service HOST --dataset team/name` submits one)")
        return 0
    rows = [
        (
            j["id"],
            f"{j['team']}/{j['dataset']}",
            j["state"],
            progress_text(j.get("progress")),
            j.get("version") or "-",
            j["submitter"],
            j["updated_at"],
        )
        for j in jobs
    ]
    table(("ID", "DATASET", "STATE", "PROGRESS", "VERSION", "SUBMITTER", "UPDATED"), rows)
    return 0


def _job_lines(job: dict[str, Any]) -> list[str]:
    lines = [
        f"job {job['id']}: {job['state']}  ({job['team']}/{job['dataset']}, submitted by {job['submitter']} "
        f"at {job['created_at']})",
        f"  output:   {job['output_url']}",
        f"  ray job:  {job.get('ray_job_id') or '-'}",
        f"  progress: {progress_text(job.get('progress'))}",
    ]
    if job.get("aliases"):
        lines.append(f"  aliases:  {', '.join(job['aliases'])}")
    if job.get("version"):
        lines.append(f"  version:  {job['version']}")
    if job.get("error"):
        lines.append(f"  error:    {job['error']}")
    return lines


def _jobs_show(args: argparse.Namespace) -> int:
    client = client_of(args)
    job = client.job(args.id)
    if args.follow:
        seen = None
        while True:
            now = (job["state"], progress_text(job.get("progress")))
            if now != seen and not args.json:
                print(f"{time.strftime('%H:%M:%S')} job {job['id']}: {now[0]}  {now[1]}", flush=True)
                seen = now
            if job["state"] not in LIVE:
                break
            time.sleep(FOLLOW_EVERY_S)
            job = client.job(args.id)
    if args.json:
        print_json(job)
    else:
        print("\n".join(_job_lines(job)))
    if args.follow:
        return 0 if job["state"] == "published" else 1
    return 0
