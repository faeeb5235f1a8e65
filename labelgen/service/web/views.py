"""What each page of the web catalog shows, gathered from the catalog as the signed-in caller.

Every function takes a :class:`labelgen.service.store.Catalog` (the caller behind the
page's session, in the page's transaction) and calls only its operations, the same ones
the HTTP API calls, so a page shows exactly what the API would answer that caller and
refuses exactly where it refuses (a :class:`~labelgen.service.errors.ServiceError` with
the API's status). The results are plain dicts for the templates, plots already drawn.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from labelgen.catalog.names import DatasetRef, InvalidName, parse_ref
from labelgen.service.errors import ServiceError
from labelgen.service.web.plots import COLOURS, histogram_svg, line_plot_svg, valid_histogram

__all__ = [
    "FILTERS",
    "parse_filters",
    "dataset_list",
    "dataset_page",
    "run_page",
    "compare_page",
    "jobs_page",
    "job_page",
    "metric_names",
]

FILTERS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    # query parameter: (label, hint, parser) -- the filters of GET /v1/datasets, the same names
    "name": ("Name contains", "web", str),
    "team": ("Team", "nlp", str),
    "teacher": ("Teacher contains", "qwen", str),
    "tokenizer": ("Tokenizer fingerprint", "sha256 of the tokenizer", str),
    "k": ("k", "64", int),
    "products": ("Products", "draws,hidden", str),
    "min_tokens": ("Tokens at least", "", int),
    "max_tokens": ("Tokens at most", "", int),
    "min_bytes": ("Bytes at least", "", int),
    "max_bytes": ("Bytes at most", "", int),
}
_LIMITS = {"name": 64, "teacher": 256, "tokenizer": 64, "products": 256, "team": 64}
"""Longest text the API accepts for each text filter."""

MAX_SHARDS_SHOWN = 200
"""Files listed on a dataset page (the rest are counted)."""

_METRIC_ORDER = ("loss", "kd", "ce", "kl", "top1", "lr", "temperature", "T")
_METRIC_TITLES = {
    "loss": "loss",
    "kd": "KD loss",
    "ce": "CE loss",
    "kl": "KL to teacher",
    "top1": "top-1 agreement",
    "lr": "learning rate",
    "temperature": "temperature",
    "T": "temperature",
}


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def parse_filters(query: dict[str, str]) -> dict[str, Any]:
    """The search filters of a page's query string, checked as the API checks them (400)."""
    out: dict[str, Any] = {}
    for key, (label, _, parse) in FILTERS.items():
        raw = (query.get(key) or "").strip()
        if not raw:
            continue
        if parse is int:
            if not raw.isdigit() or len(raw) > 18:
                raise _bad(f"{label} ({key}) must be a whole number, got {raw[:40]!r}")
            value: Any = int(raw)
            if key == "k" and not 1 <= value <= 1 << 20:
                raise _bad(f"k must be between 1 and {1 << 20}, got {value}")
        else:
            if len(raw) > _LIMITS[key]:
                raise _bad(f"{label} ({key}) is at most {_LIMITS[key]} characters, got {len(raw)}")
            value = raw
        out[key] = value
    return out


def _trust(row: dict[str, Any]) -> dict[str, Any]:
    """The trust summary of a list row or a version view ({} when the catalog has none)."""
    found = row.get("trust")
    if found is None and isinstance(row.get("latest"), dict):
        found = row["latest"].get("trust")
    return found if isinstance(found, dict) else {}


