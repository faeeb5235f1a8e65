"""The catalog's client side: dataset refs, the HTTP client, ``labelgen://`` URLs and the CLI verbs.

- :mod:`~labelgen.catalog.names`: the one home of the catalog's name rules (teams,
  datasets, users, aliases) and of dataset refs (``team/name@ref``); the service imports
  them too;
- :mod:`~labelgen.catalog.client`: :class:`~labelgen.catalog.client.CatalogClient`, one
  method per endpoint of the service's HTTP API (stdlib ``http.client``, keep-alive
  connections per thread), the credentials file written by ``labelgen login`` and ranged
  GETs of plain (presigned or service-signed) URLs;
- :mod:`~labelgen.catalog.fs`: the ``labelgen://HOST[:PORT]/team/name@REF/path`` fsspec
  filesystem a student reads a published version through, verified against the catalog's
  sizes and sha256, plus lineage (:func:`~labelgen.catalog.fs.resolve_url`,
  :func:`~labelgen.catalog.fs.report_run`, :func:`~labelgen.catalog.fs.report_metrics`);
- :mod:`~labelgen.catalog.trust`: checking a version's signatures and audits on the
  reader's side (:func:`~labelgen.catalog.trust.require_trusted`), signing;
- :mod:`~labelgen.catalog.commands`: the ``labelgen`` verbs that talk to the service
  (login, publish, datasets, token, teams, alias, share, unshare, audit-log), with
  :mod:`~labelgen.catalog.trust_commands` (keys, sign, verify) and
  :mod:`~labelgen.catalog.job_commands` (submit --service, jobs); their shared parts are
  in :mod:`~labelgen.catalog.cli_common`.

Imports only the standard library, fsspec and :mod:`labelgen.contract` (the ``students``
package imports it). Nothing is registered on import: fsspec finds the ``labelgen``
protocol through the package's ``fsspec.specs`` entry point (or call
:func:`labelgen.catalog.fs.register`).
"""
