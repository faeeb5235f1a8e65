"""``labelgen://HOST[:PORT]/team/name@REF/path``: a published dataset version, as a read-only fsspec FS.

The first touch of a version asks the service for its file list once (``GET
.../versions/REF/files``: every file with its size, sha256 and a time-limited URL) and
keeps it for the life of the process (every instance, in every thread, shares it). An
alias (``@stable``, ``@latest``, or no ref at all) is pinned to the version that first
answer named, so a process reads one version even if the alias moves meanwhile (the
pins travel with a pickled filesystem into spawned DataLoader workers; forked ones
inherit them).

Bytes come from the file URLs: whole-file reads (``cat_file``) are checked against the
catalog's size and sha256, ranged reads (``open`` + seek + read, as pyarrow does for row
groups) against the size the store reports and the length asked for. A file list is
refreshed before use once it is within ``min(60 s, ttl/4)`` of its URLs' expiry (timed on
this process's monotonic clock from the ``expires_in`` the service gave, else from
``expires_at``), and an expired URL (HTTP 403) makes the filesystem refresh it once and
retry. Nothing can be written: a published version never changes.

Failures are the OSErrors fsspec users expect (FileNotFoundError, PermissionError,
ConnectionError), each naming the ``labelgen://`` path and carrying the service's
message; bytes that differ from the catalog raise :class:`DataIntegrityError`, and so does a
location that says the stored file changed (HTTP 409), is gone (410), or is shorter than
the catalog's size (416 for a range inside that size, or fewer bytes than asked).

The protocol is registered through the package's ``fsspec.specs`` entry point, or by
:func:`register`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from labelgen.catalog.client import (
    CatalogClient,
    CatalogError,
    RangeError,
    RangeResponse,
    get_range,
    parse_service,
    service_for,
)
from labelgen.catalog.names import DatasetRef, InvalidName
from labelgen.contract.errors import ChecksumError
from labelgen.contract.format import FormatError, check_dataset_path

__all__ = [
    "PROTOCOL",
    "CatalogFileSystem",
    "CatalogFile",
    "DataIntegrityError",
    "register",
    "split_path",
    "resolve_url",
    "report_run",
    "report_metrics",
]

log = logging.getLogger(__name__)

PROTOCOL = "labelgen"
URL_FORM = "labelgen://HOST[:PORT]/team/name[@REF][/path]"
EXPIRY_MARGIN_S = 60.0
"""A file list this close to its URLs' expiry is refreshed before use (at most: a quarter of
the URLs' lifetime when that is shorter, see :func:`_margin`)."""
_monotonic = time.monotonic  # this process's clocks (module names, so tests can move them)
_wall = time.time
_CHANGED = "the file changed after it was published; ask the dataset's team to publish a new version"


class DataIntegrityError(ChecksumError):
    """Bytes read through a ``labelgen://`` URL differ from what the catalog published."""


def register() -> None:
    """Register the ``labelgen`` protocol with fsspec (the entry point does the same)."""
    fsspec.register_implementation(PROTOCOL, "labelgen.catalog.fs.CatalogFileSystem", clobber=True)


def split_path(path: str) -> tuple[str, DatasetRef, str, str]:
    """``HOST:PORT/team/name@REF/rel`` (with or without ``labelgen://``) as (netloc, ref, rel, root).

    ``root`` is the dataset part as written (``HOST:PORT/team/name@REF``), ``rel`` the path
    inside the version ('' for the version itself).

    Raises:
        InvalidName: the path does not name a catalog dataset version.
    """
    stripped = CatalogFileSystem._strip_protocol(path)
    parts = stripped.split("/")
    if len(parts) < 3 or not parts[0]:
        raise InvalidName(
            f"labelgen://{stripped:.200} does not name a dataset version; write {URL_FORM}, "
            "e.g. labelgen://catalog:8470/nlp/web@2"
        )
    netloc, team, last = parts[0], parts[1], parts[2]
    try:
        parse_service(netloc)
    except CatalogError as exc:
        raise InvalidName(f"labelgen://{stripped:.200}: {exc.message}") from None
    name, _, ref = last.partition("@")
    try:
        dataset = DatasetRef(team, name, ref or "latest")
    except InvalidName as exc:
        raise InvalidName(f"labelgen://{stripped:.200}: {exc}; write {URL_FORM}") from None
    return netloc, dataset, "/".join(p for p in parts[3:] if p), "/".join(parts[:3])


