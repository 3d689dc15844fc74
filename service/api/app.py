"""The FastAPI app: :func:`create_app` wires the transport-free pieces to HTTP routes.

It joins the settings, the onnxruntime models (:mod:`service.core.runtime`),
the dynamic batcher (:mod:`service.core.inference`) and the decode pool
(:mod:`service.core.decode_pool`) to the routes below; request bodies are read
by :mod:`.uploads`, errors rendered by :mod:`.errors`, requests counted by
:mod:`.metrics` and guarded by :mod:`.middleware`.

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
    ``/v2/...``            Open Inference Protocol v2 (:mod:`.oip_v2`).

Everything under ``/v1`` and ``/v2`` passes the guards of :mod:`.guards`
(API keys when configured, admission by work, deadline, disconnects); SIGTERM
drains the process (:mod:`.draining`).
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.demo import create_demo_router
from service.api.draining import drain_on_sigterm
from service.api.errors import ERROR_RESPONSES, install_error_handlers
from service.api.guards import ADMISSION_TICKET_KEY, Admission, AdmissionTicket
from service.api.metrics import Metrics
from service.api.middleware import install_middlewares
from service.api.oip_v2 import create_oip_v2_router
from service.api.uploads import PREDICT_REQUEST_BODY, band_uploads, read_uploads
from service.core.decode_pool import DecodePool, band_group_name
from service.core.inference import CutoutOutcome, InferenceEngine, PreparedCutout
from service.core.runtime import MAX_SEED, OnnxModelRuntime, available_providers
from service.errors import LensServeError, ModelUnavailableError, OverloadedError
from service.schemas import (
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    PredictResponse,
    encode_result,
)
from service.settings import Settings

logger = logging.getLogger("lensserve.api")


@dataclass
class _AppState:
    """Everything one app holds: its settings, models, batcher, decode pool and metrics."""

    settings: Settings
    engine: InferenceEngine
    runtime: OnnxModelRuntime
    decode_pool: DecodePool
    metrics: Metrics
    admission: Admission
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

    async def load_models(self) -> None:
        """Load and warm up the models; the app turns ready, or remembers why it cannot."""
        try:
            await asyncio.to_thread(self.engine.load)
        except LensServeError as exc:
            self.load_error = exc
            logger.error("lensserve is not ready: %s", exc)
            return
        self.ready = True
        self.metrics.ready.set(1)
        logger.info("models loaded and warmed up: %s", self.runtime.models.versions)

    def begin_drain(self) -> None:
        """SIGTERM: answer not ready from now on, still serving what arrives."""
        self.draining = True
        self.metrics.ready.set(0)
        logger.info(
            "SIGTERM: not ready from now on; the port closes in %g s",
            self.settings.shutdown_grace_s,
        )


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
    state = _build_state(settings, runtime)
    app = FastAPI(
        title="lensserve",
        summary="Strong-lens probabilities, deflector parameters and Einstein-radius "
        "distributions for g, r, i FITS cutouts.",
        version=_package_version(),
        lifespan=_lifespan,
    )
    app.state.lensserve = state
    install_error_handlers(
        app, metrics=state.metrics, retry_after_s=settings.overload_retry_after_s
    )
    install_middlewares(app, settings=settings, admission=state.admission, metrics=state.metrics)

    app.include_router(
        create_oip_v2_router(
            runtime=state.runtime,
            settings=settings,
            is_ready=lambda: state.ready and not state.draining,
            server_version=app.version,
        )
    )
    app.include_router(
        create_demo_router(
            models=lambda: state.runtime.models,
            limits=state.decode_pool.limits,
            max_body_bytes=settings.max_body_bytes,
            require_ready=state.require_ready,
            run_decode=state.decode_pool.run,
            error_responses=ERROR_RESPONSES,
        )
    )
    app.add_api_route(
        "/v1/predict",
        _predict_cutouts_endpoint(state),
        methods=["POST"],
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=PREDICT_REQUEST_BODY,
        summary="Predict for one or more FITS cutouts",
    )
    app.add_api_route(
        "/v1/models",
        read_models,
        methods=["GET"],
        response_model=ModelsResponse,
        summary="Model cards and provider",
    )
    app.add_api_route(
        "/health/live",
        read_liveness,
        methods=["GET"],
        response_model=HealthResponse,
        summary="Liveness",
    )
    app.add_api_route(
        "/health/ready",
        read_readiness,
        methods=["GET"],
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse}},
        summary="Readiness",
    )
    app.add_api_route(
        "/metrics",
        read_metrics,
        methods=["GET"],
        response_class=Response,
        summary="Prometheus metrics",
    )
    return app


# --------------------------------------------------------------------------- routes


def _state(request: Request) -> _AppState:
    state: _AppState = request.app.state.lensserve
    return state


def _predict_cutouts_endpoint(state: _AppState) -> Callable[..., Awaitable[Response]]:
    """``POST /v1/predict``, its query bounds taken from the settings."""
    settings = state.settings

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
        explain: Annotated[
            bool,
            Query(
                description="Add occlusion maps of what drives P(lens) and theta_E to each "
                "result (about ten times the cost of the answer)."
            ),
        ] = False,
    ) -> Response:
        """Answer one result per file, in order; one object sent as one file per band
        (multipart fields `g`, `r`, `i`) gets one result.

        In a request with several files, a file that cannot be used gets an
        `error` in its result and the others are answered; a request with one
        file (or one object) that cannot be used is answered with a 4xx error.
        """
        state.require_ready()
        spec = state.runtime.models.input
        uploads = await read_uploads(
            request,
            max_body_bytes=settings.max_body_bytes,
            max_files=settings.max_files,
            band_fields=spec.bands,
        )
        per_band = band_uploads(uploads, spec.bands)
        ticket = request.scope.get(ADMISSION_TICKET_KEY)
        if isinstance(ticket, AdmissionTicket):
            # Admitted on an estimate from Content-Length; one object per band group.
            ticket.correct(1 if per_band is not None else len(uploads))
        outcomes: list[CutoutOutcome | PreparedCutout]
        if per_band is not None:
            outcomes = [await state.decode_pool.prepare_bands(per_band, spec=spec)]
            uploads = [replace(per_band[0], filename=band_group_name(per_band), band=None)]
        else:
            outcomes = list(await state.decode_pool.prepare(uploads, spec=spec))
        if len(outcomes) == 1 and isinstance(outcomes[0], LensServeError):
            raise outcomes[0]
        prepared = [o for o in outcomes if isinstance(o, PreparedCutout)]
        predictions = iter(
            await state.engine.predict_cutouts(
                prepared,
                num_samples=samples,
                seed=seed,
                include_samples=include_samples,
                explain=explain,
            )
        )
        answers: list[CutoutOutcome] = [
            next(predictions) if isinstance(o, PreparedCutout) else o for o in outcomes
        ]
        if len(answers) == 1 and isinstance(answers[0], LensServeError):
            raise answers[0]
        errors = [a for a in answers if isinstance(a, LensServeError)]
        for error in errors:
            state.metrics.errors.labels(code=error.code).inc()
        state.metrics.cutouts.inc(len(answers) - len(errors))
        response = PredictResponse(
            model_versions=state.runtime.models.versions,
            results=[
                encode_result(answer, filename=upload.filename)
                for answer, upload in zip(answers, uploads, strict=True)
            ],
        )
        return Response(response.model_dump_json(), media_type="application/json")

    return predict_cutouts


async def read_models(request: Request) -> ModelsResponse:
    """The loaded models' cards and versions, and where they run."""
    state = _state(request)
    state.require_ready()
    runtime = state.runtime
    return ModelsResponse(
        provider=runtime.provider,
        device=state.settings.device,
        available_providers=available_providers(),
        intra_op_threads=runtime.intra_op_threads,
        model_instances=state.engine.model_instances,
        seed_controls_dropout=runtime.seed_controls_dropout,
        versions=runtime.models.versions,
        models=runtime.models.cards,
    )


