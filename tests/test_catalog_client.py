"""The catalog's client side without a server: names and refs, credentials, the HTTP client,
and the ``labelgen://`` filesystem against a tiny stdlib HTTP server on loopback.

The fake server speaks just enough of the service's API (/v1/whoami, /v1/datasets,
/v1/audit, publishing, the ``/files`` answer and ranged blob GETs, which it can make answer
409, 410, 416 or short bodies) to test the client; the real service has its own tests.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import re
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelgen.catalog import client as client_mod
from labelgen.catalog import commands
from labelgen.catalog import fs as fs_mod
from labelgen.catalog.client import (
    CatalogClient,
    CatalogError,
    default_service,
    get_range,
    http_get_range,
    parse_service,
    save_login,
    token_for,
)
from labelgen.catalog.fs import CatalogFileSystem, DataIntegrityError, register, resolve_url, split_path
from labelgen.catalog.fs import report_run as fs_report_run
from labelgen.catalog.names import DatasetRef, InvalidName, check_name, parse_ref
from labelgen.contract.errors import ChecksumError

TOKEN = "lgt_" + "A" * 43


# --------------------------------------------------------------------------- names and refs


@pytest.mark.parametrize("name", ["nlp", "a", "web-2024.v1_x", "0abc", "x" * 64])
def test_good_names(name):
    assert check_name("team", name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("Nlp", "'N'"),
        ("-x", "starts with '-'"),
        ("a..b", "'..'"),
        ("x" * 65, "65 characters"),
        ("a/b", "'/'"),
        ("a b", "' '"),
        (3, "int, not a string"),
    ],
)
def test_bad_names_name_the_kind_value_and_rule(name, problem):
    with pytest.raises(InvalidName) as info:
        check_name("dataset", name)
    message = str(info.value)
    assert message.startswith("dataset name ")
    assert problem in message
    assert "lowercase letters, digits" in message


def test_alias_may_not_be_all_digits():
    assert check_name("team", "123") == "123"
    with pytest.raises(InvalidName, match="all digits.*version 12"):
        check_name("alias", "12")


@pytest.mark.parametrize(
    ("text", "ref", "version"),
    [
        ("nlp/web", DatasetRef("nlp", "web", "latest"), None),
        ("nlp/web@3", DatasetRef("nlp", "web", "3"), 3),
        ("nlp/web@stable", DatasetRef("nlp", "web", "stable"), None),
    ],
)
def test_parse_ref(text, ref, version):
    parsed = parse_ref(text)
    assert parsed == ref
    assert parsed.version == version
    assert str(parsed) == f"{ref.team}/{ref.name}@{ref.ref}"
    assert parse_ref(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("/data/labels", "path"),
        ("s3://bucket/x", "URL"),
        ("file:labels", "URL"),
        ("nlp/../web", "'..'"),
        ("nlp/web@" + "a" * 200, "more than 200"),
        ("nlp", "not team/name"),
        ("nlp/web/x", "not team/name"),
        ("nlp/web@", "nothing follows"),
        ("nlp/web@1@2", "more than one '@'"),
        ("nlp/web@01", "leading zeros"),
        ("nlp/web@0", "leading zeros"),
        ("nlp/Web", "dataset name"),
        ("nlp/web@Stable", "alias name"),
        ("", "empty"),
        ("nlp/ web", "whitespace"),
    ],
)
def test_parse_ref_refuses(text, problem):
    with pytest.raises(InvalidName) as info:
        parse_ref(text)
    assert problem in str(info.value)
    assert "team/name@3" in str(info.value)


# --------------------------------------------------------------------------- credentials


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELGEN_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("LABELGEN_TOKEN", raising=False)
    monkeypatch.delenv("LABELGEN_SERVICE", raising=False)
    return tmp_path / "cfg"


def test_credentials_file_is_0600_and_env_overrides(config, monkeypatch):
    assert token_for("cat:8470") is None and default_service() is None
    path = save_login("cat:8470", TOKEN)
    assert path == config / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"default": "cat:8470", "hosts": {"cat:8470": {"token": TOKEN}}}
    assert token_for("cat:8470") == TOKEN
    assert token_for("http://cat:8470/") == TOKEN
    assert token_for("other:1") is None
    assert default_service() == "cat:8470"

    path.chmod(0o644)  # an existing file with loose permissions is fixed on the next login
    save_login("https://secure:443", "lgt_second")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["default"] == "https://secure:443"
    assert set(data["hosts"]) == {"cat:8470", "https://secure:443"}
    assert token_for("https://secure:443") == "lgt_second"
    assert client_mod.service_for("secure:443") == "https://secure:443"
    assert client_mod.service_for("cat:8470") == "cat:8470"

    monkeypatch.setenv("LABELGEN_TOKEN", "lgt_from_env")
    monkeypatch.setenv("LABELGEN_SERVICE", "env:1")
    assert token_for("cat:8470") == "lgt_from_env"
    assert default_service() == "env:1"


def test_corrupt_credentials_file_names_the_fix(config):
    config.mkdir()
    (config / "credentials.json").write_text("[1, 2]")
    with pytest.raises(
        CatalogError, match="credentials.json is not a labelgen credentials file.*labelgen login"
    ):
        token_for("cat:8470")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("cat:8470", "cat:8470"),
        ("http://cat:8470/", "cat:8470"),
        ("https://cat", "https://cat"),
        ("[::1]:9", "[::1]:9"),
    ],
)
def test_parse_service(text, key):
    assert parse_service(text).key == key


@pytest.mark.parametrize("text", ["", "ftp://x:1", "cat:8470/v1", "cat:port", "https://u:p@cat:1"])
def test_parse_service_refuses(text):
    with pytest.raises(CatalogError) as info:
        parse_service(text)
    assert info.value.code == "invalid_service"


# --------------------------------------------------------------------------- a fake service


def _parquet_bytes() -> bytes:
    table = pa.table({"id": list(range(100)), "text": [f"row {i}" for i in range(100)]})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=25)
    return sink.getvalue()


class FakeCatalog:
    """State of the fake service: one dataset nlp/web, versions 1 and 2, alias stable -> 2."""

    def __init__(self) -> None:
        self.files = {
            "manifest.json": b'{"format": "labelgen"}',
            "shards/part-00000-00000.parquet": _parquet_bytes(),
            "shards/part-00000-00001.parquet": bytes(range(256)) * 40,
            "_commits/job.json": b"{}",
        }
        self.published_sha: dict[str, str] = {}  # rel -> sha256 the catalog claims (default: the real one)
        self.reported_total: int | None = None  # Content-Range total the store claims
        self.generation = 1  # the signature in blob URLs; older ones answer 403
        self.file_calls: list[str] = []  # refs asked for /files
        self.blob_requests = 0
        self.drop_connections = False  # close after each response without saying so
        self.versions = {"1": 1, "2": 2, "latest": 2, "stable": 2}
        self.port = 0
        self.expires_at = 4e9  # the /files answer's expires_at (unix seconds)
        self.expires_in: float | None = None  # its expires_in (seconds), when set
        self.on_files: Any = None  # called while answering /files (e.g. to move a fake clock)
        self.stored: dict[str, bytes] = {}  # rel -> what storage now holds (default: what was published)
        self.blob_answer: tuple[int, bytes, str] | None = None  # every blob GET: (status, body, type)
        self.short_by = 0  # ranged answers leave out this many bytes (Content-Range still claims them)
        self.dataset_queries: list[dict[str, str]] = []
        self.events: list[dict[str, Any]] = []  # what /v1/audit answers
        self.publish_delay = 0.0  # seconds the fake takes to "verify" a publish

    def listing(self, version: int) -> dict[str, Any]:
        base = f"http://127.0.0.1:{self.port}"
        return {
            "ref": f"nlp/web@{version}",
            "version": version,
            "manifest_sha256": hashlib.sha256(self.files["manifest.json"]).hexdigest(),
            "expires_at": self.expires_at,
            **({} if self.expires_in is None else {"expires_in": self.expires_in}),
            "files": [
                {
                    "path": rel,
                    "size": len(data),
                    "sha256": self.published_sha.get(rel, hashlib.sha256(data).hexdigest()),
                    "url": f"{base}/blob/{version}/{rel}?exp=1&sig={self.generation}",
                }
                for rel, data in self.files.items()
            ],
        }


def _handler(state: FakeCatalog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                self.close_connection = True
                return
            if state.drop_connections:
                self.close_connection = True

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode())

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(status, {"error": {"code": code, "message": message}})

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            if parts.path.startswith("/blob/"):
                return self._blob(parts.path[len("/blob/") :], parse_qs(parts.query))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._error(401, "unauthorized", "no valid token; run `labelgen login HOST`")
            if parts.path == "/v1/whoami":
                return self._json(200, {"user": "alice", "admin": False, "teams": {"nlp": "writer"}})
            if parts.path == "/v1/datasets":
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                state.dataset_queries.append(query)
                return self._json(200, {"datasets": [], "query": query})
            if parts.path == "/v1/audit":
                return self._json(200, {"events": state.events})
            match = re.fullmatch(r"/v1/datasets/nlp/(\w+)/versions/(\w+)/files", parts.path)
            if match and match.group(1) == "web" and match.group(2) in state.versions:
                state.file_calls.append(match.group(2))
                if state.on_files is not None:
                    state.on_files()
                return self._json(200, state.listing(state.versions[match.group(2)]))
            self._error(
                404,
                "not_found",
                f"no dataset version at {parts.path}; list them with `labelgen datasets list`",
            )

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                if self.path == "/v1/runs":
                    return self._json(201, {"id": 7, "ref": body["ref"], "config": body["config"]})
                if self.path == "/v1/datasets/nlp/web/versions":
                    time.sleep(state.publish_delay)
                    return self._json(201, {"ref": "nlp/web@3", "url": body["url"]})
            self._error(403, "forbidden", f"token {TOKEN} may not do that")  # a careless server

        def _blob(self, rest: str, query: dict[str, list[str]]) -> None:
            state.blob_requests += 1
            if query.get("sig") != [str(state.generation)]:
                return self._send(403, b"<Error>expired</Error>", {"Content-Type": "application/xml"})
            if state.blob_answer is not None:
                status, body, kind = state.blob_answer
                return self._send(status, body, {"Content-Type": kind})
            _, _, rel = rest.partition("/")
            data = state.stored.get(rel, state.files.get(rel))
            if data is None:
                return self._send(404, b"")
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if not ranged:
                return self._send(200, data, {"Content-Type": "application/octet-stream"})
            start = int(ranged.group(1))
            if start >= len(data):  # as S3 answers a range past the end of the object
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            end = min(int(ranged.group(2)) + 1 if ranged.group(2) else len(data), len(data))
            total = state.reported_total if state.reported_total is not None else len(data)
            body = data[start : end - state.short_by]
            self._send(206, body, {"Content-Range": f"bytes {start}-{end - 1}/{total}"})

    return Handler


@pytest.fixture
def catalog(config, monkeypatch) -> Iterator[FakeCatalog]:
    state = FakeCatalog()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("LABELGEN_TOKEN", TOKEN)
    register()
    CatalogFileSystem.clear_instance_cache()
    fs_mod._SHARED.__init__()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        CatalogFileSystem.clear_instance_cache()


def _url(state: FakeCatalog, ref: str = "2", rel: str = "") -> str:
    return f"labelgen://127.0.0.1:{state.port}/nlp/web@{ref}" + (f"/{rel}" if rel else "")


# --------------------------------------------------------------------------- the client


def test_client_calls_and_errors(catalog):
    client = CatalogClient(f"127.0.0.1:{catalog.port}")
    assert client.whoami()["user"] == "alice"
    assert TOKEN not in repr(client)
    client.list_datasets(team="nlp", k=8, products=["draws", "hidden"], max_tokens=None)
    with pytest.raises(TypeError, match="unknown filters"):
        client.list_datasets(colour="red")
    with pytest.raises(CatalogError) as info:
        client.version("nlp/missing@1")
    assert (info.value.status, info.value.code) == (404, "not_found")
    assert "labelgen datasets list" in info.value.message
    with pytest.raises(CatalogError) as info:
        client.create_team("vision")  # the fake echoes the token in its message
    assert info.value.status == 403 and TOKEN not in str(info.value)
    with pytest.raises(InvalidName):
        client.files("nlp/../x")
    anonymous = CatalogClient(f"127.0.0.1:{catalog.port}", token="")
    with pytest.raises(CatalogError, match="labelgen login") as info:
        anonymous.whoami()
    assert info.value.status == 401


def test_client_reconnects_a_dropped_keep_alive_connection(catalog):
    client = CatalogClient(f"127.0.0.1:{catalog.port}")
    client.whoami()
    catalog.drop_connections = True
    for _ in range(3):  # each call finds the previous connection closed by the server
        assert client.whoami()["user"] == "alice"


def test_unreachable_service_says_how_to_fix(config):
    client = CatalogClient("127.0.0.1:1", token=TOKEN, timeout=5)
    with pytest.raises(CatalogError) as info:
        client.whoami()
    assert info.value.status is None and info.value.code == "unreachable"
    assert "cannot reach the labelgen service at 127.0.0.1:1" in info.value.message
    assert "labelgen serve" in info.value.message and "--service" in info.value.message
    assert TOKEN not in info.value.message


def test_http_get_range(catalog):
    url = catalog.listing(2)["files"][2]["url"]
    data = catalog.files["shards/part-00000-00001.parquet"]
    assert http_get_range(url, 10, 20) == data[10:20]
    whole = get_range(url)
    assert whole.status == 200 and whole.data == data and whole.total == len(data)
    ranged = get_range(url, 5, 9)
    assert ranged.status == 206 and ranged.total == len(data)


# --------------------------------------------------------------------------- the filesystem


def test_strip_protocol_and_split_path():
    assert CatalogFileSystem._strip_protocol("labelgen://h:1/nlp/web@2/shards/") == "h:1/nlp/web@2/shards"
    assert CatalogFileSystem._strip_protocol("h:1/nlp/web@2") == "h:1/nlp/web@2"
    netloc, ref, rel, root = split_path("labelgen://h:1/nlp/web@stable/shards/a.parquet")
    assert (netloc, ref, rel, root) == (
        "h:1",
        DatasetRef("nlp", "web", "stable"),
        "shards/a.parquet",
        "h:1/nlp/web@stable",
    )
    assert split_path("labelgen://h/nlp/web")[1] == DatasetRef("nlp", "web", "latest")
    for bad in ("labelgen://h:1/nlp", "labelgen://h:1/nlp/Web@2", "labelgen://h:x/nlp/web"):
        with pytest.raises(InvalidName, match=re.escape(bad)):
            split_path(bad)


def test_ls_info_cat_and_open(catalog):
    fs, root = fsspec.core.url_to_fs(_url(catalog))
    assert isinstance(fs, CatalogFileSystem) and root == f"127.0.0.1:{catalog.port}/nlp/web@2"
    assert fs.ls(root, detail=False) == [f"{root}/_commits", f"{root}/manifest.json", f"{root}/shards"]
    shards = fs.ls(f"{root}/shards")
    assert [s["type"] for s in shards] == ["file", "file"]
    data = catalog.files["shards/part-00000-00001.parquet"]
    path = f"{root}/shards/part-00000-00001.parquet"
    assert fs.info(path) == {
        "name": path,
        "size": len(data),
        "type": "file",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert fs.info(f"{root}/shards")["type"] == "directory" and fs.isdir(root)
    assert fs.exists(path) and not fs.exists(f"{root}/nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fs.info(f"{root}/nope.json")
    assert fs.find(root, prefix="manifest") == [f"{root}/manifest.json"]
    assert fs.find(f"{root}/shards", prefix="part-00000-0000") == [
        f"{root}/shards/part-00000-0000{i}.parquet" for i in (0, 1)
    ]
    assert fs.cat_file(path) == data
    assert fs.cat_file(path, 100, 200) == data[100:200]
    assert fs.cat_file(path, -10) == data[-10:]
    with fs.open(path, "rb", block_size=1000) as f:
        f.seek(5000)
        assert f.read(3000) == data[5000:8000]
        f.seek(-4, os.SEEK_END)
        assert f.read() == data[-4:]
    with pytest.raises(PermissionError, match="read-only filesystem"):
        fs.open(f"{root}/new.txt", "wb")
    with pytest.raises(PermissionError, match="read-only"):
        fs.rm(path)
    with pytest.raises(IsADirectoryError):
        fs.open(f"{root}/shards", "rb")
    assert catalog.file_calls == ["2"]  # one /files call for everything above


def test_sha_mismatch_names_the_path(catalog):
    rel = "shards/part-00000-00001.parquet"
    catalog.published_sha[rel] = "0" * 64
    url = _url(catalog, rel=rel)
    fs, path = fsspec.core.url_to_fs(url)
    with pytest.raises(DataIntegrityError) as info:
        fs.cat_file(path)
    message = str(info.value)
    assert url in message and "0" * 64 in message
    assert hashlib.sha256(catalog.files[rel]).hexdigest() in message
    assert "changed after it was published" in message and "publish a new version" in message


def test_served_size_differing_from_the_catalog_is_refused(catalog):
    catalog.reported_total = 999
    fs, path = fsspec.core.url_to_fs(_url(catalog, rel="shards/part-00000-00001.parquet"))
    with pytest.raises(DataIntegrityError, match="999 bytes at its location"):
        fs.cat_file(path, 0, 10)


SHARD = "shards/part-00000-00001.parquet"  # 10240 bytes


def _service_error(status: int, code: str, message: str) -> tuple[int, bytes, str]:
    return status, json.dumps({"error": {"code": code, "message": message}}).encode(), "application/json"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            _service_error(409, "changed", f"{SHARD} is 9 bytes in storage, its version says 10240"),
            f"HTTP 409: {SHARD} is 9 bytes in storage, its version says 10240",
        ),
        (
            _service_error(410, "gone", f"{SHARD} of this version is no longer in storage (No such file)"),
            f"HTTP 410: {SHARD} of this version is no longer in storage",
        ),
        ((410, b"<Error><Code>Gone</Code></Error>", "application/xml"), "no longer in storage"),  # not JSON
        ((409, b"", "application/json"), "HTTP 409 (the stored file differs from its version)"),
    ],
)
@pytest.mark.parametrize("whole", [True, False])
def test_location_answering_changed_or_gone_is_a_data_integrity_error(catalog, answer, expected, whole):
    url = _url(catalog, rel=SHARD)
    fs, path = fsspec.core.url_to_fs(url)
    fs.info(path)
    catalog.blob_answer = answer
    with pytest.raises(DataIntegrityError) as info:
        if whole:
            fs.cat_file(path)
        else:
            with fs.open(path, "rb", block_size=1000) as f:
                f.seek(5000)
                f.read(100)
    assert isinstance(info.value, ChecksumError)
    message = str(info.value)
    assert url in message and expected in message and "publish a new version" in message
    assert catalog.file_calls == ["2"]  # not taken for an expired URL: the file list is not refetched


def test_stored_file_shorter_than_published_is_a_data_integrity_error(catalog):
    data = catalog.files[SHARD]
    url = _url(catalog, rel=SHARD)
    fs, path = fsspec.core.url_to_fs(url)
    catalog.stored[SHARD] = data[:4000]
    with pytest.raises(
        DataIntegrityError, match=r"refused bytes 5000-5099 \(HTTP 416\).*10240 bytes"
    ) as info:
        fs.cat_file(path, 5000, 5100)  # inside the catalog's size, past the stored end: S3 answers 416
    assert url in str(info.value) and "it is 4000 bytes there" in str(info.value)
    with pytest.raises(DataIntegrityError, match="4000 bytes at its location"):
        fs.cat_file(path, 0, 100)  # the store's Content-Range total gives it away
    with pytest.raises(DataIntegrityError, match="4000 bytes at its location"):
        fs.cat_file(path)
    assert fs.cat_file(path, 20000, 20100) == b""  # past the catalog's size: nothing to read, nothing asked
    message = f"Range 'bytes=5000-5099' is outside the file's {len(data)} bytes"
    catalog.blob_answer = _service_error(416, "bad_range", message)
    with (
        pytest.raises(DataIntegrityError, match=re.escape(f"(HTTP 416: {message})")),
        fs.open(path, "rb", block_size=100) as f,
    ):
        f.seek(5000)
        f.read(100)


def test_short_ranged_read_is_a_data_integrity_error(catalog):
    data = catalog.files[SHARD]
    url = _url(catalog, rel=SHARD)
    fs, path = fsspec.core.url_to_fs(url)
    catalog.short_by = 10  # the answer claims bytes 100-199 of 10240 but sends 90 of them
    with pytest.raises(DataIntegrityError, match=r"returned 90 bytes for bytes 100-199 \(100 bytes") as info:
        fs.cat_file(path, 100, 200)
    assert url in str(info.value)
    with (
        pytest.raises(DataIntegrityError, match=r"returned \d+ bytes for bytes 0-\d+ \(\d+ bytes") as info,
        fs.open(path, "rb", block_size=1000) as f,
    ):
        f.read(10)  # a block (and fsspec's read-ahead), 10 bytes short
    got, asked = map(int, re.search(r"returned (\d+) bytes .* \((\d+) bytes", str(info.value)).groups())
    assert asked - got == 10
    catalog.short_by = 0
    assert fs.cat_file(path, 10200, 10300) == data[10200:]  # clipped at the catalog's size: not short


class _Clock:
    """A stand-in for fs's monotonic and wall clocks."""

    def __init__(self) -> None:
        self.mono, self.wall = 1000.0, 1.7e9

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(fs_mod, "_monotonic", lambda: c.mono)
    monkeypatch.setattr(fs_mod, "_wall", lambda: c.wall)
    return c