@dataclass(frozen=True)
class _File:
    size: int
    sha256: str
    url: str


@dataclass
class _Listing:
    """One version's file list, as the service gave it."""

    ref: DatasetRef  # concrete: @N
    files: dict[str, _File]
    deadline: float  # when its URLs expire, on this process's monotonic clock (inf: never said)
    ttl: float  # the URLs' lifetime the service gave, in seconds (inf: never said)
    manifest_sha256: str = ""
    children: dict[str, dict[str, bool]] = field(default_factory=dict)  # dir -> {child rel: is_dir}

    def __post_init__(self) -> None:
        self.children = {"": {}}
        for rel in self.files:
            parts = rel.split("/")
            for depth in range(len(parts)):
                parent, child = "/".join(parts[:depth]), "/".join(parts[: depth + 1])
                self.children.setdefault(parent, {})[child] = depth < len(parts) - 1

    def stale(self) -> bool:
        return _monotonic() > self.deadline - _margin(self.ttl)


def _margin(ttl: float) -> float:
    """How long before its URLs expire a file list is refreshed: ``min(60 s, ttl/4)``."""
    return min(EXPIRY_MARGIN_S, ttl / 4)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _expiry(answer: dict[str, Any], sent: float, where: str) -> tuple[float, float]:
    """(deadline on the monotonic clock, ttl) of a /files answer to a request sent at
    monotonic time ``sent``: from ``expires_in`` (seconds from the request) when the
    service gave it, else from ``expires_at`` (unix seconds) against this machine's clock."""
    expires_in, expires_at = _number(answer.get("expires_in")), _number(answer.get("expires_at"))
    if expires_in is not None:
        ttl, deadline = expires_in, sent + expires_in
    elif expires_at is not None:
        ttl = expires_at - _wall()
        deadline = _monotonic() + ttl
    else:
        return float("inf"), float("inf")
    if ttl != ttl or ttl <= 0:  # NaN, or already expired: a clock disagrees; rely on HTTP 403
        log.warning(
            "%s: the service's file URLs expire %s (in %.0f s by this machine's clock); refreshing "
            "them only when they are refused: check this machine's clock",
            where,
            "at once" if expires_in is not None else f"at unix time {expires_at:.0f}",
            ttl,
        )
        return float("inf"), float("inf")
    return deadline, ttl


def _parse_listing(answer: Any, asked: DatasetRef, where: str, sent: float | None = None) -> _Listing:
    """A /files answer as a :class:`_Listing` (``sent``: when the request was sent, on the
    monotonic clock; default now); FormatError naming ``where`` if it is malformed."""
    problem = f"{where}: the service's file list is malformed"
    if not isinstance(answer, dict) or not isinstance(answer.get("files"), list):
        raise FormatError(f"{problem} (no 'files' list); is the service a labelgen catalog?")
    version = answer.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{problem} (version {version!r:.40} is not a positive integer)")
    if asked.version is not None and version != asked.version:
        raise FormatError(f"{problem} (asked for version {asked.version}, got {version})")
    files: dict[str, _File] = {}
    for item in answer["files"]:
        if not isinstance(item, dict):
            raise FormatError(f"{problem} (an entry is a {type(item).__name__}, not an object)")
        rel = check_dataset_path(item.get("path"), f"{where}: file list")
        size, sha, url = item.get("size"), item.get("sha256"), item.get("url")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{problem} ({rel}: size {size!r:.40} is not a byte count)")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise FormatError(f"{problem} ({rel}: sha256 {sha!r:.80} is not 64 hex digits)")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise FormatError(f"{problem} ({rel}: its URL is not http(s))")
        files[rel] = _File(size, sha, url)
    deadline, ttl = _expiry(answer, _monotonic() if sent is None else sent, where)
    manifest = answer.get("manifest_sha256")
    return _Listing(asked.at(version), files, deadline, ttl, manifest if isinstance(manifest, str) else "")


