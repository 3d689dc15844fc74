"""Open Inference Protocol v2 (KServe, Triton) over HTTP, beside ``/v1``.

Endpoints (prefix ``/v2``)
    ``GET  /v2``                                  server name, version, extensions
    ``GET  /v2/health/live``, ``/v2/health/ready`` 200 when true, 400 when false
    ``GET  /v2/models/{name}[/versions/{v}]``        inputs and outputs from the card
    ``GET  /v2/models/{name}[/versions/{v}]/ready``  200 when loaded
    ``POST /v2/models/{name}[/versions/{v}]/infer``  tensors in, tensors out

The models are ``lens_classifier``, ``einstein_radius`` and
``einstein_radius_mc``, fed preprocessed ``image`` tensors (FP32, NHWC, the
card's shape; see :func:`service.contract.preprocessing.preprocess_cutout`); the MC
model also takes ``num_samples`` (INT32; the service default when left out)
and a request parameter ``seed`` for reproducible dropout masks. Tensors come
as JSON ``data`` or with the binary tensor data extension. A request runs
directly on the onnxruntime sessions, outside the ``/v1`` batcher: the client
already batched along the first axis.

Errors are answered as the protocol's ``{"error": "<message>"}``, not the
``{"error": {"code", "message"}}`` of ``/v1``.
"""

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.api.oip_codec import (
    InferResponse,
    decode_infer_request,
    encode_infer_response,
    feeds_for_model,
    tensor_metadata,
)
from service.api.uploads import read_capped_body
from service.contract.cards import NUM_SAMPLES_INPUT, ModelCard
from service.core.runtime import MAX_SEED, OnnxModelRuntime
from service.errors import (
    InferenceError,
    InvalidRequestError,
    LensServeError,
    ModelNotFoundError,
    ModelUnavailableError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from service.settings import Settings

#: HTTP header carrying the JSON header's length when binary tensor data follow it.
HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
#: Request parameter that seeds the MC model's dropout masks.
SEED_PARAMETER = "seed"
#: Triton's name for the platform of ONNX models run by onnxruntime.
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("binary_tensor_data",)

_STATUS_BY_ERROR: dict[type[LensServeError], int] = {
    InvalidRequestError: 400,
    ModelNotFoundError: 404,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InferenceError: 500,
    ModelUnavailableError: 503,
}


class OipErrorResponse(BaseModel):
    """The protocol's error body."""

    error: str


#: Statuses the routes answer besides 200, documented so schema-driven clients expect them.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OipErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed request or tensors."),
        (401, "An API key is required and was missing or unknown."),
        (404, "No such model or version."),
        (413, "Body over the size limit."),
        (415, "Unsupported content type."),
        (500, "The model failed."),
        (503, "Models not loaded, or at capacity (Retry-After)."),
    )
}


