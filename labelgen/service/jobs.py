"""Jobs submitted through the service: the catalog operations.

A job is a job spec a writer of a team sends (``POST /v1/jobs``, ``labelgen submit
--service``), to be run on the service's Ray cluster and published, once its manifest
lands, as the next version of ``team/name``. Its states::

    submitting ──► running ──► publishing ──► published
         │            │             │
         └────────────┴──► failed ◄─┘        running ──► stopped

The route records the job (``submitting``) in one transaction, hands it to Ray outside
any transaction, then moves it to ``running`` or ``failed``; the tracker
(:mod:`labelgen.service.tracker`) moves it on from there. Every move is a conditional
update (``UPDATE jobs … WHERE state = OLD``, :func:`move_job`), so the route and the
tracker never overwrite each other's move.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from labelgen.catalog.names import LATEST, InvalidName, check_name, parse_ref
from labelgen.service import access, locations
from labelgen.service.db import Dataset, Job, Team, Version, iso, now
from labelgen.service.errors import ServiceError

__all__ = ["JobOps", "LIVE", "STATES", "move_job", "job_spec_of", "job_view"]

STATES = ("submitting", "running", "publishing", "published", "failed", "stopped")
"""Every state a job can be in."""
LIVE = ("submitting", "running", "publishing")
"""States of a job that may still write to its output URL (or publish it)."""
MAX_ALIASES = 16


def job_spec_of(text: str, what: str) -> Any:
    """The :class:`labelgen.spec.JobSpec` of ``text``; 400 listing every problem (as
    ``labelgen validate``) if it is not a valid one."""
    from labelgen.contract.configs import ConfigError
    from labelgen.spec import load_spec_text

    try:
        return load_spec_text(text, source=f"the job spec for {what}")
    except ConfigError as exc:
        raise ServiceError(
            400, "bad_spec", f"{exc}\nfix the spec (`labelgen validate SPEC` checks it) and submit again"
        ) from exc


def move_job(session: Session, job_id: int, old: str | tuple[str, ...], new: str, **values: Any) -> bool:
    """Move job ``job_id`` from state ``old`` (one of them) to ``new``, setting ``values``;
    False (and nothing changed) if it was no longer in ``old``: someone else moved it first."""
    olds = (old,) if isinstance(old, str) else old
    assert new in STATES and all(o in STATES for o in olds), (old, new)
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.state.in_(olds))
        .values(state=new, updated_at=now(), **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def job_view(job: Job, team: str, detail: bool = False) -> dict[str, Any]:
    """The job as the API answers it (``detail``: with its spec)."""
    try:
        progress = json.loads(job.progress) if job.progress else None
    except ValueError:
        progress = {"text": job.progress}
    out: dict[str, Any] = {
        "id": job.id,
        "team": team,
        "dataset": job.dataset,
        "aliases": [a for a in job.aliases.split(",") if a],
        "state": job.state,
        "ray_job_id": job.ray_job_id,
        "progress": progress,
        "error": job.error,
        "version": f"{team}/{job.dataset}@{job.version_number}" if job.version_number else None,
        "output_url": job.output_url,
        "submitter": job.submitter,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
    }
    if detail:
        out["spec"] = job.spec
    return out


def _overlapping(column: Any, url: str) -> Any:
    """SQL: ``column`` is ``url``, a directory above it, or inside it."""
    parts = url.split("/")
    above = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return sa.or_(column.in_(above), column.startswith(url + "/", autoescape=True))


def _relation(url: str, other: str) -> str:
    if url == other:
        return "is"
    return "lies inside" if url.startswith(other + "/") else "contains"


class JobOps:
    """Mixed into :class:`labelgen.service.store.Catalog`."""

    def record_job(
        self: Any, dataset: str, spec_text: str, aliases: list[str], settings: Any = None
    ) -> dict[str, Any]:
        """Check a job and record it in state ``submitting`` (the caller hands it to Ray next).

        Args:
            dataset: ``team/name`` its output is published as (new or existing).
            spec_text: the job spec, YAML, overrides applied.
            aliases: aliases the published version gets (besides ``latest``).
            settings: the service's :class:`~labelgen.service.settings.ServiceSettings`
                (its Ray cluster and storage rules); None: no cluster, so no job.
        """
        try:
            if not isinstance(dataset, str) or "@" in dataset:
                raise InvalidName(
                    f"dataset {str(dataset)[:80]!r} must be team/name: a job publishes the next "
                    "version, so it takes no @version or @alias (pass aliases separately)"
                )
            ref = parse_ref(dataset)
            assert ref.ref == LATEST
            wanted = list(dict.fromkeys(check_name("alias", a) for a in aliases))
        except InvalidName as exc:
            raise ServiceError(400, "bad_name", str(exc)) from exc
        what = ref.dataset
        team = self._team(ref.team)
        self._require("submit", team.name, what)
        if len(wanted) > MAX_ALIASES or len(",".join(wanted)) > 256:
            raise ServiceError(
                400, "too_many_aliases", f"a job takes at most {MAX_ALIASES} aliases (256 characters in all)"
            )
        address = getattr(settings, "ray_address", None)
        if not address:
            raise ServiceError(
                503,
                "no_cluster",
                "this service runs no jobs: it was started without a Ray cluster; its operator "
                "restarts it with `labelgen serve --ray-address http://HEAD:8265` (or "
                "$LABELGEN_RAY_ADDRESS), or run the job yourself (`labelgen submit SPEC --address …`) "
                f"and publish its output (`labelgen publish URL {what}`)",
            )
        spec = job_spec_of(spec_text, what)
        if spec.output.overwrite:
            raise ServiceError(
                400,
                "overwrite_refused",
                f"the job spec for {what} sets output.overwrite: true; a job run by the service never "
                "deletes data: set it to false and give a new output.url",
            )
        url = locations.check_storage_url(spec.output.url, settings.fs_roots, settings.local_paths)
        self.check_storage(url)
        self._check_no_overlap(url, what)
        job = Job(
            team_id=team.id,
            dataset=ref.name,
            aliases=",".join(wanted),
            spec=spec_text,
            output_url=url,
            submitter=self.caller.name,
            state="submitting",
        )
        self.s.add(job)
        self.s.flush()
        # The Ray submission id is chosen here, so a job whose route died after Ray took it
        # is still found (the tracker asks Ray for it); the random part keeps two catalogs
        # sharing one cluster apart.
        job.ray_job_id = f"labelgen-job-{job.id}-{secrets.token_hex(4)}"
        self.s.flush()
        self._audit(
            "job.submit",
            what,
            team=team.name,
            job=job.id,
            output_url=url,
            spec_sha256=spec.content_hash(),
            aliases=wanted,
        )
        return job_view(job, team.name, detail=True)

    def _check_no_overlap(self: Any, url: str, what: str) -> None:
        """409 if ``url`` overlaps a published version's storage or a live job's output."""
        version = self.s.execute(
            sa.select(Team.name, Dataset.name, Version.number, Version.url)
            .join(Dataset, Dataset.team_id == Team.id)
            .join(Version, Version.dataset_id == Dataset.id)
            .where(_overlapping(Version.url, url))
            .order_by(Version.id)
            .limit(1)
        ).first()
        if version is not None:  # check_storage let it through: the caller may publish there
            team, name, number, other = version
            raise ServiceError(
                409,
                "output_in_use",
                f"output.url {url} {_relation(url, other)} the storage of {team}/{name}@{number} "
                f"({other}); a job writes a new dataset and never changes a published one: give the "
                f"job spec for {what} an output.url of its own",
            )
        job = self.s.execute(
            sa.select(Job, Team.name)
            .join(Team, Team.id == Job.team_id)
            .where(Job.state.in_(LIVE), _overlapping(Job.output_url, url))
            .order_by(Job.id)
            .limit(1)
        ).first()
        if job is not None:
            other, team = job
            seen = access.allowed("read", team, self.caller.roles, (), self.caller.is_admin)
            who = (
                f"job {other.id} ({team}/{other.dataset}, {other.state}, {other.output_url})"
                if seen
                else "a running job of another team"
            )
            raise ServiceError(
                409,
                "output_in_use",
                f"output.url {url} {_relation(url, other.output_url) if seen else 'overlaps'} the output "
                f"of {who}; two jobs must not write to one place: wait for it to end, or give the job "
                f"spec for {what} another output.url",
            )

    def list_jobs(self: Any, team: str | None = None) -> dict[str, Any]:
        """Jobs of the caller's teams (organisation admins: all), or of ``team``; newest first."""
        query = (
            sa.select(Job, Team.name).join(Team, Team.id == Job.team_id).order_by(Job.id.desc()).limit(500)
        )
        if team is not None:
            row = self._team(team)
            if not access.allowed("read", row.name, self.caller.roles, (), self.caller.is_admin):
                raise ServiceError(
                    403,
                    "forbidden",
                    f"{self.caller.name} may not see the jobs of team {row.name}: only its members and "
                    "organisation admins may; list your own with `labelgen jobs list`",
                    team=row.name,
                )
            query = query.where(Team.id == row.id)
        elif not self.caller.is_admin:
            query = query.where(Team.name.in_(sorted(self.caller.roles)))
        return {"jobs": [job_view(job, name) for job, name in self.s.execute(query).all()]}

    def job_view(self: Any, job_id: int) -> dict[str, Any]:
        """Job ``job_id`` with its spec; 404 unless the caller is a member of its team (or an
        organisation admin): a job of another team is not even said to exist."""
        found = (
            self.s.execute(
                sa.select(Job, Team.name).join(Team, Team.id == Job.team_id).where(Job.id == job_id)
            ).first()
            if 0 < job_id < 2**63
            else None
        )
        if found is None or not access.allowed("read", found[1], self.caller.roles, (), self.caller.is_admin):
            raise ServiceError(
                404,
                "no_job",
                f"no job {job_id} that {self.caller.name} may see; list them with `labelgen jobs list`",
            )
        return job_view(found[0], found[1], detail=True)
