"""The Ray executor and the Ray Jobs client: the only module that imports ray.

``labelgen run-ray SPEC`` is the job's driver. It plans the job like the local
runner (:func:`labelgen.runner.plan_job`: the same work units, sources or parts of
them, :mod:`labelgen.units`), starts ``cluster.replicas`` teacher replicas (Ray actors,
each owning one vLLM engine on ``gpus_per_replica`` GPUs) and hands each idle replica
the next pending work unit. A replica runs the same :func:`labelgen.runner.run_work_unit`
as the local runner, after reading the unit's commit records itself, so a unit retried
after its replica died resumes after its committed shards: nothing is lost and nothing
is written twice. When a replica dies the driver logs it, starts a replacement and puts
the unit back at the head of the queue, at most ``cluster.max_unit_attempts`` times per
unit (each part of a split source is a unit of its own, retried on its own). The
manifest is written last, by the driver, with :func:`labelgen.runner.finish_job`; a
killed driver is resumed by submitting the job again.

``labelgen submit|status|logs|stop`` wrap Ray's Jobs API
(:class:`ray.job_submission.JobSubmissionClient`): ``submit`` validates the spec
here, uploads the resolved spec as the job's working directory and runs
``labelgen run-ray job-spec.yaml`` on the cluster; ``status`` adds the driver's
``<output>/_progress.json`` to Ray's job status. :class:`RayJobs` is the same Jobs API
as the dataset service uses it (``labelgen serve --ray-address``): submit a spec under a
chosen submission id, ask a job's state, telling an unknown job (:class:`UnknownJob`)
from an unreachable cluster (:class:`ClusterUnreachable`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from labelgen.checks import Checker
from labelgen.contract.commits import CommitLog
from labelgen.contract.format import MANIFEST_NAME, SPEC_NAME, Manifest, UnitRecord, join_url
from labelgen.progress import PROGRESS_NAME, JobProgress, UnitProgress, format_progress
from labelgen.provenance import load_tokenizer
from labelgen.runner import JobError, finish_job, plan_job, record_teacher, run_work_unit
from labelgen.spec import JobSpec
from labelgen.teacher import Teacher, load_teacher
from labelgen.units import WorkUnit

__all__ = [
    "import_ray",
    "replica_name",
    "run_job_ray",
    "submit_job",
    "job_status",
    "job_logs",
    "stop_job",
    "UnknownJob",
    "ClusterUnreachable",
    "RayJobState",
    "RayJobs",
]


def import_ray() -> Any:
    """Import ray, or raise ImportError with the install line."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"running labeling jobs on a Ray cluster needs Ray: `pip install 'labelgen[ray]'` ({exc})"
        ) from exc
    return ray


def replica_name(spec: JobSpec, slot: int, generation: int = 0) -> str:
    """Ray actor name of a replica (unique per job spec, slot and restart)."""
    suffix = f"-r{generation}" if generation else ""
    return f"labelgen-{spec.content_hash()[:8]}-replica-{slot}{suffix}"


class _Replica:
    """One teacher replica: a vLLM engine plus the tokenizer; labels whole work units."""

    def __init__(self, spec: JobSpec, teacher_factory: Callable[[JobSpec], Teacher]):
        self.spec = spec
        if spec.generate is not None:
            Checker(spec.generate)  # the user's check imports on this node, before the engine starts
        self.tokenizer = load_tokenizer(spec.teacher)
        self.teacher = teacher_factory(spec)
        self.progress = UnitProgress()

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "provenance": self.teacher.provenance()}

    def run(self, unit: WorkUnit) -> tuple[UnitRecord, int]:
        """Label (or generate) one unit after its committed shards; returns its record and the
        tokens labeled now."""
        commits = CommitLog.at(self.spec.output.url)
        record = run_work_unit(self.spec, unit, self.tokenizer, self.teacher, commits, self.progress)
        return record, self.progress.tokens

    def snapshot(self) -> dict[str, Any]:
        return self.progress.snapshot()

    def close(self) -> None:
        self.teacher.close()


