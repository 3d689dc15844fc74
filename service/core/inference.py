"""From FITS bytes to per-cutout predictions, with no knowledge of HTTP.

Two steps, so each can run where it belongs:

1. :func:`prepare_cutout` (CPU-bound, thread-safe, one file): decode the FITS
   file for the models' bands, size and pixel scale, then apply the one
   preprocessing. The API runs it in a thread pool, many files at once.
2. :class:`InferenceEngine` merges the prepared cutouts of concurrent requests
   through a :class:`~service.core.batching.DynamicBatcher` into one onnxruntime
   call per model, then turns the raw outputs into
   :class:`CutoutPrediction` objects: the lens probability, the point
   parameters, and the theta_E predictive distribution summarised from the
   MC-dropout passes (:mod:`service.contract.uncertainty`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

from service.contract.cards import (
    CLASSIFIER_NAME,
    PARAMETER_COMPONENTS,
    REGRESSOR_NAME,
    REQUIRED_OUTPUTS,
    InputSpec,
    ModelSet,
)
from service.contract.ood import input_statistics, novelty_factor, spread_pass_means
from service.contract.preprocessing import preprocess_cutout_with_levels, signal_to_noise
from service.contract.uncertainty import (
    QUANTILE_LEVELS,
    calibrate_by_regime,
    draw_predictive_samples,
    draw_regime_samples,
    summarise_mc_samples,
)
from service.core.batching import BatchStats, DynamicBatcher
from service.core.explain import Explanation, explain_occlusion
from service.core.runtime import MAX_SEED, ModelRuntime, RawPredictions
from service.errors import InferenceError, LensServeError
from service.fits.decode import (
    BandFile,
    DecodedCutout,
    decode_band_files,
    decode_fits,
    decode_plain_fits,
)
from service.fits.raw import FitsLimits


@dataclass(frozen=True)
class PreparedCutout:
    """A decoded, preprocessed cutout ready for the models."""

    filename: str
    image: NDArray[np.float32]
    """Network input, shape (ny, nx, bands), in asinh noise units."""
    masked_fraction: float
    """Fraction (0-1) of pixels that were masked and filled."""
    ra_deg: float | None
    """Right ascension of the cutout centre (degrees, ICRS), when the file has a WCS."""
    dec_deg: float | None
    """Declination of the cutout centre (degrees, ICRS), when the file has a WCS."""
    warnings: tuple[str, ...]
    signal_to_noise: float | None = None
    """Signal-to-noise of the central aperture
    (:func:`~service.contract.preprocessing.signal_to_noise`; dimensionless); None: not yet
    measured (it is then measured on ``image`` when needed)."""

    def measured_signal_to_noise(self) -> float:
        """``signal_to_noise``, measured on ``image`` when it was not set (dimensionless)."""
        if self.signal_to_noise is not None:
            return self.signal_to_noise
        return float(signal_to_noise(self.image))

    input_statistics: NDArray[np.float64] | None = None
    """:func:`service.contract.ood.input_statistics` of the decoded cutout, before preprocessing."""


@dataclass(frozen=True)
class EinsteinRadiusPrediction:
    """Predictive distribution of the Einstein radius for one cutout (all in arcsec)."""

    mean: float
    std: float
    aleatoric_std: float
    epistemic_std: float
    quantiles: dict[float, float]
    """Quantile value (arcsec) keyed by level, for each level in ``QUANTILE_LEVELS``."""
    samples: NDArray[np.float64] | None
    """Draws from the predictive distribution (arcsec), when they were asked for."""
    calibrated_by_regime: bool = False
    """Whether the fields describe the card's per-regime calibrated distribution (else the
    mixture, read at the card's mixture levels)."""


@dataclass(frozen=True)
class OutOfDistribution:
    """How unlike the training data one cutout is (:mod:`service.contract.ood`)."""

    score: float
    """Standardised score; higher means less like the training data."""
    flag: bool
    """Whether the score is above the classifier card's threshold."""


@dataclass(frozen=True)
class CutoutPrediction:
    """Everything the models say about one cutout."""

    filename: str
    lens_probability: float
    """Probability (0-1) that the cutout shows a strong lens."""
    parameters: dict[str, float]
    """Point estimates: theta_E, center_x, center_y (arcsec); e1, e2 (dimensionless)."""
    einstein_radius: EinsteinRadiusPrediction
    ra_deg: float | None
    dec_deg: float | None
    warnings: tuple[str, ...]
    explanation: Explanation | None = None
    """Occlusion maps of what drives P(lens) and theta_E, when they were asked for."""
    signal_to_noise: float | None = None
    """Signal-to-noise of the central aperture (dimensionless), when it was measured."""
    out_of_distribution: OutOfDistribution | None = None
    """None when the models ship no out-of-distribution statistics."""


