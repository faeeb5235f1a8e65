"""``labelgen serve``: migrate the catalog, bootstrap the first admin, run uvicorn.

With no flags the catalog is a SQLite file under ``~/.local/share/labelgen`` and the
service listens on 127.0.0.1:8000. On an empty catalog an organisation admin is created
(``LABELGEN_BOOTSTRAP_ADMIN``, default ``admin``) with ``LABELGEN_BOOTSTRAP_TOKEN``, or a
new token printed once. :class:`ServiceThread` runs the same server inside a process
(tests, the demo). With ``ray_address`` set the service takes jobs
(``POST /v1/jobs``) and runs the job tracker (:mod:`labelgen.service.tracker`), started
and stopped with the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from typing import Any

try:
    import uvicorn
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the labelgen service needs FastAPI and uvicorn: pip install 'labelgen[service]'"
    ) from exc

from labelgen.service.app import ServiceSettings, create_app
from labelgen.service.db import default_db_url, describe_db

__all__ = ["settings_from_env", "serve", "app_from_env", "ServiceThread"]


class _NoSignatures(logging.Filter):
    """Drop the query string of byte-range URLs from access log lines: a logged signature
    would let a reader of the log fetch the file until the URL expires."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            path = record.args[2]
            if path.startswith("/v1/blobs/") and "?" in path:
                record.args = (*record.args[:2], path.split("?", 1)[0] + "?…", *record.args[3:])
        return True


_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"lines": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"no_signatures": {"()": _NoSignatures}},
    "handlers": {
        "err": {"class": "logging.StreamHandler", "formatter": "lines", "stream": "ext://sys.stderr"}
    },
    # The access log prints method, path and status; tokens travel in a header it never prints.
    "loggers": {
        "uvicorn": {"handlers": ["err"], "level": "INFO"},
        "uvicorn.access": {
            "handlers": ["err"],
            "level": "INFO",
            "propagate": False,
            "filters": ["no_signatures"],
        },
        "labelgen.service": {"handlers": ["err"], "level": "INFO"},
    },
}


def settings_from_env(
    db: str | None = None,
    data_dir: str | None = None,
    fs_roots: tuple[str, ...] = (),
    url_ttl_s: int = 900,
    public_url: str | None = None,
    host: str = "127.0.0.1",
    ray_address: str | None = None,
    job_poll_s: float = 10.0,
) -> ServiceSettings:
    """Settings from flags, falling back on LABELGEN_DB, LABELGEN_SIGNING_KEY,
    LABELGEN_BOOTSTRAP_ADMIN, LABELGEN_BOOTSTRAP_TOKEN and LABELGEN_RAY_ADDRESS."""
    if url_ttl_s < 10:
        raise ValueError(f"--url-ttl must be at least 10 seconds, got {url_ttl_s}")
    if not 0.1 <= job_poll_s <= 3600:
        raise ValueError(f"--job-poll must be between 0.1 and 3600 seconds, got {job_poll_s}")
    ray_address = ray_address or os.environ.get("LABELGEN_RAY_ADDRESS") or None
    if ray_address is not None and not ray_address.startswith(("http://", "https://")):
        raise ValueError(
            f"--ray-address {ray_address!r} must be the URL of the Ray cluster's job server, "
            "e.g. http://HEAD:8265 (the dashboard port)"
        )
    return ServiceSettings(
        db_url=db or os.environ.get("LABELGEN_DB") or default_db_url(data_dir),
        fs_roots=tuple(os.path.abspath(r) for r in fs_roots),
        url_ttl_s=url_ttl_s,
        signing_key=os.environ.get("LABELGEN_SIGNING_KEY") or None,
        bootstrap_admin=os.environ.get("LABELGEN_BOOTSTRAP_ADMIN") or "admin",
        bootstrap_token=os.environ.get("LABELGEN_BOOTSTRAP_TOKEN") or None,
        public_url=public_url,
        # Beyond loopback, local paths are published only from under --fs-root.
        local_paths=bool(fs_roots) or host in ("127.0.0.1", "localhost", "::1"),
        ray_address=ray_address,
        job_poll_s=job_poll_s,
    )


def _announce(app: Any, settings: ServiceSettings, host: str, port: int) -> None:
    where = describe_db(settings.db_url)
    print(f"labelgen serve: catalog {where}; API on http://{host}:{port} (OpenAPI at /docs)", file=sys.stderr)
    if settings.ray_address:
        print(
            f"labelgen serve: jobs run on the Ray cluster at {settings.ray_address} "
            f"(tracked every {settings.job_poll_s:g} s)",
            file=sys.stderr,
        )
    token = app.state.bootstrap_token
    if token:
        print(
            f"labelgen serve: created organisation admin {settings.bootstrap_admin!r}; "
            "its token (shown once, "
            f"stored hashed):\n{token}\nsign in with: labelgen login {host}:{port} (it asks for the token)",
            file=sys.stderr,
            flush=True,
        )


_SETTINGS_ENV = "LABELGEN_SERVICE_SETTINGS"  # how `serve --workers N` hands its settings to the workers


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service until interrupted, in ``workers`` processes (one catalog, shared).

    The catalog is migrated and bootstrapped here, once, before any worker starts; each
    worker then opens the same database (SQLite in WAL mode takes concurrent readers and
    one writer at a time; PostgreSQL any number)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    app = create_app(settings)
    _announce(app, settings, host, port)
    options = dict(host=host, port=port, log_config=_LOG_CONFIG, access_log=True, server_header=False)
    if workers == 1:
        uvicorn.run(app, **options)
        return
    os.environ[_SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
    uvicorn.run("labelgen.service.server:app_from_env", factory=True, workers=workers, **options)


def app_from_env() -> Any:
    """The application in a worker process of ``serve --workers N`` (settings from the parent)."""
    raw = json.loads(os.environ[_SETTINGS_ENV])
    return create_app(ServiceSettings(**{**raw, "fs_roots": tuple(raw["fs_roots"])}))


class ServiceThread:
    """The service on a background thread of this process, on 127.0.0.1 (tests, the demo).

    Usage: ``with ServiceThread(settings) as svc: svc.address`` ("127.0.0.1:PORT").
    """

    def __init__(self, settings: ServiceSettings, host: str = "127.0.0.1", port: int = 0):
        self.app = create_app(settings)
        self.settings = settings
        config = uvicorn.Config(
            self.app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="labelgen-service", daemon=True)
        self.host = host

    @property
    def bootstrap_token(self) -> str | None:
        return self.app.state.bootstrap_token

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        tracker = getattr(self.app.state, "job_tracker", None)
        if tracker is not None:  # lifespan is off here: the app's startup handlers do not run
            tracker.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the labelgen service did not start (see the log above)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.address = f"{self.host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        tracker = getattr(self.app.state, "job_tracker", None)
        if tracker is not None:
            tracker.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)
