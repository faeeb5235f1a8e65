"""The contract's error type, shared by the format, the codecs and the commit log."""

from __future__ import annotations

__all__ = ["FormatError", "ChecksumError"]


class FormatError(ValueError):
    """A label dataset is missing, incomplete, corrupt or of an unsupported version."""


class ChecksumError(FormatError):
    """A file's bytes do not match the size or sha256 its record (or its catalog entry) promises."""