def _reads_after(catalog: FakeCatalog, clock: _Clock, fs: Any, path: str, seconds: float) -> int:
    """How many /files calls a read makes ``seconds`` after the last one."""
    calls = len(catalog.file_calls)
    clock.advance(seconds)
    fs.cat_file(path, 0, 4)
    return len(catalog.file_calls) - calls


@pytest.mark.parametrize(
    ("expires_in", "fresh_for"),
    [(100, 75), (3600, 3540), (8, 6)],  # refreshed min(60 s, ttl/4) before the URLs expire
)
def test_file_list_is_refreshed_by_expires_in_on_the_monotonic_clock(catalog, clock, expires_in, fresh_for):
    catalog.expires_in = expires_in  # expires_at (4e9) says much later: expires_in wins
    fs, path = fsspec.core.url_to_fs(_url(catalog, rel=SHARD))
    fs.info(path)
    assert _reads_after(catalog, clock, fs, path, fresh_for - 1) == 0
    assert _reads_after(catalog, clock, fs, path, 2) == 1
    clock.wall -= 1e6  # the wall clock jumps: no matter
    assert _reads_after(catalog, clock, fs, path, fresh_for - 1) == 0
    assert _reads_after(catalog, clock, fs, path, 2) == 1


def test_expires_in_counts_from_when_the_request_was_sent(catalog, clock):
    catalog.expires_in = 100
    catalog.on_files = lambda: clock.advance(50)  # the answer takes 50 s to come
    fs, path = fsspec.core.url_to_fs(_url(catalog, rel=SHARD))
    fs.info(path)  # sent at t, answered at t+50; stale from t+75
    assert _reads_after(catalog, clock, fs, path, 24) == 0
    assert _reads_after(catalog, clock, fs, path, 2) == 1


