"""The audit report: the JSON object ``labelgen audit`` writes and posts, and its readable summary.

Shape (docs/AUDIT.md): ``passed``, ``url``, ``ref``, ``rows``, ``positions``, ``seed``,
``reference``, ``teacher``, ``dtype``, ``tolerance``, ``worst`` {topk_logprob,
target_logprob, hidden}, ``first_failure`` {check, shard, row, position, reason} or None,
``checks`` {name: {passed, detail, ...}}, ``summary`` (text) and, in a local report only,
``sampled`` (one entry per re-scored sequence).
"""

from __future__ import annotations

from typing import Any

from labelgen.audit.compare import CHECK_ORDER

__all__ = ["summary_text", "attestation_body"]


def _mark(check: dict[str, Any]) -> str:
    if check.get("skipped"):
        return "skipped"
    return "ok" if check.get("passed") else "FAILED"


def summary_text(report: dict[str, Any]) -> str:
    """The readable summary of ``report`` (every key but ``summary``)."""
    where = report["url"] + (f" ({report['ref']})" if report.get("ref") else "")
    lines = [
        f"audit {'PASSED' if report['passed'] else 'FAILED'}: {where}",
        f"teacher     {report['teacher']} ({report['dtype']}), re-scored through {report['reference']}; "
        f"seed {report['seed']}",
        f"re-scored   {report['rows']} sequence(s), {report['positions']} label position(s) compared",
    ]
    for name in CHECK_ORDER:
        check = report["checks"].get(name)
        if check is not None:
            lines.append(f"{name:<11} {_mark(check):<7} {check.get('detail', '')}")
    worst = report["worst"]
    hidden = "n/a" if worst.get("hidden") is None else f"{worst['hidden']:.3g}"
    lines.append(
        f"worst       top-k {worst['topk_logprob']:.3g} nats, target {worst['target_logprob']:.3g} nats, "
        f"hidden {hidden} (relative)"
    )
    tol = report["tolerance"]
    lines.append(
        f"tolerance   {tol.get('logprob')} ({tol.get('dtype')}); codec {tol.get('codec')} adds "
        f"{tol.get('codec_level')}; hidden {tol.get('hidden_rel')} relative + storage rounding; "
        f"draws fail at p < {tol.get('draw_p_value')}"
    )
    first = report.get("first_failure")
    if first:
        at = [f"shard {first['shard']}" if first.get("shard") else None]
        at.append(f"row {first['row']}" if first.get("row") is not None else None)
        at.append(f"position {first['position']}" if first.get("position") is not None else None)
        place = ", ".join(a for a in at if a) or "the dataset"
        lines.append(f"first failure: {first['check']} at {place}: {first['reason']}")
    elif not report["passed"]:
        lines.append("first failure: no position was compared (a pass needs at least one)")
    return "\n".join(lines)


def attestation_body(report: dict[str, Any]) -> dict[str, Any]:
    """The report as an attestation carries it: everything but the per-row ``sampled`` list."""
    return {key: value for key, value in report.items() if key != "sampled"}