def dataset_list(c: Any, filters: dict[str, Any]) -> dict[str, Any]:
    """The datasets the caller may read whose newest version matches ``filters``."""
    rows = c.list_datasets(filters)["datasets"]
    out = []
    for row in rows:
        latest = row["latest"]
        card = latest.get("card") or {}
        out.append(
            {
                "team": row["team"],
                "name": row["name"],
                "ref": latest["ref"],
                "version": latest["version"],
                "aliases": row.get("aliases") or {},
                "teacher": (card.get("teacher") or {}).get("model"),
                "tokenizer": (card.get("tokenizer") or {}).get("fingerprint"),
                "k": card.get("k"),
                "products": sorted(p for p, v in (card.get("products") or {}).items() if v),
                "tokens": card.get("tokens"),
                "bytes": latest.get("bytes"),
                "created_at": latest.get("created_at"),
                "trust": _trust(row),
            }
        )
    return {"datasets": out, "filters": filters}


def _histograms(card: dict[str, Any]) -> list[dict[str, Any]]:
    found = ((card.get("stats") or {}).get("histograms")) or {}
    plots = []
    for key, title, xlabel in (
        ("entropy_nats", "Teacher entropy per position", "entropy (nats, top-k + tail bucket)"),
        ("top1_mass", "Teacher top-1 mass per position", "probability of the top-1 token"),
    ):
        hist = found.get(key) if isinstance(found, dict) else None
        if valid_histogram(hist):
            svg = histogram_svg(hist["edges"], hist["counts"], title, xlabel)
            plots.append({"key": key, "title": title, "svg": svg, "positions": sum(hist["counts"])})
    return plots


def _job_of(c: Any, team: str, ref: str) -> dict[str, Any] | None:
    """The job that made version ``ref``, if the caller may see it."""
    try:
        jobs = c.list_jobs(team).get("jobs", [])
    except ServiceError:  # jobs are the team's; a reader through a share sees the version only
        return None
    return next((j for j in jobs if j.get("version") == ref), None)