def test_file_list_falls_back_to_expires_at(catalog, clock, caplog):
    catalog.expires_at = clock.wall + 100
    fs, path = fsspec.core.url_to_fs(_url(catalog, rel=SHARD))
    fs.info(path)
    assert _reads_after(catalog, clock, fs, path, 74) == 0
    catalog.expires_at = clock.wall + 100 + 1
    assert _reads_after(catalog, clock, fs, path, 2) == 1
    catalog.expires_at = clock.wall - 5  # this machine's clock is ahead of the service's: rely on 403s
    fs_mod._SHARED.__init__()
    assert _reads_after(catalog, clock, fs, path, 0) == 1
    assert "check this machine's clock" in caplog.text
    assert _reads_after(catalog, clock, fs, path, 1e6) == 0


def test_expired_location_is_refreshed_once(catalog):
    rel = "shards/part-00000-00001.parquet"
    fs, path = fsspec.core.url_to_fs(_url(catalog, rel=rel))
    assert fs.cat_file(path, 0, 4) == catalog.files[rel][:4]
    catalog.generation = 2  # every URL handed out so far now answers 403
    assert fs.cat_file(path, 4, 8) == catalog.files[rel][4:8]
    assert catalog.file_calls == ["2", "2"]
    catalog.generation = 3
    catalog.versions["2"] = 2
    requests = catalog.blob_requests
    assert fs.cat_file(path) == catalog.files[rel]
    assert catalog.blob_requests == requests + 2 and len(catalog.file_calls) == 3


