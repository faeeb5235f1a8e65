"""Object storage through fsspec: credential hygiene, safe publishing, bounded retries.

Datasets and corpora live under any fsspec URL (a local path, ``s3://``, ``gs://``;
``http(s)://`` for reading). Credentials come from where each backend normally
looks (``AWS_ACCESS_KEY_ID`` / ``~/.aws/credentials`` / an instance role for S3,
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS); an S3-compatible endpoint (MinIO, a test
server) is set with ``AWS_ENDPOINT_URL``, which botocore honours. None of it ever goes
in a job spec or a manifest: :func:`url_problem` refuses URLs with embedded
credentials and :func:`find_secrets` finds secret-looking keys and values.

Object stores have no atomic rename. A file is therefore published with one PUT of
the finished local file (a multipart upload is also invisible until it completes),
and :func:`retry` repeats transient failures with bounded exponential backoff, each
retry logged. A shard is only trusted once its commit record exists, and the record
is written after the shard, so a failed or half-retried upload is never read.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "CredentialError",
    "url_problem",
    "check_url",
    "find_secrets",
    "is_local",
    "retry",
    "put_file",
    "put_bytes",
    "RETRY_ATTEMPTS",
]

T = TypeVar("T")
log = logging.getLogger("labelgen.object_store")

_sleep = time.sleep  # tests replace it to retry without waiting
RETRY_ATTEMPTS = 5
"""Attempts per object-store call (1 + 4 retries, backoff 0.5 s, 1 s, 2 s, 4 s, with jitter)."""

_SECRET_QUERY = re.compile(
    r"^(x-amz-(signature|credential|security-token)|awsaccesskeyid|signature|sig|token|"
    r"access_?token|x-goog-(signature|credential)|sas|secret)$",
    re.I,
)
_SECRET_WORDS = {"secret", "password", "passwd", "credential", "credentials", "apikey", "sas"}
# "token" alone is everywhere in LLM configs (bos_token_id, min_tokens): only these pairs count
_SECRET_PAIRS = {
    ("access", "key"),
    ("private", "key"),
    ("api", "key"),
    *(
        (word, "token")
        for word in ("access", "auth", "session", "security", "hf", "api", "bearer", "refresh")
    ),
}
_SECRET_VALUE = re.compile(
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----|\b(ghp|hf)_[A-Za-z0-9]{30,}"
)
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


class CredentialError(ValueError):
    """A URL or a spec carries credentials, which belong in the environment."""


def url_problem(url: str) -> str | None:
    """Why ``url`` may not appear in a spec or manifest (embedded credentials), or None."""
    if "://" not in url:
        return None
    parts = urlsplit(url)
    if parts.username or parts.password or "@" in parts.netloc:
        return (
            f"{_redact(url)!r} embeds credentials (user:secret@host); remove them and provide credentials "
            "the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials for s3://, "
            "GOOGLE_APPLICATION_CREDENTIALS for gs://), never in a spec"
        )
    signed = [key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_QUERY.match(key)]
    if signed:
        return (
            f"{_redact(url)!r} carries a signature or token in its query ({', '.join(signed)}); signed URLs "
            "leak into job specs and manifests: use an unsigned URL with credentials from the environment"
        )
    return None


def check_url(url: str, what: str) -> None:
    """Raise CredentialError naming ``what`` (e.g. ``output.url``) if ``url`` embeds credentials."""
    problem = url_problem(url)
    if problem:
        raise CredentialError(f"{what}: {problem}")


def _redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return (
        f"{parts.scheme}://***@{host}{parts.path}"
        if "@" in parts.netloc
        else f"{parts.scheme}://{host}{parts.path}?***"
    )


def find_secrets(data: Any, path: str = "") -> Iterator[str]:
    """Dotted paths in a nested dict/list whose key or value looks like a credential."""
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if _secret_key(str(key)) and value not in (None, "", False, 0):
                yield where
            else:
                yield from find_secrets(value, where)
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            yield from find_secrets(value, f"{path}[{i}]")
    elif isinstance(data, str) and (_SECRET_VALUE.search(data) or url_problem(data)):
        yield path


def _secret_key(key: str) -> bool:
    words = [w for w in re.split(r"[_\-. ]+|(?<=[a-z])(?=[A-Z])", key) if w]
    lower = [w.lower() for w in words]
    pairs = set(zip(lower, lower[1:], strict=False))
    return lower == ["token"] or bool(_SECRET_WORDS & set(lower) or _SECRET_PAIRS & pairs)


def is_local(fs: Any) -> bool:
    """True for the local filesystem (atomic rename available)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(exc).__module__.startswith(
        ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "requests", "urllib3")
    )


def retry(
    fn: Callable[[], T],
    what: str,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = 0.5,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient object-store errors with backoff.

    Errors a retry cannot fix (missing file, permission denied, bad argument) are raised
    at once; transient ones are retried ``attempts - 1`` times, each logged with the
    delay, then the last is raised with the count in its message.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc) or attempt == attempts:
                if attempt > 1:
                    exc.add_note(f"{what}: gave up after {attempt} attempts")
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.75 + 0.5 * random.random())
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            (sleep or _sleep)(delay)
    raise AssertionError("unreachable")


def put_file(fs: Any, local_path: str, dest: str) -> None:
    """Publish a finished local file at ``dest`` in one PUT (object stores), retried.

    The upload goes straight to the final key: S3 and GCS make an object visible only
    when its PUT (or multipart upload) completes, so a reader never sees a partial file.
    """
    retry(lambda: fs.put_file(local_path, dest), f"upload {os.path.basename(local_path)} to {dest}")


def put_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a small object in one PUT, retried."""
    retry(lambda: fs.pipe_file(path, data), f"write {path}")