def _status_for(error: LensServeError) -> int:
    for cls in type(error).__mro__:
        if cls in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[cls]
    return 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _OipRoute(APIRoute):
    """A route that answers errors in the protocol's shape, ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except LensServeError as exc:
                return _error(_status_for(exc), str(exc))
            except RequestValidationError as exc:
                return _error(400, str(exc.errors()))

        return answer


async def _read_body(request: Request, limit_bytes: int) -> bytes:
    """The body, refused as soon as it passes ``limit_bytes``; no Content-Encoding."""
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise UnsupportedMediaTypeError("the v2 endpoints read bodies without Content-Encoding")
    return await read_capped_body(request, limit_bytes)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidRequestError(
            f"{HEADER_LENGTH_HEADER} is {header_length!r}; the body has {len(body)} bytes"
        )
    return body[: int(header_length)], body[int(header_length) :]


def _seed(parameters: dict[str, Any]) -> int | None:
    seed = parameters.get(SEED_PARAMETER)
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"got seed {seed!r}; seeds are integers from 0 to {MAX_SEED}")
    return seed


def _check_num_samples(feeds: dict[str, np.ndarray], max_samples: int) -> None:
    if NUM_SAMPLES_INPUT in feeds:
        samples = int(feeds[NUM_SAMPLES_INPUT])
        if not 1 <= samples <= max_samples:
            raise InvalidRequestError(
                f"got {NUM_SAMPLES_INPUT}={samples}; accepted: 1 to {max_samples}"
            )


def create_oip_v2_router(
    *,
    runtime: OnnxModelRuntime,
    settings: Settings,
    is_ready: Callable[[], bool],
    server_version: str,
) -> APIRouter:
    """The ``/v2`` routes, answering from ``runtime`` once ``is_ready()`` is true.

    Parameters
    ----------
    runtime : OnnxModelRuntime
        The app's runtime; its sessions run the requests.
    settings : Settings
        Body limit (bytes), default and maximum MC samples (samples).
    is_ready : callable
        Whether the models are loaded and warmed up.
    server_version : str
        Version reported by ``GET /v2``.
    """
    router = APIRouter(
        prefix="/v2",
        tags=["Open Inference Protocol v2"],
        route_class=_OipRoute,
        responses=_ERROR_RESPONSES,
    )
    default_feeds = {NUM_SAMPLES_INPUT: np.asarray(settings.default_samples, dtype=np.int32)}

    def card_for(name: str, version: str | None) -> ModelCard:
        if not is_ready():
            raise ModelUnavailableError("the models are still loading; retry in a few seconds")
        cards = runtime.models.cards
        card = cards.get(name)
        if card is None:
            raise ModelNotFoundError(f"no model named {name!r}; models: {sorted(cards)}")
        if version is not None and version != card.version:
            raise ModelNotFoundError(
                f"model {name!r} has version {card.version!r}, not {version!r}"
            )
        return card

    @router.get("", summary="Server metadata")
    async def read_server_metadata() -> dict[str, Any]:
        return {"name": "lensserve", "version": server_version, "extensions": list(EXTENSIONS)}

    @router.get("/health/live", summary="Server liveness")
    async def read_server_liveness() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="Server readiness")
    async def read_server_readiness() -> JSONResponse:
        ready = is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    async def read_model_metadata(model_name: str, model_version: str | None = None) -> Any:
        card = card_for(model_name, model_version)
        inputs, outputs = tensor_metadata(card)
        return {
            "name": card.name,
            "versions": [card.version],
            "platform": PLATFORM,
            "inputs": inputs,
            "outputs": outputs,
        }

    async def read_model_readiness(
        model_name: str, model_version: str | None = None
    ) -> JSONResponse:
        try:
            card_for(model_name, model_version)
        except ModelUnavailableError:
            return JSONResponse({"name": model_name, "ready": False}, status_code=400)
        return JSONResponse({"name": model_name, "ready": True})

    def infer_tensors(card: ModelCard, header: bytes, binary: bytes) -> InferResponse:
        decoded = decode_infer_request(header, binary)
        feeds = feeds_for_model(card, decoded.inputs, defaults=default_feeds)
        _check_num_samples(feeds, settings.max_samples)
        outputs = runtime.run_model(card.name, feeds, seed=_seed(decoded.parameters))
        return encode_infer_response(
            decoded, model_name=card.name, model_version=card.version, outputs=outputs
        )

    async def infer_model(
        model_name: str, request: Request, model_version: str | None = None
    ) -> Response:
        card = card_for(model_name, model_version)
        body = await _read_body(request, settings.max_body_bytes)
        header, binary = _split_body(body, request.headers.get(HEADER_LENGTH_HEADER))
        # Parsing megabytes of JSON is as CPU-bound as the model: all of it leaves the loop.
        encoded = await asyncio.to_thread(infer_tensors, card, header, binary)
        if encoded.header_length is None:
            return Response(encoded.body, media_type="application/json")
        return Response(
            encoded.body,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH_HEADER: str(encoded.header_length)},
        )

    for prefix in ("/models/{model_name}", "/models/{model_name}/versions/{model_version}"):
        router.add_api_route(prefix, read_model_metadata, methods=["GET"], summary="Model metadata")
        router.add_api_route(
            f"{prefix}/ready", read_model_readiness, methods=["GET"], summary="Model readiness"
        )
        router.add_api_route(f"{prefix}/infer", infer_model, methods=["POST"], summary="Inference")
    return router
