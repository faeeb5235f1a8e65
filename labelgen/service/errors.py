"""The service's one error type: an HTTP status, a short code and a message that says the fix."""

from __future__ import annotations

__all__ = ["ServiceError"]


class ServiceError(Exception):
    """A refused request. ``message`` names the thing, the value and what to do instead."""

    def __init__(self, status: int, code: str, message: str, *, team: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.team = team  # the team whose resource was refused (its admins see it in the audit log)

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON every refusal answers with: ``{"error": {"code", "message"}}``."""
        return {"error": {"code": self.code, "message": self.message}}
