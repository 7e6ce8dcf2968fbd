"""The errors an action refuses with. The API turns each into PROTOCOL.md's error shape (its status and code);
the dashboard shows its detail as a flash message."""

from __future__ import annotations


class ActionError(Exception):
    """An action refused; the API turns it into PROTOCOL.md's error shape."""

    status = 409
    code = "conflict"

    def __init__(self, detail: str, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code


class NotFound(ActionError):
    status = 404
    code = "not_found"


class StaleAttempt(ActionError):
    code = "stale_attempt"
