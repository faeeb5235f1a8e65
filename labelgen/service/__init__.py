"""The dataset service: a catalog of label datasets that teams share, behind ``labelgen serve``.

- :mod:`~labelgen.service.verify`: the checks a dataset passes before it becomes a version,
  and its dataset card; :mod:`~labelgen.service.publishing`: those checks under the
  service's storage rules, for a user's publish and a job's alike;
- :mod:`~labelgen.service.db`: the catalog's tables (SQLAlchemy 2) and the engine;
- :mod:`~labelgen.service.migrations`: the Alembic migrations applied at start;
- :mod:`~labelgen.service.access`: roles and who may do what (the access rules, in one place);
- :mod:`~labelgen.service.store`: catalog operations (teams, tokens, datasets, versions,
  aliases, shares, the audit log) over one database session, with the operations of
  :mod:`~labelgen.service.trust` (signing keys, signatures, attestations),
  :mod:`~labelgen.service.runs` (student runs and their metrics) and
  :mod:`~labelgen.service.jobs` (jobs submitted through the service) mixed in;
- :mod:`~labelgen.service.tracker`: follows submitted jobs on Ray and publishes their output;
- :mod:`~labelgen.service.locations`: where a reader fetches a version's bytes (presigned
  object-store URLs or the service's own signed byte-range URLs);
- :mod:`~labelgen.service.settings`: how ``labelgen serve`` runs;
- :mod:`~labelgen.service.app`: the HTTP API (FastAPI), with the route groups
  ``routes_trust``, ``routes_runs`` and ``routes_jobs`` (:mod:`~labelgen.service.routing`);
- :mod:`~labelgen.service.web`: the web catalog's pages (server-rendered, no scripts);
- :mod:`~labelgen.service.server`: ``labelgen serve``: migrate, bootstrap, run uvicorn.

FastAPI and uvicorn are imported only in ``app``, ``server``, the ``routes_*`` modules and
``web``; SQLAlchemy and Alembic only in ``db``, ``store``, ``trust``, ``runs``, ``jobs``,
``tracker`` and ``migrations`` (install with ``pip install 'labelgen[service]'``).
The client side (``labelgen://`` URLs, the CLI verbs) is :mod:`labelgen.catalog`.
"""
