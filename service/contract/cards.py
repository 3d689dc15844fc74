"""Model cards: the JSON contract between ``training/`` and ``service/``.

Each ONNX model in ``models/`` ships with a JSON card naming its input (tensor
name, shape, layout, bands, pixel scale, preprocessing id) and outputs (names,
shapes, units). The service reads the card and never guesses; it also checks
the ONNX file against the card's SHA-256 so a half-copied or swapped model is
refused at start-up rather than answering with the wrong numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.contract.ood import OOD_METHOD_IDS, OodStatistics, read_ood_statistics
from service.contract.preprocessing import PREPROCESSING_ID
from service.contract.uncertainty import QUANTILE_LEVELS, RegimeTable
from service.errors import ModelUnavailableError

#: Card names of the three models the service needs, by role.
CLASSIFIER_NAME = "lens_classifier"
REGRESSOR_NAME = "einstein_radius"
MC_NAME = "einstein_radius_mc"

#: Output tensors the service reads from each model.
REQUIRED_OUTPUTS: dict[str, tuple[str, ...]] = {
    CLASSIFIER_NAME: ("lens_probability",),
    REGRESSOR_NAME: ("parameters",),
    MC_NAME: ("theta_E_samples", "theta_E_log_variance_samples"),
}
#: Optional classifier output: the trunk's feature vector, read for the out-of-distribution
#: score (:mod:`service.contract.ood`) when the card lists it.
FEATURES_OUTPUT = "features"
#: Optional classifier output: each band's seeing FWHM (log10 arcsec) as a small network in
#: the classifier's graph estimates it, for the score's seeing term (method ``..._psf_v2``).
SEEING_OUTPUT = "psf_fwhm_log10_arcsec"
#: Optional MC output: the regressor's point parameters from the MC graph's own trunk passes.
#: When the MC card lists it, the full answer runs two models instead of three.
MC_PARAMETERS_OUTPUT = "parameters"
#: Order of the regressor's ``parameters`` components the service reports.
PARAMETER_COMPONENTS: tuple[str, ...] = ("theta_E", "e1", "e2", "center_x", "center_y")
#: Name of the MC model's scalar input giving the dropout passes per cutout.
NUM_SAMPLES_INPUT = "num_samples"


class InputSpec(BaseModel):
    """The image tensor a model takes."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="ONNX input name.")
    shape: list[int | None] = Field(description="Tensor shape; null marks the batch axis.")
    dtype: str = Field(description="Element type, e.g. float32.")
    layout: str = Field(description="Axis order, e.g. NHWC.")
    bands: list[str] = Field(description="Photometric bands in channel order.")
    pixel_scale_arcsec: float = Field(gt=0, description="Pixel scale (arcsec per pixel).")
    preprocessing: str = Field(description="Identifier of the preprocessing the model expects.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one cutout as the model takes it: (ny, nx, bands) in pixels and bands."""
        ny, nx, bands = self.shape[1:]
        if ny is None or nx is None or bands is None:
            raise ValueError(f"input shape {self.shape} leaves a cutout dimension open")
        return ny, nx, bands


class ExtraInputSpec(BaseModel):
    """A non-image input, such as the MC model's ``num_samples``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    shape: list[int | None]
    dtype: str
    meaning: str = ""


class OutputSpec(BaseModel):
    """One output tensor, with its meaning and unit(s)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    shape: list[int | None]
    dtype: str
    meaning: str = ""
    unit: str | None = Field(default=None, description="Unit of every element.")
    components: list[str] | None = Field(default=None, description="Names along the last axis.")
    units: list[str] | None = Field(default=None, description="Unit of each component.")


class IntervalCalibration(BaseModel):
    """Recalibrated quantile levels of the MC model's predictive mixture.

    The reported quantile at ``levels[i]`` is the mixture's quantile at
    ``mixture_levels[i]``, fitted on held-out simulated lenses so that each
    central interval covers its nominal fraction (Kuleshov et al. 2018).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    levels: tuple[float, ...] = Field(description="Reported quantile levels (fractions).")
    mixture_levels: tuple[float, ...] = Field(description="Mixture CDF levels used for them.")

    @model_validator(mode="after")
    def _check(self) -> IntervalCalibration:
        if self.levels != QUANTILE_LEVELS:
            raise ValueError(f"levels must be {list(QUANTILE_LEVELS)}, got {list(self.levels)}")
        inner = self.mixture_levels
        if len(inner) != len(self.levels) or not all(0 < a < b < 1 for a, b in _pairs(inner)):
            raise ValueError(f"mixture_levels must rise strictly inside (0, 1), got {list(inner)}")
        return self


class RegimeCalibration(BaseModel):
    """Per-regime calibration of the MC model's intervals (:class:`RegimeTable`).

    Fitted by ``python -m training calibrate-regimes`` on held-out simulated
    lenses: in each bin of predicted theta_E crossed with each band of
    signal-to-noise, the quantiles of the standardised residual (truth - mean)
    / std at ``levels``. When present, the service reports the calibrated
    distribution built from them instead of the mixture's (``interval_calibration``
    is then unused).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    theta_E_edges_arcsec: tuple[float, ...] = Field(
        description="Interior edges between bins of predicted theta_E (arcsec)."
    )
    signal_to_noise_edges: tuple[float, ...] = Field(
        description="Interior edges between signal-to-noise bands (dimensionless)."
    )
    levels: tuple[float, ...] = Field(description="Levels of the residual quantiles (fractions).")
    residual_quantiles: tuple[tuple[tuple[float, ...], ...], ...] = Field(
        description="Quantiles of the standardised residual, [theta_E bin][band][level]."
    )

    @model_validator(mode="after")
    def _check(self) -> RegimeCalibration:
        self.table()  # RegimeTable checks shapes, order and levels
        return self

    def table(self) -> RegimeTable:
        """The numpy table the service applies."""
        return RegimeTable(
            theta_E_edges_arcsec=np.asarray(self.theta_E_edges_arcsec, dtype=np.float64),
            signal_to_noise_edges=np.asarray(self.signal_to_noise_edges, dtype=np.float64),
            levels=tuple(self.levels),
            residual_quantiles=np.asarray(self.residual_quantiles, dtype=np.float64),
        )


