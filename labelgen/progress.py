"""Progress of a labeling job: per-unit counters, the job-wide snapshot, the local progress bar.

Executors report through these: a unit's counters (:class:`UnitProgress`, readable
from another thread, so the Ray driver can poll its replicas), the job-wide view
(:class:`JobProgress`: units done/total, tokens/s, ETA, rejected records, retries),
which is rewritten to ``<output>/_progress.json`` for ``labelgen status``, and the
tqdm bar of the local executor (:class:`ProgressBar`).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from labelgen.contract.format import UnitRecord, join_url
from labelgen.contract.storage import write_json_atomic
from labelgen.corpus import Source

__all__ = ["PROGRESS_NAME", "UnitProgress", "JobProgress", "ProgressBar", "format_progress"]

PROGRESS_NAME = "_progress.json"
"""Progress snapshot under the output URL (not part of the dataset; read by `labelgen status`)."""


class UnitProgress:
    """Counters of the unit being labeled; an executor may read them from another thread."""

    def __init__(self) -> None:
        self.unit = -1
        self.source_bytes = self.sequences = self.tokens = self.rejected = 0

    def start_unit(self, unit: int = -1) -> None:
        self.unit = unit
        self.source_bytes = self.sequences = self.tokens = self.rejected = 0

    def update(self, source_bytes: int, sequences: int = 0, tokens: int = 0, rejected: int = 0) -> None:
        self.source_bytes = source_bytes
        self.sequences += sequences
        self.tokens += tokens
        self.rejected = max(self.rejected, rejected)

    def snapshot(self) -> dict[str, int]:
        return {
            "unit": self.unit,
            "source_bytes": self.source_bytes,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "rejected": self.rejected,
        }


@dataclass
class JobProgress:
    """Job-wide progress: units done/total, tokens/s, ETA, rejected records, retries.

    ``tokens`` and the rate count what this run labeled (resumed work shows in
    units_done only). The ETA extrapolates source bytes consumed per second over the
    source bytes left.
    """

    sources: list[Source]
    finished: dict[int, UnitRecord]
    replicas: int = 1
    executor: str = "local"
    start: float = field(default_factory=time.monotonic)
    retries: int = 0
    live: dict[int, dict[str, int]] = field(default_factory=dict)
    tokens_done: int = 0  # tokens labeled by this run in the units it finished
    bytes_done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update_unit(self, snapshot: dict[str, int]) -> None:
        with self._lock:
            self.live[snapshot["unit"]] = dict(snapshot)

    def finish_unit(self, record: UnitRecord, tokens: int | None = None) -> None:
        """``tokens``: labeled by this attempt (default: the unit's last reported count)."""
        with self._lock:
            live = self.live.pop(record.unit, None)
            self.finished[record.unit] = record
            self.tokens_done += tokens if tokens is not None else live["tokens"] if live else 0
            self.bytes_done += self.sources[record.unit].size

    def drop_unit(self, unit: int) -> None:
        """The unit's attempt died: its committed shards stay, the rest is redone."""
        with self._lock:
            self.live.pop(unit, None)
            self.retries += 1

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        with self._lock:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            live = list(self.live.values())
            tokens = self.tokens_done + sum(u["tokens"] for u in live)
            consumed = self.bytes_done + sum(u["source_bytes"] for u in live)
            left = sum(s.size for i, s in enumerate(self.sources) if i not in self.finished)
            left -= sum(u["source_bytes"] for u in live)
            rejected = sum(sum(r.rejected.values()) for r in self.finished.values())
            rejected += sum(u["rejected"] for u in live)
            rate = consumed / elapsed
            return {
                "state": state,
                "executor": self.executor,
                "replicas": self.replicas,
                "units_done": len(self.finished),
                "units_total": len(self.sources),
                "units_running": sorted(self.live),
                "tokens": tokens,
                "tokens_per_s": round(tokens / elapsed, 1),
                "elapsed_s": round(elapsed, 1),
                "eta_s": round(max(left, 0) / rate, 1) if rate > 0 and state == "running" else None,
                "rejected": rejected,
                "retries": self.retries,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }

    def write(self, fs: Any, root: str, state: str = "running") -> dict[str, Any]:
        """Rewrite ``<root>/_progress.json``; returns the snapshot written."""
        snap = self.snapshot(state)
        write_json_atomic(fs, join_url(root, PROGRESS_NAME), snap)
        return snap


def format_progress(snap: dict[str, Any]) -> str:
    """One log line: ``progress [running] | units 3/10 | tokens 1,234 | tok/s 567 | eta ...``."""
    eta = snap.get("eta_s")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "-"
    return (
        f"progress [{snap['state']}] | units {snap['units_done']}/{snap['units_total']} | "
        f"tokens {snap['tokens']:,} | tok/s {snap['tokens_per_s']:,.0f} | eta {eta_text} | "
        f"rejected {snap['rejected']} | retries {snap['retries']} | replicas {snap['replicas']}"
    )


class ProgressBar(UnitProgress):
    """The local executor's progress: a tqdm bar over the bytes of all pending sources."""

    def __init__(self, job: JobProgress, total_bytes: int, enabled: bool):
        super().__init__()
        self.job = job
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="labeling",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self._base = 0
        self._tokens = self._sequences = 0

    def start_unit(self, unit: int = -1) -> None:
        super().start_unit(unit)
        self._base = self.bar.n

    def update(self, source_bytes: int, sequences: int = 0, tokens: int = 0, rejected: int = 0) -> None:
        super().update(source_bytes, sequences, tokens, rejected)
        self.job.update_unit(self.snapshot())
        self._tokens += tokens
        self._sequences += sequences
        self.bar.update(self._base + source_bytes - self.bar.n)
        rate = self._tokens / max(time.monotonic() - self.job.start, 1e-9)
        self.bar.set_postfix_str(
            f"seq={self._sequences} tok={self._tokens} tok/s={rate:,.0f} rejected={rejected}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()