class _Pool:
    """The driver's replicas: start, replace and stop Ray actors."""

    def __init__(self, ray: Any, spec: JobSpec, teacher_factory: Callable[[JobSpec], Teacher], log):
        self.ray, self.spec, self.log = ray, spec, log
        cluster = spec.cluster
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.gpus = spec.gpus_per_replica(has_gpus)
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"), **cluster.env_vars}
        self.actor_class = ray.remote(_Replica)
        self.options = dict(
            num_cpus=cluster.cpus_per_replica,
            num_gpus=self.gpus,
            resources=dict(cluster.resources) or None,
            max_concurrency=2,  # run() in one thread, snapshot() polled from another
            max_restarts=0,  # the driver replaces dead replicas itself and re-queues their unit
            runtime_env={"env_vars": env},
        )
        self.teacher_factory = teacher_factory
        self.generation: dict[int, int] = {}
        self.actors: dict[int, Any] = {}

    def start(self, slot: int) -> Any:
        generation = self.generation.get(slot, -1) + 1
        self.generation[slot] = generation
        name = replica_name(self.spec, slot, generation)
        actor_class = self.actor_class.options(name=name, **self.options)
        self.actors[slot] = actor_class.remote(self.spec, self.teacher_factory)
        self.log(f"replica {slot}: starting actor {name} ({self.gpus:g} GPU(s))")
        return self.actors[slot]

    def stop(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor, no_restart=True)
        self.actors.clear()


def run_job_ray(
    spec: JobSpec,
    address: str | None = None,
    teacher_factory: Callable[[JobSpec], Teacher] = load_teacher,
    log: Callable[[str], None] = lambda msg: print(msg, flush=True),
) -> Manifest:
    """Run (or finish) a labeling job on a Ray cluster; returns the manifest.

    Connects to ``address`` (or the cluster of the Ray job this runs in, or starts a
    local one) unless Ray is already initialised here.
    """
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    plan = plan_job(spec, log)
    if plan.done is not None:
        log(f"{spec.output.url} is already complete ({plan.done.totals['rows']} sequences); nothing to do")
        return plan.done
    pending = deque(unit.index for unit in plan.pending)
    if not pending:
        return finish_job(plan)
    work = plan.work
    replicas = min(spec.cluster.replicas, len(pending))
    job = JobProgress(work, dict(plan.units), replicas=replicas, executor="ray")
    pool = _Pool(ray, spec, teacher_factory, log)
    attempts: dict[int, int] = {}
    running: dict[Any, tuple[int, int]] = {}  # result ref -> (slot, unit)
    idle: deque[int] = deque()
    state = "failed"
    try:
        for slot in range(replicas):
            pool.start(slot)
        try:
            first = ray.get(pool.actors[0].ready.remote())
        except ray.exceptions.RayActorError as exc:
            raise JobError(
                f"replica 0 could not start the teacher {spec.teacher.model!r} ({exc}); check the model "
                "path on the cluster nodes, the GPU memory (teacher.engine_args.gpu_memory_utilization) "
                "and the replica's log in the Ray dashboard"
            ) from exc
        record_teacher(plan, first["provenance"])
        job.start = time.monotonic()  # rates count labeling time, not the first engine's start-up
        idle.extend(range(replicas))
        next_report = time.monotonic() + spec.cluster.progress_every_s
        while pending or running:
            while idle and pending:
                slot, unit = idle.popleft(), pending.popleft()
                attempts[unit] = attempts.get(unit, 0) + 1
                ref = pool.actors[slot].run.remote(work[unit])
                running[ref] = (slot, unit)
                log(f"unit {unit} ({work[unit].describe()}) → replica {slot}, attempt {attempts[unit]}")
            timeout = max(0.0, next_report - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
            for ref in ready:
                slot, unit = running.pop(ref)
                try:
                    record, tokens = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    job.drop_unit(unit)
                    log(f"replica {slot} died while labeling unit {unit}: {type(exc).__name__}")
                    if attempts[unit] >= spec.cluster.max_unit_attempts:
                        raise JobError(
                            f"unit {unit} ({work[unit].describe()} at {work[unit].source.url}) failed "
                            f"{attempts[unit]} times "
                            f"(cluster.max_unit_attempts={spec.cluster.max_unit_attempts}); its committed "
                            "shards are kept: fix the cause (see the replica logs) and submit the job again"
                        ) from exc
                    pending.appendleft(unit)
                    pool.start(slot)
                    idle.append(slot)
                    continue
                job.finish_unit(record, tokens)
                log(f"unit {unit} done: {record.sequences} sequences, {record.shards} shard(s)")
                idle.append(slot)
            if time.monotonic() >= next_report:
                _poll(ray, pool, running, job)
                log(format_progress(job.write(plan.fs, plan.root)))
                next_report = time.monotonic() + spec.cluster.progress_every_s
        manifest = finish_job(plan)
        state = "done"
        return manifest
    finally:
        pool.stop()
        log(format_progress(job.write(plan.fs, plan.root, state)))


def _poll(ray: Any, pool: _Pool, running: dict[Any, tuple[int, int]], job: JobProgress) -> None:
    """Ask busy replicas for their unit's counters (a dead one simply does not answer)."""
    refs = {pool.actors[slot].snapshot.remote(): unit for slot, unit in running.values()}
    if not refs:
        return
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=5.0)
    for ref in ready:
        try:
            snap = ray.get(ref)
        except ray.exceptions.RayError:
            continue
        if snap["unit"] == refs[ref]:
            job.update_unit(snap)