def test_alias_is_pinned_and_travels_with_the_pickled_fs(catalog, caplog):
    caplog.set_level("INFO", logger="labelgen.catalog.fs")
    fs, root = fsspec.core.url_to_fs(_url(catalog, "stable"))
    assert fs.cat_file(f"{root}/manifest.json") == catalog.files["manifest.json"]
    assert "nlp/web@stable is version 2" in caplog.text
    catalog.versions["stable"] = 1  # the alias moves: this process keeps reading version 2
    catalog.generation = 2
    fs.cat_file(f"{root}/manifest.json")
    assert catalog.file_calls == ["stable", "2"]
    ref, version, service = resolve_url(_url(catalog, "stable"))
    assert (str(ref), version, service) == ("nlp/web@2", 2, f"127.0.0.1:{catalog.port}")
    other_thread: list[bytes] = []  # fsspec makes one instance per thread: the pin is per process
    reader = threading.Thread(
        target=lambda: other_thread.append(
            fsspec.open(_url(catalog, "stable", "manifest.json")).open().read()
        )
    )
    reader.start()
    reader.join()
    assert other_thread == [catalog.files["manifest.json"]] and catalog.file_calls == ["stable", "2"]
    blob = pickle.dumps(fs)
    CatalogFileSystem.clear_instance_cache()
    fs_mod._SHARED.__init__()  # as in a fresh (spawned) process
    worker = pickle.loads(blob)
    assert worker is not fs
    worker.cat_file(f"{root}/manifest.json")
    assert catalog.file_calls[-1] == "2"