#: One slot of a batch answer: a prediction, or the error that stopped this cutout.
CutoutOutcome: TypeAlias = CutoutPrediction | LensServeError


def prepare_cutout(
    data: bytes,
    *,
    filename: str,
    models: ModelSet,
    limits: FitsLimits,
    content_encoding: str | None = None,
) -> PreparedCutout:
    """Decode one FITS file and preprocess it for the models.

    Parameters
    ----------
    data : bytes
        The file as received (plain or gzip-compressed FITS).
    filename : str
        Name reported back with the result.
    models : ModelSet
        The loaded cards: their input fixes the bands, the cutout size
        (pixels) and the pixel scale (arcsec/pixel).
    limits : FitsLimits
        Caps on decompressed size (bytes), pixels, header cards and masked
        fraction.
    content_encoding : str or None
        HTTP ``Content-Encoding`` the bytes arrived with (``gzip`` or None).

    Raises
    ------
    LensServeError
        The file is not usable; see :func:`service.fits.decode.decode_fits`.
    """
    return prepare_cutout_for_input(
        data, filename=filename, spec=models.input, limits=limits, content_encoding=content_encoding
    )


def decode_for_input(
    data: bytes, *, spec: InputSpec, limits: FitsLimits, content_encoding: str | None = None
) -> DecodedCutout:
    """Decode one FITS file into the bands, size (pixels) and scale the models' input needs."""
    return decode_fits(data, **_geometry(spec), limits=limits, content_encoding=content_encoding)


def _geometry(spec: InputSpec) -> dict:
    """The decoder's bands, cutout side (pixels) and pixel scale (arcsec/pixel) for ``spec``."""
    return {
        "bands": tuple(spec.bands),
        "size_pixels": spec.image_shape[0],
        "pixel_scale_arcsec": spec.pixel_scale_arcsec,
    }


def prepare_cutout_for_input(
    data: bytes,
    *,
    filename: str,
    spec: InputSpec,
    limits: FitsLimits,
    content_encoding: str | None = None,
) -> PreparedCutout:
    """:func:`prepare_cutout` given only the models' input spec (picklable, for worker processes).

    Parameters
    ----------
    spec : InputSpec
        Bands, cutout shape (pixels) and pixel scale (arcsec/pixel) of the models' input.

    Other parameters are those of :func:`prepare_cutout`.
    """
    decoded = decode_for_input(data, spec=spec, limits=limits, content_encoding=content_encoding)
    return _prepared(decoded, filename)


def decode_band_files_for_input(
    files: Mapping[str, BandFile], *, spec: InputSpec, limits: FitsLimits
) -> DecodedCutout:
    """Decode one object sent as one file per band, for the models' input."""
    return decode_band_files(files, **_geometry(spec), limits=limits)


def prepare_band_files_for_input(
    files: Mapping[str, BandFile], *, filename: str, spec: InputSpec, limits: FitsLimits
) -> PreparedCutout:
    """:func:`prepare_cutout_for_input` for one object sent as one file per band (picklable,
    for worker processes).

    Parameters
    ----------
    files : mapping of str to BandFile
        One file per band of ``spec``, keyed by band name.
    filename : str
        Name reported back with the result.
    spec : InputSpec
        Bands, cutout shape (pixels) and pixel scale (arcsec/pixel) of the models' input.
    limits : FitsLimits
        Caps applied to each file.
    """
    return _prepared(decode_band_files_for_input(files, spec=spec, limits=limits), filename)


def prepare_plain_cutout_for_input(
    data: bytes,
    *,
    filename: str,
    spec: InputSpec,
    limits: FitsLimits,
    content_encoding: str | None = None,
) -> PreparedCutout | None:
    """:func:`prepare_cutout_for_input` for a plain float cube read without astropy; else None.

    Safe beside the server (no native code parses the file): the API runs it in a
    thread and sends only the files it returns None for to the decode worker processes.
    """
    decoded = decode_plain_fits(
        data, **_geometry(spec), limits=limits, content_encoding=content_encoding
    )
    return None if decoded is None else _prepared(decoded, filename)


