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


def whole_number(text: str | bytes | None, digits: int = 18) -> int | None:
    """A decimal number a client wrote (a header, a query parameter) as an int; None when it is not one, or has more
    than ``digits`` digits (Python refuses ``int()`` of 4,300 digits or more with ValueError: a client's 500)."""
    if text is None:
        return None
    text = text.strip()
    if not text.isdigit() or len(text) > digits:  # isdigit, not isdecimal: what int() takes of bytes and str alike
        return None
    try:
        return int(text)
    except ValueError:  # digits int() does not take (superscripts)
        return None


class BodyTooLarge(Exception):
    """The request body grew past ``max_body_bytes`` while it was read."""


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error body every failure answers with."""
    return JSONResponse({"error": message, "type": kind, "status": status}, status_code=status, headers=headers)
