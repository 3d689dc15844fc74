"""Service errors as HTTP answers: one status table, one JSON shape, the exception handlers.

The errors of :mod:`service.errors` carry no HTTP codes; this module is the one
place that maps them to 4xx/5xx and renders ``{"error": {"code", "message"}}``.
"""

import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.metrics import Metrics
from service.errors import (
    BandMismatchError,
    CutoutTooSmallError,
    InferenceError,
    InvalidFitsError,
    InvalidRequestError,
    LensServeError,
    ModelUnavailableError,
    NoImageDataError,
    OverloadedError,
    PayloadTooLargeError,
    PixelScaleMismatchError,
    RequestTimeoutError,
    TooManyMaskedPixelsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from service.schemas import ErrorResponse

#: HTTP status of each error family. The most specific class in an error's MRO wins.
STATUS_BY_ERROR: dict[type[LensServeError], int] = {
    InvalidRequestError: 400,
    InvalidFitsError: 400,
    NoImageDataError: 422,
    BandMismatchError: 422,
    CutoutTooSmallError: 422,
    PixelScaleMismatchError: 422,
    TooManyMaskedPixelsError: 422,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    UnauthorizedError: 401,
    RequestTimeoutError: 408,
    ModelUnavailableError: 503,
    OverloadedError: 503,
    InferenceError: 500,
}

#: OpenAPI description of the error answers of the working routes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "An API key is required and was missing or unknown (`unauthorized`)."),
        (408, "The body did not arrive within the request timeout (`request_timeout`)."),
        (400, "Not FITS, truncated, or a malformed request (`invalid_fits`, `invalid_request`)."),
        (413, "Body, file count or decompressed size over the limits (`payload_too_large`)."),
        (415, "Unsupported Content-Type or Content-Encoding (`unsupported_media_type`)."),
        (
            422,
            "FITS without usable image data: no image HDU, wrong bands, too small, other "
            "pixel scale, too many masked pixels; or bad query parameters.",
        ),
        (
            503,
            "Models not ready or shutting down (`model_unavailable`), or at capacity: queue "
            "full, too many requests at once, or no answer within the timeout (`overloaded`, "
            "Retry-After).",
        ),
        (500, "The models failed (`inference_failed`)."),
    )
}


def status_for(error: LensServeError) -> int:
    """HTTP status for a service error: its closest class in :data:`STATUS_BY_ERROR`, else 500."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    """The JSON error body ``{"error": {"code": ..., "message": ...}}`` with ``status``."""
    body = ErrorResponse.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def service_error_response(
    exc: LensServeError, *, metrics: Metrics, retry_after_s: int
) -> JSONResponse:
    """The one rendering of a service error: status, JSON body, Retry-After, WWW-Authenticate.

    Parameters
    ----------
    exc : LensServeError
        The error; it is counted in ``metrics`` by its code.
    metrics : Metrics
        The app's metrics.
    retry_after_s : int
        Value of ``Retry-After`` on an ``overloaded`` answer (seconds).
    """
    metrics.errors.labels(code=exc.code).inc()
    return render_service_error(exc, retry_after_s=retry_after_s)


def render_service_error(exc: LensServeError, *, retry_after_s: int) -> JSONResponse:
    """:func:`service_error_response` without counting: for answers rendered once and
    replayed, whose every use the caller counts."""
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = 'Bearer realm="lensserve"'
    return error_response(status_for(exc), exc.code, str(exc), **headers)


def install_error_handlers(app: FastAPI, *, metrics: Metrics, retry_after_s: int) -> None:
    """Answer service errors, request-validation errors and Starlette's HTTP errors as JSON."""

    async def handle_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LensServeError)
        return service_error_response(exc, metrics=metrics, retry_after_s=retry_after_s)

    async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        metrics.errors.labels(code=InvalidRequestError.code).inc()
        return error_response(422, InvalidRequestError.code, problems)

    async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = re.sub(r"\W+", "_", HTTPStatus(exc.status_code).phrase.lower())
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, **dict(exc.headers or {}))

    app.add_exception_handler(LensServeError, handle_service_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
