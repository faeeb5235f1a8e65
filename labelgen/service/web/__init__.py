"""The web catalog: server-rendered pages over the same catalog operations as the API.

``labelgen serve`` serves it under ``/ui/``: sign in with a token, list and search
datasets, a dataset page (card, provenance, files, teacher histograms, lineage, audits
and signatures), student runs with their training curves, two runs compared, jobs.
Pages are HTML rendered on the server with Jinja2 (plots are inline SVG); they need no
JavaScript and are sent with a Content Security Policy that allows none.
"""

from __future__ import annotations

from labelgen.service.routing import Api

__all__ = ["mount"]


def mount(api: Api) -> None:
    """Add the pages (``/ui/…``) to ``api.app``."""
    from labelgen.service.web.pages import add_pages

    add_pages(api)
