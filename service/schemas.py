"""Pydantic models of the JSON the service answers with, and the encoders that fill them.

``encode_result`` / ``encode_error`` are the output half of the codec pair
whose input half is :func:`service.fits.decode.decode_fits`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from service.contract.cards import ModelCard
from service.core.explain import Explanation
from service.core.inference import CutoutPrediction
from service.errors import LensServeError

_EXAMPLE_QUANTILES: dict[str, Any] = {
    "0.025": 0.93,
    "0.16": 1.08,
    "0.5": 1.21,
    "0.84": 1.33,
    "0.975": 1.47,
}
_EXAMPLE_RESULT: dict[str, Any] = {
    "filename": "00000.fits",
    "lens_probability": 0.97,
    "parameters": {"theta_E": 1.2, "e1": 0.05, "e2": -0.11, "center_x": 0.03, "center_y": -0.02},
    "einstein_radius": {
        "mean": 1.21,
        "std": 0.13,
        "aleatoric_std": 0.11,
        "epistemic_std": 0.07,
        "quantiles": _EXAMPLE_QUANTILES,
    },
    "wcs": {"ra": 52.3791, "dec": -27.9183},
    "warnings": [],
    "error": None,
    "out_of_distribution": {"score": -0.4, "flag": False},
}
_EXAMPLE_FAILED_RESULT: dict[str, Any] = {
    "filename": "notes.txt",
    "lens_probability": None,
    "parameters": None,
    "einstein_radius": None,
    "wcs": None,
    "warnings": [],
    "error": {
        "code": "invalid_fits",
        "message": "notes.txt is not a FITS file: it does not start with 'SIMPLE  ='",
    },
}


class ErrorDetail(BaseModel):
    """What went wrong, machine- and human-readable."""

    code: str = Field(description="Stable error code, e.g. `invalid_fits`, `band_mismatch`.")
    message: str = Field(description="What was received and what is accepted.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "band_mismatch",
                        "message": "got 2 bands (g, r); the model needs g, r, i",
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class Quantiles(BaseModel):
    """Quantiles of the predictive distribution of theta_E, keyed by level (arcsec)."""

    model_config = ConfigDict(
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        json_schema_extra={"examples": [_EXAMPLE_QUANTILES]},
    )

    q_0_025: float = Field(alias="0.025", description="2.5% quantile (arcsec).")
    q_0_16: float = Field(alias="0.16", description="16% quantile (arcsec).")
    q_0_5: float = Field(alias="0.5", description="Median (arcsec).")
    q_0_84: float = Field(alias="0.84", description="84% quantile (arcsec).")
    q_0_975: float = Field(alias="0.975", description="97.5% quantile (arcsec).")


class EinsteinRadiusDistribution(BaseModel):
    """Predictive distribution of the Einstein radius theta_E from MC dropout.

    The equal-weight mixture of one Gaussian per dropout pass (Perreault
    Levasseur et al. 2017); its variance is the aleatoric part (mean predicted
    variance) plus the epistemic part (spread of the pass means). With a
    per-regime table in the MC card (``calibration`` is ``per_regime``), every
    field describes the calibrated distribution m + s G(Z) built from the
    mixture's mean m and std s (docs/calibration.md).
    """

    mean: float = Field(description="Mean of theta_E (arcsec).")
    std: float = Field(description="Total standard deviation of theta_E (arcsec).")
    aleatoric_std: float = Field(description="Standard deviation from noise in the data (arcsec).")
    epistemic_std: float = Field(
        description="Standard deviation from the model's own uncertainty (arcsec); widened "
        "by score / threshold when `out_of_distribution.flag` is true."
    )
    quantiles: Quantiles
    samples: list[float] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Draws from the predictive distribution (arcsec), one per MC pass; "
        "present only with `include_samples=true`.",
    )
    calibration: Literal["per_regime", "mixture"] = Field(
        default="mixture",
        description="`per_regime`: all fields describe the distribution calibrated in the "
        "cutout's bin of predicted theta_E and signal-to-noise band; `mixture`: the raw "
        "mixture, quantiles at the card's recalibrated levels.",
    )
    signal_to_noise: float | None = Field(
        default=None,
        description="Signal-to-noise of the light within 3.2 arcsec of the centre "
        "(dimensionless): the noise axis of the per-regime calibration.",
    )


class Parameters(BaseModel):
    """Point estimates of the deflector's mass profile (singular isothermal ellipsoid)."""

    theta_E: float = Field(description="Einstein radius (arcsec).")
    e1: float = Field(description="Mass ellipticity component 1 (dimensionless).")
    e2: float = Field(description="Mass ellipticity component 2 (dimensionless).")
    center_x: float = Field(description="Lens centre, x offset from the cutout centre (arcsec).")
    center_y: float = Field(description="Lens centre, y offset from the cutout centre (arcsec).")


