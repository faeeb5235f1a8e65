"""The job tracker: follows the jobs the service handed to Ray, and publishes their output.

Every ``job_poll_s`` seconds a daemon thread looks at each live job (see
:mod:`labelgen.service.jobs` for the states):

- ``submitting``: the route records a job, then submits it to Ray; if Ray has it
  (the route died before saying so) the job is ``running``; a job Ray never got
  within :data:`SUBMIT_TIMEOUT` is ``failed``;
- ``running``: Ray's state (:class:`labelgen.cluster.RayJobs`) and the driver's
  ``_progress.json`` from the output URL (kept on the job). A job that SUCCEEDED with its
  manifest written is published; FAILED is ``failed`` and STOPPED ``stopped``, with
  Ray's message (for a failed driver: its exit code and last log lines); a job id Ray
  does not know (the cluster restarted) is ``failed``; a cluster that does not answer
  is asked again at the next poll;
- ``publishing``: the output is verified exactly as ``labelgen publish`` verifies
  (:func:`labelgen.service.publishing.verify_for_publish`) and registered by
  :meth:`labelgen.service.store.Catalog.publish` *as the submitter* (their access is
  checked then, not only at submission), with the job's aliases and spec; the job is
  ``published`` with its version number in the same transaction. A refusal is
  ``failed`` with its reason.

Several server processes (``labelgen serve --workers N``) share a catalog; only the
one holding the tracker lease (a row of the ``settings`` table, renewed every poll,
:data:`LEASE_KEY`) tracks, so a job is published once. A poll that raises is logged;
it never ends the thread. :func:`poll_job` is one step for one job (tests drive it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from labelgen.service import store
from labelgen.service.db import Job, Member, Setting, Team, User, now
from labelgen.service.errors import ServiceError
from labelgen.service.jobs import LIVE, job_spec_of, move_job
from labelgen.service.publishing import verify_for_publish

__all__ = [
    "SUBMIT_TIMEOUT",
    "LEASE_KEY",
    "JobTracker",
    "cluster_of",
    "hand_to_cluster",
    "poll_job",
    "install",
]

log = logging.getLogger("labelgen.service.jobs")

SUBMIT_TIMEOUT = dt.timedelta(minutes=10)
"""A job still ``submitting`` this long after it was recorded never reached Ray: failed."""
LEASE_KEY = "job_tracker"
"""The ``settings`` row naming the tracker that holds the lease, and until when."""
MAX_ERROR_CHARS = 8000
MAX_PROGRESS_BYTES = 1 << 20
_SYSTEM = "system"  # the actor of the tracker's lines in the audit log


def cluster_of(state: Any, settings: Any) -> Any:
    """The cluster the service runs jobs on: ``state.job_cluster`` if set, else a
    :class:`labelgen.cluster.RayJobs` for ``settings.ray_address`` (made once)."""
    found = getattr(state, "job_cluster", None)
    if found is None:
        from labelgen.cluster import RayJobs

        found = state.job_cluster = RayJobs(settings.ray_address)
    return found


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _describe(exc: BaseException) -> str:
    from labelgen.runner import JobError

    return (
        str(exc) if isinstance(exc, JobError | ServiceError | ImportError) else f"{type(exc).__name__}: {exc}"
    )


def _end(sessions: Any, job: Job, team: str, old: str, new: str, error: str, **values: Any) -> str:
    """Move ``job`` from ``old`` to the end state ``new`` with ``error``, logged in the audit
    log; the job's state after (someone else's, if they moved it first)."""
    with sessions.begin() as session:
        if move_job(session, job.id, old, new, error=_clip(error), **values):
            detail = {"error": error} if error else {}
            store.record(session, _SYSTEM, f"job.{new}", f"job:{job.id}", team=team, **detail)
            return new
        return session.scalar(sa.select(Job.state).where(Job.id == job.id)) or old


def hand_to_cluster(sessions: Any, cluster: Any, job_id: int) -> str:
    """Submit recorded job ``job_id`` (``submitting``) to ``cluster``, outside any
    transaction; then ``running``, or ``failed`` with the reason. Its state after."""
    with sessions() as session:
        found = session.execute(
            sa.select(Job, Team.name).join(Team, Team.id == Job.team_id).where(Job.id == job_id)
        ).first()
    assert found is not None, job_id
    job, team = found
    if job.state != "submitting":
        return job.state
    try:
        spec = job_spec_of(job.spec, f"{team}/{job.dataset}")
        ray_job_id = cluster.submit(spec, job.ray_job_id, {"labelgen.catalog_job": str(job.id)})
    except Exception as exc:  # noqa: BLE001 - whatever went wrong is the job's error
        log.warning("job %s: submission to the Ray cluster failed: %s", job.id, exc)
        return _end(
            sessions, job, team, "submitting", "failed", f"not submitted to the Ray cluster: {_describe(exc)}"
        )
    with sessions.begin() as session:
        if move_job(session, job.id, "submitting", "running", ray_job_id=ray_job_id):
            return "running"
        return session.scalar(sa.select(Job.state).where(Job.id == job.id)) or "running"


def _caller(session: Any, name: str) -> store.Caller:
    """The submitter as a caller (their roles now, not at submission)."""
    user = session.scalar(sa.select(User).where(User.name == name))
    if user is None:
        raise ServiceError(403, "no_user", f"the job's submitter {name!r} no longer exists")
    roles = dict(
        session.execute(
            sa.select(Team.name, Member.role)
            .join(Member, Member.team_id == Team.id)
            .where(Member.user_id == user.id)
        ).all()
    )
    return store.Caller(user.id, user.name, user.is_admin, roles)


def _storage(url: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def read_progress(url: str) -> dict[str, Any] | None:
    """The driver's ``_progress.json`` at ``url``, None if absent or unreadable."""
    from labelgen.contract.format import join_url
    from labelgen.progress import PROGRESS_NAME

    try:
        fs, root = _storage(url)
        path = join_url(root, PROGRESS_NAME)
        if not fs.exists(path) or fs.size(path) > MAX_PROGRESS_BYTES:
            return None
        found = json.loads(fs.cat_file(path))
    except Exception as exc:  # noqa: BLE001 - progress is best effort; the job goes on without it
        log.info("progress at %s unreadable: %s", url, exc)
        return None
    return found if isinstance(found, dict) else None


