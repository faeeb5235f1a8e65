"""Where a version's bytes live and where a reader fetches them.

- :func:`check_storage_url`: the storage URLs a version may be published from (local
  absolute paths, ``file://``, ``s3://``, ``gs://``/``gcs://``), with no ``..`` segments
  and no embedded credentials or signatures (the rule of :mod:`labelgen.credentials`: a
  version's URL is shown to every reader), optionally only under configured roots.
  Anything else is refused before it is opened.
- :func:`read_locations`: one GET URL per file of a version. Object stores that presign
  (s3fs, gcsfs) give short-lived presigned URLs, so the reader never holds bucket
  credentials and the service stays out of the data path; other storage (a filesystem)
  gets a URL of the service's own byte-range endpoint, signed with HMAC-SHA256 over
  (version id, path, expiry) — no token travels in it.
- :func:`check_signature` and :func:`blob_path`: what the byte-range endpoint checks
  before it serves a byte: a valid, unexpired signature, and a path that is one of the
  version's own files, joined to the version's own URL (never a URL from the request).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import fsspec

from labelgen.contract.format import FormatError, check_dataset_path, join_url
from labelgen.credentials import url_problem
from labelgen.service.errors import ServiceError

__all__ = [
    "SCHEMES",
    "MAX_URL_CHARS",
    "check_storage_url",
    "storage_fs",
    "read_locations",
    "sign",
    "check_signature",
    "blob_path",
]

SCHEMES = ("file", "s3", "gs", "gcs")
"""Storage a version may live on (a local absolute path counts as ``file``)."""
MAX_URL_CHARS = 1024


def check_storage_url(url: object, roots: Sequence[str] = (), local_paths: bool = True) -> str:
    """``url`` if the service may publish a version from it, else a 400 naming the rule.

    Args:
        url: what the publisher sent.
        roots: if given, local paths must lie under one of these directories (symlinks
            resolved).
        local_paths: False: no local path at all (a service listening beyond loopback
            without ``--fs-root``).
    """
    if not isinstance(url, str) or not url:
        raise ServiceError(
            400,
            "bad_url",
            "url must be a non-empty string: the dataset's URL (s3://BUCKET/PATH or an absolute path)",
        )
    if len(url) > MAX_URL_CHARS or any(ord(c) < 32 for c in url):
        raise ServiceError(
            400, "bad_url", f"url must be at most {MAX_URL_CHARS} printable characters, got {len(url)}"
        )
    if "::" in url:
        raise ServiceError(
            400, "bad_url", f"url {url!r} chains filesystems ('::'); give the dataset's own URL"
        )
    problem = url_problem(url)
    if problem:
        raise ServiceError(400, "credentials_in_url", problem)
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    if scheme not in SCHEMES:
        raise ServiceError(
            400,
            "bad_scheme",
            f"url scheme {scheme!r} is not storage the catalog serves; "
            f"use one of {', '.join(s + '://' for s in SCHEMES)} or an absolute path",
        )
    if any(part == ".." for part in rest.split("/")):
        raise ServiceError(400, "bad_url", f"url {url!r} has a '..' segment; give the dataset's own URL")
    if scheme == "file" and not local_paths:
        raise ServiceError(
            400,
            "no_local_paths",
            f"url {url!r} is a local path, and this service listens beyond loopback without --fs-root: "
            "publish from object storage, or restart it with --fs-root DIR",
        )
    if scheme == "file":
        if not rest.startswith("/"):
            raise ServiceError(
                400,
                "bad_url",
                f"url {url!r} is a relative path; send an absolute one (`labelgen publish` does)",
            )
        path = os.path.normpath(rest)
        real = os.path.realpath(path)
        if roots and not any(
            real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots)
        ):
            raise ServiceError(
                400,
                "outside_roots",
                f"url {url!r} is outside the directories this service publishes from "
                f"({', '.join(roots)}); see `labelgen serve --fs-root`",
            )
        return path
    if not rest.split("/")[0]:
        raise ServiceError(400, "bad_url", f"url {url!r} names no bucket")
    return f"{scheme}://{rest.rstrip('/')}"


def storage_fs(url: str) -> tuple[Any, str]:
    """(filesystem, root) of a version's storage URL."""
    return fsspec.core.url_to_fs(url)


def sign(key: bytes, version_id: int, path: str, expires: int, token_id: int) -> str:
    """The signature of a byte-range URL: (version, path, expiry, the token it was issued to)."""
    message = f"{version_id}\n{path}\n{expires}\n{token_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def check_signature(
    key: bytes, version_id: int, path: str, expires: str, token_id: str, signature: str
) -> int:
    """The token id a byte-range URL was issued to; 403 unless ``signature`` signs (version,
    path, expiry, token) and the expiry is in the future."""
    try:
        when, token = int(expires), int(token_id)
    except ValueError:
        when, token = 0, 0
    expected = sign(key, version_id, path, when, token)
    if not hmac.compare_digest(expected, signature or ""):
        raise ServiceError(
            403,
            "bad_signature",
            "this byte-range URL's signature is not valid for this file; "
            "ask the service for the file list again",
        )
    if when < time.time():
        raise ServiceError(
            403,
            "expired_url",
            "this byte-range URL has expired; "
            "ask the service for the file list again (readers do this themselves)",
        )
    return token


def blob_path(
    version_url: str, files: Sequence[dict[str, Any]], path: str
) -> tuple[Any, str, str, dict[str, Any]]:
    """(fs, version root, full path, file record) of ``path`` inside a version; 404 if it
    is not one of its files."""
    try:
        path = check_dataset_path(path, "blob path")
    except FormatError as exc:
        raise ServiceError(400, "bad_path", str(exc)) from exc
    record = next((f for f in files if f["path"] == path), None)
    if record is None:
        raise ServiceError(404, "no_file", f"{path!r} is not a file of this version")
    fs, root = storage_fs(version_url)
    return fs, root, join_url(root, path), record


def check_local_file(root: str, path: str) -> None:
    """403 unless ``path`` resolves (symlinks followed) to a file inside ``root``: a
    dataset may not hand out bytes from elsewhere through a link."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if not real.startswith(base.rstrip("/") + "/") or not os.path.isfile(real):
        raise ServiceError(
            403,
            "outside_dataset",
            f"{os.path.relpath(path, root)} is a link to (or is) something outside the dataset "
            f"directory {root}; datasets are served only from their own files",
        )


def read_locations(
    version: dict[str, Any], base_url: str, key: bytes, ttl_s: int, token_id: int
) -> tuple[float, list[dict[str, Any]]]:
    """(expiry, files with a ``url`` each) for a reader of ``version`` (store.version_files),
    whose token is ``token_id`` (the service's own URLs stop working when it is revoked)."""
    fs, root = storage_fs(version["url"])
    expires = int(time.time()) + ttl_s
    presign = _presigns(fs)
    out = []
    for f in version["files"]:
        if presign:
            url = fs.sign(join_url(root, f["path"]), expiration=ttl_s)
        else:
            signature = sign(key, version["version_id"], f["path"], expires, token_id)
            url = (
                f"{base_url}/v1/blobs/{version['version_id']}/{quote(f['path'])}"
                f"?exp={expires}&t={token_id}&sig={signature}"
            )
        out.append({"path": f["path"], "size": f["size"], "sha256": f["sha256"], "url": url})
    return float(expires), out


def _presigns(fs: Any) -> bool:
    """Does this filesystem make presigned URLs (s3fs, gcsfs)? The base class raises."""
    return type(fs).sign is not fsspec.AbstractFileSystem.sign and "file" not in (
        fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    )