def _prepared(decoded: DecodedCutout, filename: str) -> PreparedCutout:
    """A decoded cutout, preprocessed for the models."""
    image, levels = preprocess_cutout_with_levels(decoded.pixels, noise_sigma=decoded.noise_sigma)
    return PreparedCutout(
        filename=filename,
        image=image,
        masked_fraction=decoded.masked_fraction,
        ra_deg=decoded.ra_deg,
        dec_deg=decoded.dec_deg,
        warnings=tuple(decoded.warnings),
        signal_to_noise=float(signal_to_noise(image)),
        input_statistics=(
            input_statistics(decoded.pixels, levels=levels) if len(decoded.pixels) == 3 else None
        ),
    )


@dataclass(frozen=True)
class _BatchItem:
    """A chunk of one request's cutouts, as queued in the batcher."""

    cutouts: tuple[PreparedCutout, ...]
    num_samples: int
    seed: int | None
    include_samples: bool
    chunk_index: int
    """Position of this chunk in its request; seeds of later chunks are derived from it."""
    explain: bool = False
    """Also compute occlusion maps (:mod:`service.core.explain`)."""

    @property
    def model_seed(self) -> int | None:
        """Seed of the dropout masks: the request's seed for its first chunk, then derived."""
        if self.seed is None or self.chunk_index == 0:
            return self.seed
        state = np.random.SeedSequence((self.seed, self.chunk_index)).generate_state(1, np.uint64)
        return int(state[0]) & MAX_SEED

    def sample_rng(self) -> np.random.Generator:
        """Generator of the predictive draws: seeded from (seed, chunk) or fresh entropy."""
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng((self.seed, self.chunk_index))