async def read_liveness() -> HealthResponse:
    """200 while the process can answer."""
    return HealthResponse(status="live")


async def read_readiness(request: Request) -> HealthResponse:
    """200 once the models are loaded and warmed up; 503 before, if loading failed, while
    the inference queue is full and from SIGTERM on."""
    _state(request).check_readiness()
    return HealthResponse(status="ready")


async def read_metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    registry = _state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------- wiring


def _build_state(settings: Settings, runtime: OnnxModelRuntime | None) -> _AppState:
    """The models, the batcher, the decode pool and the metrics of one app."""
    metrics = Metrics()
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
        decode_pool=DecodePool(
            isolation=settings.decode_isolation,
            workers=settings.resolved_decode_threads,
            max_memory_bytes=settings.decode_worker_max_bytes,
            niceness=settings.decode_niceness,
            limits=settings.fits_limits,
        ),
        metrics=metrics,
        admission=Admission(
            max_queue_wait_s=settings.max_queue_wait_s,
            seconds_per_cutout=lambda: engine.seconds_per_cutout,
            max_body_bytes_in_flight=settings.max_body_bytes_in_flight,
            unknown_body_bytes=settings.max_body_bytes,
            max_requests=settings.max_concurrent_requests,
            retry_after_s=settings.overload_retry_after_s,
            on_refusal=metrics.count_refusal,
        ),
    )
    metrics.queued.set_function(lambda: engine.queued_cutouts)
    metrics.in_flight.set_function(lambda: state.admission.active)
    metrics.admitted_cutouts.set_function(lambda: state.admission.cutouts)
    metrics.expected_wait.set_function(state.admission.expected_wait_s)
    return state


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the decode pool and the batcher, load the models in the background, drain on
    SIGTERM; stop them all on the way out."""
    state: _AppState = app.state.lensserve
    state.decode_pool.start()
    await state.engine.start()
    task = asyncio.create_task(state.load_models(), name="lensserve-load-models")
    state.background.add(task)
    task.add_done_callback(state.background.discard)
    restore_sigterm = drain_on_sigterm(
        asyncio.get_running_loop(),
        on_drain=state.begin_drain,
        grace_s=state.settings.shutdown_grace_s,
    )
    try:
        yield
    finally:
        restore_sigterm()
        state.ready = False
        state.metrics.ready.set(0)
        await state.engine.close()
        await state.decode_pool.close()


def _configure_logging(level: str) -> None:
    """Give the ``lensserve`` loggers a handler unless the host application set one up."""
    package_logger = logging.getLogger("lensserve")
    package_logger.setLevel(level.upper())
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package_logger.addHandler(handler)


def _package_version() -> str:
    try:
        return version("lensserve")
    except PackageNotFoundError:
        return "0+unknown"
