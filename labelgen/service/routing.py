"""What a group of API routes needs from :func:`labelgen.service.app.create_app`.

``create_app`` builds the application, its error handlers and its transaction helpers,
then hands an :class:`Api` to each ``routes_*`` module's ``add_routes``: the routes of
one subject (trust, runs, jobs) live in one module, with the same authentication,
transactions, retries and JSON answers as the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Api"]


@dataclass(frozen=True)
class Api:
    app: Any
    """The FastAPI application."""
    sessions: Any
    """The catalog's session factory."""
    settings: Any
    """The :class:`~labelgen.service.settings.ServiceSettings` it runs with."""
    run: Callable[..., Any]
    """``run(request, authorization, action, fn)``: ``fn(catalog)`` in one transaction, as the
    caller behind the token (retried on a write collision); its result."""
    call: Callable[..., Any]
    """``call(request, authorization, action, fn, status=200)``: :attr:`run`, answered as JSON."""
    ref: Callable[[str, str, str], Any]
    """``ref(team, name, ref)``: a checked :class:`~labelgen.catalog.names.DatasetRef` (400 if not)."""