def test_pyarrow_reads_parquet_through_the_url(catalog):
    url = _url(catalog, rel="shards/part-00000-00000.parquet")
    with fsspec.open(url, "rb") as f:
        table = pq.read_table(f)
    assert table.column("id").to_pylist() == list(range(100))
    with fsspec.open(url, "rb") as f:
        parquet = pq.ParquetFile(f)
        assert parquet.num_row_groups == 4
        assert parquet.read_row_group(2).column("text").to_pylist()[0] == "row 50"


def test_missing_version_is_file_not_found(catalog):
    fs = CatalogFileSystem()
    with pytest.raises(FileNotFoundError, match="labelgen datasets list"):
        fs.info(f"127.0.0.1:{catalog.port}/nlp/web@9/manifest.json")


def test_report_run(catalog):
    assert fs_report_run(_url(catalog, "stable"), "student-kd", {"lr": 1e-3, "path": object()}) == 7
    assert fs_report_run("/local/labels", "student-kd", {}) is None
    assert fs_report_run(_url(catalog, "2"), "student-kd", {}, token="lgt_wrong") is None  # refused: 401


def test_publish_waits_for_the_verification(catalog):
    catalog.publish_delay = 1.0
    client = CatalogClient(f"127.0.0.1:{catalog.port}", timeout=0.3)
    assert client.publish("nlp/web", "s3://labels/web")["ref"] == "nlp/web@3"
    assert client.whoami()["user"] == "alice"  # the kept connection is back on the short timeout
    assert client_mod.PUBLISH_TIMEOUT_S >= 3600
    with pytest.raises(CatalogError, match="timed out"):
        client.request("POST", "/v1/datasets/nlp/web/versions", {"url": "s3://labels/web"})


