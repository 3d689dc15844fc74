"""The HTTP layer: FastAPI routes, request-body limits, error mapping and metrics.

This is the only module that knows about HTTP. :func:`create_app` wires the
transport-free pieces together: settings, the onnxruntime models
(:mod:`service.core.runtime`), the dynamic batcher (:mod:`service.core.inference`) and
the FITS codec (:mod:`service.fits.decode`).

The module does not use ``from __future__ import annotations``: the query
parameters' bounds come from the settings inside :func:`create_app`, and
FastAPI must see those annotations already evaluated.

Endpoints
    ``POST /v1/predict``   FITS cutouts in, predictions out.
    ``GET /v1/models``     model cards, versions and the execution provider.
    ``GET /health/live``   the process answers.
    ``GET /health/ready``  200 once the models are loaded and warmed up.
    ``GET /metrics``       Prometheus metrics.
    ``GET /``              the browser demo; ``POST /v1/cutout`` its pixels (:mod:`.demo`).
    ``/v2/...``            Open Inference Protocol v2 (:mod:`service.api.oip_v2`).

Everything under ``/v1`` and ``/v2`` passes the guards of :mod:`service.api.guards`
(API keys when configured, admission limit, deadline, disconnects); SIGTERM
drains the process (:mod:`service.api.draining`).

Each process keeps its own metrics registry: with ``--workers N`` every worker
reports only what it served.
"""

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.demo import create_demo_router
from service.api.draining import drain_on_sigterm
from service.api.guards import (
    API_KEY_HEADER,
    Admission,
    ApiKeyMiddleware,
    Scope,
    WorkGuardMiddleware,
    is_protected,
    route_path,
)
from service.api.oip_v2 import create_oip_v2_router
from service.contract.cards import InputSpec
from service.core.batching import BatchStats
from service.core.cpu import lower_current_thread_priority
from service.core.inference import (
    CutoutOutcome,
    InferenceEngine,
    PreparedCutout,
    prepare_cutout_for_input,
    prepare_plain_cutout_for_input,
)
from service.core.isolation import IsolatedDecoder
from service.core.runtime import MAX_SEED, OnnxModelRuntime, available_providers
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
from service.fits.decode import RAW_FITS_MEDIA_TYPES, FitsLimits
from service.schemas import (
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    PredictResponse,
    encode_result,
)
from service.settings import Settings

logger = logging.getLogger("lensserve.api")
ResultT = TypeVar("ResultT")

