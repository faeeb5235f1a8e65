"""PostgreSQL for tests: a fresh, empty database per test on the server CI starts.

The server is ``$LABELGEN_TEST_POSTGRES`` (a SQLAlchemy URL of a database the role may
connect to; the role needs CREATEDB), by default the one ``scripts/start-postgres.sh``
sets up. Each test using ``postgres_url`` gets the URL of its own new database,
``labelgen_t_<hex>``, dropped afterwards. Without a reachable server (or without
psycopg) those tests skip, saying how to start one; with ``LABELGEN_REQUIRE_POSTGRES=1``
(CI sets it) they fail instead, so CI never passes with them silently skipped.

The fixtures are available to every test module through tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_URL = "postgresql+psycopg://labelgen:labelgen@127.0.0.1:5432/labelgen_test"
START_HINT = "start it with `bash scripts/start-postgres.sh`"


def server_url() -> str:
    """The SQLAlchemy URL of the test server's maintenance database."""
    return os.environ.get("LABELGEN_TEST_POSTGRES") or DEFAULT_URL


def conninfo(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq URI for psycopg."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def redacted(url: str) -> str:
    """``url`` with its password masked, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (query parameters kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("LABELGEN_REQUIRE_POSTGRES") == "1":
        pytest.fail(
            f"{reason} (LABELGEN_REQUIRE_POSTGRES=1, so this is a failure, not a skip)", pytrace=False
        )
    pytest.skip(reason)


def _connect(url: str):
    import psycopg

    return psycopg.connect(conninfo(url), autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """Create an empty database on the server of ``url``; yield its URL; drop it."""
    from psycopg import sql

    name = f"labelgen_t_{uuid.uuid4().hex[:16]}"
    with _connect(url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(url, name)
    finally:
        # FORCE: connections the test left open (an engine's pool) are closed first.
        with _connect(url) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test server's URL, once it answers; skips (or fails, in CI) when it does not.

    Checked once per session: a skip or failure here is reused by every test after.
    """
    url = server_url()
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed: pip install 'labelgen[postgres]' (or the dev extra)")
    try:
        with _connect(url) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split())
        _unavailable(f"PostgreSQL not reachable at {redacted(url)} ({detail}): {START_HINT}")
    return url


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """The SQLAlchemy URL (``postgresql+psycopg://...``) of a fresh, empty database."""
    with fresh_database(postgres_server) as url:
        yield url
