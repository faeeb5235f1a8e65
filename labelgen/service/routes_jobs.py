"""The jobs routes of the catalog API (see docs/SERVICE.md).

``POST /v1/jobs`` records the job in one transaction (its checks: the caller may submit
to the team, the spec is valid, its output is new storage, the service has a cluster),
submits it to the Ray cluster outside any transaction, then answers 201 with the job:
``running``, or ``failed`` with the reason Ray did not take it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Header, Request

from labelgen.service.routing import Api

__all__ = ["add_routes"]

AuthHeader = Annotated[str | None, Header(include_in_schema=False)]
MAX_SPEC_CHARS = 256 * 1024
"""Longest job spec accepted (real ones are a few KiB)."""


def add_routes(api: Api) -> None:
    """Add the jobs routes to ``api.app``."""
    app = api.app

    @app.post("/v1/jobs", status_code=201)
    def submit_job(
        request: Request,
        dataset: Annotated[str, Body(embed=True, max_length=200)],
        spec: Annotated[str, Body(embed=True, max_length=MAX_SPEC_CHARS)],
        aliases: Annotated[list[str], Body(default_factory=list, embed=True, max_length=16)],
        authorization: AuthHeader = None,
    ) -> Any:
        from labelgen.service.tracker import cluster_of, hand_to_cluster

        recorded = api.run(
            request,
            authorization,
            "job.submit",
            lambda c: c.record_job(dataset, spec, aliases, settings=api.settings),
        )
        hand_to_cluster(api.sessions, cluster_of(api.app.state, api.settings), recorded["id"])
        return api.call(request, authorization, "job.show", lambda c: c.job_view(recorded["id"]), 201)

    @app.get("/v1/jobs")
    def list_jobs(request: Request, team: str | None = None, authorization: AuthHeader = None) -> Any:
        return api.call(request, authorization, "job.list", lambda c: c.list_jobs(team))

    @app.get("/v1/jobs/{job_id}")
    def job(request: Request, job_id: int, authorization: AuthHeader = None) -> Any:
        return api.call(request, authorization, "job.show", lambda c: c.job_view(job_id))