MULTIPART_MEDIA_TYPE = "multipart/form-data"
#: Form field that carries the files of a multipart request.
FILES_FIELD = "files"
#: Name reported for the file of a raw (non-multipart) request without a Content-Disposition.
RAW_BODY_FILENAME = "body"

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

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def status_for(error: LensServeError) -> int:
    """HTTP status for a service error: its closest class in :data:`STATUS_BY_ERROR`, else 500."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


class _Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lensserve_requests",
            "HTTP requests answered, by route and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lensserve_errors",
            "Errors by code: whole requests refused and single files refused within a request.",
            ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lensserve_request_duration_seconds",
            "Time from request start to the end of the response (seconds).",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.cutouts = Counter(
            "lensserve_cutouts_processed",
            "Cutouts answered with predictions.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "lensserve_batch_size_cutouts",
            "Cutouts per onnxruntime batch (cutouts).",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "lensserve_queue_time_seconds",
            "Time a request waited in the batcher before its batch ran (seconds).",
            buckets=_QUEUE_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_time = Histogram(
            "lensserve_batch_duration_seconds",
            "Time to run one batch through the three models and summarise it (seconds).",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.ready = Gauge(
            "lensserve_ready", "1 once the models are loaded and warmed up.", registry=self.registry
        )
        self.queued = Gauge(
            "lensserve_queued_cutouts",
            "Cutouts waiting for a batch (cutouts).",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lensserve_requests_in_flight",
            "POST requests under /v1 and /v2 being handled (requests).",
            registry=self.registry,
        )

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_time.observe(stats.run_s)
        for wait_s in stats.queue_times_s:
            self.queue_time.observe(wait_s)


@dataclass
class _Upload:
    """One file received in a request."""

    filename: str
    data: bytes
    content_encoding: str | None = None


@dataclass
class _AppState:
    settings: Settings
    engine: InferenceEngine
    runtime: OnnxModelRuntime
    limits: FitsLimits
    metrics: _Metrics
    admission: Admission
    executor: ThreadPoolExecutor | None = None
    decoder: IsolatedDecoder | None = None
    ready: bool = False
    draining: bool = False
    load_error: LensServeError | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise ModelUnavailableError(f"the models could not be loaded: {self.load_error}")
        if not self.ready:
            raise ModelUnavailableError("the models are still loading; retry in a few seconds")

    def check_readiness(self) -> None:
        """Raise unless new work is welcome: models ready, not draining, queue not full."""
        self.require_ready()
        if self.draining:
            raise ModelUnavailableError("the service is shutting down; send requests elsewhere")
        queued = self.engine.queued_cutouts
        if queued >= self.settings.max_queue_cutouts:
            raise OverloadedError(
                f"the inference queue is full ({queued} of {self.settings.max_queue_cutouts} "
                "cutouts); retry later"
            )


# --------------------------------------------------------------------------- request bodies


async def _stream_capped(request: Request, limit_bytes: int) -> AsyncIterator[bytes]:
    """Yield the body's chunks, refusing it as soon as it passes ``limit_bytes``.

    A declared Content-Length over the limit is refused before anything is
    read; a chunked or lying body is refused the moment the running total
    passes the limit, so a client cannot make the server buffer more than
    ``limit_bytes``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit_bytes:
            raise PayloadTooLargeError(
                f"the body is {int(declared)} bytes; at most {limit_bytes} bytes are accepted"
            )
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit_bytes:
            raise PayloadTooLargeError(
                f"the body passed {limit_bytes} bytes, the most accepted; send fewer or "
                "smaller files per request"
            )
        if chunk:
            yield chunk


def _content_disposition_filename(value: str | None) -> str | None:
    if not value:
        return None
    _, options = parse_options_header(value)
    name = options.get(b"filename")
    return name.decode("utf-8", "replace") if name else None


async def _read_raw_body(request: Request, settings: Settings) -> list[_Upload]:
    encoding = request.headers.get("content-encoding", "").strip().lower() or None
    if encoding not in (None, "identity", "gzip", "x-gzip"):
        raise UnsupportedMediaTypeError(
            f"got Content-Encoding {encoding!r}; accepted: gzip or none"
        )
    chunks = [chunk async for chunk in _stream_capped(request, settings.max_body_bytes)]
    filename = (
        _content_disposition_filename(request.headers.get("content-disposition"))
        or RAW_BODY_FILENAME
    )
    return [
        _Upload(
            filename=filename,
            data=b"".join(chunks),
            content_encoding=None if encoding in (None, "identity") else "gzip",
        )
    ]


