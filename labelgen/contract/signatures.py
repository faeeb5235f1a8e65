"""Signatures of label datasets: ed25519 over the manifest's sha256, key files, detached files.

What is signed is one message, the same everywhere (the catalog, plain URLs)::

    b"labelgen manifest signature v1\\n" + MANIFEST_SHA256_HEX (64 lowercase ASCII characters)

The manifest lists every shard's size and sha256, so a valid signature over its hash
vouches for every byte a reader checks against it. A key is an ed25519 key pair:

- the private key, a PKCS#8 PEM file (mode 0600; never sent anywhere);
- the public key, ``PATH.pub``: one line ``ed25519 HEX64 NAME`` (the raw 32 bytes, hex);
- its id: the first 16 hex characters of sha256 over the raw 32 public bytes.

A dataset outside the catalog (a plain URL) carries its signatures beside it, one file
per key: ``_signatures/KEY_ID.json`` under the dataset root (:func:`signature_file`),
holding ``format``, ``key_id``, ``public_key``, ``name``, ``manifest_sha256``,
``signature`` and ``created_at``. A file there proves only that the holder of that key
signed those bytes: whose key it is, the reader says (``labelgen verify URL --key PUB``).

The ``cryptography`` package is imported when a key is made, loaded or used
(:func:`require_cryptography`); everything else here needs only the standard library.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelgen.contract.format import join_url

__all__ = [
    "ALGORITHM",
    "MESSAGE_PREFIX",
    "SIGNATURES_DIR",
    "SIGNATURE_FORMAT",
    "SignatureError",
    "require_cryptography",
    "message",
    "check_sha256",
    "check_public_key",
    "check_signature",
    "key_id_of",
    "PublicKey",
    "PrivateKey",
    "new_key",
    "save_key",
    "load_private_key",
    "load_public_key",
    "sign_digest",
    "verify_digest",
    "signature_file",
    "DetachedSignature",
    "detached_signature",
    "parse_detached",
]

ALGORITHM = "ed25519"
MESSAGE_PREFIX = b"labelgen manifest signature v1\n"
"""What every signed message starts with (then the manifest's sha256, hex)."""
SIGNATURES_DIR = "_signatures"
"""Where a plain URL's detached signatures live, under the dataset root."""
SIGNATURE_FORMAT = "labelgen-signature-v1"
"""The ``format`` field of a detached signature file."""
_HEX = re.compile(r"^[0-9a-f]+$")
_INSTALL = "pip install 'labelgen[service]' (or pip install cryptography)"


class SignatureError(ValueError):
    """A key file, a key or a signature is malformed or missing; the message names it and the fix."""


def require_cryptography() -> Any:
    """The ``cryptography`` ed25519 module, or ImportError with the install line."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"signing and verifying labelgen datasets needs cryptography: {_INSTALL}") from exc
    return ed25519


def _hex(value: object, length: int, what: str) -> str:
    if not isinstance(value, str):
        raise SignatureError(f"{what} is a {type(value).__name__}, not a string of {length} hex characters")
    text = value.strip().lower()
    if len(text) != length or not _HEX.fullmatch(text):
        raise SignatureError(f"{what} {value[:80]!r} is not {length} hex characters")
    return text


def check_sha256(value: object, what: str = "manifest sha256") -> str:
    """``value`` as 64 lowercase hex characters, else SignatureError naming ``what``."""
    return _hex(value, 64, what)


def check_public_key(value: object, what: str = "public key") -> str:
    """``value`` (an ed25519 public key: 32 bytes, hex) lowercased, else SignatureError."""
    return _hex(value, 64, what)


def check_signature(value: object, what: str = "signature") -> str:
    """``value`` (an ed25519 signature: 64 bytes, hex) lowercased, else SignatureError."""
    return _hex(value, 128, what)


def message(manifest_sha256: str) -> bytes:
    """The bytes a signature of a manifest with this sha256 signs."""
    return MESSAGE_PREFIX + check_sha256(manifest_sha256).encode("ascii")


def key_id_of(public_key: str) -> str:
    """The id of a public key (hex): sha256 of its raw 32 bytes, first 16 hex characters."""
    return hashlib.sha256(bytes.fromhex(check_public_key(public_key))).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """An ed25519 public key as the catalog and ``PATH.pub`` files hold it."""

    hex: str
    """The raw 32 bytes, 64 lowercase hex characters."""
    name: str = ""
    """What its owner called it (``laptop``, ``ci``)."""

    @property
    def key_id(self) -> str:
        return key_id_of(self.hex)

    def line(self) -> str:
        """The ``PATH.pub`` line: ``ed25519 HEX64 NAME``."""
        return f"{ALGORITHM} {self.hex} {self.name}".rstrip()


@dataclass(frozen=True)
class PrivateKey:
    """An ed25519 private key (a ``cryptography`` object) with its public half."""

    key: Any
    name: str = ""

    @property
    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives import serialization

        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(raw.hex(), self.name)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def __repr__(self) -> str:  # never the key
        return f"PrivateKey(key_id={self.key_id!r}, name={self.name!r})"


def new_key(name: str = "") -> PrivateKey:
    """A fresh random ed25519 key pair."""
    return PrivateKey(require_cryptography().Ed25519PrivateKey.generate(), name)


def save_key(key: PrivateKey, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``key`` to ``path`` (PEM, mode 0600) and its public half to ``path.pub``.

    Returns:
        (private key path, public key path).

    Raises:
        FileExistsError: either file exists (a key is never overwritten: signatures made
            with the old one would lose their key).
    """
    from cryptography.hazmat.primitives import serialization

    private, public = Path(path), Path(f"{path}.pub")
    for existing in (private, public):
        if existing.exists():
            raise FileExistsError(
                f"{existing} exists; a key file is never overwritten (signatures made with it would "
                "lose their key): choose another --out PATH, or remove it if you are sure"
            )
    pem = key.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private, 0o600)  # whatever the umask
    public.write_text(key.public.line() + "\n")
    return private, public


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """The ed25519 private key in the PEM file ``path`` (its name from ``path.pub`` if there).

    Raises:
        SignatureError: the file is absent, not PEM, or not an ed25519 private key; or it is
            readable by others (mode wider than 0600).
    """
    ed25519 = require_cryptography()
    from cryptography.hazmat.primitives import serialization

    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise SignatureError(
            f"no private key at {file}; make one with `labelgen keys new --out {file}`"
        ) from None
    if file.stat().st_mode & 0o077:
        raise SignatureError(
            f"{file} is readable by other users (mode {file.stat().st_mode & 0o777:o}); a private key must "
            f"be yours alone: `chmod 600 {file}`"
        )
    if data.lstrip().startswith(ALGORITHM.encode()):
        raise SignatureError(
            f"{file} is a public key file; sign with the private key (the file without .pub)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{file} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{file} holds a {type(key).__name__}; labelgen signs with ed25519 keys only")
    name = ""
    pub = Path(f"{file}.pub")
    if pub.exists():
        name = load_public_key(pub).name
    return PrivateKey(key, name)


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """The public key in ``path`` (one line ``ed25519 HEX64 NAME``).

    Raises:
        SignatureError: the file is absent or its line is not of that form.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        raise SignatureError(
            f"no public key at {file}; `labelgen keys new --out KEY` writes KEY.pub"
        ) from None
    parts = text.split(maxsplit=2)
    if len(parts) < 2 or parts[0] != ALGORITHM or "\n" in text:
        raise SignatureError(
            f"{file} is not a labelgen public key file: it must hold one line `{ALGORITHM} HEX64 NAME` "
            "(as `labelgen keys new` writes it)"
        )
    return PublicKey(check_public_key(parts[1], f"{file}: public key"), parts[2] if len(parts) > 2 else "")


def sign_digest(key: PrivateKey, manifest_sha256: str) -> str:
    """The signature (128 hex characters) of the manifest whose sha256 is ``manifest_sha256``."""
    return key.key.sign(message(manifest_sha256)).hex()


def verify_digest(public_key: str, manifest_sha256: str, signature: str) -> bool:
    """Does ``signature`` (hex) by ``public_key`` (hex) sign the manifest hashing to
    ``manifest_sha256``? False for a wrong or malformed signature, key or hash."""
    try:
        args = (check_public_key(public_key), check_sha256(manifest_sha256), check_signature(signature))
    except SignatureError:
        return False
    return _verify(*args)


@functools.lru_cache(maxsize=4096)
def _verify(public_key: str, manifest_sha256: str, signature: str) -> bool:
    # Cached: the same (key, manifest, signature) triple never changes its answer, and the
    # catalog checks every signature of every dataset it lists.
    ed25519 = require_cryptography()
    from cryptography.exceptions import InvalidSignature

    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), message(manifest_sha256))
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- detached signatures


def signature_file(root: str, key_id: str) -> str:
    """Where the detached signature by key ``key_id`` of the dataset at ``root`` lives."""
    if not re.fullmatch(r"[0-9a-f]{16}", key_id):
        raise SignatureError(f"key id {key_id[:40]!r} is not 16 hex characters")
    return join_url(root, SIGNATURES_DIR, f"{key_id}.json")


@dataclass(frozen=True)
class DetachedSignature:
    """One ``_signatures/KEY_ID.json`` file, checked for form (not yet verified)."""

    key_id: str
    public_key: str
    manifest_sha256: str
    signature: str
    name: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SIGNATURE_FORMAT,
            "key_id": self.key_id,
            "public_key": self.public_key,
            "name": self.name,
            "manifest_sha256": self.manifest_sha256,
            "signature": self.signature,
            "created_at": self.created_at,
        }

    def verifies(self, manifest_sha256: str) -> bool:
        """Does it sign the manifest hashing to ``manifest_sha256`` (and name that hash)?"""
        return self.manifest_sha256 == manifest_sha256 and verify_digest(
            self.public_key, manifest_sha256, self.signature
        )


def detached_signature(key: PrivateKey, manifest_sha256: str) -> DetachedSignature:
    """A detached signature by ``key`` of the manifest hashing to ``manifest_sha256``."""
    public = key.public
    return DetachedSignature(
        key_id=public.key_id,
        public_key=public.hex,
        manifest_sha256=check_sha256(manifest_sha256),
        signature=sign_digest(key, manifest_sha256),
        name=key.name,
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    )


def parse_detached(data: bytes, where: str) -> DetachedSignature:
    """A detached signature file's bytes as a :class:`DetachedSignature`.

    Raises:
        SignatureError: not JSON, another format, a field missing or malformed, or a key id
            that is not its public key's (each naming ``where``).
    """
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{where} is not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"{where} is not a labelgen signature file (format {SIGNATURE_FORMAT!r})")
    out = DetachedSignature(
        key_id=_hex(raw.get("key_id"), 16, f"{where}: key_id"),
        public_key=check_public_key(raw.get("public_key"), f"{where}: public_key"),
        manifest_sha256=check_sha256(raw.get("manifest_sha256"), f"{where}: manifest_sha256"),
        signature=check_signature(raw.get("signature"), f"{where}: signature"),
        name=str(raw.get("name") or "")[:64],
        created_at=str(raw.get("created_at") or "")[:64],
    )
    if key_id_of(out.public_key) != out.key_id:
        raise SignatureError(
            f"{where}: key_id {out.key_id} is not the id of its public key ({key_id_of(out.public_key)})"
        )
    return out
