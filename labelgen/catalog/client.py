"""The catalog service's HTTP client, the credentials file, and ranged GETs of plain URLs.

:class:`CatalogClient` has one method per endpoint of the service's API (``labelgen
serve``): JSON in and out, ``Authorization: Bearer`` on every call, errors raised as
:class:`CatalogError` with the server's own message. HTTP goes through the standard
library's ``http.client`` over keep-alive connections kept per thread (one per
scheme, host and port), reconnected once when the server dropped an idle one.

Credentials: ``LABELGEN_TOKEN`` overrides; else the per-user file ``labelgen login``
writes, ``$LABELGEN_CONFIG_DIR/credentials.json`` (default ``~/.config/labelgen``), mode
0600: ``{"default": "host:port", "hosts": {"host:port": {"token": "lgt_..."}}}``. A token
never appears in a log line or an exception message.

:func:`http_get_range` reads a byte range of a presigned or service-signed URL (what
``/files`` hands out), over the same per-thread connections.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from labelgen.catalog.names import TOKEN_PREFIX, DatasetRef, check_name, parse_ref

__all__ = [
    "CatalogError",
    "CatalogClient",
    "Service",
    "parse_service",
    "config_dir",
    "credentials_path",
    "save_login",
    "token_for",
    "default_service",
    "service_for",
    "http_get_range",
    "RangeResponse",
    "get_range",
    "RangeError",
    "DATASET_FILTERS",
    "PUBLISH_TIMEOUT_S",
]

log = logging.getLogger(__name__)

CREDENTIALS_NAME = "credentials.json"
DATASET_FILTERS = (
    "team",
    "name",
    "teacher",
    "tokenizer",
    "k",
    "products",
    "min_tokens",
    "max_tokens",
    "min_bytes",
    "max_bytes",
)
"""The query parameters of ``GET /v1/datasets``."""
PUBLISH_TIMEOUT_S = 3600.0
"""The least read timeout of ``publish``: the service reads and hashes every file of the
dataset before it answers, which takes minutes for a large one (the client's own
``timeout``, when larger, is used instead)."""
_DROPPED = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)  # what a reused keep-alive connection raises when the server closed it meanwhile
_TOKEN_LIKE = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{8,}")


class CatalogError(Exception):
    """A refused or failed call to the catalog service.

    Attributes:
        status: the HTTP status (None: the service could not be reached).
        code: the server's short error code ('not_found', 'forbidden', ...; 'unreachable'
            when there was no answer).
        message: the server's message, which names the thing and the fix.
    """

    def __init__(self, status: int | None, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- service address


@dataclass(frozen=True)
class Service:
    """Where the service listens: ``scheme://host[:port]``."""

    scheme: str
    host: str
    port: int | None

    @property
    def netloc(self) -> str:
        """``host[:port]`` (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def key(self) -> str:
        """The credentials file's name for it: ``host:port`` for http, ``https://host:port`` for https."""
        return self.netloc if self.scheme == "http" else f"{self.scheme}://{self.netloc}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_service(service: object) -> Service:
    """``host[:port]`` or ``http(s)://host[:port]`` (a trailing '/' allowed) as a :class:`Service`.

    Raises:
        CatalogError: anything else (a path, a query, another scheme, no host, a bad port).
    """
    fix = "give it as HOST:PORT or https://HOST:PORT (e.g. --service catalog.internal:8470)"
    if not isinstance(service, str) or not service.strip():
        raise CatalogError(None, "invalid_service", f"no labelgen service address given; {fix}")
    text = service.strip().rstrip("/")
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise CatalogError(
            None, "invalid_service", f"service address {service!r:.100} ({exc}); {fix}"
        ) from None
    if parts.scheme not in ("http", "https") or not host or parts.path or parts.query or parts.fragment:
        raise CatalogError(
            None, "invalid_service", f"service address {service!r:.100} is not HOST:PORT; {fix}"
        )
    if parts.username or parts.password:
        raise CatalogError(
            None,
            "invalid_service",
            f"service address for {host} holds credentials; log in with `labelgen login`",
        )
    return Service(parts.scheme, host, port)


# --------------------------------------------------------------------------- credentials