# -- Ray Jobs API ------------------------------------------------------------------------


class UnknownJob(JobError):
    """The cluster's job server does not know the job id (never submitted, or the cluster
    was restarted since)."""


class ClusterUnreachable(JobError):
    """The cluster's job server did not answer (down, restarting, a wrong address)."""


def _client(address: str | None) -> Any:
    import_ray()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except OSError as exc:  # ConnectionError, requests' errors
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster's job server at {address or os.environ.get('RAY_ADDRESS')!r}: "
            f"{exc}; pass --address http://HEAD:8265 or set RAY_ADDRESS"
        ) from exc


def submit_job(
    spec: JobSpec,
    address: str | None = None,
    submission_id: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    client: Any = None,
) -> str:
    """Submit ``spec`` to the cluster as a Ray job running ``labelgen run-ray``; returns the job id.

    The spec is resolved (overrides applied) and validated here; the cluster sees the
    resolved YAML as ``job-spec.yaml`` in the job's working directory. Paths in the spec
    are read on the cluster: use URLs (s3://, gs://) or paths that exist there.
    ``metadata`` is added to the job's (the service records its job id there); ``client``
    an already connected JobSubmissionClient (default: one for ``address``).
    """
    client = client or _client(address)
    with tempfile.TemporaryDirectory(prefix="labelgen-submit-") as tmp:
        with open(os.path.join(tmp, SPEC_NAME), "w") as f:
            f.write(spec.to_yaml())
        env = dict(runtime_env or {})
        env["working_dir"] = tmp
        return client.submit_job(
            entrypoint=f"labelgen run-ray {SPEC_NAME}",
            runtime_env=env,
            submission_id=submission_id,
            metadata={
                "labelgen.output_url": spec.output.url,
                "labelgen.spec_sha256": spec.content_hash(),
                "labelgen.replicas": str(spec.cluster.replicas),
                **(metadata or {}),
            },
        )


