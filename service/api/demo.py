"""The browser demo: the page at ``/``, its static files, and the pixels it draws.

The page (``service/api/static/``: plain HTML, JS and CSS, nothing fetched from
elsewhere) posts files to ``/v1/predict`` and draws each cutout from
``POST /v1/cutout``, which answers the g, r, i pixels exactly as the service
decoded them for the models (any accepted layout: cubes, one HDU per band,
one file per band, tile-compressed, scaled integers, gzip; larger images
centre-cropped). The
colour composite is therefore of the pixels the models saw, and the browser
needs no FITS reader.
"""

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from service.api.uploads import (
    MULTIPART_MEDIA_TYPE,
    band_uploads,
    read_capped_body,
    read_uploads,
)
from service.contract.cards import InputSpec, ModelSet
from service.core.decode_pool import band_group_name
from service.core.inference import decode_band_files_for_input, decode_for_input
from service.errors import InvalidRequestError
from service.fits.decode import BandFile, DecodedCutout
from service.fits.raw import RAW_FITS_MEDIA_TYPES, FitsLimits

STATIC_DIR = Path(__file__).with_name("static")
#: Files the page loads, with their media types; nothing else under static/ is served.
STATIC_FILES = {
    "demo.js": "text/javascript",
    "demo.css": "text/css",
}


class CutoutPixels(BaseModel):
    """Answer of `POST /v1/cutout`: one cutout's decoded pixels, for display."""

    filename: str = Field(description="Name from the Content-Disposition header, or `body`.")
    bands: list[str] = Field(description="Band of each plane of `pixels`, e.g. g, r, i.")
    pixel_scale_arcsec: float = Field(description="Pixel scale (arcsec per pixel).")
    pixels: list[list[list[float | None]]] = Field(
        description="Linear fluxes in the file's unit, indexed [band][row][column]; row 0 is "
        "the first FITS row (lowest y). Masked pixels are null."
    )


def decode_pixels(
    data: bytes, *, filename: str, spec: InputSpec, limits: FitsLimits
) -> CutoutPixels:
    """Decode one FITS file as the models' input does, without preprocessing it."""
    return _cutout_pixels(decode_for_input(data, spec=spec, limits=limits), filename, spec)


def decode_band_pixels(
    files: Mapping[str, BandFile], *, filename: str, spec: InputSpec, limits: FitsLimits
) -> CutoutPixels:
    """Decode one object sent as one file per band as the models' input does."""
    decoded = decode_band_files_for_input(files, spec=spec, limits=limits)
    return _cutout_pixels(decoded, filename, spec)


def _cutout_pixels(decoded: DecodedCutout, filename: str, spec: InputSpec) -> CutoutPixels:
    pixels = decoded.pixels.astype(object)
    # JSON has no NaN: masked pixels travel as null.
    pixels[~np.isfinite(decoded.pixels)] = None
    values = pixels.tolist()
    return CutoutPixels(
        filename=filename,
        bands=list(spec.bands),
        pixel_scale_arcsec=spec.pixel_scale_arcsec,
        pixels=values,
    )


def create_demo_router(
    *,
    models: Callable[[], ModelSet],
    limits: FitsLimits,
    max_body_bytes: int,
    require_ready: Callable[[], None],
    run_decode: Callable[[Callable[[], CutoutPixels]], Awaitable[CutoutPixels]],
    error_responses: dict[int | str, dict[str, Any]] | None = None,
) -> APIRouter:
    """Routes of the demo page and of the pixels it draws.

    Parameters
    ----------
    models : callable
        Returns the loaded model cards (bands, cutout size, pixel scale).
    limits : FitsLimits
        The same decoding limits as ``/v1/predict``.
    max_body_bytes : int
        Largest body accepted (bytes).
    require_ready : callable
        Raises ``ModelUnavailableError`` while the models are not loaded.
    run_decode : callable
        Runs a decode call off the event loop, where ``/v1/predict`` decodes
        untrusted files (a worker process by default).
    error_responses : dict or None
        OpenAPI description of the error answers, as ``/v1/predict`` documents them.
    """
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def read_demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    for name, media_type in STATIC_FILES.items():
        router.add_api_route(
            f"/static/{name}",
            _static_endpoint(STATIC_DIR / name, media_type),
            methods=["GET"],
            include_in_schema=False,
        )

    @router.post(
        "/v1/cutout",
        response_model=CutoutPixels,
        responses=error_responses,
        summary="Decoded pixels of one FITS cutout (for display)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    **{
                        media: {"schema": {"type": "string", "format": "binary"}}
                        for media in RAW_FITS_MEDIA_TYPES
                    },
                    MULTIPART_MEDIA_TYPE: {
                        "schema": {
                            "type": "object",
                            "description": "One object as one file per band, in fields "
                            "named after the model's bands (g, r, i), or one file in `files`.",
                        }
                    },
                },
            }
        },
    )
    async def read_cutout_pixels(
        request: Request,
        x_filename: Annotated[str | None, Header(description="Name reported back.")] = None,
    ) -> CutoutPixels:
        """The g, r, i pixels of one FITS file (raw body), or of one object sent as one
        file per band (multipart fields `g`, `r`, `i`), as decoded for the models.

        The demo page draws its colour composite from these; no prediction is made.
        """
        require_ready()
        spec = models().input
        media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if media != MULTIPART_MEDIA_TYPE:
            data = await read_capped_body(request, max_body_bytes)
            return await run_decode(
                partial(
                    decode_pixels, data, filename=x_filename or "body", spec=spec, limits=limits
                )
            )
        uploads = await read_uploads(
            request,
            max_body_bytes=max_body_bytes,
            max_files=len(spec.bands),
            band_fields=spec.bands,
        )
        per_band = band_uploads(uploads, spec.bands)
        if per_band is None:
            if len(uploads) != 1:
                raise InvalidRequestError(
                    f"got {len(uploads)} files; /v1/cutout draws one object: one file, or one "
                    f"file per band ({', '.join(spec.bands)})"
                )
            (upload,) = uploads
            call = partial(
                decode_pixels, upload.data, filename=upload.filename, spec=spec, limits=limits
            )
            return await run_decode(call)
        files = {
            upload.band or "": BandFile(upload.data, upload.filename, upload.content_encoding)
            for upload in per_band
        }
        call = partial(
            decode_band_pixels,
            files,
            filename=band_group_name(per_band),
            spec=spec,
            limits=limits,
        )
        return await run_decode(call)

    return router


def _static_endpoint(path: Path, media_type: str) -> Callable[[], FileResponse]:
    def read_static_file() -> FileResponse:
        return FileResponse(path, media_type=media_type)

    return read_static_file