def _has_manifest(url: str) -> bool:
    from labelgen.contract.format import MANIFEST_NAME, join_url

    fs, root = _storage(url)
    return bool(fs.exists(join_url(root, MANIFEST_NAME)))


def poll_job(
    sessions: Any, settings: Any, cluster: Any, job_id: int, at: dt.datetime | None = None
) -> str | None:
    """One look at job ``job_id``: move it on as its Ray job and its output say (module
    docstring). Its state after, None if there is no such job.

    Args:
        sessions: the catalog's session factory.
        settings: the service's settings (storage rules for publishing).
        cluster: what the jobs run on (:class:`labelgen.cluster.RayJobs`, or an object with
            its ``submit`` and ``state``).
        at: the time now (default: the clock), for the submission timeout.
    """
    with sessions() as session:
        found = session.execute(
            sa.select(Job, Team.name).join(Team, Team.id == Job.team_id).where(Job.id == job_id)
        ).first()
    if found is None:
        return None
    job, team = found
    if job.state == "submitting":
        return _poll_submitting(sessions, cluster, job, team, at or now())
    if job.state == "running":
        return _poll_running(sessions, settings, cluster, job, team)
    if job.state == "publishing":
        return _publish(sessions, settings, job, team)
    return job.state


def _poll_submitting(sessions: Any, cluster: Any, job: Job, team: str, at: dt.datetime) -> str:
    try:
        cluster.state(job.ray_job_id)
    except Exception as exc:  # noqa: BLE001 - unknown to Ray, or Ray not answering: wait, then fail
        if at - job.created_at < SUBMIT_TIMEOUT:
            return "submitting"
        minutes = int(SUBMIT_TIMEOUT.total_seconds() // 60)
        return _end(
            sessions,
            job,
            team,
            "submitting",
            "failed",
            f"the job did not reach the Ray cluster within {minutes} minutes of its submission "
            f"({_describe(exc)}); submit it again",
        )
    with sessions.begin() as session:  # Ray has it: the route stopped before it said so
        moved = move_job(session, job.id, "submitting", "running")
    return "running" if moved else "submitting"


def _poll_running(sessions: Any, settings: Any, cluster: Any, job: Job, team: str) -> str:
    from labelgen.cluster import ClusterUnreachable, UnknownJob

    progress = read_progress(job.output_url)
    values = {}
    if progress is not None and json.dumps(progress, sort_keys=True) != job.progress:
        values["progress"] = json.dumps(progress, sort_keys=True)
    try:
        state = cluster.state(job.ray_job_id)
    except UnknownJob as exc:
        return _end(
            sessions,
            job,
            team,
            "running",
            "failed",
            f"the Ray cluster does not know job {job.ray_job_id} (was it restarted?): {exc}; submit the "
            "job again: it resumes from its committed shards",
            **values,
        )
    except ClusterUnreachable as exc:
        log.warning("job %s: the Ray cluster did not answer: %s", job.id, exc)
        state = None
    if state is not None and state.status == "SUCCEEDED":
        try:
            complete = _has_manifest(job.output_url)
        except Exception as exc:  # noqa: BLE001 - storage not answering now: ask again next poll
            log.warning("job %s: cannot look at %s: %s", job.id, job.output_url, exc)
            return "running"
        if not complete:
            return _end(
                sessions,
                job,
                team,
                "running",
                "failed",
                f"the Ray job succeeded but {job.output_url} has no manifest.json: the driver did not "
                "finish the dataset; see its log (`labelgen logs "
                f"{job.ray_job_id}`) and submit the job again",
                **values,
            )
        with sessions.begin() as session:
            if not move_job(session, job.id, "running", "publishing", **values):
                return session.scalar(sa.select(Job.state).where(Job.id == job.id)) or "running"
        return _publish(sessions, settings, job, team)
    if state is not None and state.status == "FAILED":
        message = state.message or "no message from Ray"
        return _end(sessions, job, team, "running", "failed", f"the Ray job failed: {message}", **values)
    if state is not None and state.status == "STOPPED":
        message = state.message or "stopped"
        return _end(
            sessions, job, team, "running", "stopped", f"the Ray job was stopped: {message}", **values
        )
    if values:
        with sessions.begin() as session:
            move_job(session, job.id, "running", "running", **values)
    return "running"


class _MovedMeanwhile(Exception):
    """The job left ``publishing`` while it was being published (rolls the publish back)."""


def _publish(sessions: Any, settings: Any, job: Job, team: str) -> str:
    """Verify the job's output (long; no transaction open) and publish it as its submitter."""
    from labelgen.service.verify import PublishRefused

    what = f"{team}/{job.dataset}"
    try:
        verified = verify_for_publish(job.output_url, settings)
    except (PublishRefused, ServiceError) as exc:
        reason = exc.message if isinstance(exc, ServiceError) else str(exc)
        return _end(sessions, job, team, "publishing", "failed", f"not published as {what}: {reason}")
    except OSError as exc:
        return _end(
            sessions,
            job,
            team,
            "publishing",
            "failed",
            f"not published as {what}: the service cannot read {job.output_url} "
            f"({type(exc).__name__}: {exc}); check the service's storage credentials, then publish it with "
            f"`labelgen publish {job.output_url} {what}`",
        )
    aliases = [a for a in job.aliases.split(",") if a]
    try:
        with sessions.begin() as session:
            caller = _caller(session, job.submitter)
            view = store.Catalog(session, caller).publish(team, job.dataset, verified, aliases, job.spec)
            if not move_job(
                session, job.id, "publishing", "published", version_number=view["version"], error=""
            ):
                raise _MovedMeanwhile  # someone else moved it: their move stands, this publish is undone
            store.record(session, _SYSTEM, "job.published", f"job:{job.id}", team=team, version=view["ref"])
    except _MovedMeanwhile:
        with sessions() as session:
            return session.scalar(sa.select(Job.state).where(Job.id == job.id)) or "publishing"
    except ServiceError as exc:
        return _end(sessions, job, team, "publishing", "failed", f"not published as {what}: {exc.message}")
    except store.Conflict:  # a publish of the same dataset took the version number: next poll
        return "publishing"
    log.info("job %s published as %s", job.id, view["ref"])
    return "published"


class JobTracker:
    """The daemon thread that polls the live jobs (one per catalog, by lease)."""

    def __init__(self, sessions: Any, settings: Any, cluster: Callable[[], Any]):
        """``cluster()`` gives the cluster to ask (looked up each poll)."""
        self.sessions, self.settings, self.cluster = sessions, settings, cluster
        self.poll_s = max(0.05, float(settings.job_poll_s))
        self.lease_s = max(30.0, 3 * self.poll_s)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling (again); a running tracker is left as it is."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="labelgen-job-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and give the lease up (another process may then track at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        try:
            with self.sessions.begin() as session:
                row = session.get(Setting, LEASE_KEY)
                if row is not None and json.loads(row.value).get("owner") == self.owner:
                    session.delete(row)
        except Exception:  # noqa: BLE001 - the lease then simply runs out
            log.exception("could not give the job tracker lease up")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a bad poll is logged; the next one comes
                log.exception("job tracker poll failed")
            self._stop.wait(self.poll_s)

    def take_lease(self) -> bool:
        """Hold (or renew) the tracker lease; False if another live tracker holds it."""
        clock = time.time()
        value = json.dumps({"owner": self.owner, "until": clock + self.lease_s})
        try:
            with self.sessions.begin() as session:
                row = session.get(Setting, LEASE_KEY)
                if row is None:
                    session.add(Setting(key=LEASE_KEY, value=value))
                    session.flush()
                    return True
                try:
                    held = json.loads(row.value)
                    mine, until = held.get("owner") == self.owner, float(held.get("until", 0))
                except (ValueError, TypeError, AttributeError):
                    mine, until = False, 0.0
                if not mine and until > clock:
                    return False
                result = session.execute(
                    sa.update(Setting)
                    .where(Setting.key == LEASE_KEY, Setting.value == row.value)
                    .values(value=value)
                    .execution_options(synchronize_session=False)
                )
                return result.rowcount == 1
        except store.Conflict:  # another tracker created the row at the same moment
            return False

    def poll_once(self) -> int:
        """One look at every live job, if this tracker holds the lease; how many it looked at."""
        if not self.take_lease():
            return 0
        with self.sessions() as session:
            ids = list(session.scalars(sa.select(Job.id).where(Job.state.in_(LIVE)).order_by(Job.id)))
        looked = 0
        for job_id in ids:
            if self._stop.is_set() or not self.take_lease():
                break
            try:
                poll_job(self.sessions, self.settings, self.cluster(), job_id)
            except Exception:  # noqa: BLE001 - one job's trouble does not stop the others
                log.exception("job tracker: polling job %s failed", job_id)
            looked += 1
        return looked


def install(api: Any) -> JobTracker | None:
    """Give the application its tracker (``app.state.job_tracker``), started and stopped
    with it, when it runs jobs (``ray_address``) and tracks them here (``track_jobs``)."""
    settings = api.settings
    if not (settings.ray_address and settings.track_jobs):
        api.app.state.job_tracker = None
        return None
    tracker = JobTracker(api.sessions, settings, lambda: cluster_of(api.app.state, settings))
    api.app.state.job_tracker = tracker
    api.app.router.add_event_handler("startup", tracker.start)
    api.app.router.add_event_handler("shutdown", tracker.stop)
    return tracker
