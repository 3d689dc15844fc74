"""The app's middleware stack: CORS, metrics, API keys and the work guard."""

import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from service.api.errors import render_service_error, service_error_response
from service.api.guards import (
    API_KEY_HEADER,
    Admission,
    ApiKeyMiddleware,
    RefusalAccessLogFilter,
    Scope,
    WorkGuardMiddleware,
    is_protected,
    route_path,
)
from service.api.metrics import Metrics, MetricsMiddleware
from service.errors import LensServeError, OverloadedError
from service.settings import Settings

#: Headers of a guard's refusal that the /v2 error shape keeps.
_GUARD_HEADERS = ("retry-after", "www-authenticate")


def install_middlewares(
    app: FastAPI, *, settings: Settings, admission: Admission, metrics: Metrics
) -> None:
    """The middleware stack, outermost last: CORS, metrics, API keys, work guard."""
    quiet_refusals_in_access_log()

    def render_error(exc: LensServeError, scope: Scope) -> JSONResponse:
        response = service_error_response(
            exc, metrics=metrics, retry_after_s=settings.overload_retry_after_s
        )
        return _in_shape_of(response, exc, scope)

    def render_refusal(exc: OverloadedError, scope: Scope, retry_after_s: int) -> JSONResponse:
        # Counted by the admission's on_refusal hook: this answer is replayed.
        return _in_shape_of(render_service_error(exc, retry_after_s=retry_after_s), exc, scope)

    # Starlette wraps each new middleware around the previous ones.
    app.add_middleware(
        WorkGuardMiddleware,  # type: ignore[arg-type]
        admission=admission,
        timeout_s=settings.request_timeout_s,
        render_error=render_error,
        render_refusal=render_refusal,
        refusal_delay_s=settings.refusal_delay_s,
    )
    app.add_middleware(
        ApiKeyMiddleware,  # type: ignore[arg-type]
        keys=[key.get_secret_value() for key in settings.api_keys],
        render_error=render_error,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    if settings.cors_origins:
        # Outermost, so that preflights need no key and refusals still carry CORS headers.
        app.add_middleware(
            CORSMiddleware,  # type: ignore[arg-type]
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=[
                "Authorization",
                API_KEY_HEADER.decode(),
                "Content-Type",
                "Content-Encoding",
                "Content-Disposition",
            ],
            expose_headers=["Retry-After"],
            max_age=600,
        )


def _in_shape_of(response: JSONResponse, exc: LensServeError, scope: Scope) -> JSONResponse:
    """``response`` as it is, or in the Open Inference Protocol's error shape under /v2."""
    if not is_protected(route_path(scope), ("/v2",)):
        return response
    # The Open Inference Protocol's error shape (service.api.oip_v2), same status and headers.
    kept = {k: v for k, v in response.headers.items() if k in _GUARD_HEADERS}
    return JSONResponse({"error": str(exc)}, status_code=response.status_code, headers=kept)


def quiet_refusals_in_access_log() -> None:
    """Keep 503 answers to guarded POSTs out of uvicorn's access log (once per process)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RefusalAccessLogFilter) for f in access.filters):
        access.addFilter(RefusalAccessLogFilter())