class SkyPosition(BaseModel):
    """Sky position of the cutout centre from the file's celestial WCS."""

    ra: float = Field(description="Right ascension (degrees).")
    dec: float = Field(description="Declination (degrees).")


#: Decimals kept in the explanation maps: 1e-6 in probability or arcsec, far below what
#: occluding 64 pixels changes, and a quarter of the JSON of full float32 values.
EXPLANATION_DECIMALS = 6


class ExplanationMaps(BaseModel):
    """Occlusion-sensitivity maps over the cutout's pixels (`explain=true` only).

    Each map is indexed [row][column] like the cutout's pixels (row 0 is the first FITS
    row). A value is the mean drop of the model's answer when a patch covering the pixel is
    set to the sky level, over the patches that cover it; pixels outside the probed central
    square are 0. Positive: that light raises the answer.
    """

    method: str = Field(description="`occlusion` (Zeiler & Fergus 2014).")
    lens_probability: list[list[float]] = Field(
        description="Drop in P(lens) (probability) when the pixel is occluded."
    )
    theta_E: list[list[float]] = Field(
        description="Drop in the point theta_E (arcsec) when the pixel is occluded."
    )
    patch_pixels: int = Field(description="Side of each occluded square patch (pixels).")
    stride_pixels: int = Field(description="Step between neighbouring patches (pixels).")
    region_pixels: int = Field(
        description="Side of the central square the patches tile (pixels); 0 outside it."
    )


class OutOfDistributionScore(BaseModel):
    """How unlike the training data the cutout is (image features and input statistics)."""

    score: float = Field(
        description="Standardised score; higher means less like the training data "
        "(0 is the training data's median, 1 its robust spread)."
    )
    flag: bool = Field(
        description="True when the score is above the threshold that 1% of in-distribution "
        "test cutouts exceed; a warning then says so."
    )


class CutoutResult(BaseModel):
    """The answer for one input file; either the predictions or `error` is set."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_RESULT]})

    filename: str = Field(description="Name of the file (multipart) or `body` (raw upload).")
    lens_probability: float | None = Field(
        description="Probability (0-1) that the cutout shows a strong gravitational lens."
    )
    parameters: Parameters | None
    einstein_radius: EinsteinRadiusDistribution | None
    wcs: SkyPosition | None = Field(
        description="Sky position of the cutout centre; null when the file has no celestial WCS."
    )
    warnings: list[str] = Field(
        description="Things the service fixed on the way, e.g. masked pixels filled or a "
        "larger cutout centre-cropped."
    )
    error: ErrorDetail | None = Field(
        description="Why this file could not be used (multi-file requests only); null on success."
    )
    explanation: ExplanationMaps | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="What drives P(lens) and theta_E, pixel by pixel; present only with "
        "`explain=true`.",
    )
    out_of_distribution: OutOfDistributionScore | None = Field(
        default=None,
        description="Out-of-distribution score and flag; null when the file could not be used "
        "or the models ship no out-of-distribution statistics.",
    )


class PredictResponse(BaseModel):
    """Answer of `POST /v1/predict`: exactly one result per input file, in order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_versions": {
                        "lens_classifier": "2.2.0",
                        "einstein_radius": "2.2.0",
                        "einstein_radius_mc": "2.2.0",
                    },
                    "results": [_EXAMPLE_RESULT, _EXAMPLE_FAILED_RESULT],
                }
            ]
        }
    )

    model_versions: dict[str, str] = Field(description="Version of each model that answered.")
    results: list[CutoutResult]


