"""``labelgen``: offline teacher labels for distilling LLMs, stored as sharded Parquet.

The public surface, imported lazily (``import labelgen`` loads nothing heavy)::

    from labelgen import load_spec, run_job
    manifest = run_job(load_spec("job.yaml"))

Modules: ``contract`` (the label format both sides share), ``spec`` (the job spec),
``corpus`` / ``packing`` (records → token sequences), ``teacher`` / ``teacher_vllm`` /
``extraction`` (labels out of vLLM), ``writer`` (shards), ``runner`` (plan, units,
manifest; the local executor), ``cluster`` (the Ray executor), ``progress``,
``summary`` (``labelgen inspect``), ``credentials``, ``provenance``; ``testing`` holds
the tiny models and corpora of the demo and the tests (not library API).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "JobSpec": "labelgen.spec",
    "load_spec": "labelgen.spec",
    "run_job": "labelgen.runner",
    "run_job_ray": "labelgen.cluster",
    "submit_job": "labelgen.cluster",
    "inspect_dataset": "labelgen.summary",
    "read_manifest": "labelgen.contract.dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'labelgen' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