# --------------------------------------------------------------------------- the CLI verbs


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="labelgen")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.add_commands(sub)
    return parser.parse_args(argv)


def test_login_stores_the_checked_token(catalog, monkeypatch, capsys):
    monkeypatch.delenv("LABELGEN_TOKEN")
    args = _parse(["login", f"127.0.0.1:{catalog.port}", "--token", TOKEN])
    assert commands.run(args) == 0
    out = capsys.readouterr().out
    assert "as alice" in out and "nlp (writer)" in out and TOKEN not in out
    assert token_for(f"127.0.0.1:{catalog.port}") == TOKEN
    assert default_service() == f"127.0.0.1:{catalog.port}"
    with pytest.raises(CatalogError) as info:
        commands.run(_parse(["login", f"127.0.0.1:{catalog.port}", "--token", "lgt_wrong"]))
    assert info.value.status == 401
    assert issubclass(CatalogError, commands.USER_ERRORS) and issubclass(InvalidName, commands.USER_ERRORS)


def test_verbs_parse_and_refuse_bad_names(catalog, capsys):
    args = _parse(["datasets", "list", "--service", f"127.0.0.1:{catalog.port}", "--k", "8", "--json"])
    assert commands.run(args) == 0 and json.loads(capsys.readouterr().out) == []
    with pytest.raises(InvalidName, match="publish takes team/name"):
        commands.run(_parse(["publish", "/tmp/x", "nlp/web@2", "--service", "h:1"]))
    with pytest.raises(InvalidName, match="alias name"):
        commands.run(_parse(["alias", "set", "nlp/web", "7", "1", "--service", "h:1"]))
    for argv in (
        ["token", "revoke", "3"],
        ["teams", "add-member", "nlp", "bob", "--role", "reader"],
        ["audit-log"],
    ):
        assert _parse(argv).catalog_handler is not None
    assert set(commands.COMMANDS) >= {"login", "publish", "datasets", "share", "unshare"}