class ModelsResponse(BaseModel):
    """Answer of `GET /v1/models`."""

    model_config = ConfigDict(protected_namespaces=())

    provider: str = Field(description="onnxruntime execution provider in use.")
    device: str = Field(description="The configured device: auto, cpu or cuda.")
    available_providers: list[str] = Field(description="Providers this onnxruntime offers.")
    intra_op_threads: int = Field(description="onnxruntime threads per operator (count).")
    model_instances: int = Field(
        description="Batches that run at once, each with `intra_op_threads` (count)."
    )
    seed_controls_dropout: bool = Field(
        description="Whether a request's `seed` changes the MC-dropout masks; when false, "
        "seeded answers are still reproducible but every seed gives the same masks."
    )
    versions: dict[str, str] = Field(description="Version of each model.")
    models: dict[str, ModelCard] = Field(description="The model cards, keyed by model name.")


class HealthResponse(BaseModel):
    """Answer of the health endpoints."""

    status: str = Field(description="`live` or `ready`.")


def encode_error(error: LensServeError) -> ErrorDetail:
    """The code and message of a service error."""
    return ErrorDetail(code=error.code, message=str(error))


def encode_result(outcome: CutoutPrediction | LensServeError, *, filename: str) -> CutoutResult:
    """The JSON model of one file's prediction, or of the error that stopped it.

    Parameters
    ----------
    outcome : CutoutPrediction or LensServeError
        What :class:`~service.core.inference.InferenceEngine` or decoding produced.
    filename : str
        Name of the input file, reported back.
    """
    if isinstance(outcome, LensServeError):
        return CutoutResult(
            filename=filename,
            lens_probability=None,
            parameters=None,
            einstein_radius=None,
            wcs=None,
            warnings=[],
            error=encode_error(outcome),
        )
    radius = outcome.einstein_radius
    maps = outcome.explanation
    wcs = None
    if outcome.ra_deg is not None and outcome.dec_deg is not None:
        wcs = SkyPosition(ra=outcome.ra_deg, dec=outcome.dec_deg)
    return CutoutResult(
        filename=filename,
        lens_probability=outcome.lens_probability,
        parameters=Parameters(**outcome.parameters),
        einstein_radius=EinsteinRadiusDistribution(
            mean=radius.mean,
            std=radius.std,
            aleatoric_std=radius.aleatoric_std,
            epistemic_std=radius.epistemic_std,
            # Keys such as "0.025" are the levels written with format "g", as the schema names them.
            quantiles=Quantiles.model_validate(
                {f"{level:g}": value for level, value in radius.quantiles.items()}
            ),
            samples=None if radius.samples is None else radius.samples.tolist(),
            calibration="per_regime" if radius.calibrated_by_regime else "mixture",
            signal_to_noise=outcome.signal_to_noise,
        ),
        wcs=wcs,
        warnings=list(outcome.warnings),
        error=None,
        explanation=None if maps is None else encode_explanation(maps),
        out_of_distribution=None
        if outcome.out_of_distribution is None
        else OutOfDistributionScore(
            score=outcome.out_of_distribution.score, flag=outcome.out_of_distribution.flag
        ),
    )


def _rounded(values: NDArray[np.float32]) -> list[list[float]]:
    return np.round(values.astype(np.float64), EXPLANATION_DECIMALS).tolist()


def encode_explanation(explanation: Explanation) -> ExplanationMaps:
    """The JSON model of one cutout's occlusion maps, rounded to ``EXPLANATION_DECIMALS``."""
    return ExplanationMaps(
        method=explanation.method,
        lens_probability=_rounded(explanation.lens_probability),
        theta_E=_rounded(explanation.theta_E),
        patch_pixels=explanation.grid.patch_pixels,
        stride_pixels=explanation.grid.stride_pixels,
        region_pixels=explanation.grid.region_pixels,
    )
