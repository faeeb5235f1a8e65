"""The contract's error type, shared by the format, the codecs and the commit log."""

from __future__ import annotations

__all__ = ["FormatError"]


class FormatError(ValueError):
    """A label dataset is missing, incomplete, corrupt or of an unsupported version."""
