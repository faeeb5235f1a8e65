"""How ``labelgen serve`` runs: its settings (flags and environment), in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServiceSettings", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (a publish request with a job spec is a few KiB)."""


@dataclass(frozen=True)
class ServiceSettings:
    """How ``labelgen serve`` runs (its flags and environment)."""

    db_url: str
    """SQLAlchemy URL of the catalog database (``sqlite:///PATH`` or ``postgresql+psycopg://…``)."""
    fs_roots: tuple[str, ...] = ()
    """If set, local-path datasets may be published only from under these directories."""
    url_ttl_s: int = 900
    """Lifetime of the read URLs a reader gets (presigned or signed byte-range), in seconds."""
    signing_key: str | None = None
    """Key for byte-range URL signatures (default: one kept in the catalog)."""
    bootstrap_admin: str = "admin"
    """Name of the organisation admin created on an empty catalog."""
    bootstrap_token: str | None = None
    """Token for that admin (default: a new one, printed once at start)."""
    public_url: str | None = None
    """Base URL readers reach the service at (default: the URL each request came in on)."""
    max_body_bytes: int = MAX_BODY_BYTES
    local_paths: bool = True
    """May datasets be published from local paths? (``labelgen serve`` says no when it
    listens beyond loopback without ``--fs-root``.)"""
    ray_address: str | None = None
    """Ray cluster jobs submitted through the service run on (``http://HEAD:8265``; None: the
    service accepts no jobs)."""
    job_poll_s: float = 10.0
    """Seconds between two looks at the running jobs (progress, end, publish)."""
    track_jobs: bool = True
    """Run the job tracker in this process (tests that drive it by hand say False)."""