def test_dataset_filters_and_audit_listing(catalog, capsys):
    assert "q" not in client_mod.DATASET_FILTERS
    assert {"min_bytes", "max_bytes"} <= set(client_mod.DATASET_FILTERS)
    service = f"127.0.0.1:{catalog.port}"
    with pytest.raises(TypeError, match="unknown filters"):
        CatalogClient(service).list_datasets(q="web")
    argv = ["datasets", "list", "--service", service, "--min-bytes", "10", "--max-bytes", "2000", "--json"]
    assert commands.run(_parse(argv)) == 0
    assert catalog.dataset_queries[-1] == {"min_bytes": "10", "max_bytes": "2000"}
    with pytest.raises(SystemExit):
        _parse(["datasets", "list", "--q", "web"])
    catalog.events = [
        {
            "id": 3,
            "at": "2025-01-01T00:00:00",
            "actor": "alice",
            "action": "alias.move",
            "target": "nlp/web",
            "team": "nlp",
            "outcome": "ok",
            "status": 200,
            "detail": {"alias": "stable"},
        }
    ]
    capsys.readouterr()
    assert commands.run(_parse(["audit-log", "--service", service])) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["AT", "USER", "ACTION"]
    assert row.split()[:6] == ["2025-01-01T00:00:00", "alice", "alias.move", "nlp", "nlp/web", "ok"]
    with pytest.raises(SystemExit):
        _parse(["audit-log", "--help"])
    assert "alias.move" in capsys.readouterr().out


