"""Student runs and their metrics: the catalog operations of lineage.

A run is reported by the trainer for each served version it trains from
(:meth:`RunOps.report_run`), then fed its training metrics step by step
(:meth:`RunOps.add_metrics`): one row per (run, step) in ``run_metrics``, a JSON object
of name → number. Resending a step with the same values is a no-op (a retried request);
with other values it is refused (409), so a run's curves never change once drawn.

Access: a run is seen exactly by those who may read its version (404 for anyone else,
so the existence of a private dataset's runs never leaks); metrics are added by the
run's own user or an organisation admin.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from labelgen.catalog.names import DatasetRef
from labelgen.service.db import Dataset, Run, RunMetric, Team, Version, iso
from labelgen.service.errors import ServiceError

__all__ = [
    "RunOps",
    "MAX_CONFIG_CHARS",
    "MAX_METRIC_NAMES",
    "MAX_METRIC_RECORDS",
    "MAX_STEP",
    "METRIC_NAME",
]

MAX_CONFIG_CHARS = 100_000
"""Longest run config accepted, as JSON text (a resolved student config is a few KiB)."""
MAX_METRIC_RECORDS = 10_000
"""Most records one ``POST /v1/runs/{id}/metrics`` may carry (the body cap still applies)."""
MAX_METRIC_NAMES = 64
"""Most metric names one record may carry (besides ``step``)."""
MAX_STEP = 2**31 - 1
"""Largest step accepted (the column's range)."""
METRIC_NAME = re.compile(r"[a-z0-9_.-]{1,64}")
"""A metric's name: 1-64 characters of lower-case letters, digits, ``_``, ``.`` and ``-``."""
_RECORD_FORM = '{"step": INT >= 0, "NAME": NUMBER, ...}'


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "bad_metrics", message)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_record(index: int, record: Any) -> tuple[int, dict[str, float | int]]:
    """(step, values) of one record, or 400 naming the record, the field and the rule."""
    where = f"records[{index}]"
    if not isinstance(record, Mapping):
        raise _bad(f"{where} must be an object {_RECORD_FORM}, got {type(record).__name__}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise _bad(f"{where}.step must be an integer in [0, {MAX_STEP}], got {json.dumps(step)[:40]}")
    values = {key: value for key, value in record.items() if key != "step"}
    if not values:
        raise _bad(f"{where} (step {step}) holds no metric; send {_RECORD_FORM}")
    if len(values) > MAX_METRIC_NAMES:
        raise _bad(f"{where} (step {step}) holds {len(values)} metrics; at most {MAX_METRIC_NAMES} per step")
    for name, value in values.items():
        if not isinstance(name, str) or not METRIC_NAME.fullmatch(name):
            raise _bad(
                f"{where} (step {step}): metric name {str(name)[:80]!r} breaks the rule: "
                "1-64 characters of a-z, 0-9, '_', '.', '-' (e.g. kd, eval_kl)"
            )
        if not _is_number(value):
            raise _bad(
                f"{where} (step {step}).{name} must be a finite number, got {json.dumps(value)[:40]}; "
                "leave out a metric that has no value at a step"
            )
    return step, dict(sorted(values.items()))


def check_records(records: Any) -> dict[int, dict[str, float | int]]:
    """{step: values} of a metrics request, every rule checked first (nothing stored on a 400)."""
    if not isinstance(records, list):
        raise _bad(f"records must be a list of {_RECORD_FORM}, got {type(records).__name__}")
    if len(records) > MAX_METRIC_RECORDS:
        raise _bad(
            f"{len(records)} records in one request; at most {MAX_METRIC_RECORDS}: send them in batches"
        )
    steps: dict[int, dict[str, float | int]] = {}
    for index, record in enumerate(records):
        step, values = _check_record(index, record)
        if step in steps and steps[step] != values:
            raise _bad(
                f"records[{index}] sends step {step} a second time with other values; send a step once"
            )
        steps[step] = values
    return steps


class RunOps:
    """Mixed into :class:`labelgen.service.store.Catalog` (``self.s``, ``self.caller`` and its
    helpers come from there)."""

    def report_run(self, ref: DatasetRef, name: str, config: Any) -> dict[str, Any]:
        """Record that run ``name`` (the trainer's output directory) trains from ``ref``;
        ``{"id", "ref"}``. Anyone who may read the version may report a run of it."""
        team, ds, v = self._resolve(ref)
        text = json.dumps(config, default=str, sort_keys=True)
        if len(text) > MAX_CONFIG_CHARS:
            raise ServiceError(
                400,
                "config_too_large",
                f"the run's config is {len(text):,} characters as JSON; at most {MAX_CONFIG_CHARS:,}: "
                "report the resolved training config, not data (large lists belong in files beside the run)",
                team=team.name,
            )
        run = Run(version_id=v.id, name=str(name)[:256], user=self.caller.name, config=text)
        self.s.add(run)
        self.s.flush()
        target = f"{team.name}/{ds.name}@{v.number}"
        self._audit("run.report", target, team=team.name, run=run.id, name=run.name)
        return {"id": run.id, "ref": target}

    def _run(self, run_id: int) -> tuple[Run, str, str, int]:
        """(run, team, dataset name, version number) if the caller may read the run's version;
        404 otherwise (the same answer as an unknown id: a run of a dataset you cannot read
        does not exist for you)."""
        row = None
        if 0 < run_id <= MAX_STEP:
            row = self.s.execute(
                sa.select(Run, Team.name, Dataset.id, Dataset.name, Version.number)
                .join(Version, Version.id == Run.version_id)
                .join(Dataset, Dataset.id == Version.dataset_id)
                .join(Team, Team.id == Dataset.team_id)
                .where(Run.id == run_id)
            ).first()
        if row is None or not self._may("read", row[1], row[2]):
            raise ServiceError(
                404,
                "no_run",
                f"no run {run_id} that {self.caller.name} may read; runs are listed on their version "
                "(`labelgen datasets show team/name@N`)",
            )
        run, team, _, name, number = row
        return run, team, name, number

    def run_view(self, run_id: int) -> dict[str, Any]:
        """Run ``run_id``: its version, user, config and metrics ordered by step
        (``[{"step": int, NAME: number, ...}]``)."""
        run, team, name, number = self._run(run_id)
        rows = self.s.execute(
            sa.select(RunMetric.step, RunMetric.values)
            .where(RunMetric.run_id == run.id)
            .order_by(RunMetric.step)
        ).all()
        try:
            config = json.loads(run.config) if run.config else {}
        except ValueError:  # cut by an older release's silent truncation
            config = {"text": run.config}
        return {
            "id": run.id,
            "ref": f"{team}/{name}@{number}",
            "team": team,
            "name": run.name,
            "user": run.user,
            "config": config,
            "created_at": iso(run.created_at),
            "metrics": [{"step": step, **json.loads(values)} for step, values in rows],
        }

    def add_metrics(self, run_id: int, records: Any) -> dict[str, Any]:
        """Store ``records`` (``[{"step": int, NAME: number, ...}]``) on run ``run_id``;
        ``{"stored": n}`` (steps already there with the same values are not counted).

        Raises:
            ServiceError: 404 if the caller may not read the run; 403 unless it is their own
                run (or they are an organisation admin); 400 for a malformed record; 409
                naming the first step already stored with other values (nothing stored).
        """
        run, team, name, number = self._run(run_id)
        if run.user != self.caller.name and not self.caller.is_admin:
            raise ServiceError(
                403,
                "forbidden",
                f"{self.caller.name} may not add metrics to run {run.id}: it is {run.user}'s run "
                f"(of {team}/{name}@{number}); only its own user or an organisation admin may",
                team=team,
            )
        steps = check_records(records)
        stored: dict[int, str] = {}
        keys = sorted(steps)
        for start in range(0, len(keys), 500):  # bounded IN lists
            chunk = keys[start : start + 500]
            stored.update(
                self.s.execute(
                    sa.select(RunMetric.step, RunMetric.values).where(
                        RunMetric.run_id == run.id, RunMetric.step.in_(chunk)
                    )
                ).all()
            )
        for step in keys:
            if step in stored and json.loads(stored[step]) != steps[step]:
                raise ServiceError(
                    409,
                    "step_conflict",
                    f"run {run.id} already has step {step} with other values "
                    f"({stored[step][:200]}); metrics of a step never change: send new steps only "
                    "(a resumed run reports itself as a new run)",
                    team=team,
                )
        new = [step for step in keys if step not in stored]
        for step in new:
            self.s.add(RunMetric(run_id=run.id, step=step, values=json.dumps(steps[step], sort_keys=True)))
        self.s.flush()
        if new:
            self._audit(
                "run.metrics",
                f"run:{run.id}",
                team=team,
                ref=f"{team}/{name}@{number}",
                stored=len(new),
                first_step=new[0],
                last_step=new[-1],
            )
        return {"stored": len(new)}