def _os_error(exc: CatalogError, where: str) -> OSError:
    """The OSError fsspec callers expect for a refused or failed service call."""
    message = f"labelgen://{where}: {exc.message}"
    if exc.status == 404:
        return FileNotFoundError(message)
    if exc.status in (401, 403):
        return PermissionError(message)
    if exc.status is None:
        return ConnectionError(message)
    return OSError(message)


class _Shared:
    """What every instance of this process shares (fsspec makes one instance per thread).

    ``pins``: (netloc, "team/name@alias") -> the version the alias named first;
    ``listings``: (token, netloc, "team/name@N") -> its file list.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pins: dict[tuple[str, str], int] = {}
        self.listings: dict[tuple[str | None, str, str], _Listing] = {}

    def reset_lock(self) -> None:  # in a forked child: another thread of the parent may have held it
        self.lock = threading.RLock()


_SHARED = _Shared()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SHARED.reset_lock)


def _restore(cls: type, args: tuple, options: dict, pins: dict) -> CatalogFileSystem:
    """Unpickle a filesystem (in a spawned worker), keeping the parent's alias pins."""
    with _SHARED.lock:
        for key, version in pins.items():
            _SHARED.pins.setdefault(key, version)
    return fsspec.spec.make_instance(cls, args, options)


class CatalogFileSystem(AbstractFileSystem):
    """Published dataset versions of labelgen catalog services, read-only.

    Args:
        token: bearer token for every host (default: ``$LABELGEN_TOKEN``, else the
            credentials file's token for the URL's host).
        timeout: seconds per request.
    """

    protocol = PROTOCOL
    root_marker = ""
    verifies_whole_reads = True
    """Whole-file reads are checked against the catalog's sha256 (``info(path)["sha256"]``)
    and raise :class:`DataIntegrityError` on a mismatch: a reader that checks the same
    sha256 need not hash those bytes again."""

    def __init__(self, token: str | None = None, timeout: float = 60, **storage_options: Any):
        super().__init__(token=token, timeout=timeout, **storage_options)
        self._token = token
        self.timeout = timeout
        self._clients: dict[str, CatalogClient] = {}

    def __reduce__(self) -> Any:  # the alias pins travel to spawned DataLoader workers
        with _SHARED.lock:
            pins = dict(_SHARED.pins)
        return _restore, (type(self), self.storage_args, self.storage_options, pins)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return super()._strip_protocol(path).strip("/")

    # -- the file list

    def _client(self, netloc: str) -> CatalogClient:
        with _SHARED.lock:
            client = self._clients.get(netloc)
            if client is None:
                client = CatalogClient(service_for(netloc), token=self._token, timeout=self.timeout)
                self._clients[netloc] = client
            return client

    def _listing(self, netloc: str, ref: DatasetRef, refresh: bool = False) -> _Listing:
        """The file list of ``ref`` on ``netloc``, fetched once per process unless stale; an alias
        is pinned, process-wide, to the version its first answer named."""
        with _SHARED.lock:
            version = ref.version or _SHARED.pins.get((netloc, str(ref)))
            key = (self._token, netloc, str(ref.at(version))) if version else None
            listing = _SHARED.listings.get(key) if key else None
            if listing is not None and not refresh and not listing.stale():
                return listing
            fresh = self._fetch(netloc, ref.at(version) if version else ref)
            if listing is not None:
                fresh = _carry_over(listing, fresh, netloc)
            if ref.version is None and version is None:
                assert fresh.ref.version is not None  # _parse_listing made it @N
                _SHARED.pins[(netloc, str(ref))] = fresh.ref.version
                log.info(
                    "labelgen://%s/%s is version %d; this process reads version %d",
                    netloc,
                    ref,
                    fresh.ref.version,
                    fresh.ref.version,
                )
            _SHARED.listings[(self._token, netloc, str(fresh.ref))] = fresh
            return fresh

    def _fetch(self, netloc: str, ref: DatasetRef) -> _Listing:
        where = f"{netloc}/{ref}"
        client = self._client(netloc)
        sent = _monotonic()
        try:
            answer = client.files(ref)
        except CatalogError as exc:
            raise _os_error(exc, where) from exc
        return _parse_listing(answer, ref, f"labelgen://{where}", sent)

    def _locate(self, path: str) -> tuple[str, DatasetRef, str, str, _Listing]:
        netloc, ref, rel, root = split_path(path)
        return netloc, ref, rel, root, self._listing(netloc, ref)

    def _file(self, path: str, refresh: bool = False) -> tuple[_File, str, DatasetRef]:
        """(the file's record, its netloc, its ref) for a file path; FileNotFoundError if none."""
        netloc, ref, rel, _, listing = self._locate(path)
        if refresh:
            listing = self._listing(netloc, ref, refresh=True)
        entry = listing.files.get(rel)
        if entry is not None:
            return entry, netloc, ref
        where = f"labelgen://{self._strip_protocol(path)}"
        if rel in listing.children:
            raise IsADirectoryError(f"{where} is a directory of {listing.ref}, not a file")
        raise FileNotFoundError(
            f"{where}: no such file in {listing.ref} ({len(listing.files)} files; list them with "
            f"fs.ls or `labelgen datasets show {ref}`)"
        )

    # -- listing

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        netloc, ref, rel, root, listing = self._locate(path)
        if rel in listing.files:
            entries = [self._info(root, rel, listing)]
        elif rel in listing.children:
            entries = [self._info(root, child, listing) for child in sorted(listing.children[rel])]
        else:
            raise FileNotFoundError(
                f"labelgen://{self._strip_protocol(path)}: no such file or directory in {listing.ref}"
            )
        return entries if detail else [e["name"] for e in entries]

    def _info(self, root: str, rel: str, listing: _Listing) -> dict[str, Any]:
        name = f"{root}/{rel}" if rel else root
        entry = listing.files.get(rel)
        if entry is None:
            return {"name": name, "size": 0, "type": "directory"}
        return {"name": name, "size": entry.size, "type": "file", "sha256": entry.sha256}

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        _, _, rel, root, listing = self._locate(path)
        if rel in listing.files or rel in listing.children:
            return self._info(root, rel, listing)
        raise FileNotFoundError(
            f"labelgen://{self._strip_protocol(path)}: no such file or directory in {listing.ref}"
        )

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        prefix: str = "",
        **kwargs: Any,
    ) -> Any:
        """Files (and with ``withdirs`` directories) under ``path`` whose path below it starts
        with ``prefix`` (as s3fs's ``find(prefix=)``), at most ``maxdepth`` levels deep."""
        _, _, rel, root, listing = self._locate(path)
        if rel in listing.files and not prefix:
            found = {self._info(root, rel, listing)["name"]: self._info(root, rel, listing)}
            return found if detail else list(found)
        if rel not in listing.children:
            return {} if detail else []
        base = f"{rel}/" if rel else ""
        candidates = list(listing.files) + (list(listing.children) if withdirs else [])
        found = {}
        for item in sorted(set(candidates)):
            if not item or not item.startswith(base) or item == rel:
                continue
            below = item[len(base) :]
            if not below.startswith(prefix) or (maxdepth is not None and below.count("/") >= maxdepth):
                continue
            info = self._info(root, item, listing)
            found[info["name"]] = info
        return found if detail else list(found)

    def ukey(self, path: str) -> str:
        return self.info(path).get("sha256", "")

    def invalidate_cache(self, path: str | None = None) -> None:
        """Nothing to do: a published version's file list never changes (expired URLs are refreshed)."""

    # -- reading

    def _get(self, path: str, start: int | None, end: int | None) -> tuple[RangeResponse, _File]:
        """GET a range of a file's location, refreshing the file list once on HTTP 403.

        Raises:
            DataIntegrityError: the location says the stored file changed (409), is gone
                (410), or ends before a range inside the catalog's size (416).
        """
        where = f"labelgen://{self._strip_protocol(path)}"
        refresh = False
        while True:
            entry, _, _ = self._file(path, refresh=refresh)
            try:
                response = get_range(entry.url, start, end, timeout=self.timeout)
            except RangeError as exc:
                if exc.status == 403 and not refresh:
                    log.info("%s: its location answered HTTP 403 (expired); refreshing the file list", where)
                    refresh = True
                    continue
                raise _range_error(exc, where, entry) from exc
            except OSError as exc:
                raise ConnectionError(f"cannot read {where}: {exc}") from exc
            lo = start or 0
            if response.status == 416 and lo < entry.size:
                hi = entry.size if end is None else min(end, entry.size)
                stored = f" (it is {response.total} bytes there)" if response.total is not None else ""
                said = f": {response.message}" if response.message else ""
                raise DataIntegrityError(
                    f"{where}: its location refused bytes {lo}-{hi - 1} (HTTP 416{said}), which lie inside "
                    f"the {entry.size} bytes the catalog published (sha256 {entry.sha256}){stored}: the "
                    f"stored file is shorter than published; {_CHANGED}"
                )
            return response, entry

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Bytes ``[start, end)`` of a file; a whole-file read is verified (size and sha256)."""
        entry, _, _ = self._file(path)
        start, end = _bounds(start, end, entry.size)
        where = f"labelgen://{self._strip_protocol(path)}"
        if start == 0 and end >= entry.size:
            response, entry = self._get(path, None, None)
            _check_whole(response.data, entry, where)
            return response.data
        if start >= end:
            return b""
        return self._read_range(path, start, end)

    def _read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (inside the catalog's size); DataIntegrityError when the
        location reports another size or returns another number of bytes."""
        response, entry = self._get(path, start, end)
        where = f"labelgen://{self._strip_protocol(path)}"
        if response.total is not None and response.total != entry.size:
            raise DataIntegrityError(
                f"{where} is {response.total} bytes at its location, the catalog published "
                f"{entry.size} bytes (sha256 {entry.sha256}): {_CHANGED}"
            )
        expected = min(end, entry.size) - start
        if len(response.data) != expected:
            asked = f"bytes {start}-{start + expected - 1}"
            raise DataIntegrityError(
                f"{where}: its location returned {len(response.data)} bytes for {asked}"
                f" ({expected} bytes, inside the {entry.size} bytes the catalog published, sha256 "
                f"{entry.sha256}): the stored file is not the one published, or the read was cut short; "
                f"{_CHANGED}"
            )
        return response.data

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict | None = None,
        **kwargs: Any,
    ) -> CatalogFile:
        if mode != "rb":
            self._read_only(path, f"open in mode {mode!r}")
        entry, _, _ = self._file(path)
        kwargs.pop("size", None)  # a reopened (unpickled) file passes it: the catalog's is the truth
        return CatalogFile(
            self,
            self._strip_protocol(path),
            mode="rb",
            block_size=block_size or CatalogFile.DEFAULT_BLOCK_SIZE,
            cache_options=cache_options,
            size=entry.size,
            sha256=entry.sha256,
            **kwargs,
        )

    # -- writing: refused

    def _read_only(self, path: Any, what: str) -> None:
        raise PermissionError(
            f"cannot {what} labelgen://{self._strip_protocol(str(path))}: labelgen:// is a read-only "
            "filesystem (a published version never changes); write to a storage URL and publish it with "
            "`labelgen publish URL team/name`"
        )

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._read_only(path, "create a directory")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._read_only(path, "create a directory")

    def rmdir(self, path: str) -> None:
        self._read_only(path, "remove")

    def rm_file(self, path: str) -> None:
        self._read_only(path, "remove")

    def _rm(self, path: str) -> None:
        self._read_only(path, "remove")

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._read_only(path, "remove")

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._read_only(path2, "copy onto")

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self._read_only(path, "write")

    def put_file(
        self, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite", **kwargs: Any
    ) -> None:
        self._read_only(rpath, "upload to")

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        self._read_only(path, "write")


