"""A training run and the dataset service: the trust it requires, the runs and metrics it reports.

Before training, :func:`check_trust` asks the service whether every dataset the run reads
has what ``data.require`` demands (a valid signature, a passing audit); under torchrun
only rank 0 asks and every rank stops with the same message. While training, a
:class:`Lineage` (rank 0) reports one run per served version the run reads, then sends
the trainer's metrics to each of those runs, batched at every log step. The service's
run page plots them::

    lineage = Lineage(urls, name="runs/student-1", config=cfg_dict, log=print)
    lineage.report()                  # POST /v1/runs for each labelgen:// version
    lineage.add({"step": 10, "kd": 1.2, "ce": 4.6, "stage": "kd"})   # numbers only are sent
    lineage.flush()                   # POST /v1/runs/{id}/metrics, in batches
    lineage.close()                   # a last flush, and a line if anything was not sent

Lineage is a record, never a reason to stop training: a refusal or an unreachable
service is logged once per run and counted (:attr:`Lineage.counts`); unsent records are
kept (up to :data:`MAX_PENDING`) and sent again later, which is safe because the
service ignores a step it already holds with the same values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from students.distributed import Dist

__all__ = ["Lineage", "DataTrustError", "check_trust", "served", "MAX_PENDING", "BATCH_RECORDS"]

Log = Callable[[str], None]

PROTOCOL = "labelgen://"
BATCH_RECORDS = 1000
"""Records per metrics request (well under the service's 10,000 and its 1 MiB body cap)."""
MAX_PENDING = 100_000
"""Unsent records kept per run while the service is unreachable (the oldest go first)."""


class DataTrustError(ValueError):
    """A dataset the run reads lacks what ``data.require`` asks for (raised on every rank)."""


def served(urls: Sequence[str]) -> list[str]:
    """The ``labelgen://`` URLs among ``urls``, each once, sorted."""
    return sorted({u for u in urls if u.startswith(PROTOCOL)})


def _verdict(urls: Sequence[str], needs: Sequence[str], log: Log) -> str | None:
    """None if every URL has ``needs``, else the message naming what is missing (never raises)."""
    wanted = f"data.require=[{', '.join(needs)}]"
    plain = [u for u in dict.fromkeys(urls) if not u.startswith(PROTOCOL)]
    if plain:
        return (
            f"{wanted}, but {', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not read through the "
            "dataset service: only a published version (labelgen://HOST/team/name@N) has signatures and "
            "audits to check; publish it (`labelgen publish URL team/name`) and read it by name, or drop "
            "data.require"
        )
    try:
        from labelgen.catalog.trust import TrustRefused, require_trusted
    except ImportError as exc:
        return f"{wanted} needs labelgen.catalog.trust ({exc}): pip install 'labelgen[service]'"
    for url in served(urls):
        try:
            verdict = require_trusted(url, needs)
        except TrustRefused as exc:
            return f"{wanted}: {exc}"
        except Exception as exc:  # no answer, no access: what is required cannot be shown
            return (
                f"{wanted}: could not check {url} with the dataset service ({type(exc).__name__}: {exc}); "
                "the run does not start without the check"
            )
        log(f"{url} ({verdict.ref}): {' and '.join(needs)}, as data.require asks")
    return None


def check_trust(urls: Sequence[str], needs: Sequence[str], dist: Dist, log: Log) -> None:
    """Refuse to train unless every dataset in ``urls`` has ``needs`` ('signed', 'audited').

    Rank 0 asks the service (``labelgen.catalog.trust.require_trusted``) and shares its
    verdict, so every rank stops together with the same message. Nothing is asked when
    ``needs`` is empty.

    Raises:
        DataTrustError: naming the dataset and what it lacks (or why it could not be checked).
    """
    if not needs:
        return
    message = dist.broadcast(_verdict(urls, needs, log) if dist.main else None)
    if message is not None:
        raise DataTrustError(message)


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics record, ``step`` left out (names as given)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Lineage:
    """The runs one training run reported on the dataset service, and the metrics it sends them.

    Args:
        urls: every dataset URL the run reads; only the ``labelgen://`` ones are reported.
        name: the run's name (its output directory).
        config: the resolved training config (plain data), stored with each run.
        log: where the few lines about reporting go (rank 0's log).
        timeout: seconds per request to the service.
        retry_s: after a run's service did not answer, seconds before it is tried again
            (so a down service costs one timeout per ``retry_s``, not one per log step).
    """

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        config: Mapping[str, Any],
        log: Log = print,
        timeout: float = 10.0,
        retry_s: float = 60.0,
    ) -> None:
        self.urls = served(urls)
        self.name, self.config, self.log = name, dict(config), log
        self.timeout, self.retry_s = timeout, retry_s
        self.runs: dict[str, int] = {}
        """labelgen:// URL → the id of the run reported on it."""
        self.counts = {"sent": 0, "refused": 0, "unreachable": 0}
        """Records by outcome, over every run (``unreachable``: given up on at :meth:`close`)."""
        self._steps: dict[int, dict[str, float]] = {}  # added, not yet handed to the runs
        self._queues: dict[int, dict[int, dict[str, float]]] = {}  # run id → step → values
        self._retry_at: dict[int, float] = {}  # run id → monotonic time of the next try
        self._said: set[tuple[int, str]] = set()  # (run id, outcome) already logged

    def report(self) -> dict[str, int]:
        """Report the run on every served version it reads (``POST /v1/runs``); ``runs``."""
        if not self.urls:
            return self.runs
        from labelgen.catalog.fs import report_run

        for url in self.urls:
            try:
                run = report_run(url, name=self.name, config=self.config, timeout=self.timeout)
            except Exception as exc:  # lineage is a record, not a reason to stop training
                self.log(f"could not report this run to the dataset service for {url}: {exc}")
                continue
            if run is None:  # refused or unreachable: report_run logged why
                self.log(f"this run is not reported on {url} (see the warning above); training goes on")
                continue
            self.runs[url] = run
            self._queues[run] = {}
            self.log(f"reported run {run} to the dataset service as a student of {url}")
        return self.runs

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue the numbers of ``record`` (``{"step": int, NAME: value, ...}``; strings,
        NaN and infinities are left out) for step ``record["step"]``, merged with what that
        step already has. Every record of a step must be added before the :meth:`flush`
        that sends it (the service refuses to change a step it holds)."""
        if not self._queues:
            return
        values = _numbers(record)
        if values:
            self._steps.setdefault(int(record["step"]), {}).update(values)

    def flush(self, final: bool = False) -> None:
        """Send the queued steps to every run, :data:`BATCH_RECORDS` per request. A run whose
        service did not answer is tried again after ``retry_s`` (``final``: now, once)."""
        for values in self._queues.values():
            for step, numbers in self._steps.items():
                values.setdefault(step, {}).update(numbers)
        self._steps = {}
        from labelgen.catalog.fs import report_metrics

        now = time.monotonic()
        for url, run in self.runs.items():
            queue = self._queues[run]
            if not queue or (not final and now < self._retry_at.get(run, 0.0)):
                continue
            while queue:
                steps = sorted(queue)[:BATCH_RECORDS]
                records = [{"step": step, **queue[step]} for step in steps]
                outcome, why = report_metrics(url, run, records, timeout=self.timeout)
                if outcome == "unreachable":
                    self._retry_at[run] = time.monotonic() + self.retry_s
                    self._say(run, outcome, f"cannot send metrics to run {run} on {url}: {why}; will retry")
                    break
                for step in steps:
                    del queue[step]
                self.counts[outcome] += len(records)
                if outcome == "refused":
                    self._say(run, outcome, f"the service refused metrics of run {run} on {url}: {why}")
            while len(queue) > MAX_PENDING:  # a long outage: keep the newest
                del queue[min(queue)]
                self.counts["unreachable"] += 1

    def close(self) -> dict[str, int]:
        """A last :meth:`flush`; what was not sent is counted as unreachable and said once."""
        self.flush(final=True)
        left = sum(len(q) for q in self._queues.values())
        if left:
            self.counts["unreachable"] += left
            for queue in self._queues.values():
                queue.clear()
        if self.runs and (left or self.counts["refused"]):
            self.log(
                f"metrics to the dataset service: {self.counts['sent']} records sent, "
                f"{self.counts['refused']} refused, {self.counts['unreachable']} not delivered "
                "(all of them are in metrics.jsonl)"
            )
        return dict(self.counts)

    def _say(self, run: int, outcome: str, message: str) -> None:
        if (run, outcome) not in self._said:
            self._said.add((run, outcome))
            self.log(f"{message} (said once; training goes on)")