class InferenceEngine:
    """The models behind a dynamic batcher.

    Parameters
    ----------
    runtime : ModelRuntime
        Loads and runs the three models.
    max_batch_size : int
        Largest number of cutouts in one model call (cutouts).
    max_batch_wait_s : float
        Longest time the oldest request waits for others to join (seconds).
    max_queue_cutouts : int
        Most cutouts waiting for inference before requests are refused (cutouts).
    on_batch : callable, optional
        Receives a :class:`~service.core.batching.BatchStats` after every batch.
    model_instances : int
        Batches run at once on the one runtime, each in its own thread (count).
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue_cutouts: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        model_instances: int = 1,
    ) -> None:
        self._runtime = runtime
        self._max_batch_size = max_batch_size
        self._model_instances = model_instances
        self._batcher: DynamicBatcher[_BatchItem, list[CutoutOutcome]] = DynamicBatcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            max_batch_wait_s=max_batch_wait_s,
            max_queue_size=max_queue_cutouts,
            on_batch=on_batch,
            max_concurrent_batches=model_instances,
        )

    @property
    def model_instances(self) -> int:
        """Batches that run at once (count)."""
        return self._model_instances

    @property
    def runtime(self) -> ModelRuntime:
        """The runtime that runs the models."""
        return self._runtime

    @property
    def queued_cutouts(self) -> int:
        """Cutouts waiting for a batch (cutouts)."""
        return self._batcher.queued_size

    @property
    def seconds_per_cutout(self) -> float | None:
        """Measured time the engine takes per cutout with every model instance busy: the
        batcher's average run time per cutout divided by the instances (seconds per
        cutout); None before the first batch has run."""
        per_batch_cutout_s = self._batcher.seconds_per_item
        if per_batch_cutout_s is None:
            return None
        return per_batch_cutout_s / self._model_instances

    def load(self) -> None:
        """Load and warm up the models (blocking; run it off the event loop)."""
        self._runtime.load()

    async def start(self) -> None:
        """Start the batcher on the running event loop."""
        await self._batcher.start()

    async def close(self) -> None:
        """Stop the batcher (waiting requests fail) and release the models."""
        await self._batcher.stop()
        await asyncio.to_thread(self._runtime.close)

    async def predict_cutouts(
        self,
        cutouts: Sequence[PreparedCutout],
        *,
        num_samples: int,
        seed: int | None = None,
        include_samples: bool = False,
        explain: bool = False,
    ) -> list[CutoutOutcome]:
        """Predict for prepared cutouts, batched with whatever else is waiting.

        Parameters
        ----------
        cutouts : sequence of PreparedCutout
            The cutouts of one request.
        num_samples : int
            MC-dropout passes per cutout (samples).
        seed : int or None
            Makes the dropout masks and the predictive draws reproducible.
            A seeded request chunk runs on its own model call.
        include_samples : bool
            Also return ``num_samples`` draws from each predictive distribution.
        explain : bool
            Also compute each cutout's occlusion maps (about ten times the cost).

        Returns
        -------
        list
            One :class:`CutoutPrediction` per cutout, in order, or the
            :class:`~service.errors.LensServeError` that stopped that cutout
            (a model output that is not finite).

        Raises
        ------
        OverloadedError
            The queue is full.
        LensServeError
            The batch this request ran in failed.
        """
        if not cutouts:
            return []
        size = self._chunk_size(len(cutouts), seeded=seed is not None)
        chunks = [
            _BatchItem(
                cutouts=tuple(cutouts[start : start + size]),
                num_samples=num_samples,
                seed=seed,
                include_samples=include_samples,
                chunk_index=index,
                explain=explain,
            )
            for index, start in enumerate(range(0, len(cutouts), size))
        ]
        answers = await self._batcher.submit_many([(chunk, len(chunk.cutouts)) for chunk in chunks])
        return [outcome for answer in answers for outcome in answer]

    def _chunk_size(self, n_cutouts: int, *, seeded: bool) -> int:
        """Cutouts per queued chunk of a request: at most a batch.

        An unseeded request is also split among the model instances, so that a lone
        request runs on all of them at once (the batcher merges chunks again under a
        backlog). A seeded request keeps batch-sized chunks: the dropout seed of each
        chunk derives from its index, and must not depend on the server's instances.
        """
        if seeded:
            return self._max_batch_size
        return min(self._max_batch_size, -(-n_cutouts // self._model_instances))

    def _run_batch(self, items: list[_BatchItem]) -> list[list[CutoutOutcome]]:
        """Run one batch in the worker thread: one model call for all unseeded items."""
        answers: list[list[CutoutOutcome] | None] = [None] * len(items)
        shared = [i for i, item in enumerate(items) if item.seed is None]
        if shared:
            images = np.stack([c.image for i in shared for c in items[i].cutouts])
            raw = self._runtime.predict(
                images, num_samples=max(items[i].num_samples for i in shared)
            )
            for i, outcomes in self._summarise_shared(items, shared, raw).items():
                answers[i] = outcomes
        for i, item in enumerate(items):
            if item.seed is not None:
                answers[i] = _predict_item(self._runtime, item, self._max_batch_size)
        return [answer for answer in answers if answer is not None]

    def _summarise_shared(
        self, items: list[_BatchItem], shared: list[int], raw: RawPredictions
    ) -> dict[int, list[CutoutOutcome]]:
        """The answers of ``items[i]`` for i in ``shared``, whose cutouts ran in that order.

        Items that want neither samples nor maps are summarised together, one call per
        sample count, so many single-cutout requests cost one summary, not one each
        (every step of the summary treats cutouts independently).
        """
        stops = np.cumsum([len(items[i].cutouts) for i in shared])
        rows = {
            i: np.arange(stop - len(items[i].cutouts), stop)
            for i, stop in zip(shared, stops, strict=True)
        }
        models = self._runtime.models
        answers: dict[int, list[CutoutOutcome]] = {}
        together: dict[int, list[int]] = {}
        for i in shared:
            item = items[i]
            if item.include_samples or item.explain:
                part = raw.select(rows[i], num_samples=item.num_samples)
                maps = _explain(self._runtime, item, part, self._max_batch_size)
                answers[i] = _summarise(item, part, models, maps)
            else:
                together.setdefault(item.num_samples, []).append(i)
        for num_samples, group in together.items():
            part = raw.select(np.concatenate([rows[i] for i in group]), num_samples=num_samples)
            cutouts = tuple(c for i in group for c in items[i].cutouts)
            outcomes = iter(_summarise(replace(items[group[0]], cutouts=cutouts), part, models))
            for i in group:
                answers[i] = [next(outcomes) for _ in items[i].cutouts]
        return answers


def _predict_item(
    runtime: ModelRuntime, item: _BatchItem, max_batch_size: int
) -> list[CutoutOutcome]:
    """One model call for one item alone, with the item's own dropout seed."""
    images = np.stack([c.image for c in item.cutouts])
    raw = runtime.predict(images, num_samples=item.num_samples, seed=item.model_seed)
    maps = _explain(runtime, item, raw, max_batch_size)
    return _summarise(item, raw, runtime.models, maps)