def config_dir() -> Path:
    """``$LABELGEN_CONFIG_DIR``, else ``~/.config/labelgen``."""
    configured = os.environ.get("LABELGEN_CONFIG_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".config" / "labelgen"


def credentials_path() -> Path:
    """The credentials file ``labelgen login`` writes."""
    return config_dir() / CREDENTIALS_NAME


def _read_credentials() -> dict[str, Any]:
    """The credentials file's contents ({} if there is none)."""
    path = credentials_path()
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CatalogError(None, "credentials", f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); run: chmod 600 %s", path, stat.S_IMODE(mode), path)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("hosts", {}), dict):
        raise CatalogError(
            None,
            "credentials",
            f"{path} is not a labelgen credentials file (a JSON object with 'default' and 'hosts'); "
            "remove it and run `labelgen login HOST:PORT` again",
        )
    return data


def save_login(service: str, token: str) -> Path:
    """Store ``token`` for ``service`` and make it the default service; returns the file's path.

    The file is written whole (a temporary file created with mode 0600, then renamed over
    the old one), so it is never readable by others, even for a moment.
    """
    key = parse_service(service).key
    path = credentials_path()
    data = _read_credentials()
    hosts = data.setdefault("hosts", {})
    hosts[key] = {**(hosts.get(key) if isinstance(hosts.get(key), dict) else {}), "token": token}
    data["default"] = key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=path.parent)  # mkstemp: O_EXCL, 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)
    return path


def token_for(service: str) -> str | None:
    """The token for ``service``: ``$LABELGEN_TOKEN``, else the credentials file, else None."""
    env = os.environ.get("LABELGEN_TOKEN")
    if env:
        return env
    hosts = _read_credentials().get("hosts", {})
    parsed = parse_service(service)
    for key in (parsed.key, parsed.netloc, f"https://{parsed.netloc}"):
        entry = hosts.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("token"), str):
            return entry["token"]
    return None


def default_service() -> str | None:
    """``$LABELGEN_SERVICE``, else the credentials file's default (the last login), else None."""
    env = os.environ.get("LABELGEN_SERVICE")
    if env:
        return env
    default = _read_credentials().get("default")
    return default if isinstance(default, str) and default else None


def service_for(netloc: str) -> str:
    """The service address for ``host[:port]`` of a ``labelgen://`` URL: ``https://host:port``
    when the credentials file (or ``$LABELGEN_SERVICE``) knows it only as an https
    service, else ``host:port`` (plain http)."""
    env = os.environ.get("LABELGEN_SERVICE", "")
    if env.rstrip("/") == f"https://{netloc}":
        return env.rstrip("/")
    try:
        hosts = _read_credentials().get("hosts", {})
    except CatalogError:
        return netloc
    return f"https://{netloc}" if f"https://{netloc}" in hosts and netloc not in hosts else netloc


# --------------------------------------------------------------------------- transport


class _Connections(threading.local):
    """This thread's keep-alive connections, by (scheme, host, port)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.open: dict[tuple[str, str, int | None], tuple[http.client.HTTPConnection, list[int]]] = {}


_CONNECTIONS = _Connections()


@dataclass
class _Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _connection(
    scheme: str, host: str, port: int | None, timeout: float
) -> tuple[http.client.HTTPConnection, list[int]]:
    if _CONNECTIONS.pid != os.getpid():  # a forked child never shares its parent's sockets
        _CONNECTIONS.open, _CONNECTIONS.pid = {}, os.getpid()
    key = (scheme, host, port)
    held = _CONNECTIONS.open.get(key)
    if held is None:
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        held = (conn, [0])  # [requests answered on it]
        _CONNECTIONS.open[key] = held
    held[0].timeout = timeout
    return held


def _drop(scheme: str, host: str, port: int | None) -> None:
    held = _CONNECTIONS.open.pop((scheme, host, port), None)
    if held is not None:
        held[0].close()


def _exchange(
    scheme: str,
    host: str,
    port: int | None,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes | None,
    timeout: float,
    read_timeout: float | None = None,
) -> _Answer:
    """One request on this thread's keep-alive connection to (scheme, host, port).

    ``timeout`` bounds connecting, sending and (unless ``read_timeout`` is given) waiting
    for and reading the answer. A reused connection the server closed meanwhile is
    reopened and the request sent once more; any other network failure is raised as the
    OSError it is.
    """
    for attempt in (1, 2):
        conn, served = _connection(scheme, host, port, timeout)
        reused = served[0] > 0
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)  # a kept connection may hold another call's timeout
            conn.request(method, target, body=body, headers=dict(headers))
            if read_timeout is not None and conn.sock is not None:
                conn.sock.settimeout(read_timeout)
            response = conn.getresponse()
            data = response.read()
            if read_timeout is not None and conn.sock is not None:
                conn.sock.settimeout(timeout)
        except _DROPPED:
            _drop(scheme, host, port)
            if reused and attempt == 1:
                log.debug("keep-alive connection to %s dropped; reconnecting", host)
                continue
            raise
        except (OSError, http.client.HTTPException):
            _drop(scheme, host, port)
            raise
        served[0] += 1
        if response.will_close:
            _drop(scheme, host, port)
        return _Answer(response.status, response.headers, data)
    raise AssertionError("unreachable")


def _plain(url: str) -> str:
    """``url`` without its query (signatures) for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass
class RangeResponse:
    """What a ranged GET returned: the bytes, and the file's total size when the server said it.

    A 416 answer (the range lies beyond the stored file) has no bytes; ``message`` is then
    the server's JSON error message, when it gave one.
    """

    data: bytes
    status: int
    total: int | None
    message: str | None = None


class RangeError(OSError):
    """A ranged GET of a plain URL answered an error status (``.status``).

    ``code`` and ``server_message`` are the server's ``{"error": {"code", "message"}}``
    when its answer had one (the labelgen service's byte-range URLs do; S3 does not).
    """

    def __init__(self, status: int, message: str, code: str | None = None, server_message: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.server_message = server_message


def get_range(
    url: str, start: int | None = None, end: int | None = None, timeout: float = 60
) -> RangeResponse:
    """GET bytes ``[start, end)`` of ``url`` (the whole file when both are None).

    Sends ``Range: bytes=start-(end-1)``; a 206 answer is taken as is (its Content-Range
    total kept), a 200 answer (a server that ignores Range) is sliced.

    Raises:
        RangeError: the URL answered an error status (403: expired or refused, 404: absent,
            409: the stored file's size differs from its version, 410: no longer stored).
        OSError: the URL's host could not be reached.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{_plain(url)} is not an http(s) URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Accept-Encoding": "identity"}
    ranged = start is not None or end is not None
    lo = start or 0
    if ranged:
        if end is not None and end <= lo:
            return RangeResponse(b"", 206, None)
        headers["Range"] = f"bytes={lo}-" + ("" if end is None else str(end - 1))
    answer = _exchange(parts.scheme, parts.hostname, parts.port, "GET", target, headers, None, timeout)
    if answer.status == 206:
        return RangeResponse(answer.body, 206, _content_range_total(answer.headers.get("Content-Range")))
    if answer.status == 200:
        data = answer.body
        total = len(data)
        if ranged:
            data = data[lo:end]
        return RangeResponse(data, 200, total)
    code, message = _error_of(_json_or_none(answer.body))
    if answer.status == 416:
        return RangeResponse(b"", 416, _content_range_total(answer.headers.get("Content-Range")), message)
    raise RangeError(
        answer.status,
        f"GET {_plain(url)} answered HTTP {answer.status} {_short(answer.body)}",
        code,
        message,
    )


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else None
    except ValueError:  # UnicodeDecodeError included: S3 answers XML, proxies HTML
        return None


def http_get_range(url: str, start: int, end: int, timeout: float = 60) -> bytes:
    """Bytes ``[start, end)`` of a plain (presigned or service-signed) URL; see :func:`get_range`."""
    return get_range(url, start, end, timeout).data


def _content_range_total(value: str | None) -> int | None:
    """The total of ``bytes a-b/total`` (None when absent or '*')."""
    match = re.fullmatch(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None


def _short(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace").strip()
    return f"({text})" if text else ""


# --------------------------------------------------------------------------- the client


def _segment(kind: str, value: object) -> str:
    """A checked name, quoted as one URL path segment."""
    return quote(check_name(kind, value), safe="")


def _dataset_path(dataset: str | DatasetRef) -> str:
    ref = dataset if isinstance(dataset, DatasetRef) else parse_ref(dataset)
    return f"/v1/datasets/{_segment('team', ref.team)}/{_segment('dataset', ref.name)}"


def _version_path(ref: str | DatasetRef) -> str:
    parsed = ref if isinstance(ref, DatasetRef) else parse_ref(ref)
    return f"{_dataset_path(parsed)}/versions/{quote(parsed.ref, safe='')}"


def _grantee(value: str) -> str:
    return "%2A" if value == "*" else _segment("team", value)


class CatalogClient:
    """The catalog service's API, one method per endpoint.

    Args:
        service: ``host:port`` or ``http(s)://host:port``.
        token: the bearer token (None: :func:`token_for` the service, which may be None:
            then only :meth:`health` works).
        timeout: seconds per request.

    Raises (every method):
        CatalogError: the server refused the call (``status``, ``code``, its message), or
            could not be reached (``status`` None).
        InvalidName: a name or ref argument breaks the catalog's rules (nothing is sent).
    """

    def __init__(self, service: str, token: str | None = None, timeout: float = 30):
        self.service = parse_service(service)
        self._token = token if token is not None else token_for(service)
        self.timeout = timeout

    def __repr__(self) -> str:  # never the token
        return f"CatalogClient({self.service.key!r})"

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    # -- plumbing

    def request(
        self, method: str, path: str, body: Any = None, auth: bool = True, read_timeout: float | None = None
    ) -> Any:
        """Send ``body`` as JSON to ``path``; the decoded JSON answer (None for an empty body).
        ``read_timeout``: seconds to wait for the answer once the request is sent (default:
        the client's ``timeout``, which always bounds connecting and sending)."""
        headers = {"Accept": "application/json", "User-Agent": "labelgen-catalog"}
        if auth and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        s = self.service
        try:
            answer = _exchange(
                s.scheme, s.host, s.port, method, path, headers, payload, self.timeout, read_timeout
            )
        except (OSError, http.client.HTTPException) as exc:
            raise CatalogError(None, "unreachable", self._unreachable(exc)) from None
        return self._decode(method, path, answer)

    def _unreachable(self, exc: BaseException) -> str:
        reason = (
            "timed out" if isinstance(exc, socket.timeout | TimeoutError) else str(exc) or type(exc).__name__
        )
        return (
            f"cannot reach the labelgen service at {self.service.key}: {self._scrub(reason)}; "
            "start it with `labelgen serve` or check --service (or $LABELGEN_SERVICE)"
        )

    def _decode(self, method: str, path: str, answer: _Answer) -> Any:
        try:
            data = json.loads(answer.body) if answer.body.strip() else None
        except ValueError:
            data = None
            if answer.status < 400:
                raise CatalogError(
                    answer.status,
                    "bad_response",
                    f"{method} {path} on {self.service.key} answered HTTP {answer.status} with a body "
                    f"that is not JSON {_short(answer.body)}; is {self.service.key} a labelgen service?",
                ) from None
        if answer.status < 400:
            return data
        code, message = _error_of(data)
        if message is None:
            message = (
                f"{method} {path} on {self.service.key} answered HTTP {answer.status} {_short(answer.body)}"
            )
        if answer.status == 401 and not self._token:
            message += f" (no token for {self.service.key}: run `labelgen login {self.service.key}`)"
        raise CatalogError(answer.status, code or f"http_{answer.status}", self._scrub(message))

    def _scrub(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "<token>")
        return _TOKEN_LIKE.sub(TOKEN_PREFIX + "<redacted>", text)

    # -- endpoints

    def health(self) -> dict[str, Any]:
        """``GET /health`` (no token needed)."""
        return self.request("GET", "/health", auth=False)

    def whoami(self) -> dict[str, Any]:
        """``{"user", "admin", "teams": {team: role}}`` of this token."""
        return self.request("GET", "/v1/whoami")

    def create_team(self, name: str) -> dict[str, Any]:
        """Create team ``name`` (org admins)."""
        return self.request("POST", "/v1/teams", {"name": check_name("team", name)})

    def set_member(self, team: str, user: str, role: str) -> dict[str, Any]:
        """Give ``user`` ``role`` (reader, writer, admin) in ``team`` (team admins; creates the user)."""
        if role not in ("reader", "writer", "admin"):
            raise CatalogError(None, "invalid_role", f"role {role!r:.40} is not one of reader, writer, admin")
        path = f"/v1/teams/{_segment('team', team)}/members/{_segment('user', user)}"
        return self.request("PUT", path, {"role": role})

    def remove_member(self, team: str, user: str) -> Any:
        """Remove ``user`` from ``team`` (team admins)."""
        return self.request("DELETE", f"/v1/teams/{_segment('team', team)}/members/{_segment('user', user)}")

    def create_token(
        self, name: str | None = None, expires_days: int | None = None, user: str | None = None
    ) -> dict[str, Any]:
        """A new token (``{"id", "token", "user", "name", "expires_at"}``; the token is shown only here)."""
        body: dict[str, Any] = {"name": name, "expires_days": expires_days}
        if user is not None:
            body["user"] = check_name("user", user)
        return self.request("POST", "/v1/tokens", body)

    def list_tokens(self) -> list[dict[str, Any]]:
        """The tokens this caller may see (no secrets: id, user, name, prefix, dates)."""
        return (self.request("GET", "/v1/tokens") or {}).get("tokens", [])

    def revoke_token(self, token_id: int) -> Any:
        """Revoke token ``token_id``."""
        return self.request("DELETE", f"/v1/tokens/{int(token_id)}")

    def publish(
        self,
        dataset: str | DatasetRef,
        url: str,
        aliases: Iterable[str] = (),
        job_spec: str | None = None,
    ) -> dict[str, Any]:
        """Verify the dataset at ``url`` and register it as the next version of ``dataset``
        (``team/name``; writers); the new version object.

        The service answers only once it has verified every file, so this call waits up to
        :data:`PUBLISH_TIMEOUT_S` (or the client's ``timeout``, if larger) for the answer."""
        body = {"url": url, "aliases": [check_name("alias", a) for a in aliases], "job_spec": job_spec}
        wait = max(self.timeout, PUBLISH_TIMEOUT_S)
        return self.request("POST", f"{_dataset_path(dataset)}/versions", body, read_timeout=wait)

    def list_datasets(self, **filters: Any) -> list[dict[str, Any]]:
        """Readable datasets matching ``filters`` (see :data:`DATASET_FILTERS`; None values
        are left out, a list of products is joined with ',')."""
        unknown = sorted(set(filters) - set(DATASET_FILTERS))
        if unknown:
            raise TypeError(
                f"list_datasets() got unknown filters {unknown}; known: {', '.join(DATASET_FILTERS)}"
            )
        query = {}
        for key, value in filters.items():
            if value is None:
                continue
            if isinstance(value, list | tuple | set | frozenset):
                value = ",".join(str(v) for v in value)
            query[key] = str(value)
        path = "/v1/datasets" + (f"?{urlencode(query)}" if query else "")
        return (self.request("GET", path) or {}).get("datasets", [])

    def dataset(self, dataset: str | DatasetRef) -> dict[str, Any]:
        """``team/name``'s versions, aliases and shares."""
        return self.request("GET", _dataset_path(dataset))

    def version(self, ref: str | DatasetRef) -> dict[str, Any]:
        """The version object of ``team/name@ref``."""
        return self.request("GET", _version_path(ref))

    def files(self, ref: str | DatasetRef) -> dict[str, Any]:
        """Every file of ``team/name@ref`` with its size, sha256 and a (time-limited) URL."""
        return self.request("GET", f"{_version_path(ref)}/files")

    def set_alias(self, dataset: str | DatasetRef, alias: str, version: int) -> Any:
        """Point ``alias`` of ``dataset`` at ``version`` (writers)."""
        path = f"{_dataset_path(dataset)}/aliases/{_segment('alias', alias)}"
        return self.request("PUT", path, {"version": int(version)})

    def delete_alias(self, dataset: str | DatasetRef, alias: str) -> Any:
        """Remove ``alias`` of ``dataset`` (writers)."""
        return self.request("DELETE", f"{_dataset_path(dataset)}/aliases/{_segment('alias', alias)}")

    def share(self, dataset: str | DatasetRef, grantee: str) -> Any:
        """Let team ``grantee`` (or everyone: '*') read ``dataset`` (team admins)."""
        return self.request("PUT", f"{_dataset_path(dataset)}/shares/{_grantee(grantee)}")

    def unshare(self, dataset: str | DatasetRef, grantee: str) -> Any:
        """Withdraw a share of ``dataset``."""
        return self.request("DELETE", f"{_dataset_path(dataset)}/shares/{_grantee(grantee)}")

    def report_run(
        self, ref: str | DatasetRef, name: str, config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record that run ``name`` trained on ``ref`` (lineage); ``{"id", "ref"}``."""
        parsed = ref if isinstance(ref, DatasetRef) else parse_ref(ref)
        return self.request(
            "POST", "/v1/runs", {"ref": str(parsed), "name": name, "config": dict(config or {})}
        )

    # ---- trust: signing keys, signatures, attestations (docs/TRUST.md, docs/AUDIT.md) ----------
    def register_key(self, team: str, public_key: str, name: str) -> dict[str, Any]:
        """Register an ed25519 public key (64 hex characters) for signing ``team``'s versions
        (writers; the key is the caller's own); the key object (``key_id``, ``owner``, …)."""
        body = {"public_key": public_key, "name": check_name("key name", name)}
        return self.request("POST", f"/v1/teams/{_segment('team', team)}/keys", body)

    def list_keys(self, team: str) -> list[dict[str, Any]]:
        """``team``'s signing keys, revoked ones included (their ``revoked_at`` set)."""
        return (self.request("GET", f"/v1/teams/{_segment('team', team)}/keys") or {}).get("keys", [])

    def revoke_key(self, team: str, key_id: str) -> Any:
        """Revoke a signing key: signatures made with it no longer count (its owner or team admins)."""
        return self.request("DELETE", f"/v1/teams/{_segment('team', team)}/keys/{_segment('key id', key_id)}")

    def sign_version(self, ref: str | DatasetRef, key_id: str, signature: str) -> dict[str, Any]:
        """Attach ``signature`` (128 hex characters: ed25519 over the manifest sha256, see
        :mod:`labelgen.contract.signatures`) made with the caller's key ``key_id`` to ``ref``."""
        body = {"key_id": key_id, "signature": signature}
        return self.request("POST", f"{_version_path(ref)}/signatures", body)

    def attest(self, ref: str | DatasetRef, report: Mapping[str, Any]) -> dict[str, Any]:
        """Post an audit report (``labelgen audit``'s, without its sampled rows) as an
        attestation on ``ref``; the attestation object."""
        return self.request("POST", f"{_version_path(ref)}/attestations", {"report": dict(report)})

    def trust(self, ref: str | DatasetRef) -> dict[str, Any]:
        """What vouches for ``ref``: ``{"ref", "manifest_sha256", "signatures", "attestations",
        "keys", "signed", "audited"}`` as the service sees it (verify the signatures yourself:
        :func:`labelgen.catalog.trust.check_version`)."""
        return self.request("GET", f"{_version_path(ref)}/trust")

    # ---- runs: lineage and training metrics ----------------------------------------------------
    def run(self, run_id: int) -> dict[str, Any]:
        """Run ``run_id``: its version, user, config and metrics (``{"metrics": [{"step", …}]}``)."""
        return self.request("GET", f"/v1/runs/{int(run_id)}")

    def report_metrics(self, run_id: int, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Append training metrics to run ``run_id``: records of ``{"step": int, NAME: number, …}``
        (a step sent again with the same values is ignored); ``{"stored": N}``."""
        return self.request(
            "POST", f"/v1/runs/{int(run_id)}/metrics", {"records": [dict(r) for r in records]}
        )

    # ---- jobs: labeling and generation jobs run by the service ---------------------------------
    def submit_job(self, dataset: str | DatasetRef, spec: str, aliases: Iterable[str] = ()) -> dict[str, Any]:
        """Submit job spec ``spec`` (YAML text, overrides applied) to the service's cluster;
        once its manifest lands it is published as the next version of ``dataset`` (writers of
        its team); the job object (``id``, ``state``, …)."""
        parsed = dataset if isinstance(dataset, DatasetRef) else parse_ref(dataset)
        body = {
            "dataset": f"{parsed.team}/{parsed.name}",
            "spec": spec,
            "aliases": [check_name("alias", a) for a in aliases],
        }
        return self.request("POST", "/v1/jobs", body)

    def list_jobs(self, team: str | None = None) -> list[dict[str, Any]]:
        """Jobs of the teams the caller belongs to (or of ``team``), newest first."""
        query = f"?{urlencode({'team': check_name('team', team)})}" if team is not None else ""
        return (self.request("GET", f"/v1/jobs{query}") or {}).get("jobs", [])

    def job(self, job_id: int) -> dict[str, Any]:
        """Job ``job_id``: state, progress, error and the version it published."""
        return self.request("GET", f"/v1/jobs/{int(job_id)}")

    def audit(
        self, team: str | None = None, action: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Audit events (org admins: all; team admins: their teams'), newest first."""
        query: dict[str, str] = {"limit": str(int(limit))}
        if team is not None:
            query["team"] = check_name("team", team)
        if action is not None:
            query["action"] = action
        return (self.request("GET", f"/v1/audit?{urlencode(query)}") or {}).get("events", [])


def _error_of(data: Any) -> tuple[str | None, str | None]:
    """(code, message) of an error body: ``{"error": {"code", "message"}}`` or FastAPI's ``{"detail"}``."""
    if not isinstance(data, dict):
        return None, None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        return (code if isinstance(code, str) else None), error["message"]
    detail = data.get("detail")
    if isinstance(detail, str):
        return None, detail
    if isinstance(detail, list):
        parts = []
        for item in detail[:5]:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []))
                parts.append(f"{where}: {item.get('msg', item)}")
        return "invalid_request", "; ".join(parts) or None
    return None, None
