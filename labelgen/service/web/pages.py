"""The web catalog's routes (``/ui/…``): sign-in, sessions, CSRF and error pages, rendering.

A page is: read the session cookie (:mod:`labelgen.service.web.cookies`; none or a bad
one: to the sign-in page), find the caller behind its token (revoked or expired: signed
out), run a function of :mod:`labelgen.service.web.views` on that caller's
:class:`~labelgen.service.store.Catalog` in one transaction, render its template. A
refusal (:class:`~labelgen.service.errors.ServiceError`) is an HTML error page with the
API's status and message, and a line in the audit log as on the API; a crash is a 500
page. Forms that change state (sign in, sign out) are refused unless the request's Origin
(or, without one, its Referer) is the service's own. Every page is sent with a strict
Content Security Policy: no scripts at all, styles only from the service's style sheet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

try:
    import jinja2
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the web catalog needs Jinja2: pip install 'labelgen[service]'") from exc

from labelgen.service import store
from labelgen.service.errors import ServiceError
from labelgen.service.routing import Api
from labelgen.service.web import cookies, views

__all__ = ["add_pages", "CSP"]

log = logging.getLogger("labelgen.service")

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_MAX_FORM_BYTES = 8192


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _num(n: Any, digits: int = 3) -> str:
    if isinstance(n, bool) or n is None:
        return "–" if n is None else str(n)
    if isinstance(n, int):
        return f"{n:,}"
    if isinstance(n, float):
        return f"{n:.{digits}g}" if abs(n) < 1e5 else f"{n:,.0f}"
    return str(n)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["size"] = _size
    env.filters["num"] = _num
    env.filters["short"] = lambda s, n=12: (s[:n] + "…") if isinstance(s, str) and len(s) > n else s
    return env


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _local_next(value: str | None) -> str:
    """Where to go after signing in: a page of the catalog, never another site."""
    if (
        value
        and value.startswith("/ui/")
        and not value.startswith("//")
        and "\\" not in value
        and all(32 <= ord(ch) < 127 for ch in value)
        and len(value) <= 1024
    ):
        return value
    return "/ui/"


class _Pages:
    def __init__(self, api: Api):
        self.api = api
        with api.sessions.begin() as session:
            self.key = cookies.session_key(store.signing_key(session, api.settings.signing_key))
        self.env = _environment()
        self.css = (HERE / "static" / "catalog.css").read_bytes()

    # ---- responses -------------------------------------------------------------------------------
    def html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def error(self, status: int, title: str, message: str, me: Any = None) -> HTMLResponse:
        return self.html("error.html", status, status_code=status, title=title, message=message, me=me)

    def to_signin(self, request: Request, message: str | None = None) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        where = f"/ui/signin?next={quote(_local_next(target), safe='')}"
        if message:
            where += f"&why={quote(message[:40], safe='')}"
        response = RedirectResponse(where, status_code=303, headers=_HEADERS)
        response.delete_cookie(cookies.COOKIE_NAME, path="/ui")
        return response

    def refused(self, request: Request, actor: str | None, action: str, error: ServiceError) -> None:
        try:
            store.record_refusal(self.api.sessions, actor, action, request.url.path, error)
        except Exception:  # the page is still answered if the log cannot be written
            log.exception("could not write a refusal to the audit log")

    # ---- checks ----------------------------------------------------------------------------------
    def same_origin(self, request: Request) -> bool:
        """Whether a state-changing form came from this service's own pages."""
        sent = request.headers.get("origin")
        if sent is None:
            referer = request.headers.get("referer")
            sent = _origin(referer) if referer else None
        if not sent or sent == "null":
            return False
        allowed = {_origin(str(request.base_url))}
        if self.api.settings.public_url:
            allowed.add(_origin(self.api.settings.public_url))
        return sent.rstrip("/").lower() in allowed

    def session(self, request: Request) -> cookies.WebSession | None:
        return cookies.read_cookie(self.key, request.cookies.get(cookies.COOKIE_NAME))

    # ---- a page ----------------------------------------------------------------------------------
    def page(self, request: Request, action: str, template: str, build: Callable[[Any], dict]) -> Response:
        """``build(catalog)`` as the signed-in caller in one transaction, rendered."""
        signed = self.session(request)
        if signed is None:
            return self.to_signin(request)
        request.state.action = action
        me, actor = None, None
        try:
            with self.api.sessions.begin() as session:
                caller = store.caller_by_token_id(session, signed.token_id)
                actor = request.state.actor = caller.name
                catalog = store.Catalog(session, caller)
                me = catalog.whoami()
                context = build(catalog)
            return self.html(template, me=me, **context)
        except ServiceError as exc:
            self.refused(request, actor, action, exc)
            if exc.status == 401:  # the token was revoked or expired: signed out
                return self.to_signin(request, exc.code)
            title = {400: "Bad request", 403: "Not allowed", 404: "Not found"}.get(exc.status, "Refused")
            return self.error(exc.status, title, exc.message, me)
        except Exception as exc:
            log.exception("internal error on page %s", request.url.path)
            return self.error(
                500, "Internal error", f"internal error ({type(exc).__name__}); see the service's log", me
            )