def test_open_file_pickles(catalog):
    rel = "shards/part-00000-00001.parquet"
    with fsspec.open(_url(catalog, rel=rel), "rb") as f:
        f.seek(100)
        copy = pickle.loads(pickle.dumps(f))
        assert copy.read(10) == catalog.files[rel][100:110]


VERSION = {
    "ref": "nlp/web@2",
    "team": "nlp",
    "name": "web",
    "version": 2,
    "url": "s3://labels/web",
    "manifest_sha256": "ab" * 32,
    "card": {
        "teacher": {"model": "qwen-72b"},
        "k": 64,
        "products": {"draws": {"n": 8}},
        "draws": 8,
        "tokens": 1000,
    },
    "files": 12,
    "bytes": 3 * 2**20,
    "published_by": "alice",
    "created_at": "2025-01-01T00:00:00",
    "aliases": ["latest", "stable"],
    "job_spec": None,
    "runs": [{"id": 7, "name": "kd", "user": "bob", "created_at": "2025-01-02"}],
}


def test_publish_and_list_print_summaries(config, monkeypatch, capsys, tmp_path):
    sent: dict[str, Any] = {}

    def publish(self, dataset, url, aliases=(), job_spec=None):
        sent.update(dataset=dataset, url=url, aliases=list(aliases), job_spec=job_spec)
        return VERSION

    monkeypatch.setattr(CatalogClient, "publish", publish)
    monkeypatch.setattr(
        CatalogClient,
        "list_datasets",
        lambda self, **f: [
            {"team": "nlp", "name": "web", "latest": VERSION, "aliases": {"latest": 2, "stable": 2}}
        ],
    )
    monkeypatch.setattr(CatalogClient, "version", lambda self, ref: VERSION)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text("labels: {k: 64}\n")
    argv = [
        "publish",
        "out/web",
        "nlp/web",
        "--alias",
        "stable",
        "--job-spec",
        "job.yaml",
        "--service",
        "h:1",
    ]
    assert commands.run(_parse(argv)) == 0
    assert sent == {
        "dataset": "nlp/web",
        "url": str(tmp_path / "out/web"),
        "aliases": ["stable"],
        "job_spec": "labels: {k: 64}\n",
    }
    out = capsys.readouterr().out
    assert (
        "published nlp/web@2: 12 files, 3.0 MiB" in out
        and "teacher: qwen-72b" in out
        and "top-64" in out
        and "draws 8" in out
    )
    assert commands.run(_parse(["datasets", "list", "--service", "h:1"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["REF", "TEACHER", "K", "PRODUCTS", "TOKENS", "SIZE", "TRUST", "ALIASES"]
    assert out[1].split()[:5] == ["nlp/web@2", "qwen-72b", "64", "draws", "1000"] and "stable=2" in out[1]
    assert commands.run(_parse(["datasets", "show", "nlp/web@2", "--service", "h:1"])) == 0
    out = capsys.readouterr().out
    assert "nlp/web@2: 12 files" in out and "7: kd (bob" in out


def test_no_service_says_how_to_give_one(config):
    with pytest.raises(CatalogError, match="--service HOST:PORT.*labelgen login"):
        commands.run(_parse(["token", "list"]))
