"""What the catalog's command-line verbs share: parser leaves and groups, the service a
verb talks to, its client, and printing (JSON, tables, sizes)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from labelgen.catalog.client import CatalogClient, CatalogError, default_service, parse_service
from labelgen.catalog.names import InvalidName, parse_ref

__all__ = [
    "leaf",
    "group",
    "service_of",
    "client_of",
    "catalog_url",
    "print_json",
    "size",
    "table",
    "SERVICE_HELP",
]

SERVICE_HELP = "catalog service HOST:PORT (default: $LABELGEN_SERVICE, else the last `labelgen login`)"


def leaf(sub: Any, name: str, handler: Any, help_text: str, service: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    if service:
        p.add_argument("--service", default=None, metavar="HOST:PORT", help=SERVICE_HELP)
    p.set_defaults(catalog_handler=handler)
    return p


def group(sub: Any, name: str, help_text: str) -> Any:
    p = sub.add_parser(name, help=help_text, description=help_text)
    return p.add_subparsers(dest=f"{name}_verb", required=True, metavar="VERB")


def catalog_url(arg: str, service: str | None = None) -> str:
    """``arg`` as a URL ``labelgen inspect`` can open: a URL or an existing path as is; a
    catalog name (``team/name@N``, ``team/name@alias``) as ``labelgen://SERVICE/…`` on the
    default service."""
    if "://" in arg or os.path.exists(arg):
        return arg
    try:
        ref = parse_ref(arg)
    except InvalidName:
        return arg  # not a name either: the dataset reader says what is missing
    service = service or default_service()
    if not service:
        raise CatalogError(
            None,
            "no_service",
            f"{arg!r} is not a path; as a catalog name it needs a service: set $LABELGEN_SERVICE, "
            "run `labelgen login HOST:PORT`, or give labelgen://HOST:PORT/" + str(ref),
        )
    return f"labelgen://{parse_service(service).netloc}/{ref}"


def service_of(args: argparse.Namespace) -> str:
    service = getattr(args, "service", None) or default_service()
    if not service:
        raise CatalogError(
            None,
            "no_service",
            "no labelgen service given: pass --service HOST:PORT, set $LABELGEN_SERVICE, "
            "or run `labelgen login HOST:PORT` once",
        )
    return service


def client_of(args: argparse.Namespace) -> CatalogClient:
    return CatalogClient(service_of(args))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    lines = [[str(c) for c in header], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