class CatalogFile(AbstractBufferedFile):
    """A file of a published version, read by ranged GETs of its location (read-only)."""

    DEFAULT_BLOCK_SIZE = 4 * 2**20

    def __init__(self, fs: CatalogFileSystem, path: str, sha256: str = "", **kwargs: Any):
        super().__init__(fs, path, **kwargs)
        self.sha256 = sha256

    def _fetch_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if start >= end:
            return b""
        fs: CatalogFileSystem = self.fs
        return fs._read_range(self.path, start, end)

    def _upload_chunk(self, final: bool = False) -> bool:  # never called: mode is "rb"
        raise PermissionError(f"labelgen://{self.path} is read-only")

    def _initiate_upload(self) -> None:
        raise PermissionError(f"labelgen://{self.path} is read-only")


def _bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """fsspec's [start, end) with negatives counted from the end, clamped to the file."""
    lo = 0 if start is None else (max(size + start, 0) if start < 0 else min(start, size))
    hi = size if end is None else (max(size + end, 0) if end < 0 else min(end, size))
    return lo, hi


def _check_whole(data: bytes, entry: _File, where: str) -> None:
    if len(data) != entry.size:
        raise DataIntegrityError(
            f"{where} is {len(data)} bytes at its location, the catalog published {entry.size} bytes "
            f"(expected sha256 {entry.sha256}, actual sha256 {hashlib.sha256(data).hexdigest()}): {_CHANGED}"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise DataIntegrityError(
            f"{where}: expected sha256 {entry.sha256}, actual sha256 {actual}: {_CHANGED}"
        )


def _range_error(exc: RangeError, where: str, entry: _File) -> OSError:
    said = f": {exc.server_message}" if exc.server_message else ""
    if exc.status == 409:
        meaning = said or " (the stored file differs from its version)"
        return DataIntegrityError(
            f"{where}: its location answered HTTP 409{meaning}; "
            f"the catalog published {entry.size} bytes, sha256 {entry.sha256}: {_CHANGED}"
        )
    if exc.status == 410:
        return DataIntegrityError(
            f"{where}: its location answered HTTP 410{said or ' (the file is no longer in storage)'}; "
            f"the catalog published {entry.size} bytes, sha256 {entry.sha256}: the stored file is gone; "
            "ask the dataset's team to publish a new version"
        )
    if exc.status == 404:
        return FileNotFoundError(
            f"{where}: its location answered HTTP 404 (the stored file is gone); ask the dataset's team "
            "to publish a new version"
        )
    if exc.status in (401, 403):
        return PermissionError(
            f"{where}: its location refused the read (HTTP {exc.status}) even after refreshing the file "
            "list; check the service's storage credentials or clock"
        )
    return OSError(f"{where}: its location answered HTTP {exc.status}{said}")


def _carry_over(old: _Listing, new: _Listing, netloc: str) -> _Listing:
    """A refreshed list of the same version: new URLs, the sizes and hashes first published."""
    for rel, entry in old.files.items():
        fresh = new.files.get(rel)
        if fresh is not None and (fresh.size, fresh.sha256) != (entry.size, entry.sha256):
            raise DataIntegrityError(
                f"labelgen://{netloc}/{old.ref}/{rel}: the catalog now lists it as {fresh.size} bytes, "
                f"sha256 {fresh.sha256}; it first listed {entry.size} bytes, sha256 {entry.sha256}: "
                "a published version changed; ask the service's operators"
            )
    return new


# --------------------------------------------------------------------------- lineage


def _catalog_fs(**options: Any) -> CatalogFileSystem:
    return CatalogFileSystem(**options)


def resolve_url(url: str, **options: Any) -> tuple[DatasetRef, int, str]:
    """(``team/name@N``, N, the service address) of a ``labelgen://`` URL, alias refs resolved
    (and pinned) the way a reader of the URL resolves them.

    Raises:
        ValueError: ``url`` is not a ``labelgen://`` URL.
        InvalidName: it does not name a dataset version.
        OSError: the service refused or could not be reached (FileNotFoundError, PermissionError, ...).
    """
    if not isinstance(url, str) or not url.startswith(f"{PROTOCOL}://"):
        raise ValueError(f"{url!r:.200} is not a {PROTOCOL}:// URL ({URL_FORM})")
    fs = _catalog_fs(**options)
    netloc, ref, _, _ = split_path(url)
    listing = fs._listing(netloc, ref)
    version = listing.ref.version
    assert version is not None
    return listing.ref, version, service_for(netloc)


def report_run(url: str, name: str, config: Mapping[str, Any] | None = None, **options: Any) -> int | None:
    """Record on the catalog that run ``name`` trains on ``url`` (lineage); the run id.

    Returns:
        The run's id, or None when nothing was recorded: ``url`` is not a ``labelgen://``
        URL, the service refused or could not be reached (logged as a warning: lineage never
        stops a training run), or its answer had no id. Callers must check for None before
        saying the run was reported (never print "reported run None").
    """
    if not isinstance(url, str) or not url.startswith(f"{PROTOCOL}://"):
        return None
    try:
        ref, _, service = resolve_url(url, **options)
        fs = _catalog_fs(**options)
        netloc = split_path(url)[0]
        plain = json.loads(json.dumps(dict(config or {}), default=str))
        answer = fs._client(netloc).report_run(ref, name, plain)
    except (CatalogError, OSError, FormatError) as exc:
        log.warning("could not record run %r on %s in the labelgen catalog: %s", name, url, exc)
        return None
    run_id = answer.get("id") if isinstance(answer, dict) else None
    if isinstance(run_id, int):
        log.info("recorded run %r (id %d) on %s at %s", name, run_id, ref, service)
        return run_id
    return None


def report_metrics(
    url: str, run_id: int, records: Sequence[Mapping[str, Any]], **options: Any
) -> tuple[Literal["sent", "refused", "unreachable"], str]:
    """Send training metrics (``[{"step": int, NAME: number, ...}]``) to run ``run_id``,
    reported on ``url`` by :func:`report_run`: (what became of them, why).

    Returns:
        ("sent", ""): the service stored them (steps it already had with the same values
        it ignores, so a resend is safe); ("refused", its message): it answered with an
        error (a conflicting step, a malformed record, no access: sending the same records
        again will not help); ("unreachable", the reason): no answer (down, timed out, or a
        proxy's 502/503/504: the same records may be sent later). Nothing is raised or
        logged: the caller decides (lineage never stops a training run).
    """
    try:
        netloc = split_path(url)[0]
        _catalog_fs(**options)._client(netloc).report_metrics(run_id, records)
    except CatalogError as exc:
        return ("unreachable" if exc.status in (None, 502, 503, 504) else "refused"), exc.message
    except (InvalidName, ValueError) as exc:
        return "refused", str(exc)
    return "sent", ""
