"""The dataset service: a catalog of label datasets that teams share, behind ``labelgen serve``.

- :mod:`~labelgen.service.verify`: the checks a dataset passes before it becomes a version,
  and its dataset card;
- :mod:`~labelgen.service.db`: the catalog's tables (SQLAlchemy 2) and the engine;
- :mod:`~labelgen.service.migrations`: the Alembic migrations applied at start;
- :mod:`~labelgen.service.access`: roles and who may do what (the access rules, in one place);
- :mod:`~labelgen.service.store`: catalog operations (teams, tokens, datasets, versions,
  aliases, shares, runs, the audit log) over one database session;
- :mod:`~labelgen.service.locations`: where a reader fetches a version's bytes (presigned
  object-store URLs or the service's own signed byte-range URLs);
- :mod:`~labelgen.service.app`: the HTTP API (FastAPI);
- :mod:`~labelgen.service.server`: ``labelgen serve``: migrate, bootstrap, run uvicorn.

FastAPI and uvicorn are imported only in ``app`` and ``server``, SQLAlchemy and Alembic
only in ``db``, ``store`` and ``migrations`` (install with ``pip install 'labelgen[service]'``).
The client side (``labelgen://`` URLs, the CLI verbs) is :mod:`labelgen.catalog`.
"""
