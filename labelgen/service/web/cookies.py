"""The web catalog's sign-in cookie: a token id and an expiry, signed by the service.

Signing in with a token makes a session cookie ``ID.EXPIRES.HMAC``: the token's id, the
moment the session ends (Unix seconds: 12 hours on, or the token's own expiry if that
comes first) and an HMAC-SHA256 over both with a key derived from the service's signing
key (:func:`labelgen.service.store.signing_key`). The token itself is never in the
cookie, so a copied cookie cannot be used against the API, and every page checks the
token again (revoked or expired: signed out at once). A cookie whose HMAC does not match
(changed by hand, or signed with another service's key) or whose expiry has passed is
refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import time
from dataclasses import dataclass

__all__ = [
    "COOKIE_NAME",
    "SESSION_HOURS",
    "WebSession",
    "session_key",
    "session_end",
    "make_cookie",
    "read_cookie",
]

COOKIE_NAME = "labelgen_session"
SESSION_HOURS = 12
"""Longest a web session lasts (it ends earlier with its token)."""

_PURPOSE = b"labelgen web session v1"


@dataclass(frozen=True)
class WebSession:
    """A signed-in browser: the token it signed in with, and when the session ends."""

    token_id: int
    expires: int
    """Unix seconds."""


def session_key(signing_key: bytes) -> bytes:
    """The key web sessions are signed with: derived from the service's signing key, so a
    session signature can never stand for a byte-range URL's signature nor the reverse."""
    return hmac.new(signing_key, _PURPOSE, hashlib.sha256).digest()


def _mac(key: bytes, token_id: int, expires: int) -> str:
    return hmac.new(key, f"{token_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def session_end(token_expires: dt.datetime | None, now: float | None = None) -> int:
    """When a session signed in now with a token expiring at ``token_expires`` ends (Unix s)."""
    now = time.time() if now is None else now
    end = int(now) + SESSION_HOURS * 3600
    if token_expires is not None:
        when = token_expires if token_expires.tzinfo else token_expires.replace(tzinfo=dt.UTC)
        end = min(end, int(when.timestamp()))
    return end


def make_cookie(key: bytes, token_id: int, expires: int) -> str:
    """The cookie value of a session of token ``token_id`` ending at ``expires``."""
    return f"{token_id}.{expires}.{_mac(key, token_id, expires)}"


def read_cookie(key: bytes, value: str | None, now: float | None = None) -> WebSession | None:
    """The session a cookie value holds; None if it is absent, malformed, not signed with
    ``key`` or past its expiry."""
    if not value or len(value) > 200:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    token_id, expires = int(parts[0]), int(parts[1])
    if not hmac.compare_digest(_mac(key, token_id, expires), parts[2]):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return WebSession(token_id, expires)
