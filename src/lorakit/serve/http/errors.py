"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status codes its
clients expect: 4xx for the client's mistakes (the `openai` client does not retry those), 5xx only for
the server's own failures (it retries those).
"""
from __future__ import annotations

from typing import Any

# status -> OpenAI's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client as JSON in OpenAI's shape.

    Args:
        status: the HTTP status code.
        message: what was wrong and how to fix it.
        param: the request field at fault, if any.
        code: a short machine-readable code (e.g. "model_not_found").
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON of an error response."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) from pydantic's validation errors: each field at fault with what it needs."""
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
            continue
        if e.get("type") == "extra_forbidden":
            parts.append(f"unrecognized request argument supplied: {where}")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid value')}")
        param = param or where or None
    return "; ".join(parts) or "invalid request", param


def install_handlers(app) -> None:
    """Answer APIErrors, validation errors, unknown routes and unexpected failures in OpenAI's shape."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(400, message, param, "invalid_request"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and the README."
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # the server's own failure: a 500, the only 5xx we send
        return JSONResponse(error_body(500, f"the server failed: {type(exc).__name__}: {exc}"), status_code=500)
