"""Credential hygiene for URLs and specs: credentials live in the environment, never in a spec.

Datasets and corpora live under any fsspec URL (a local path, ``s3://``, ``gs://``;
``http(s)://`` for reading). Credentials come from where each backend normally
looks (``AWS_ACCESS_KEY_ID`` / ``~/.aws/credentials`` / an instance role for S3,
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS); an S3-compatible endpoint (MinIO, a test
server) is set with ``AWS_ENDPOINT_URL``, which botocore honours. None of it ever goes
in a job spec or a manifest: :func:`url_problem` refuses URLs with embedded
credentials and :func:`find_secrets` finds secret-looking keys and values. (Publishing
and retries on object stores: :mod:`labelgen.contract.storage`.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from labelgen.contract.config_input import clip

__all__ = [
    "CredentialError",
    "url_problem",
    "check_url",
    "find_secrets",
]

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


class CredentialError(ValueError):
    """A URL or a spec carries credentials, which belong in the environment."""


def url_problem(url: str) -> str | None:
    """Why ``url`` may not appear in a spec or manifest (embedded credentials), or None."""
    if "://" not in url:
        return None
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - parses the host (refuses a malformed IPv6 literal)
    except ValueError as exc:
        return f"{clip(url)!r} is not a valid URL ({exc}); fix its host part"
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
        f"{parts.scheme}://***@{host}{clip(parts.path)}"
        if "@" in parts.netloc
        else f"{parts.scheme}://{host}{clip(parts.path)}?***"
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