class OutOfDistributionSpec(BaseModel):
    """The classifier card's out-of-distribution score (:mod:`service.contract.ood`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str = Field(description="Identifier of the score's maths and statistics.")
    statistics_file: str = Field(description="The statistics' .npz file, next to the card.")
    statistics_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    threshold: float = Field(description="Scores above it are flagged (score units).")
    flagged_fraction: float = Field(
        ge=0, le=1, description="Share (0-1) of the threshold data flagged at that threshold."
    )


def _pairs(values: tuple[float, ...]) -> list[tuple[float, float]]:
    return list(zip(values[:-1], values[1:], strict=True))


class ModelCard(BaseModel):
    """The JSON card that travels with each ONNX model in ``models/``."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    name: str
    version: str
    description: str = ""
    created: str | None = None
    git_commit: str | None = None
    input: InputSpec
    extra_inputs: list[ExtraInputSpec] = Field(default_factory=list)
    outputs: list[OutputSpec]
    metrics: dict[str, Any] = Field(default_factory=dict)
    onnx_file: str
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    onnx_opset: int | None = None
    interval_calibration: IntervalCalibration | None = None
    regime_calibration: RegimeCalibration | None = None
    out_of_distribution: OutOfDistributionSpec | None = None

    @property
    def output_names(self) -> list[str]:
        """Names of the output tensors, in card order."""
        return [spec.name for spec in self.outputs]

    def output(self, name: str) -> OutputSpec:
        """The output called ``name``; raises ``KeyError`` when the card has none."""
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass(frozen=True)
class ModelSet:
    """The three cards the service serves, with the ONNX bytes each one vouches for."""

    classifier: ModelCard
    regressor: ModelCard
    mc: ModelCard
    onnx_bytes: dict[str, bytes]
    """Serialized ONNX model of each card, keyed by card name (bytes, already verified)."""
    ood: OodStatistics | None = None
    """The out-of-distribution statistics of the classifier's card (None: no score)."""

    @property
    def cards(self) -> dict[str, ModelCard]:
        """All cards keyed by model name."""
        return {card.name: card for card in (self.classifier, self.regressor, self.mc)}

    @property
    def versions(self) -> dict[str, str]:
        """Version string of each model, keyed by model name."""
        return {name: card.version for name, card in self.cards.items()}

    @property
    def input(self) -> InputSpec:
        """The image input all three models share."""
        return self.classifier.input

    @property
    def mc_mixture_levels(self) -> tuple[float, ...]:
        """Mixture CDF levels reported as ``QUANTILE_LEVELS`` (the card's recalibration)."""
        calibration = self.mc.interval_calibration
        return QUANTILE_LEVELS if calibration is None else calibration.mixture_levels

    @functools.cached_property
    def mc_regime_table(self) -> RegimeTable | None:
        """The MC card's per-regime calibration, or None when the card has none."""
        calibration = self.mc.regime_calibration
        return None if calibration is None else calibration.table()

    @property
    def ood_threshold(self) -> float:
        """Score above which a cutout is flagged (score units; inf without statistics)."""
        spec = self.classifier.out_of_distribution
        return float("inf") if spec is None or self.ood is None else spec.threshold

    @property
    def mc_gives_parameters(self) -> bool:
        """Whether the MC graph also returns the regressor's point ``parameters``."""
        return MC_PARAMETERS_OUTPUT in self.mc.output_names


