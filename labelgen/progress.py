"""Progress of a labeling job: per-unit counters, the job-wide snapshot, the local progress bar.

Executors report through these: a unit's counters (:class:`UnitProgress`, readable
from another thread, so the Ray driver can poll its replicas; bytes count within the
unit, a whole source or a part of one), the job-wide view (:class:`JobProgress`: units
done/total, tokens/s, the engine busy fraction, ETA from the units' input bytes,
rejected records, retries),
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

from labelgen.checks import GenerationStats
from labelgen.contract.format import UnitRecord, busy_fraction, join_url
from labelgen.contract.storage import write_json_atomic
from labelgen.pipeline import EngineClock
from labelgen.units import WorkUnit

__all__ = ["PROGRESS_NAME", "UnitProgress", "JobProgress", "ProgressBar", "format_progress"]

PROGRESS_NAME = "_progress.json"
"""Progress snapshot under the output URL (not part of the dataset; read by `labelgen status`)."""


class UnitProgress:
    """Counters of the unit being labeled; an executor may read them from another thread."""

    def __init__(self) -> None:
        self.unit = -1
        self.source_bytes = self.sequences = self.tokens = self.rejected = 0
        self.clock = EngineClock()
        """The unit's engine clock: the labeling loop (:mod:`labelgen.pipeline`) runs it."""
        self.generation = GenerationStats()
        """A generation unit's sample counts so far (prompts, samples, kept, reasons)."""

    def start_unit(self, unit: int = -1) -> None:
        self.unit = unit
        self.source_bytes = self.sequences = self.tokens = self.rejected = 0
        self.clock = EngineClock()
        self.generation = GenerationStats()

    def add_generation(self, stats: GenerationStats) -> None:
        """Count a batch's samples (a generation unit)."""
        self.generation.merge(stats)

    def update(self, source_bytes: int, sequences: int = 0, tokens: int = 0, rejected: int = 0) -> None:
        """``source_bytes``: input bytes of the unit consumed so far (not a delta)."""
        self.source_bytes = source_bytes
        self.sequences += sequences
        self.tokens += tokens
        self.rejected = max(self.rejected, rejected)

    def snapshot(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "source_bytes": self.source_bytes,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "rejected": self.rejected,
            "engine_s": self.clock.busy_s,
            "wall_s": self.clock.wall_s,
            "generation": self.generation.to_dict(),
        }


