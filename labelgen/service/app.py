"""The catalog's HTTP API (FastAPI): routes, bearer authentication, JSON errors, body caps.

Every route but ``GET /health`` and the signed byte-range route needs
``Authorization: Bearer TOKEN``. Each request runs in one database transaction; a
refusal (any :class:`~labelgen.service.errors.ServiceError`, a malformed request, an
over-size body) answers ``{"error": {"code", "message"}}`` with its status and is
written to the audit log in a transaction of its own. Tokens are never logged: they
travel only in the Authorization header, which nothing here prints. The routes and
their JSON are listed in docs/SERVICE.md; the OpenAPI schema is served at ``/docs``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Annotated, Any
from urllib.parse import unquote

try:
    from fastapi import Body, FastAPI, Header, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the labelgen service needs FastAPI and uvicorn: pip install 'labelgen[service]'"
    ) from exc

import anyio

from labelgen.catalog.names import DatasetRef, InvalidName
from labelgen.contract.storage import is_local
from labelgen.service import locations, store
from labelgen.service.db import open_catalog
from labelgen.service.errors import ServiceError
from labelgen.service.routing import Api
from labelgen.service.settings import MAX_BODY_BYTES, ServiceSettings

__all__ = ["ServiceSettings", "create_app", "MAX_BODY_BYTES"]

AuthHeader = Annotated[str | None, Header(include_in_schema=False)]

log = logging.getLogger("labelgen.service")


MAX_PATH_CHARS = 2048
"""Longest request path accepted (names are at most 64 characters; file paths 1024)."""


class _Guard:
    """ASGI middleware in front of every route: request paths with ``..`` segments, control
    characters or over :data:`MAX_PATH_CHARS` are refused with 400, request bodies over
    ``limit`` bytes (declared or streamed) with 413."""

    def __init__(self, app: Any, limit: int, audit: Any):
        self.app, self.limit, self.audit = app, limit, audit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self._guarded(scope, receive, send)

    async def _refuse(self, scope: dict, send: Any, status: int, code: str, message: str) -> None:
        target = unquote(scope.get("raw_path", b"").decode("latin-1"))[:512]
        error = ServiceError(status, code, message)
        await anyio.to_thread.run_sync(self.audit, error, target)
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _guarded(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        raw = unquote(scope.get("raw_path", b"").decode("latin-1"))
        if len(raw) > MAX_PATH_CHARS or any(
            ".." in p.split("/") or any(ord(c) < 32 for c in p) or "\\" in p for p in (path, raw)
        ):
            return await self._refuse(
                scope,
                send,
                400,
                "bad_path",
                "request paths may not hold '..' segments, "
                f"backslashes or control characters, nor exceed {MAX_PATH_CHARS} characters",
            )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"request bodies are capped at {self.limit} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, send, 413, "too_large", too_large)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, send, 413, "too_large", too_large)


class _TooLarge(Exception):
    pass


class _VersionCache:
    """Versions by id for the byte-range route (versions never change, so caching is safe)."""

    def __init__(self, size: int = 256):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, sessions: Any, version_id: int) -> tuple[str, list[dict[str, Any]]] | None:
        with self._lock:
            if version_id in self._items:
                self._items.move_to_end(version_id)
                return self._items[version_id]
        with sessions() as session:
            item = store.version_storage(session, version_id)
        if item is None:
            return None
        with self._lock:
            self._items[version_id] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return item


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _ref(team: str, name: str, ref: str) -> DatasetRef:
    """``team/name@ref`` from a request's path; 400 naming the rule if it breaks one."""
    try:
        parsed = DatasetRef(team, name, ref)
        if parsed.version is not None and parsed.version >= 2**31:  # the column's range
            raise InvalidName(f"version number must be below 2^31, got {ref[:20]!r}")
    except InvalidName as exc:
        raise ServiceError(400, "bad_name", str(exc)) from exc
    return parsed


