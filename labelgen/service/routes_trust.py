"""The trust routes of the catalog API (see docs/SERVICE.md, docs/TRUST.md and docs/AUDIT.md).

===========================================================  ========================================
route                                                        operation (:mod:`labelgen.service.trust`)
===========================================================  ========================================
``POST   /v1/teams/{team}/keys``                              register_key (the team's writers)
``GET    /v1/teams/{team}/keys``                              list_keys (the team's members)
``DELETE /v1/teams/{team}/keys/{key_id}``                     revoke_key (its owner, team admins)
``POST   /v1/datasets/{team}/{name}/versions/{ref}/signatures``    sign_version (the team's writers)
``POST   /v1/datasets/{team}/{name}/versions/{ref}/attestations``  attest_version (its readers)
``GET    /v1/datasets/{team}/{name}/versions/{ref}/trust``         trust_view (its readers)
===========================================================  ========================================
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Header, Request

from labelgen.service.routing import Api

__all__ = ["add_routes"]

AuthHeader = Annotated[str | None, Header(include_in_schema=False)]


def add_routes(api: Api) -> None:
    """Add the trust routes to ``api.app``."""
    app, call, ref = api.app, api.call, api.ref

    @app.post("/v1/teams/{team}/keys", status_code=201)
    def register_key(
        request: Request,
        team: str,
        public_key: Annotated[str, Body(embed=True, max_length=128)],
        name: Annotated[str, Body(embed=True, max_length=64)] = "key",
        authorization: AuthHeader = None,
    ) -> Any:
        return call(
            request, authorization, "key.register", lambda c: c.register_key(team, public_key, name), 201
        )

    @app.get("/v1/teams/{team}/keys")
    def list_keys(request: Request, team: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "key.list", lambda c: c.list_keys(team))

    @app.delete("/v1/teams/{team}/keys/{key_id}")
    def revoke_key(request: Request, team: str, key_id: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "key.revoke", lambda c: c.revoke_key(team, key_id))

    @app.post("/v1/datasets/{team}/{name}/versions/{version}/signatures", status_code=201)
    def sign(
        request: Request,
        team: str,
        name: str,
        version: str,
        key_id: Annotated[str, Body(embed=True, max_length=64)],
        signature: Annotated[str, Body(embed=True, max_length=256)],
        authorization: AuthHeader = None,
    ) -> Any:
        return call(
            request,
            authorization,
            "sign",
            lambda c: c.sign_version(ref(team, name, version), key_id, signature),
            201,
        )

    @app.post("/v1/datasets/{team}/{name}/versions/{version}/attestations", status_code=201)
    def attest(
        request: Request,
        team: str,
        name: str,
        version: str,
        report: Annotated[dict[str, Any], Body(embed=True)],
        authorization: AuthHeader = None,
    ) -> Any:
        return call(
            request,
            authorization,
            "attest",
            lambda c: c.attest_version(ref(team, name, version), report),
            201,
        )

    @app.get("/v1/datasets/{team}/{name}/versions/{version}/trust")
    def trust(request: Request, team: str, name: str, version: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "trust", lambda c: c.trust_view(ref(team, name, version)))