def _explain(
    runtime: ModelRuntime, item: _BatchItem, raw: RawPredictions, max_batch_size: int
) -> list[Explanation] | None:
    """The item's occlusion maps when it asked for them, against its own answers in ``raw``.

    The occluded copies run through the classifier and the point regressor (no dropout), in
    calls of at most ``max_batch_size`` copies. The regressor's theta_E equals the MC graph's
    ``parameters`` output, which ``raw.parameters`` may come from (the shipped MC graph holds
    the regressor's trunk and point head: their outputs are identical).
    """
    if not item.explain:
        return None
    (probability_output,) = REQUIRED_OUTPUTS[CLASSIFIER_NAME]
    (parameters_output,) = REQUIRED_OUTPUTS[REGRESSOR_NAME]
    theta_column = PARAMETER_COMPONENTS.index("theta_E")

    def predict_lens_probability(images: NDArray[np.float32]) -> NDArray[np.float32]:
        # Only P(lens): the features and the seeing estimate are not run on the copies.
        return runtime.run_model(CLASSIFIER_NAME, {"image": images}, outputs=[probability_output])[
            probability_output
        ]

    def predict_theta_E(images: NDArray[np.float32]) -> NDArray[np.float32]:
        return runtime.run_model(REGRESSOR_NAME, {"image": images}, outputs=[parameters_output])[
            parameters_output
        ][:, theta_column]

    return explain_occlusion(
        np.stack([c.image for c in item.cutouts]),
        lens_probability=raw.lens_probability,
        theta_E=raw.parameters[:, theta_column],
        predict_lens_probability=predict_lens_probability,
        predict_theta_E=predict_theta_E,
        max_batch_size=max_batch_size,
    )


def predict_chunk(
    runtime: ModelRuntime,
    cutouts: Sequence[PreparedCutout],
    *,
    num_samples: int,
    seed: int | None = None,
    chunk_index: int = 0,
    explain: bool = False,
) -> list[CutoutOutcome]:
    """Predict for prepared cutouts in one blocking model call, without the batcher.

    This is what :class:`InferenceEngine` runs for chunk ``chunk_index`` of a
    request, so offline callers (``lensserve batch``) get the API's numbers:
    with the same seed, chunk index and cutouts, the same dropout masks.

    Parameters
    ----------
    runtime : ModelRuntime
        A loaded runtime.
    cutouts : sequence of PreparedCutout
        The cutouts of the chunk, at most what one model call should take.
    num_samples : int
        MC-dropout passes per cutout (samples).
    seed : int or None
        Seed of the request; the chunk's dropout seed is derived from it and
        ``chunk_index`` as the engine derives it.
    chunk_index : int
        Position of the chunk in its request or catalogue (count from 0).
    explain : bool
        Also compute each cutout's occlusion maps (:mod:`service.core.explain`).

    Returns
    -------
    list
        One :class:`CutoutPrediction`, or the :class:`~service.errors.InferenceError`
        of a non-finite output, per cutout, in order.
    """
    if not cutouts:
        return []
    item = _BatchItem(
        cutouts=tuple(cutouts),
        num_samples=num_samples,
        seed=seed,
        include_samples=False,
        chunk_index=chunk_index,
        explain=explain,
    )
    return _predict_item(runtime, item, max(len(cutouts), 1))


def _out_of_distribution(
    cutouts: Sequence[PreparedCutout], raw: RawPredictions, models: ModelSet
) -> list[OutOfDistribution | None]:
    """The score and flag of each cutout; None where the models or the cutout lack what it needs."""
    answers: list[OutOfDistribution | None] = [None] * len(cutouts)
    if models.ood is None or raw.features is None:
        return answers
    rows, inputs = [], []
    for i, cutout in enumerate(cutouts):
        if cutout.input_statistics is not None:
            rows.append(i)
            inputs.append(cutout.input_statistics)
    if not rows:
        return answers
    if models.ood.has_seeing and raw.seeing is None:
        return answers
    seeing = None if raw.seeing is None or not models.ood.has_seeing else raw.seeing[rows]
    scores = models.ood.score(raw.features[rows], np.stack(inputs), seeing).tolist()
    threshold = models.ood_threshold
    for i, score in zip(rows, scores, strict=True):
        answers[i] = OutOfDistribution(score=score, flag=score > threshold)
    return answers


def _widened_for_novelty(
    sample_means: NDArray[np.float32], ood: list[OutOfDistribution | None], threshold: float
) -> NDArray[np.floating]:
    """The MC pass means, spread by :func:`~service.contract.ood.novelty_factor` where flagged."""
    scores = np.array([o.score if o is not None and o.flag else -np.inf for o in ood])
    if not np.isfinite(scores).any():
        return sample_means
    return spread_pass_means(sample_means, novelty_factor(scores, threshold))