def dataset_page(c: Any, ref: DatasetRef) -> dict[str, Any]:
    """A version with its card, provenance, files, plots, lineage and trust (403/404 as the API)."""
    view = c.version(ref)  # GET /v1/datasets/T/N/versions/REF: its access check and its answer
    exact = DatasetRef(view["team"], view["name"], str(view["version"]))
    files = c.file_records(exact)
    dataset = c.dataset(view["team"], view["name"])
    card = view.get("card") or {}
    kinds: dict[str, dict[str, int]] = {}
    for f in files:
        entry = kinds.setdefault(f.get("kind") or "file", {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += int(f.get("size") or 0)
    tokens = int(card.get("tokens") or 0)
    trust = c.trust_view(exact)
    rejected = card.get("rejected") or {}
    return {
        "view": view,
        "dataset": dataset,
        "card": card,
        "teacher": card.get("teacher") or {},
        "tokenizer": card.get("tokenizer") or {},
        "products": {p: v for p, v in (card.get("products") or {}).items() if v},
        "files": files[:MAX_SHARDS_SHOWN],
        "files_hidden": max(len(files) - MAX_SHARDS_SHOWN, 0),
        "kinds": kinds,
        "bytes_total": sum(int(f.get("size") or 0) for f in files),
        "bytes_per_token": (sum(int(f.get("size") or 0) for f in files) / tokens) if tokens else None,
        "rejected": sorted(((k, v) for k, v in rejected.items() if v), key=lambda kv: -kv[1]),
        "rejected_total": sum(v for v in rejected.values() if isinstance(v, int)),
        "plots": _histograms(card),
        "stats": card.get("stats") or {},
        "job": _job_of(c, view["team"], view["ref"]),
        "trust": trust,
        "trust_summary": _trust(view) or (trust or {}),
    }


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    """Names of the numeric metrics in ``records`` (not ``step``): the trainer's usual ones
    first, in its order, then the others alphabetically."""
    seen = {
        k
        for r in records
        for k, v in r.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }
    first = [m for m in _METRIC_ORDER if m in seen]
    return first + sorted(seen - set(first))


def _points(records: list[dict[str, Any]], name: str) -> list[tuple[float, float]]:
    return [
        (float(r["step"]), float(r[name]))
        for r in records
        if isinstance(r.get(name), int | float) and not isinstance(r.get(name), bool)
    ]


def _final(records: list[dict[str, Any]], name: str) -> tuple[int, float] | None:
    points = _points(records, name)
    return (int(points[-1][0]), points[-1][1]) if points else None


def _link_of(ref: str) -> str | None:
    try:
        parsed = parse_ref(ref)
    except InvalidName:
        return None
    return f"/ui/d/{parsed.team}/{parsed.name}/{parsed.ref}"


def _run_id(text: str, what: str = "run") -> int:
    if not text.isdigit() or len(text) > 18:
        raise ServiceError(404, "no_run", f"no {what} {text[:40]!r}: ids are whole numbers")
    return int(text)


def run_page(c: Any, run_id: str) -> dict[str, Any]:
    """A student run with one plot per reported metric against step (404 as the API)."""
    run = c.run_view(_run_id(run_id))
    records = run.get("metrics") or []
    plots = [
        {
            "name": name,
            "svg": line_plot_svg(
                [(name, _points(records, name))], _METRIC_TITLES.get(name, name), "step", name
            ),
            "final": _final(records, name),
        }
        for name in metric_names(records)
    ]
    return {
        "run": run,
        "plots": plots,
        "steps": len(records),
        "dataset_link": _link_of(run["ref"]),
        "config": json.dumps(run.get("config"), indent=2, sort_keys=True, default=str),
    }


def compare_page(c: Any, a: str, b: str) -> dict[str, Any]:
    """Two runs side by side: per metric one plot with both runs on the same axes, and the
    final value of each."""
    if not a or not b:
        raise _bad("compare needs two runs: /ui/compare?a=RUN_ID&b=RUN_ID")
    runs = [c.run_view(_run_id(a)), c.run_view(_run_id(b))]
    labels = [f"{side}: #{r['id']} {r['name']}"[:40] for side, r in zip("AB", runs, strict=True)]
    names = metric_names([m for r in runs for m in (r.get("metrics") or [])])
    plots, table = [], []
    for name in names:
        series = [
            (label, _points(r.get("metrics") or [], name)) for label, r in zip(labels, runs, strict=True)
        ]
        plots.append(
            {"name": name, "svg": line_plot_svg(series, _METRIC_TITLES.get(name, name), "step", name)}
        )
        finals = [_final(r.get("metrics") or [], name) for r in runs]
        diff = finals[1][1] - finals[0][1] if finals[0] and finals[1] else None
        table.append({"name": name, "a": finals[0], "b": finals[1], "diff": diff})
    return {
        "runs": runs,
        "labels": labels,
        "colours": COLOURS[:2],
        "plots": plots,
        "table": table,
        "links": [_link_of(r["ref"]) for r in runs],
    }


def _progress(job: dict[str, Any]) -> dict[str, Any]:
    found = job.get("progress")
    if isinstance(found, str):
        try:
            found = json.loads(found)
        except ValueError:
            found = {"text": found}
    found = found if isinstance(found, dict) else {}
    done, total = found.get("units_done"), found.get("units_total")
    share = None
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        share = max(0.0, min(done / total, 1.0))
    return {**found, "share": share, "percent": None if share is None else round(100 * share)}


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    version = job.get("version")
    return {**job, "progress_view": _progress(job), "version_link": _link_of(version) if version else None}


def jobs_page(c: Any, team: str | None) -> dict[str, Any]:
    """Jobs the caller may see (of one team, if given), with state and progress."""
    jobs = c.list_jobs(team).get("jobs", [])
    return {"jobs": [_job_row(j) for j in jobs], "team": team}


def job_page(c: Any, job_id: str) -> dict[str, Any]:
    """One job: state, progress, the version it published, its spec."""
    if not job_id.isdigit() or len(job_id) > 18:
        raise ServiceError(404, "no_job", f"no job {job_id[:40]!r}: ids are whole numbers")
    job = c.job_view(int(job_id))
    return {"job": _job_row(job)}