def add_pages(api: Api) -> None:
    """The web catalog's routes on ``api.app``."""
    app = api.app
    pages = _Pages(api)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/static/catalog.css", include_in_schema=False)
    def ui_css() -> Response:
        return Response(
            pages.css,
            media_type="text/css",
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/ui/signin", include_in_schema=False)
    def signin_form(request: Request, next: str = "/ui/", why: str = "") -> Response:
        reasons = {
            "revoked_token": "Your token was revoked: sign in with another one.",
            "expired_token": "Your token expired: sign in with another one.",
            "bad_token": "Your token is no longer known to this service: sign in with another one.",
        }
        return pages.html("signin.html", next=_local_next(next), message=reasons.get(why), me=None)

    @app.post("/ui/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        if not pages.same_origin(request):
            return _cross_site(pages, request)
        body = await request.body()
        if len(body) > _MAX_FORM_BYTES:
            return pages.error(413, "Too large", f"the sign-in form is at most {_MAX_FORM_BYTES} bytes")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        token, target = form.get("token", "").strip(), _local_next(form.get("next"))
        if not token:
            message = "Paste a token of this catalog (`labelgen token create` makes one)."
            return pages.html("signin.html", 400, next=target, message=message, me=None)
        try:
            with api.sessions.begin() as session:
                caller = store.authenticate(session, token)
                who = caller.name
                store.record(session, who, "ui.signin", f"user:{who}", token_id=caller.token_id)
        except ServiceError as exc:
            request.state.action = "ui.signin"
            pages.refused(request, None, "ui.signin", exc)
            return pages.html("signin.html", exc.status, next=target, message=exc.message, me=None)
        expires = cookies.session_end(caller.token_expires)
        response = RedirectResponse(target, status_code=303, headers=_HEADERS)
        response.set_cookie(
            cookies.COOKIE_NAME,
            cookies.make_cookie(pages.key, caller.token_id, expires),
            max_age=max(expires - int(time.time()), 0),
            expires=expires - int(time.time()),
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https" or (api.settings.public_url or "").startswith("https://"),
        )
        return response

    @app.post("/ui/signout", include_in_schema=False)
    def signout(request: Request) -> Response:
        if not pages.same_origin(request):
            return _cross_site(pages, request)
        response = RedirectResponse("/ui/signin", status_code=303, headers=_HEADERS)
        response.delete_cookie(cookies.COOKIE_NAME, path="/ui")
        return response

    @app.get("/ui/", include_in_schema=False)
    def datasets(request: Request) -> Response:
        query = dict(request.query_params)

        def build(c: Any) -> dict:
            found = views.dataset_list(c, views.parse_filters(query))
            return {**found, "fields": views.FILTERS, "query": query}

        return pages.page(request, "ui.search", "datasets.html", build)

    @app.get("/ui/d/{team}/{name}", include_in_schema=False)
    def dataset_latest(request: Request, team: str, name: str) -> Response:
        return pages.page(
            request, "ui.show", "dataset.html", lambda c: views.dataset_page(c, api.ref(team, name, "latest"))
        )

    @app.get("/ui/d/{team}/{name}/{ref}", include_in_schema=False)
    def dataset(request: Request, team: str, name: str, ref: str) -> Response:
        return pages.page(
            request, "ui.show", "dataset.html", lambda c: views.dataset_page(c, api.ref(team, name, ref))
        )

    @app.get("/ui/runs/{run_id}", include_in_schema=False)
    def run(request: Request, run_id: str) -> Response:
        return pages.page(request, "ui.run", "run.html", lambda c: views.run_page(c, run_id))

    @app.get("/ui/compare", include_in_schema=False)
    def compare(request: Request, a: str = "", b: str = "") -> Response:
        return pages.page(request, "ui.compare", "compare.html", lambda c: views.compare_page(c, a, b))

    @app.get("/ui/jobs", include_in_schema=False)
    def jobs(request: Request, team: str = "") -> Response:
        return pages.page(request, "ui.jobs", "jobs.html", lambda c: views.jobs_page(c, team or None))

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    def job(request: Request, job_id: str) -> Response:
        return pages.page(request, "ui.job", "job.html", lambda c: views.job_page(c, job_id))

    @app.get("/ui/{rest:path}", include_in_schema=False)
    def unknown(request: Request, rest: str) -> Response:
        def build(c: Any) -> dict:
            message = f"there is no page /ui/{rest[:200]}; start from the dataset list"
            raise ServiceError(404, "no_page", message)

        return pages.page(request, "ui.page", "error.html", build)


def _cross_site(pages: _Pages, request: Request) -> Response:
    error = ServiceError(403, "cross_site", "a form sent from another site (Origin/Referer) was refused")
    pages.refused(request, None, f"ui{request.url.path[3:]}"[:32], error)
    return pages.error(
        403,
        "Cross-site request refused",
        "this form was not sent from this catalog's own pages (its Origin header is missing or "
        "names another site); open the catalog's page and send the form from there",
    )
