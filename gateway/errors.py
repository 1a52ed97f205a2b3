"""Every error the gateway answers with, and the one table mapping them to status codes.

Bodies are always `{"detail": "..."}`. Client errors carry their message; 500s
carry a fixed text (the cause goes to the log, never to the client).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from acestep_triton.contract import ParameterError

log = logging.getLogger("gateway")

INTERNAL_ERROR_DETAIL = "generation failed; see the gateway log"


class NotAuthorized(Exception):
    """The request lacks the configured API key."""


class OutputNotFound(Exception):
    """No file of that name in the outputs directory (or, for /uploads, in the uploads directory)."""


class UploadTooLarge(Exception):
    """An upload's body is larger than the deployment allows."""


class UploadInUse(Exception):
    """The upload is the source of a queued or running job, or being read."""


class EngineUnavailable(Exception):
    """Triton cannot be reached, is not ready, or did not answer in time."""


class _RetryLater(Exception):
    """An error whose answer carries Retry-After: `retry_after_s` whole seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class NotReady(_RetryLater, EngineUnavailable):
    """A model cannot serve now (Triton down, a model reloading); Retry-After from the measured recovery."""


class ShuttingDown(_RetryLater):
    """The gateway is draining for shutdown: no new work; or a generation it had to stop at its deadline."""


class StorageFull(Exception):
    """The outputs directory has no space left (ENOSPC/EDQUOT); nothing was kept of the write."""


class EngineRejected(Exception):
    """Triton refused the request's inputs (INVALID_ARG); the message says why."""


class EngineFailed(Exception):
    """Triton (or the gateway around it) failed to produce audio; not the client's fault."""


class JobNotFound(Exception):
    """No job with that id (never submitted, or removed by retention)."""


class JobConflict(Exception):
    """The job's state does not allow the action (cancelling a finished job; /generate's job cancelled)."""


class Busy(_RetryLater):
    """The bound on queued plus running generations is reached; retry after `retry_after_s`."""


class DeadlineExceeded(Exception):
    """The request did not finish within the deployment's deadline."""


STATUS_BY_ERROR: dict[type[Exception], int] = {
    ParameterError: 400,
    EngineRejected: 400,
    NotAuthorized: 401,
    OutputNotFound: 404,
    JobNotFound: 404,
    JobConflict: 409,
    UploadInUse: 409,
    UploadTooLarge: 413,
    Busy: 429,
    EngineFailed: 500,
    EngineUnavailable: 503,
    ShuttingDown: 503,
    DeadlineExceeded: 504,
    StorageFull: 507,
}


def _error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def status_of(exc: Exception) -> int:
    """The status code for an error: its nearest class in STATUS_BY_ERROR, else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status == 500:
        log.error("%s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
        return _error_response(status, INTERNAL_ERROR_DETAIL)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else getattr(exc, "headers", None)
    return _error_response(status, str(exc), headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's 422 becomes the contract's 400, naming each offending field."""
    problems = []
    for err in exc.errors():
        if err["type"] == "json_invalid":
            problems.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', 'unparsable')})")
            continue
        loc = [str(p) for p in err["loc"] if p != "body"]
        where = loc[0] + "".join(f"[{p}]" for p in loc[1:]) if loc else "body"
        problems.append(f"{where}: {err['msg']}")
    return _error_response(400, "; ".join(problems))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
    return _error_response(500, INTERNAL_ERROR_DETAIL)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error type through the table above."""
    for error_type in STATUS_BY_ERROR:
        app.add_exception_handler(error_type, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