def dump_model_card(card: ModelCard) -> str:
    """The card as ``training/`` writes it to ``models/<name>.json``.

    Only the keys the card was built with are written (no defaults filled in), so
    reading the file back gives the same card.
    """
    return json.dumps(card.model_dump(mode="json", exclude_unset=True), indent=2) + "\n"


def read_model_card(path: Path) -> ModelCard:
    """Parse one JSON card.

    Parameters
    ----------
    path : Path
        The ``<name>.json`` file.

    Raises
    ------
    ModelUnavailableError
        The file is missing, not JSON, or not a valid card.
    """
    try:
        return ModelCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ModelUnavailableError(f"model card {path} does not exist") from exc
    except (OSError, ValueError, ValidationError) as exc:
        raise ModelUnavailableError(f"model card {path} is not a valid card: {exc}") from exc


def _read_verified_onnx(card: ModelCard, models_dir: Path) -> bytes:
    """The card's ONNX file as bytes, after checking it against ``onnx_sha256``."""
    onnx_path = models_dir / card.onnx_file
    try:
        data = onnx_path.read_bytes()
    except OSError as exc:
        raise ModelUnavailableError(
            f"model {card.name!r}: cannot read its ONNX file {onnx_path}: {exc}"
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != card.onnx_sha256:
        raise ModelUnavailableError(
            f"model {card.name!r}: {onnx_path} has SHA-256 {actual}, but its card expects "
            f"{card.onnx_sha256}; the file and the card do not belong together"
        )
    return data


def _read_ood_statistics(card: ModelCard, models_dir: Path) -> OodStatistics | None:
    """The classifier's out-of-distribution statistics, checked against its card; None if none.

    A card with an ``out_of_distribution`` entry must also list the ``features``
    output, and the file must match its sha256 and the features' length.
    """
    spec = card.out_of_distribution
    if spec is None:
        return None
    if FEATURES_OUTPUT not in card.output_names:
        raise ModelUnavailableError(
            f"model {card.name!r}: its card has out-of-distribution statistics but no "
            f"{FEATURES_OUTPUT!r} output (outputs: {card.output_names})"
        )
    if spec.method not in OOD_METHOD_IDS:
        raise ModelUnavailableError(
            f"model {card.name!r}: out-of-distribution method {spec.method!r}; this service "
            f"implements {list(OOD_METHOD_IDS)}"
        )
    path = models_dir / spec.statistics_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelUnavailableError(
            f"model {card.name!r}: cannot read its out-of-distribution statistics {path}: {exc}"
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.statistics_sha256:
        raise ModelUnavailableError(
            f"model {card.name!r}: {path} has SHA-256 {actual}, but its card expects "
            f"{spec.statistics_sha256}; the file and the card do not belong together"
        )
    try:
        stats = read_ood_statistics(data)
    except ValueError as exc:
        raise ModelUnavailableError(f"model {card.name!r}: {path}: {exc}") from exc
    shape = card.output(FEATURES_OUTPUT).shape
    if len(shape) == 2 and shape[1] is not None and shape[1] != stats.n_features:
        raise ModelUnavailableError(
            f"model {card.name!r}: {path} is for {stats.n_features} features; the "
            f"{FEATURES_OUTPUT!r} output has {shape[1]}"
        )
    if stats.has_seeing and SEEING_OUTPUT not in card.output_names:
        raise ModelUnavailableError(
            f"model {card.name!r}: {path} has a seeing term but the card lists no "
            f"{SEEING_OUTPUT!r} output (outputs: {card.output_names})"
        )
    return stats


def _check_card(card: ModelCard, reference: InputSpec) -> None:
    """Refuse a card the service cannot serve: missing outputs or a different input."""
    missing = [name for name in REQUIRED_OUTPUTS[card.name] if name not in card.output_names]
    if missing:
        raise ModelUnavailableError(
            f"model {card.name!r}: its card lists outputs {card.output_names}, "
            f"the service needs {list(REQUIRED_OUTPUTS[card.name])}"
        )
    spec = card.input
    if spec.preprocessing != PREPROCESSING_ID:
        raise ModelUnavailableError(
            f"model {card.name!r} expects preprocessing {spec.preprocessing!r}; this service "
            f"implements {PREPROCESSING_ID!r}"
        )
    if spec.layout != "NHWC" or spec.dtype != "float32" or len(spec.shape) != 4:
        raise ModelUnavailableError(
            f"model {card.name!r} takes a {spec.dtype} {spec.layout} tensor of shape "
            f"{spec.shape}; the service feeds float32 NHWC (n, ny, nx, bands)"
        )
    if any(dim is None for dim in spec.shape[1:]):
        raise ModelUnavailableError(
            f"model {card.name!r}: input shape {spec.shape} must fix the cutout size and bands"
        )
    if spec.shape[1] != spec.shape[2] or spec.shape[3] != len(spec.bands):
        raise ModelUnavailableError(
            f"model {card.name!r}: input shape {spec.shape} does not match square cutouts "
            f"in {len(spec.bands)} bands {spec.bands}"
        )
    if (spec.shape[1:], spec.bands, spec.pixel_scale_arcsec) != (
        reference.shape[1:],
        reference.bands,
        reference.pixel_scale_arcsec,
    ):
        raise ModelUnavailableError(
            f"model {card.name!r} takes {spec.shape[1:]} cutouts in bands {spec.bands} at "
            f"{spec.pixel_scale_arcsec} arcsec/pixel, but {CLASSIFIER_NAME!r} takes "
            f"{reference.shape[1:]} in {reference.bands} at {reference.pixel_scale_arcsec}; "
            "the service feeds one cutout to all three models"
        )


def read_model_cards(models_dir: Path) -> ModelSet:
    """Read and check the three model cards in ``models_dir``.

    Parameters
    ----------
    models_dir : Path
        Folder holding ``lens_classifier.json``, ``einstein_radius.json`` and
        ``einstein_radius_mc.json`` with the ONNX files they name.

    Returns
    -------
    ModelSet
        The cards, with the ONNX bytes whose SHA-256 matched each card.

    Raises
    ------
    ModelUnavailableError
        A card or ONNX file is missing or unreadable, a file's SHA-256 differs
        from its card, or the cards disagree on the input the service feeds.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelUnavailableError(f"models folder {models_dir} does not exist")
    cards: dict[str, ModelCard] = {}
    for name in REQUIRED_OUTPUTS:
        card = read_model_card(models_dir / f"{name}.json")
        if card.name != name:
            raise ModelUnavailableError(
                f"{models_dir / f'{name}.json'} describes a model named {card.name!r}"
            )
        cards[name] = card
    reference = cards[CLASSIFIER_NAME].input
    for card in cards.values():
        _check_card(card, reference)
    for name in (REGRESSOR_NAME, MC_NAME):
        if MC_PARAMETERS_OUTPUT not in cards[name].output_names:
            continue
        components = cards[name].output(MC_PARAMETERS_OUTPUT).components
        if components is not None and tuple(components) != PARAMETER_COMPONENTS:
            raise ModelUnavailableError(
                f"model {name!r} returns parameters {components}; the service reports "
                f"{list(PARAMETER_COMPONENTS)}"
            )
    if NUM_SAMPLES_INPUT not in {spec.name for spec in cards[MC_NAME].extra_inputs}:
        raise ModelUnavailableError(
            f"model {MC_NAME!r} has no {NUM_SAMPLES_INPUT!r} input in its card"
        )
    return ModelSet(
        classifier=cards[CLASSIFIER_NAME],
        regressor=cards[REGRESSOR_NAME],
        mc=cards[MC_NAME],
        onnx_bytes={name: _read_verified_onnx(card, models_dir) for name, card in cards.items()},
        ood=_read_ood_statistics(cards[CLASSIFIER_NAME], models_dir),
    )