def _ask(job_id: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RuntimeError as exc:  # the Jobs API answers unknown ids with RuntimeError("... 404 ...")
        kind = UnknownJob if "status code 404" in str(exc) else JobError
        fix = "list the cluster's jobs with `ray job list --address ...`"
        raise kind(f"job {job_id!r}: {exc}; {fix}") from exc
    except OSError as exc:  # ConnectionError, and requests' errors, are OSErrors
        raise ClusterUnreachable(
            f"job {job_id!r}: the cluster's job server did not answer ({type(exc).__name__}: {exc})"
        ) from exc


def job_status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """Ray's status of a job plus the driver's progress snapshot and completion, when readable."""
    client = _client(address)
    info = _ask(job_id, lambda: client.get_job_info(job_id))
    status: dict[str, Any] = {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "output_url": (info.metadata or {}).get("labelgen.output_url"),
    }
    url = status["output_url"]
    if url:
        try:
            fs, root = fsspec.core.url_to_fs(url)
            fs.invalidate_cache()
            progress_path = join_url(root, PROGRESS_NAME)
            if fs.exists(progress_path):
                status["progress"] = json.loads(fs.cat_file(progress_path))
            status["complete"] = fs.exists(join_url(root, MANIFEST_NAME))
        except Exception as exc:  # noqa: BLE001 - progress is best effort; Ray's status still shows
            status["progress_error"] = f"{type(exc).__name__}: {exc}"
    return status


def format_status(status: dict[str, Any]) -> str:
    lines = [f"job {status['job_id']}: {status['status']}  ({status['entrypoint']})"]
    if status.get("message"):
        lines.append(f"  ray: {status['message']}")
    if status.get("output_url"):
        done = " (complete: manifest written)" if status.get("complete") else ""
        lines.append(f"  output: {status['output_url']}{done}")
    if "progress" in status:
        lines.append(f"  {format_progress(status['progress'])}  [updated {status['progress']['updated_at']}]")
    elif "progress_error" in status:
        lines.append(f"  progress unreadable from here: {status['progress_error']}")
    return "\n".join(lines)


def job_logs(job_id: str, address: str | None = None, follow: bool = False, out: Any = sys.stdout) -> None:
    """Print a job's driver log; with ``follow``, keep printing until the job ends."""
    client = _client(address)
    if not follow:
        out.write(_ask(job_id, lambda: client.get_job_logs(job_id)))
        out.flush()
        return

    _ask(job_id, lambda: client.get_job_info(job_id))

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())


def stop_job(job_id: str, address: str | None = None) -> bool:
    """Ask Ray to stop a job (its driver gets SIGTERM; its replicas go with it)."""
    client = _client(address)
    return bool(_ask(job_id, lambda: client.stop_job(job_id)))


@dataclass(frozen=True)
class RayJobState:
    """A Ray job's state as the Jobs API gives it."""

    status: str
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    message: str
    """Ray's words about it (for a failed job: the exit code and the driver's last log lines)."""


class RayJobs:
    """The Ray Jobs API of one cluster, as the dataset service uses it.

    The client is made on first use and again after the cluster did not answer (making
    one asks the job server for its version), so a service started before its cluster
    still tracks jobs once the cluster is up. Safe to share between threads.
    """

    def __init__(self, address: str):
        self.address = address
        self._client: Any = None

    def _connected(self) -> Any:
        if self._client is None:
            self._client = _client(self.address)
        return self._client

    def submit(self, spec: JobSpec, submission_id: str, metadata: dict[str, str] | None = None) -> str:
        """Submit ``spec`` as a Ray job named ``submission_id`` (see :func:`submit_job`); its id."""
        try:
            return submit_job(spec, submission_id=submission_id, metadata=metadata, client=self._connected())
        except OSError as exc:  # ConnectionError, requests' errors
            self._client = None
            raise ClusterUnreachable(
                f"the Ray cluster at {self.address} did not take job {submission_id} "
                f"({type(exc).__name__}: {exc}); check that it is up (`ray status`) and submit again"
            ) from exc
        except RuntimeError as exc:  # the job server refused it (e.g. the id is taken)
            raise JobError(f"the Ray cluster at {self.address} refused job {submission_id}: {exc}") from exc

    def state(self, job_id: str) -> RayJobState:
        """Ray's state of job ``job_id``.

        Raises:
            UnknownJob: the cluster does not know the id.
            ClusterUnreachable: the cluster did not answer (ask again later).
        """
        client = self._connected()
        try:
            info = _ask(job_id, lambda: client.get_job_info(job_id))
        except ClusterUnreachable:
            self._client = None
            raise
        return RayJobState(str(getattr(info.status, "value", info.status)), str(info.message or ""))

    def stop(self, job_id: str) -> bool:
        """Ask Ray to stop job ``job_id`` (see :func:`stop_job`)."""
        client = self._connected()
        return bool(_ask(job_id, lambda: client.stop_job(job_id)))