class _MultipartCollector:
    """Callbacks for python-multipart that keep each part of field ``files`` in memory."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.uploads: list[_Upload] = []
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._chunks = []

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if field_name != FILES_FIELD:
            raise InvalidRequestError(
                f"got a form field named {field_name!r}; send FITS files in the field "
                f"{FILES_FIELD!r}"
            )
        if len(self.uploads) >= self.max_files:
            raise PayloadTooLargeError(
                f"got more than {self.max_files} files; at most {self.max_files} are accepted "
                "per request"
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        filename = _content_disposition_filename(self._headers.get("content-disposition"))
        encoding = self._headers.get("content-encoding", "").strip().lower()
        self.uploads.append(
            _Upload(
                filename=filename or f"{FILES_FIELD}[{len(self.uploads)}]",
                data=b"".join(self._chunks),
                content_encoding="gzip" if encoding in ("gzip", "x-gzip") else None,
            )
        )
        self._chunks = []

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(
    request: Request, options: dict[bytes, bytes], settings: Settings
) -> list[_Upload]:
    """Parse a multipart body while it streams in, under the body-size limit."""
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise UnsupportedMediaTypeError(
            "a multipart body cannot carry a Content-Encoding; gzip the files inside the form"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("the multipart/form-data Content-Type has no boundary")
    collector = _MultipartCollector(settings.max_files)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in _stream_capped(request, settings.max_body_bytes):
            parser.write(chunk)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise InvalidRequestError(f"the multipart/form-data body is malformed: {exc}") from exc
    if not collector.ended:
        raise InvalidRequestError("the multipart/form-data body ends before its closing boundary")
    if not collector.uploads:
        raise InvalidRequestError(f"the form holds no file in the field {FILES_FIELD!r}")
    return collector.uploads


async def _read_uploads(request: Request, settings: Settings) -> list[_Upload]:
    """The files of a request: one raw FITS body, or the ``files`` of a multipart form."""
    header = request.headers.get("content-type") or RAW_FITS_MEDIA_TYPES[-1]
    media_type, options = parse_options_header(header)
    media = media_type.decode("latin-1").lower()
    if media == MULTIPART_MEDIA_TYPE:
        return await _read_multipart(request, options, settings)
    if media in RAW_FITS_MEDIA_TYPES:
        return await _read_raw_body(request, settings)
    raise UnsupportedMediaTypeError(
        f"got Content-Type {media!r}; send one FITS file as "
        f"{', '.join(RAW_FITS_MEDIA_TYPES)} or several as {MULTIPART_MEDIA_TYPE} "
        f"in the field {FILES_FIELD!r}"
    )


async def _run_decode(call: Callable[[], ResultT], *, state: _AppState) -> ResultT:
    """Run a decode of untrusted bytes in a worker process (or the decode threads)."""
    if state.decoder is not None:
        return await state.decoder.run(call)
    return await asyncio.get_running_loop().run_in_executor(state.executor, call)


async def _prepare_uploads(
    uploads: Sequence[_Upload], *, state: _AppState
) -> list[PreparedCutout | LensServeError]:
    """Decode and preprocess a request's files; a file's error takes its place.

    With worker processes, plain float cubes (the survey's usual file, read without
    astropy) are prepared in the server's decode threads instead: nothing native parses
    them, and they save two pipe crossings. They go in a few groups, one call per
    decode thread rather than per file, so a 64-file request wakes the event loop a few
    times, not 64. The files the plain reader leaves go to the workers one by one.
    """
    outcomes: list[PreparedCutout | LensServeError | None] = [None] * len(uploads)
    if state.decoder is not None:
        outcomes = await _prepare_plain_groups(uploads, state=state)
    rest = [i for i, outcome in enumerate(outcomes) if outcome is None]
    decoded = await asyncio.gather(*(_prepare_upload(uploads[i], state=state) for i in rest))
    for i, outcome in zip(rest, decoded, strict=True):
        outcomes[i] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


async def _prepare_plain_groups(
    uploads: Sequence[_Upload], *, state: _AppState
) -> list[PreparedCutout | LensServeError | None]:
    """:func:`_prepare_plain_group` over the decode threads; None where a file is not plain."""
    n_groups = max(1, min(len(uploads), state.settings.resolved_decode_threads))
    size = -(-len(uploads) // n_groups)  # ceiling division
    loop = asyncio.get_running_loop()
    spec, limits = state.runtime.models.input, state.limits
    groups = await asyncio.gather(
        *(
            loop.run_in_executor(
                state.executor,
                partial(_prepare_plain_group, uploads[start : start + size], spec, limits),
            )
            for start in range(0, len(uploads), size)
        )
    )
    return [outcome for group in groups for outcome in group]


def _prepare_plain_group(
    uploads: Sequence[_Upload], spec: InputSpec, limits: FitsLimits
) -> list[PreparedCutout | LensServeError | None]:
    """Prepare each plain float cube of ``uploads`` in this thread; None for the others."""
    outcomes: list[PreparedCutout | LensServeError | None] = []
    for upload in uploads:
        try:
            outcomes.append(
                prepare_plain_cutout_for_input(
                    upload.data,
                    filename=upload.filename,
                    spec=spec,
                    limits=limits,
                    content_encoding=upload.content_encoding,
                )
            )
        except LensServeError as exc:
            outcomes.append(exc)
        except Exception as exc:  # a file the codec did not foresee must not take the request down
            outcomes.append(_unforeseen_decode_error(upload.filename, exc))
    return outcomes


async def _prepare_upload(upload: _Upload, *, state: _AppState) -> PreparedCutout | LensServeError:
    """Decode and preprocess one file in a worker process (or a decode thread); errors are
    returned."""
    full = partial(
        prepare_cutout_for_input,
        upload.data,
        filename=upload.filename,
        spec=state.runtime.models.input,
        limits=state.limits,
        content_encoding=upload.content_encoding,
    )
    try:
        return await _run_decode(full, state=state)
    except LensServeError as exc:
        return exc
    except Exception as exc:  # a file the codec did not foresee must not take the request down
        return _unforeseen_decode_error(upload.filename, exc)


def _unforeseen_decode_error(filename: str, exc: Exception) -> InvalidFitsError:
    """The 400 for a file whose decoding raised what the codec does not raise."""
    logger.error("unexpected failure decoding %r", filename, exc_info=exc)
    error = InvalidFitsError(f"{filename!r} could not be decoded ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error


# --------------------------------------------------------------------------- errors


def _error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def _service_error_response(exc: LensServeError, state: _AppState) -> JSONResponse:
    """The one rendering of a service error: status, JSON body, Retry-After, WWW-Authenticate."""
    state.metrics.errors.labels(code=exc.code).inc()
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(state.settings.overload_retry_after_s)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = 'Bearer realm="lensserve"'
    return _error_response(status_for(exc), exc.code, str(exc), **headers)


def _install_error_handlers(app: FastAPI, state: _AppState) -> None:
    async def handle_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LensServeError)
        return _service_error_response(exc, state)

    async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        state.metrics.errors.labels(code=InvalidRequestError.code).inc()
        return _error_response(422, InvalidRequestError.code, problems)

    async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = re.sub(r"\W+", "_", HTTPStatus(exc.status_code).phrase.lower())
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_response(exc.status_code, code, message, **dict(exc.headers or {}))

    app.add_exception_handler(LensServeError, handle_service_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)


# --------------------------------------------------------------------------- metrics middleware

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _MetricsMiddleware:
    """Counts requests by route and status and times them (a plain ASGI middleware)."""

    def __init__(
        self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]], metrics: _Metrics
    ) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # An exception leaves no response here (Starlette sends its 500 further out); a
        # request whose client went away ends with none either: nginx's 499.
        status: int | None = None
        raised = True

        async def send_with_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
            raised = False
        finally:
            if status is None:
                status = 500 if raised else 499
            route = scope.get("route")
            # Route templates, not raw paths, keep the label set small.
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(
                method=scope.get("method", ""), route=name, status=str(status)
            ).inc()
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - started)


# --------------------------------------------------------------------------- the app

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
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

_PREDICT_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One FITS file as the raw body (optionally gzip-compressed, or sent "
        "with `Content-Encoding: gzip`), or several in the multipart field `files`.",
        "content": {
            **{
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in RAW_FITS_MEDIA_TYPES
            },
            MULTIPART_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "required": [FILES_FIELD],
                    "properties": {
                        FILES_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "FITS cutouts (g, r, i); answered in this order.",
                        }
                    },
                }
            },
        },
    }
}


def _configure_logging(level: str) -> None:
    """Give the ``lensserve`` loggers a handler unless the host application set one up."""
    package_logger = logging.getLogger("lensserve")
    package_logger.setLevel(level.upper())
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package_logger.addHandler(handler)


def create_app(
    settings: Settings | None = None, *, runtime: OnnxModelRuntime | None = None
) -> FastAPI:
    """Build the lensserve application.

    Parameters
    ----------
    settings : Settings or None
        Configuration; read from the ``LENSSERVE_*`` environment when None.
    runtime : OnnxModelRuntime or None
        The model runtime, for tests that inject faults into inference; by
        default one is built from ``settings`` (models folder, device,
        threads, warm-up).

    Returns
    -------
    FastAPI
        The app. Its lifespan starts the batcher and loads the models in the
        background; ``/health/ready`` turns 200 once they are warmed up.
    """
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    metrics = _Metrics()
    runtime = runtime or OnnxModelRuntime(
        settings.models_dir,
        device=settings.device,
        intra_op_threads=settings.resolved_intra_op_threads,
        warmup_batch_sizes=(1, settings.max_batch_size) if settings.warmup else (),
        warmup_samples=settings.default_samples,
    )
    engine = InferenceEngine(
        runtime,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_s,
        max_queue_cutouts=settings.max_queue_cutouts,
        on_batch=metrics.observe_batch,
        model_instances=settings.resolved_model_instances,
    )
    state = _AppState(
        settings=settings,
        engine=engine,
        runtime=runtime,
        limits=FitsLimits(
            max_decompressed_bytes=settings.max_decompressed_bytes,
            max_pixels=settings.max_pixels,
            max_header_cards=settings.max_header_cards,
            max_masked_fraction=settings.max_masked_fraction,
        ),
        metrics=metrics,
        admission=Admission(limit=settings.max_concurrent_requests),
    )
    metrics.queued.set_function(lambda: engine.queued_cutouts)
    metrics.in_flight.set_function(lambda: state.admission.active)

    async def load_models() -> None:
        try:
            await asyncio.to_thread(engine.load)
        except LensServeError as exc:
            state.load_error = exc
            logger.error("lensserve is not ready: %s", exc)
            return
        state.ready = True
        metrics.ready.set(1)
        logger.info("models loaded and warmed up: %s", runtime.models.versions)

    def begin_drain() -> None:
        state.draining = True
        metrics.ready.set(0)
        logger.info(
            "SIGTERM: not ready from now on; the port closes in %g s", settings.shutdown_grace_s
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.decode_isolation == "process":
            state.decoder = IsolatedDecoder(
                workers=settings.resolved_decode_threads,
                max_memory_bytes=settings.decode_worker_max_bytes,
                niceness=settings.decode_niceness,
            )
            state.decoder.start()
        state.executor = ThreadPoolExecutor(
            max_workers=settings.resolved_decode_threads,
            thread_name_prefix="lensserve-decode",
            initializer=lower_current_thread_priority,
            initargs=(settings.decode_niceness,),
        )
        await engine.start()
        task = asyncio.create_task(load_models(), name="lensserve-load-models")
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        restore_sigterm = drain_on_sigterm(
            asyncio.get_running_loop(), on_drain=begin_drain, grace_s=settings.shutdown_grace_s
        )
        try:
            yield
        finally:
            restore_sigterm()
            state.ready = False
            metrics.ready.set(0)
            await engine.close()
            if state.decoder is not None:
                await asyncio.to_thread(state.decoder.close)
            if state.executor is not None:
                state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="lensserve",
        summary="Strong-lens probabilities, deflector parameters and Einstein-radius "
        "distributions for g, r, i FITS cutouts.",
        version=_package_version(),
        lifespan=lifespan,
    )
    app.state.lensserve = state
    _install_error_handlers(app, state)
    _install_middlewares(app, state)
    app.include_router(
        create_oip_v2_router(
            runtime=runtime,
            settings=settings,
            is_ready=lambda: state.ready and not state.draining,
            server_version=app.version,
        )
    )

    app.include_router(
        create_demo_router(
            models=lambda: runtime.models,
            limits=state.limits,
            max_body_bytes=settings.max_body_bytes,
            require_ready=state.require_ready,
            run_decode=partial(_run_decode, state=state),
            error_responses=_ERROR_RESPONSES,
        )
    )

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERROR_RESPONSES,
        openapi_extra=_PREDICT_REQUEST_BODY,
        summary="Predict for one or more FITS cutouts",
    )
    async def predict_cutouts(
        request: Request,
        samples: Annotated[
            int,
            Query(
                ge=1,
                le=settings.max_samples,
                description="MC-dropout samples per cutout for the theta_E distribution.",
            ),
        ] = settings.default_samples,
        include_samples: Annotated[
            bool, Query(description="Return the predictive draws of theta_E (arcsec).")
        ] = False,
        seed: Annotated[
            int | None,
            Query(
                ge=0,
                le=MAX_SEED,
                description="Makes the MC-dropout masks and the draws reproducible.",
            ),
        ] = None,
    ) -> Response:
        """Answer one result per file, in order.

        In a request with several files, a file that cannot be used gets an
        `error` in its result and the others are answered; a request with one
        file that cannot be used is answered with a 4xx error.
        """
        state.require_ready()
        uploads = await _read_uploads(request, settings)
        outcomes: list[CutoutOutcome | PreparedCutout] = list(
            await _prepare_uploads(uploads, state=state)
        )
        if len(outcomes) == 1 and isinstance(outcomes[0], LensServeError):
            raise outcomes[0]
        prepared = [o for o in outcomes if isinstance(o, PreparedCutout)]
        predictions = iter(
            await engine.predict_cutouts(
                prepared, num_samples=samples, seed=seed, include_samples=include_samples
            )
        )
        answers: list[CutoutOutcome] = [
            next(predictions) if isinstance(o, PreparedCutout) else o for o in outcomes
        ]
        if len(answers) == 1 and isinstance(answers[0], LensServeError):
            raise answers[0]
        errors = [a for a in answers if isinstance(a, LensServeError)]
        for error in errors:
            metrics.errors.labels(code=error.code).inc()
        metrics.cutouts.inc(len(answers) - len(errors))
        response = PredictResponse(
            model_versions=runtime.models.versions,
            results=[
                encode_result(answer, filename=upload.filename)
                for answer, upload in zip(answers, uploads, strict=True)
            ],
        )
        return Response(response.model_dump_json(), media_type="application/json")

    @app.get("/v1/models", response_model=ModelsResponse, summary="Model cards and provider")
    async def read_models() -> ModelsResponse:
        """The loaded models' cards and versions, and where they run."""
        state.require_ready()
        return ModelsResponse(
            provider=runtime.provider,
            device=settings.device,
            available_providers=available_providers(),
            intra_op_threads=runtime.intra_op_threads,
            model_instances=engine.model_instances,
            seed_controls_dropout=runtime.seed_controls_dropout,
            versions=runtime.models.versions,
            models=runtime.models.cards,
        )

    @app.get("/health/live", response_model=HealthResponse, summary="Liveness")
    async def read_liveness() -> HealthResponse:
        """200 while the process can answer."""
        return HealthResponse(status="live")

    @app.get(
        "/health/ready",
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse}},
        summary="Readiness",
    )
    async def read_readiness() -> HealthResponse:
        """200 once the models are loaded and warmed up; 503 before, if loading failed, while
        the inference queue is full and from SIGTERM on."""
        state.check_readiness()
        return HealthResponse(status="ready")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def read_metrics() -> Response:
        """Prometheus text exposition of this process's metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


#: Headers of a guard's refusal that the /v2 error shape keeps.
_GUARD_HEADERS = ("retry-after", "www-authenticate")


def _install_middlewares(app: FastAPI, state: _AppState) -> None:
    """The middleware stack, outermost last: CORS, metrics, API keys, work guard."""
    settings = state.settings

    def render_error(exc: LensServeError, scope: Scope) -> JSONResponse:
        response = _service_error_response(exc, state)
        if is_protected(route_path(scope), ("/v2",)):
            # The Open Inference Protocol's error shape (.oip_v2), same status and headers.
            kept = {k: v for k, v in response.headers.items() if k in _GUARD_HEADERS}
            response = JSONResponse(
                {"error": str(exc)}, status_code=response.status_code, headers=kept
            )
        return response

    # Starlette wraps each new middleware around the previous ones.
    app.add_middleware(
        WorkGuardMiddleware,  # type: ignore[arg-type]
        admission=state.admission,
        timeout_s=settings.request_timeout_s,
        render_error=render_error,
    )
    app.add_middleware(
        ApiKeyMiddleware,  # type: ignore[arg-type]
        keys=[key.get_secret_value() for key in settings.api_keys],
        render_error=render_error,
    )
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)  # type: ignore[arg-type]
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


def _package_version() -> str:
    try:
        return version("lensserve")
    except PackageNotFoundError:
        return "0+unknown"
