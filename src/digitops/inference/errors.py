"""The service's one error type, and how every failure becomes a reply.

The request path raises RequestError with words a client can act on and the HTTP status to
answer with; `install_error_handlers` turns it, FastAPI's validation errors and Starlette's own
HTTP errors into the same JSON body: `{"error": ..., "status": ...}`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class RequestError(ValueError):
    """A request the service cannot serve as sent; `.status` is the HTTP status (4xx/503)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ImageError(RequestError):
    """The image itself is unusable: not an image, too big (413), a type we don't read (415)."""


def error_reply(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _problem(error: dict) -> str:
    """One validation error in words: the field it is about, then what is wrong with it."""
    where = ".".join(str(part) for part in error["loc"] if part not in ("body", "query"))
    message = error["msg"]
    if error["type"] == "missing" and where in ("image", "images"):
        message = f"required: send the image as multipart form field '{where}'"
    elif error["type"] == "extra_forbidden":
        message = "unknown field (a misspelt option would be ignored silently otherwise)"
    return f"{where or 'body'}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    """Every failure the app can meet answers `{"error", "status"}` with its status code."""

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return error_reply(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(dict.fromkeys(_problem(e) for e in exc.errors()))
        return error_reply(400, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "no such endpoint; see /docs"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed; allowed: {exc.headers.get('Allow')}"
        elif exc.status_code == 400:  # Starlette's form parser: too many files, a broken body
            message = f"malformed multipart form: {exc.detail}"
        return error_reply(exc.status_code, message, exc.headers)  # keeps 405's Allow header
