"""An S3 endpoint on loopback for tests: moto's server on 127.0.0.1, a random free port.

Credentials are fake and come from the environment, the endpoint from
``AWS_ENDPOINT_URL`` (botocore honours it), exactly as a real deployment passes them:
nothing about the store goes into a job spec.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server and point the AWS environment at it for the session."""
    server_mod = pytest.importorskip("moto.server", reason="needs `pip install 'moto[server]'`")
    pytest.importorskip("s3fs", reason="needs `pip install s3fs`")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns ``s3://<name>``."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


def upload_dir(local_dir, url: str) -> None:
    """Copy every file of ``local_dir`` under ``url``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(os.listdir(local_dir)):
        fs.put_file(os.path.join(local_dir, path), f"{root}/{path}")
    fs.invalidate_cache()