def _ood_warnings(ood: OutOfDistribution | None, threshold: float) -> tuple[str, ...]:
    """The warning of a flagged cutout; none otherwise."""
    if ood is None or not ood.flag:
        return ()
    return (
        f"out-of-distribution score {ood.score:.3g} is above {threshold:.3g}, the threshold "
        "1% of in-distribution test cutouts exceed: this cutout is unlike the training data "
        "(other units or zero point, bands out of order, another PSF or pixel scale, or "
        "contents never simulated); treat its predictions with caution (the epistemic "
        "part of theta_E's uncertainty is widened by score / threshold)",
    )


def _summarise(
    item: _BatchItem,
    raw: RawPredictions,
    models: ModelSet,
    explanations: list[Explanation] | None = None,
) -> list[CutoutOutcome]:
    """Per-cutout predictions from one item's raw model outputs: the out-of-distribution
    score, and the item's occlusion maps when it has them.

    With a per-regime table in the MC card, the distribution is the calibrated
    one (:func:`~service.contract.uncertainty.calibrate_by_regime`), placed by
    the point theta_E and the cutout's signal-to-noise; otherwise the mixture,
    its quantiles read at the card's (recalibrated) mixture levels. Flagged
    cutouts have their pass means spread first (the epistemic part widened).
    """
    ood = _out_of_distribution(item.cutouts, raw, models)
    means = _widened_for_novelty(raw.theta_E_samples, ood, models.ood_threshold)
    table = models.mc_regime_table
    summary = summarise_mc_samples(
        means,
        raw.theta_E_log_variance_samples,
        None if table is not None else models.mc_mixture_levels,
    )
    samples = None
    if table is None:
        if item.include_samples:
            samples = draw_predictive_samples(
                means, raw.theta_E_log_variance_samples, item.sample_rng()
            )
    else:
        regime = {
            "theta_E_arcsec": raw.parameters[:, 0].astype(np.float64),
            "signal_to_noise": np.array([c.measured_signal_to_noise() for c in item.cutouts]),
        }
        passes = raw.theta_E_samples.shape[1]
        if item.include_samples:
            samples = draw_regime_samples(
                summary, table, **regime, num_samples=passes, rng=item.sample_rng()
            )
        summary = calibrate_by_regime(summary, table, **regime, num_samples=passes)
    finite = (
        np.isfinite(raw.lens_probability)
        & np.isfinite(raw.parameters).all(axis=1)
        & np.isfinite(summary.mean)
        & np.isfinite(summary.std)
        & np.isfinite(summary.quantiles).all(axis=1)
    )
    # Python floats once per array, not per element: the loop below only builds objects.
    probability, parameters = raw.lens_probability.tolist(), raw.parameters.tolist()
    mean, std = summary.mean.tolist(), summary.std.tolist()
    aleatoric, epistemic = summary.aleatoric_std.tolist(), summary.epistemic_std.tolist()
    quantiles = summary.quantiles.tolist()
    outcomes: list[CutoutOutcome] = []
    for row, cutout in enumerate(item.cutouts):
        if not finite[row]:
            outcomes.append(
                InferenceError(
                    f"the models returned a non-finite value for {cutout.filename!r}; "
                    "the cutout may be far outside what they were trained on"
                )
            )
            continue
        outcomes.append(
            CutoutPrediction(
                filename=cutout.filename,
                lens_probability=probability[row],
                parameters=dict(zip(PARAMETER_COMPONENTS, parameters[row], strict=True)),
                einstein_radius=EinsteinRadiusPrediction(
                    mean=mean[row],
                    std=std[row],
                    aleatoric_std=aleatoric[row],
                    epistemic_std=epistemic[row],
                    quantiles=dict(zip(QUANTILE_LEVELS, quantiles[row], strict=True)),
                    samples=None if samples is None else samples[row],
                    calibrated_by_regime=table is not None,
                ),
                ra_deg=cutout.ra_deg,
                dec_deg=cutout.dec_deg,
                warnings=cutout.warnings + _ood_warnings(ood[row], models.ood_threshold),
                explanation=None if explanations is None else explanations[row],
                signal_to_noise=cutout.measured_signal_to_noise(),
                out_of_distribution=ood[row],
            )
        )
    return outcomes