@dataclass
class JobProgress:
    """Job-wide progress: units done/total, tokens/s, ETA, rejected records, retries.

    ``tokens`` and the rate count what this run labeled (resumed work shows in
    units_done only). The ETA extrapolates input bytes consumed per second over the
    input bytes of the units left (:attr:`labelgen.units.WorkUnit.size`).
    """

    units: list[WorkUnit]
    """Every unit of the job, in index order."""
    finished: dict[int, UnitRecord]
    replicas: int = 1
    executor: str = "local"
    start: float = field(default_factory=time.monotonic)
    retries: int = 0
    live: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens_done: int = 0  # tokens labeled by this run in the units it finished
    bytes_done: int = 0
    engine_done: float = 0.0  # engine / loop seconds of the units this run finished
    wall_done: float = 0.0
    generation_done: GenerationStats = field(default_factory=GenerationStats)
    """Samples of the generation units this run finished (their unit records' counts)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def busy_fraction(self) -> float | None:
        """Engine busy fraction of this run so far: engine seconds over labeling-loop seconds,
        summed over finished and running units (per replica, so R replicas count R clocks)."""
        with self._lock:
            live = list(self.live.values())
            engine = self.engine_done + sum(u.get("engine_s", 0.0) for u in live)
            wall = self.wall_done + sum(u.get("wall_s", 0.0) for u in live)
        return busy_fraction(engine, wall)

    def update_unit(self, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self.live[snapshot["unit"]] = dict(snapshot)

    def finish_unit(self, record: UnitRecord, tokens: int | None = None) -> None:
        """``tokens``: labeled by this attempt (default: the unit's last reported count)."""
        with self._lock:
            live = self.live.pop(record.unit, None)
            if record.generation:  # the unit's own counts (a live snapshot may be a batch behind)
                self.generation_done.merge(GenerationStats.from_dict(record.generation))
            self.finished[record.unit] = record
            self.tokens_done += tokens if tokens is not None else live["tokens"] if live else 0
            self.bytes_done += self.units[record.unit].size
            self.engine_done += record.engine_s
            self.wall_done += record.wall_s

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
            left = sum(u.size for u in self.units if u.index not in self.finished)
            left -= sum(u["source_bytes"] for u in live)
            rejected = sum(sum(r.rejected.values()) for r in self.finished.values())
            rejected += sum(u["rejected"] for u in live)
            rate = consumed / elapsed
            snap = {
                "state": state,
                "executor": self.executor,
                "replicas": self.replicas,
                "units_done": len(self.finished),
                "units_total": len(self.units),
                "units_running": sorted(self.live),
                "tokens": tokens,
                "tokens_per_s": round(tokens / elapsed, 1),
                "elapsed_s": round(elapsed, 1),
                "eta_s": round(max(left, 0) / rate, 1) if rate > 0 and state == "running" else None,
                "rejected": rejected,
                "retries": self.retries,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        snap["engine_busy_fraction"] = self.busy_fraction()
        generation = self.generation_stats()
        if generation.samples:
            snap["generation"] = generation.to_dict()
        return snap

    def generation_stats(self) -> GenerationStats:
        """The samples this run generated so far (finished and running units)."""
        with self._lock:
            total = GenerationStats.from_dict(self.generation_done.to_dict())
            for unit in self.live.values():
                if unit.get("generation"):
                    total.merge(GenerationStats.from_dict(unit["generation"]))
        return total

    def write(self, fs: Any, root: str, state: str = "running") -> dict[str, Any]:
        """Rewrite ``<root>/_progress.json``; returns the snapshot written."""
        snap = self.snapshot(state)
        write_json_atomic(fs, join_url(root, PROGRESS_NAME), snap)
        return snap


def format_progress(snap: dict[str, Any]) -> str:
    """One log line: ``progress [running] | units 3/10 | tokens 1,234 | tok/s 567 | engine busy
    97% | eta ...``."""
    eta = snap.get("eta_s")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "-"
    gen = snap.get("generation")
    samples = ""
    if gen:
        samples = (
            f" | prompts {gen['prompts']:,} | samples {gen['samples']:,} | kept {gen['kept']:,} | "
            f"rejected samples {_reasons(gen.get('rejected', {}))}"
        )
    return (
        f"progress [{snap['state']}] | units {snap['units_done']}/{snap['units_total']} | "
        f"tokens {snap['tokens']:,} | tok/s {snap['tokens_per_s']:,.0f} | "
        f"engine busy {_fraction(snap.get('engine_busy_fraction'))} | eta {eta_text} | "
        f"rejected {snap['rejected']} | retries {snap['retries']} | replicas {snap['replicas']}{samples}"
    )


def _reasons(counts: dict[str, int]) -> str:
    """``{"wrong_answer": 3, "unfinished": 1}`` → ``4 (wrong_answer 3, unfinished 1)``."""
    total = sum(counts.values())
    if not total:
        return "0"
    top = sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))
    return f"{total:,} (" + ", ".join(f"{reason} {count:,}" for reason, count in top) + ")"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


class ProgressBar(UnitProgress):
    """The local executor's progress: a tqdm bar over the input bytes of all pending units."""

    def __init__(self, job: JobProgress, total_bytes: int, enabled: bool, desc: str = "labeling"):
        super().__init__()
        self.job = job
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc=desc,
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
        self._postfix(rejected)

    def add_generation(self, stats: GenerationStats) -> None:
        super().add_generation(stats)
        self.job.update_unit(self.snapshot())
        self._postfix(self.rejected)

    def _postfix(self, rejected: int) -> None:
        rate = self._tokens / max(time.monotonic() - self.job.start, 1e-9)
        busy = _fraction(self.job.busy_fraction())
        gen = self.job.generation_stats()
        if gen.samples:  # a generation job: tokens are response tokens
            text = (
                f"prompts={gen.prompts} samples={gen.samples} kept={gen.kept} "
                f"rejected={_reasons(gen.rejected)} tok/s={rate:,.0f} busy={busy}"
            )
        else:
            text = (
                f"seq={self._sequences} tok={self._tokens} tok/s={rate:,.0f} busy={busy} rejected={rejected}"
            )
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()
