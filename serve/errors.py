"""The service's error shape, ``{"error": message, "type": kind, "status": status}``, and the exceptions that carry it.

Every refusal is an ApiError (raised by the input parsers, the auth check and the routes) or a BodyTooLarge (raised
by the body-limit middleware while the body streams in); the app's exception handlers turn them into error_response.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A client error (or a refusal) with its HTTP status and a short machine-readable kind."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def __reduce__(self):  # picklable: the JSON parser process raises these (serve/jsonparse.py)
        return type(self), (self.status, self.kind, self.message)

    def body(self) -> dict:
        return {"error": self.message, "type": self.kind, "status": self.status}


class BodyTooLarge(Exception):
    """The request body grew past ``max_body_bytes`` while it was read."""


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error body every failure answers with."""
    return JSONResponse({"error": message, "type": kind, "status": status}, status_code=status, headers=headers)