def create_app(settings: ServiceSettings) -> Any:
    """The FastAPI application over the catalog at ``settings.db_url`` (migrated at once)."""
    sessions = open_catalog(settings.db_url)
    with sessions.begin() as session:
        token = store.bootstrap_admin(session, settings.bootstrap_admin, settings.bootstrap_token)
        key = store.signing_key(session, settings.signing_key)
    app = FastAPI(
        title="labelgen catalog",
        description="Label datasets teams share: versions, aliases, access, lineage, audit.",
        version="1",
    )
    app.state.sessions = sessions
    app.state.settings = settings
    app.state.bootstrap_token = token  # printed once by `labelgen serve`, never stored
    versions = _VersionCache()

    def refusal(request: Request, error: ServiceError) -> JSONResponse:
        actor = getattr(request.state, "actor", None)
        action = getattr(request.state, "action", f"{request.method} {request.url.path}"[:32])
        try:
            store.record_refusal(sessions, actor, action, request.url.path, error)
        except Exception:  # the refusal is still answered if the log cannot be written
            log.exception("could not write a refusal to the audit log")
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return refusal(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:20]
        )
        return refusal(request, ServiceError(400, "bad_request", f"malformed request: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _TooLarge):  # a streamed body over the cap, seen while parsing
            too_large = f"request bodies are capped at {settings.max_body_bytes} bytes"
            return refusal(request, ServiceError(413, "too_large", too_large))
        fix = "see /docs for the API" if exc.status_code in (404, 405) else ""
        return refusal(request, ServiceError(exc.status_code, "http", f"{exc.detail}; {fix}".rstrip("; ")))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return refusal(
            request,
            ServiceError(500, "internal", f"internal error ({type(exc).__name__}); see the service's log"),
        )

    def audit_refusal(error: ServiceError, target: str) -> None:
        try:
            store.record_refusal(sessions, None, "request", target, error)
        except Exception:
            log.exception("could not write a refusal to the audit log")

    app.add_middleware(_Guard, limit=settings.max_body_bytes, audit=audit_refusal)

    def catalog(request: Request, session: Any, authorization: str | None, action: str) -> store.Catalog:
        request.state.action = action
        caller = store.authenticate(session, _bearer(authorization))
        request.state.actor = caller.name
        return store.Catalog(session, caller)

    def run(request: Request, authorization: str | None, action: str, fn: Any) -> Any:
        """Run ``fn`` on the caller's catalog in one transaction; again (up to 3 times) when
        it collided with another request creating the same row (two publishes taking the
        same version number, two alias moves creating the same alias)."""
        for _ in range(3):
            try:
                with sessions.begin() as session:
                    return fn(catalog(request, session, authorization, action))
            except store.Conflict:
                continue
        raise ServiceError(
            409, "busy", "other requests changed the same entries at the same moment; try again"
        )

    def call(request: Request, authorization: str | None, action: str, fn: Any, status: int = 200) -> Any:
        """:func:`run`, answered as JSON (the result is plain data: FastAPI's encoder walk,
        a large share of a catalog call's time, is skipped)."""
        return JSONResponse(run(request, authorization, action, fn), status_code=status)

    api = Api(app=app, sessions=sessions, settings=settings, run=run, call=call, ref=_ref)
    from labelgen.service import routes_jobs, routes_runs, routes_trust

    routes_trust.add_routes(api)
    routes_runs.add_routes(api)
    routes_jobs.add_routes(api)
    from labelgen.service import web

    web.mount(api)
    from labelgen.service import tracker

    tracker.install(api)  # with a Ray cluster: the job tracker starts and stops with the app

    @app.get("/health")
    def health() -> dict[str, str]:
        with sessions() as session:
            store.ping(session)
        return {"status": "ok"}

    @app.get("/v1/whoami")
    def whoami(request: Request, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "whoami", lambda c: c.whoami())

    @app.post("/v1/teams", status_code=201)
    def create_team(
        request: Request, name: Annotated[str, Body(embed=True)], authorization: AuthHeader = None
    ) -> Any:
        return call(request, authorization, "team.create", lambda c: c.create_team(name), 201)

    @app.put("/v1/teams/{team}/members/{user}")
    def set_member(
        request: Request,
        team: str,
        user: str,
        role: Annotated[str, Body(embed=True)],
        authorization: AuthHeader = None,
    ) -> Any:
        return call(request, authorization, "member.set", lambda c: c.set_member(team, user, role))

    @app.delete("/v1/teams/{team}/members/{user}")
    def remove_member(request: Request, team: str, user: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "member.remove", lambda c: c.remove_member(team, user))

    @app.post("/v1/tokens", status_code=201)
    def create_token(
        request: Request,
        name: Annotated[str, Body(embed=True)] = "token",
        expires_days: Annotated[float | None, Body(embed=True)] = None,
        user: Annotated[str | None, Body(embed=True)] = None,
        authorization: AuthHeader = None,
    ) -> Any:
        return call(
            request, authorization, "token.create", lambda c: c.create_token(name, expires_days, user), 201
        )

    @app.get("/v1/tokens")
    def list_tokens(request: Request, user: str | None = None, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "token.list", lambda c: c.list_tokens(user))

    @app.delete("/v1/tokens/{token_id}")
    def revoke_token(request: Request, token_id: int, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "token.revoke", lambda c: c.revoke_token(token_id))

    @app.get("/v1/datasets")
    def list_datasets(
        request: Request,
        team: str | None = None,
        name: str | None = Query(None, max_length=64),
        teacher: str | None = Query(None, max_length=256),
        tokenizer: str | None = Query(None, max_length=64),
        k: int | None = Query(None, ge=1, le=1 << 20),
        products: str | None = Query(None, max_length=256),
        min_tokens: int | None = Query(None, ge=0),
        max_tokens: int | None = Query(None, ge=0),
        min_bytes: int | None = Query(None, ge=0),
        max_bytes: int | None = Query(None, ge=0),
        authorization: AuthHeader = None,
    ) -> Any:
        filters = dict(
            team=team,
            name=name,
            teacher=teacher,
            tokenizer=tokenizer,
            k=k,
            products=products,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            min_bytes=min_bytes,
            max_bytes=max_bytes,
        )
        return call(request, authorization, "search", lambda c: c.list_datasets(filters))

    @app.get("/v1/datasets/{team}/{name}")
    def dataset(request: Request, team: str, name: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "show", lambda c: c.dataset(team, name))

    @app.post("/v1/datasets/{team}/{name}/versions", status_code=201)
    def publish(
        request: Request,
        team: str,
        name: str,
        url: Annotated[str, Body(embed=True, max_length=locations.MAX_URL_CHARS)],
        aliases: Annotated[list[str], Body(default_factory=list, embed=True, max_length=16)],
        job_spec: Annotated[str | None, Body(embed=True, max_length=256 * 1024)] = None,
        authorization: AuthHeader = None,
    ) -> Any:
        from labelgen.service.publishing import verify_for_publish
        from labelgen.service.verify import PublishRefused

        target = f"{team}/{name}"
        request.state.action = "publish"
        storage = locations.check_storage_url(url, settings.fs_roots, settings.local_paths)
        with sessions.begin() as session:  # refuse early: access before the (long) verification
            catalog(request, session, authorization, "publish").check_publish(team, name, storage)
        try:
            verified = verify_for_publish(storage, settings)
        except PublishRefused as exc:
            raise ServiceError(422, "refused", f"{target}: not published: {exc}", team=team) from exc
        except OSError as exc:
            raise ServiceError(
                422,
                "unreadable",
                f"{target}: not published: the service cannot read {storage} ({type(exc).__name__}: {exc}); "
                "check the service's storage credentials and the URL",
                team=team,
            ) from exc
        out = run(
            request, authorization, "publish", lambda c: c.publish(team, name, verified, aliases, job_spec)
        )
        return JSONResponse(out, status_code=200 if out.get("existing") else 201)

    @app.get("/v1/datasets/{team}/{name}/versions/{ref}")
    def version(request: Request, team: str, name: str, ref: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "show", lambda c: c.version(_ref(team, name, ref)))

    @app.get("/v1/datasets/{team}/{name}/versions/{ref}/files")
    def files(request: Request, team: str, name: str, ref: str, authorization: AuthHeader = None) -> Any:
        def go(c: store.Catalog) -> Any:
            out, _ = c.version_files(_ref(team, name, ref))
            return {**out, "token_id": c.caller.token_id}

        found = run(request, authorization, "read", go)
        base = settings.public_url or str(request.base_url).rstrip("/")
        expires, listed = locations.read_locations(found, base, key, settings.url_ttl_s, found["token_id"])
        keys = ("ref", "version", "manifest_sha256")
        answer = {"expires_at": expires, "expires_in": settings.url_ttl_s, "files": listed}
        return JSONResponse({**{k: found[k] for k in keys}, **answer})

    @app.get("/v1/blobs/{version_id}/{path:path}")
    def blob(
        request: Request, version_id: int, path: str, exp: str = "", t: str = "", sig: str = ""
    ) -> Response:
        request.state.action = "blob"
        token_id = locations.check_signature(key, version_id, path, exp, t, sig)
        with sessions() as session:  # the token is still valid and may still read the dataset
            caller = store.caller_by_token_id(session, token_id)
            request.state.actor = caller.name
            store.Catalog(session, caller).check_read_version(version_id)
        found = versions.get(sessions, version_id)
        if found is None:
            raise ServiceError(404, "no_version", f"no version with id {version_id}")
        fs, root, full, record = locations.blob_path(found[0], found[1], path)
        if is_local(fs):
            try:
                size = os.path.getsize(full)
            except OSError as exc:
                raise ServiceError(
                    410,
                    "gone",
                    f"{path} of this version is no longer in storage ({exc.strerror}); "
                    "the dataset's team must publish it again",
                ) from exc
            locations.check_local_file(root, full)
            if size != record["size"]:
                raise ServiceError(
                    409,
                    "changed",
                    f"{path} is {size} bytes in storage, its version says {record['size']}: "
                    "it changed after publish; the dataset's team must publish a new version",
                )
            return _BlobResponse(
                full, media_type="application/octet-stream", headers={"Cache-Control": "private, max-age=0"}
            )
        return _ranged(fs, full, record["size"], request.headers.get("range"))

    @app.put("/v1/datasets/{team}/{name}/aliases/{alias}")
    def set_alias(
        request: Request,
        team: str,
        name: str,
        alias: str,
        version: Annotated[int, Body(embed=True, ge=1)],
        authorization: AuthHeader = None,
    ) -> Any:
        return call(request, authorization, "alias.move", lambda c: c.set_alias(team, name, alias, version))

    @app.delete("/v1/datasets/{team}/{name}/aliases/{alias}")
    def delete_alias(
        request: Request, team: str, name: str, alias: str, authorization: AuthHeader = None
    ) -> Any:
        return call(request, authorization, "alias.delete", lambda c: c.delete_alias(team, name, alias))

    @app.put("/v1/datasets/{team}/{name}/shares/{grantee}")
    def share(request: Request, team: str, name: str, grantee: str, authorization: AuthHeader = None) -> Any:
        return call(request, authorization, "share.grant", lambda c: c.share(team, name, grantee, True))

    @app.delete("/v1/datasets/{team}/{name}/shares/{grantee}")
    def unshare(
        request: Request, team: str, name: str, grantee: str, authorization: AuthHeader = None
    ) -> Any:
        return call(request, authorization, "share.revoke", lambda c: c.share(team, name, grantee, False))

    @app.get("/v1/audit")
    def audit(
        request: Request,
        team: str | None = None,
        action: str | None = Query(None, max_length=32),
        limit: int = Query(100, ge=1, le=10_000),
        authorization: AuthHeader = None,
    ) -> Any:
        return call(request, authorization, "audit", lambda c: c.audit(team, action, limit))

    return app


class _BlobResponse(FileResponse):
    """A file (or byte ranges of it) sent in 1 MiB chunks: shards are read whole or by row
    group, megabytes at a time, and 64 KiB chunks cost a thread hop each."""

    chunk_size = 1 << 20


def _ranged(fs: Any, path: str, size: int, header: str | None) -> Response:
    """Serve ``bytes=a-b`` of a file on storage that neither presigns nor is local."""
    start, end = 0, size - 1
    if header:
        unit, _, spec = header.partition("=")
        first, _, last = spec.partition("-")
        if unit.strip() != "bytes" or "," in spec or not (first.isdigit() or last.isdigit()):
            raise ServiceError(
                416, "bad_range", f"Range {header[:64]!r} is not one byte range (bytes=START-END)"
            )
        if first.isdigit():
            start, end = int(first), min(int(last), size - 1) if last.isdigit() else size - 1
        else:
            start = max(size - int(last), 0)
        if start > end:
            raise ServiceError(416, "bad_range", f"Range {header[:64]!r} is outside the file's {size} bytes")
    data = fs.cat_file(path, start=start, end=end + 1)
    headers = {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end}/{size}"}
    return Response(
        data, status_code=206 if header else 200, headers=headers, media_type="application/octet-stream"
    )
