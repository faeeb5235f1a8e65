"""The runs routes of the catalog API (see docs/SERVICE.md): lineage and training metrics.

=======================================  =================================================
``POST /v1/runs`` ``{ref, name, config}``  a student run trained from a version → ``{id, ref}``
``GET /v1/runs/{id}``                      the run, its version and its metrics by step
``POST /v1/runs/{id}/metrics``             ``{records: [{step, NAME: number, ...}]}`` → ``{stored}``
=======================================  =================================================
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Header, Request

from labelgen.catalog.names import InvalidName, parse_ref
from labelgen.service.errors import ServiceError
from labelgen.service.routing import Api

__all__ = ["add_routes"]

AuthHeader = Annotated[str | None, Header(include_in_schema=False)]


def add_routes(api: Api) -> None:
    """Add the runs routes to ``api.app``."""
    app, call = api.app, api.call

    @app.post("/v1/runs", status_code=201)
    def report_run(
        request: Request,
        ref: Annotated[str, Body(embed=True, max_length=256)],
        name: Annotated[str, Body(embed=True, max_length=256)],
        config: Annotated[dict[str, Any], Body(default_factory=dict, embed=True)],
        authorization: AuthHeader = None,
    ) -> Any:
        try:
            parsed = parse_ref(ref)
        except InvalidName as exc:
            raise ServiceError(400, "bad_name", str(exc)) from exc
        checked = api.ref(parsed.team, parsed.name, parsed.ref)
        return call(request, authorization, "run.report", lambda c: c.report_run(checked, name, config), 201)

    @app.get("/v1/runs/{run_id}")
    def run(request: Request, run_id: int, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "run.show", lambda c: c.run_view(run_id))

    @app.post("/v1/runs/{run_id}/metrics")
    def add_metrics(
        request: Request,
        run_id: int,
        records: Annotated[list[Any], Body(embed=True)],  # checked by runs.check_records
        authorization: AuthHeader = None,
    ) -> Any:
        return call(request, authorization, "run.metrics", lambda c: c.add_metrics(run_id, records))
