"""The out-of-distribution score: how unlike the training data a cutout is.

Two or three terms, each a Mahalanobis distance to statistics fitted on simulated
training cutouts (``python -m training ood``), each robustly standardised on
that training data; the score is the largest of them:

* **image features**: the class-conditional Mahalanobis distance of the
  classifier trunk's feature vector (its ONNX output ``features``) to the mean
  feature vector of lenses and of non-lenses, with one shared covariance
  (Lee et al. 2018, arXiv:1807.03888): the smaller of the two distances.
* **input statistics**: a few numbers measured on the cutout before
  preprocessing, which normalises away what they see (:func:`input_statistics`):
  each band's noise level and background in flux units, the correlation of the
  bands' pixel noise, the colours of the central light and the brightest pixel.
  Wrong units, a wrong zero point, an offset, bands in the wrong order or one
  band copied into all three show here even when the normalised image looks
  ordinary to the network.
* **seeing** (statistics of method ``..._psf_v2`` only): the Mahalanobis
  distance of each band's seeing FWHM, as a small network in the classifier's
  graph estimates it from the cutout (its ONNX output ``psf_fwhm_log10_arcsec``,
  log10 arcsec), to the estimates' mean on the training data. A PSF much
  sharper or broader than the survey's shows here: nothing else in the score
  measures the PSF where the cutout holds no point source.

Each squared distance ``d2`` becomes ``(log(d2) - median) / (1.4826 MAD)`` with
the median and MAD of ``log(d2)`` on the fit data, so every term is in units of
the training data's own spread; the seeing term's median and scale are set at the
fit instead (its tail matched to the others', then lowered: ``training.ood``), the
arithmetic here is the same. The flag threshold comes from the model card.
Pure numpy; no I/O beyond reading the statistics' bytes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.contract.preprocessing import BandLevels, _row_medians

#: Identifier of the statistics and of the score's maths; bump it when either changes.
OOD_METHOD_ID = "mahalanobis_features_inputs_psf_v2"
#: The two-term score of models 2.0.0-2.1.0 (no seeing term); still served.
OOD_METHOD_ID_TWO_TERMS = "mahalanobis_features_inputs_v1"
OOD_METHOD_IDS = (OOD_METHOD_ID, OOD_METHOD_ID_TWO_TERMS)

#: Names of :func:`input_statistics`' entries, in order.
INPUT_STATISTIC_NAMES: tuple[str, ...] = (
    "log10_noise_sigma_g",
    "log10_noise_sigma_r",
    "log10_noise_sigma_i",
    "background_over_sigma_g",
    "background_over_sigma_r",
    "background_over_sigma_i",
    "noise_correlation_gr",
    "noise_correlation_ri",
    "noise_correlation_gi",
    "central_colour_gr",
    "central_colour_ri",
    "log10_peak_over_sigma",
    "log10_peak_flux",
    "noise_autocorrelation",
    "peak_concentration",
    "log10_peak_curvature",
    "log10_peak_second_moment",
)

#: Width of the border (pixels) whose median is each band's background (as preprocessing).
_BORDER_PIXELS = 4
#: Half-width (pixels) of the central box whose flux gives the colours.
_CENTRAL_HALF_WIDTH = 4
#: Pixel differences beyond this many of their own sigma are left out of the noise
#: correlation, so that sources and artefacts do not pass for correlated noise.
_DIFFERENCE_CLIP_SIGMA = 4.0
#: Pixels within this many sigma of the background in every band are sky.
_SKY_SIGMA = 3.0
#: Floor on every noise level (flux units), so that log10 stays finite on blank inputs.
_SIGMA_FLOOR = 1e-30

#: Arrays in the statistics file, with their meaning.
STATISTICS_ARRAYS: dict[str, str] = {
    "feature_means": "(n_classes, n_features) mean feature vector of each class",
    "feature_precision": "(n_features, n_features) inverse of the shared (shrunk) covariance",
    "input_mean": "(n_inputs,) mean of the input statistics",
    "input_precision": "(n_inputs, n_inputs) inverse of their (shrunk) covariance",
    "log_d2_median": "(n_terms,) centre of log(d2) per term: features, inputs[, seeing]",
    "log_d2_scale": "(n_terms,) scale of log(d2) per term, same order",
}
#: Arrays of the seeing term, present in statistics of method ``OOD_METHOD_ID`` only.
SEEING_ARRAYS: dict[str, str] = {
    "seeing_mean": "(n_bands,) mean of the estimated log10 seeing FWHM (arcsec) per band",
    "seeing_precision": "(n_bands, n_bands) inverse of its (shrunk) covariance",
}


def _median(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """Median of each row leaving NaN out; the preprocessing's fast path when there is none."""
    if np.isnan(rows).any():
        return np.nanmedian(rows, axis=1)
    return _row_medians(rows)


def _band_sigmas(flat: NDArray[np.float64]) -> NDArray[np.float64]:
    """Robust (MAD) noise sigma of each row of a (rows, pixels) array (flux units)."""
    return 1.4826 * _median(np.abs(flat - _median(flat)[:, None]))


def _masked_pearson(
    x: NDArray[np.float64], y: NDArray[np.float64], keep: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """Pearson correlation of ``x`` and ``y`` over their ``keep`` entries, per leading index.

    Arrays of shape (n, ...); one value per n, 0 where fewer than 3 entries are kept or
    none varies. From the sums of the kept values, their squares and products (fused
    by ``einsum``, which also keeps them off OpenBLAS's threads: long dot products there
    cost a busy server milliseconds of waiting for microseconds of work).
    """
    n = len(keep)
    keep = keep.reshape(n, -1)
    x = np.where(keep, x.reshape(n, -1), 0.0)
    y = np.where(keep, y.reshape(n, -1), 0.0)
    count = keep.sum(axis=1)
    safe = np.maximum(count, 1)
    sum_x, sum_y = x.sum(axis=1), y.sum(axis=1)
    var_x = np.einsum("nk,nk->n", x, x) - sum_x * sum_x / safe
    var_y = np.einsum("nk,nk->n", y, y) - sum_y * sum_y / safe
    covariance = np.einsum("nk,nk->n", x, y) - sum_x * sum_y / safe
    norm = np.sqrt(np.maximum(var_x, 0.0) * np.maximum(var_y, 0.0))
    correlation = covariance / np.where(norm > 0, norm, 1.0)
    return np.where((count >= 3) & (norm > 0), np.clip(correlation, -1.0, 1.0), 0.0)


def _noise_correlations(data: NDArray[np.float64], sigma: NDArray[np.float64]) -> NDArray:
    """Pearson correlations (g-r, r-i, g-i) of the bands' pixel noise on the sky, shape (n, 3).

    The noise is the second difference along rows, ``x[j-1] - 2 x[j] + x[j+1]``,
    which cancels smooth light and gradients; only pixels within 3 sigma of the
    background in every band (the sky) and second differences within 4 times
    their white-noise sigma (sqrt(6) sigma) count, so that sources and artefacts
    do not pass for correlated noise. Independent noise in each band gives about
    0; one band copied into another gives 1.
    """
    second = data[..., :-2] - 2.0 * data[..., 1:-1] + data[..., 2:]
    band_sigma = sigma[:, :, None, None]
    with np.errstate(invalid="ignore"):  # NaN compares False: masked pixels drop out
        sky = (np.abs(data[..., 1:-1]) <= _SKY_SIGMA * band_sigma).all(axis=1)
        good = sky[:, None] & (np.abs(second) <= _DIFFERENCE_CLIP_SIGMA * np.sqrt(6.0) * band_sigma)
    first, other = [0, 1, 0], [1, 2, 2]  # the pairs g-r, r-i, g-i, in one call
    rows = len(data) * len(first)
    correlations = _masked_pearson(
        second[:, first].reshape(rows, -1),
        second[:, other].reshape(rows, -1),
        (good[:, first] & good[:, other]).reshape(rows, -1),
    )
    return correlations.reshape(len(data), len(first))


def _noise_autocorrelation(data: NDArray[np.float64], sigma: NDArray[np.float64]) -> NDArray:
    """Correlation of horizontally adjacent sky pixels, over all bands, shape (n,).

    Independent pixel noise gives about 0; resampling (another pixel scale
    interpolated onto this one) correlates neighbours.
    """
    scaled = data / sigma[:, :, None, None]
    left, right = scaled[..., :-1], scaled[..., 1:]
    with np.errstate(invalid="ignore"):
        keep = (np.abs(left) <= _SKY_SIGMA) & (np.abs(right) <= _SKY_SIGMA)
    return _masked_pearson(left, right, keep)


def _boxes(images: NDArray[np.float64], y: NDArray, x: NDArray) -> NDArray[np.float64]:
    """The 7x7 pixels of each of the (n, ny, nx) ``images`` whose top-left corner is (y, x)."""
    offsets = np.arange(7)
    rows = (y[:, None] + offsets)[:, :, None]
    columns = (x[:, None] + offsets)[:, None, :]
    return images[np.arange(len(images))[:, None, None], rows, columns]


def _peak_concentration(data: NDArray[np.float64]) -> NDArray[np.float64]:
    """Flux of the 3x3 pixels around the brightest pixel of the band sum over its 7x7's, (n,).

    About the fraction of a point source's light within one pixel of its peak:
    it measures the PSF in pixels (and so the pixel scale) on the brightest
    object; a saturated plateau flattens it.
    """
    total = np.nan_to_num(data.sum(axis=1))
    y, x = np.unravel_index(total.reshape(len(total), -1).argmax(axis=1), total.shape[1:])
    box = _boxes(np.pad(total, ((0, 0), (3, 3), (3, 3))), y, x)
    outer = box.sum(axis=(1, 2))
    inner = box[:, 2:5, 2:5].sum(axis=(1, 2))
    return np.where(outer > 0, inner / np.where(outer > 0, outer, 1.0), 0.0)


def _peak_shape(data: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """How sharp the brightest object of the band sum is, in pixels: the PSF and pixel scale.

    At the brightest pixel at least 3 pixels from the edge: log10 of the
    discrete Laplacian over the peak (2/sigma^2 for a Gaussian of sigma pixels),
    and log10 of the light-weighted mean squared radius (pixels^2) in its 7x7 box;
    -3 for both where that pixel is not positive. Each of shape (n,).
    """
    total = np.nan_to_num(data).sum(axis=1)
    inner = total[:, 3:-3, 3:-3]
    y, x = np.unravel_index(inner.reshape(len(inner), -1).argmax(axis=1), inner.shape[1:])
    box = _boxes(total, y, x)  # centred on the peak at (y + 3, x + 3)
    peak = box[:, 3, 3]
    neighbours = box[:, 2, 3] + box[:, 4, 3] + box[:, 3, 2] + box[:, 3, 4]
    positive = peak > 0
    curvature = (4.0 * peak - neighbours) / np.where(positive, peak, 1.0)
    box = np.clip(box, 0.0, None)
    offsets = np.arange(-3, 4)
    radius2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    moment = (box * radius2).sum(axis=(1, 2)) / np.maximum(box.sum(axis=(1, 2)), 1e-30)
    return (
        np.where(positive, np.log10(np.maximum(curvature, 1e-3)), -3.0),
        np.where(positive, np.log10(np.maximum(moment, 1e-3)), -3.0),
    )


def input_statistics(
    cube: NDArray[np.floating], *, levels: BandLevels | None = None
) -> NDArray[np.float64]:
    """The cheap input statistics of one cutout, before preprocessing.

    Parameters
    ----------
    cube : ndarray, shape (3, ny, nx)
        The decoded cutout in the file's flux unit (the training data's is AB zero
        point 30), bands in the models' order (g, r, i); masked pixels NaN.
    levels : BandLevels, optional
        The cube's band levels as the preprocessing measured them
        (:func:`~service.contract.preprocessing.preprocess_cutout_with_levels`): the
        same background and noise, not measured twice.

    Returns
    -------
    ndarray, shape (17,)
        In the order of ``INPUT_STATISTIC_NAMES``: log10 of each band's noise
        sigma (flux units); each band's border median over its sigma; the
        correlation of the noise of g-r, r-i and g-i; the asinh colours g-r and
        r-i of the central 9x9 pixels' flux (softened at the box's noise);
        log10 of the brightest pixel over its band's sigma, and of its flux;
        the correlation of adjacent sky pixels; the share of the light within
        one pixel of the brightest pixel (3x3 over 7x7 of the band sum); the
        curvature and second moment of the brightest object (:func:`_peak_shape`).
    """
    data = np.asarray(cube)
    if data.ndim != 3 or data.shape[0] != 3:
        raise ValueError(f"expected a (3, ny, nx) cube, got shape {data.shape}")
    return input_statistics_batch(data[None], levels=None if levels is None else [levels])[0]


def input_statistics_batch(
    cubes: NDArray[np.floating], *, levels: Sequence[BandLevels] | None = None
) -> NDArray[np.float64]:
    """:func:`input_statistics` of each of ``cubes``, shape (n, 3, ny, nx), in one pass: (n, 17).

    A cutout's statistics do not depend on the others in the batch. ``levels``, one per
    cube, are the preprocessing's band levels of each (:func:`input_statistics`).
    """
    data = np.asarray(cubes, dtype=np.float64)
    if data.ndim != 4 or data.shape[1] != 3:
        raise ValueError(f"expected (n, 3, ny, nx) cubes, got shape {data.shape}")
    if levels is not None and len(levels) != len(data):
        raise ValueError(f"expected {len(data)} band levels, got {len(levels)}")
    if len(data) == 0:
        return np.zeros((0, len(INPUT_STATISTIC_NAMES)))
    with warnings.catch_warnings():
        # A band (or its border) may be all masked: its NaN statistics become 0 below.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _input_statistics(np.where(np.isfinite(data), data, np.nan), levels)


def _band_levels(data: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """Border median and MAD noise of each band of NaN-masked cubes, each (n, 3) (flux units);
    as :class:`~service.contract.preprocessing.BandLevels` holds them, 0 for an empty band."""
    n, bands = data.shape[:2]
    inner = np.ones(data.shape[2:], dtype=bool)
    inner[_BORDER_PIXELS:-_BORDER_PIXELS, _BORDER_PIXELS:-_BORDER_PIXELS] = False
    border = data[:, :, inner].reshape(n * bands, -1)
    background = np.nan_to_num(_median(border)).reshape(n, bands)
    flat = (data - background[:, :, None, None]).reshape(n * bands, -1)
    return background, np.nan_to_num(_band_sigmas(flat)).reshape(n, bands)


def _input_statistics(
    data: NDArray[np.float64], levels: Sequence[BandLevels] | None
) -> NDArray[np.float64]:
    """:func:`input_statistics_batch` of float64 cubes whose masked pixels are NaN."""
    n, bands = data.shape[:2]
    if levels is None:
        background, sigma = _band_levels(data)
    else:
        background = np.stack([level.background for level in levels])
        sigma = np.stack([level.noise_sigma for level in levels])
    data = data - background[:, :, None, None]
    flat = data.reshape(n, bands, -1)
    sigma = np.maximum(sigma, _SIGMA_FLOOR)
    cy, cx = data.shape[2] // 2, data.shape[3] // 2
    h = _CENTRAL_HALF_WIDTH
    central = np.nansum(data[:, :, cy - h : cy + h + 1, cx - h : cx + h + 1], axis=(2, 3))
    softening = (2 * h + 1) * _row_medians(sigma)  # finite: sigma is floored
    asinh_mag = np.arcsinh(central / softening[:, None])
    peak = np.nan_to_num(np.nanmax(flat, axis=2) if np.isnan(flat).any() else flat.max(axis=2))
    brightest = np.argmax(peak / sigma, axis=1)
    rows = np.arange(n)
    peak_brightest, sigma_brightest = peak[rows, brightest], sigma[rows, brightest]
    curvature, moment = _peak_shape(data)
    return np.column_stack(
        [
            np.log10(sigma),
            background / sigma,
            _noise_correlations(data, sigma),
            asinh_mag[:, 0] - asinh_mag[:, 1],
            asinh_mag[:, 1] - asinh_mag[:, 2],
            np.log10(np.maximum(peak_brightest / sigma_brightest, 1.0)),
            np.log10(np.maximum(peak_brightest, sigma_brightest)),
            _noise_autocorrelation(data, sigma),
            _peak_concentration(data),
            curvature,
            moment,
        ]
    )


def _squared_distances(
    x: NDArray[np.float64], means: NDArray[np.float64], precision: NDArray[np.float64]
) -> NDArray[np.float64]:
    """(n, n_means) squared Mahalanobis distances of the rows of ``x`` to each mean."""
    diff = x[:, None, :] - means[None, :, :]
    return np.einsum("nkd,de,nke->nk", diff, precision, diff)


@dataclass(frozen=True)
class OodStatistics:
    """Fitted statistics of the score (the arrays of :data:`STATISTICS_ARRAYS`)."""

    feature_means: NDArray[np.float64]
    feature_precision: NDArray[np.float64]
    input_mean: NDArray[np.float64]
    input_precision: NDArray[np.float64]
    log_d2_median: NDArray[np.float64]
    log_d2_scale: NDArray[np.float64]
    seeing_mean: NDArray[np.float64] | None = None
    seeing_precision: NDArray[np.float64] | None = None

    @property
    def has_seeing(self) -> bool:
        """Whether the score has the seeing term (and needs the seeing estimates)."""
        return self.seeing_mean is not None

    @property
    def n_features(self) -> int:
        """Length of the classifier's feature vector."""
        return int(self.feature_means.shape[1])

    def squared_distances(
        self,
        features: NDArray[np.floating],
        inputs: NDArray[np.floating],
        seeing: NDArray[np.floating] | None = None,
    ) -> NDArray[np.float64]:
        """(n, n_terms) squared Mahalanobis distances: to the nearest class (features),
        inputs and, with the seeing term, the seeing estimates (required then)."""
        features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        inputs = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1)
        d2_features = _squared_distances(features, self.feature_means, self.feature_precision)
        d2_inputs = _squared_distances(inputs, self.input_mean[None, :], self.input_precision)
        columns = [d2_features.min(axis=1), d2_inputs[:, 0]]
        if self.seeing_mean is not None and self.seeing_precision is not None:
            if seeing is None:
                raise ValueError("these statistics have a seeing term: pass the seeing estimates")
            seeing = np.asarray(seeing, dtype=np.float64).reshape(len(seeing), -1)
            columns.append(
                _squared_distances(seeing, self.seeing_mean[None, :], self.seeing_precision)[:, 0]
            )
        return np.stack(columns, axis=1)

    def terms(
        self,
        features: NDArray[np.floating],
        inputs: NDArray[np.floating],
        seeing: NDArray[np.floating] | None = None,
    ) -> NDArray[np.float64]:
        """(n, n_terms) standardised terms (features, inputs[, seeing]); non-finite values
        become +inf."""
        d2 = self.squared_distances(features, inputs, seeing)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = (np.log(np.maximum(d2, 1e-12)) - self.log_d2_median) / self.log_d2_scale
        return np.where(np.isfinite(terms), terms, np.inf)

    def score(
        self,
        features: NDArray[np.floating],
        inputs: NDArray[np.floating],
        seeing: NDArray[np.floating] | None = None,
    ) -> NDArray[np.float64]:
        """(n,) score: the largest standardised term; higher means less like the training data.

        Parameters
        ----------
        features : ndarray, shape (n, n_features)
            The classifier's ``features`` output.
        inputs : ndarray, shape (n, 17)
            :func:`input_statistics` of each cutout.
        seeing : ndarray, shape (n, n_bands), optional
            The classifier's ``psf_fwhm_log10_arcsec`` output (log10 arcsec); required
            when the statistics have the seeing term (:attr:`has_seeing`).
        """
        return self.terms(features, inputs, seeing).max(axis=1)

    def to_bytes(self) -> bytes:
        """The statistics as an ``.npz`` file's bytes (float32, as shipped in ``models/``)."""
        buffer = io.BytesIO()
        names = [*STATISTICS_ARRAYS, *(SEEING_ARRAYS if self.has_seeing else ())]
        np.savez(
            buffer, **{name: np.asarray(getattr(self, name), dtype=np.float32) for name in names}
        )
        return buffer.getvalue()


def novelty_factor(scores: NDArray[np.floating], threshold: float) -> NDArray[np.float64]:
    """Factor on the epistemic spread of theta_E: 1 up to the threshold, score/threshold above.

    The MC-dropout spread comes from the last layers only and hardly grows on
    inputs unlike the training data (docs/ood.md); a flagged cutout's pass means
    are spread about their mean by this factor, so its epistemic std grows with
    its distance beyond the threshold. Cutouts under the threshold (99% of
    in-distribution ones) keep their distribution unchanged.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not threshold > 0:
        return np.ones_like(scores)
    return np.where(np.isfinite(scores), np.maximum(1.0, scores / threshold), 1.0)


def spread_pass_means(
    sample_means: NDArray[np.floating], factor: NDArray[np.floating]
) -> NDArray[np.float64]:
    """(n, T) pass means spread about each row's mean by ``factor``: epistemic std x factor."""
    means = np.asarray(sample_means, dtype=np.float64)
    centre = means.mean(axis=1, keepdims=True)
    return centre + np.asarray(factor, dtype=np.float64)[:, None] * (means - centre)


def read_ood_statistics(data: bytes) -> OodStatistics:
    """Parse the bytes of a statistics file written by :meth:`OodStatistics.to_bytes`.

    Raises
    ------
    ValueError
        The bytes are not such a file, or the arrays' shapes do not fit together.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = [*STATISTICS_ARRAYS, *(n for n in SEEING_ARRAYS if n in npz.files)]
            arrays = {name: np.asarray(npz[name], dtype=np.float64) for name in names}
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"not an out-of-distribution statistics file: {exc}") from exc
    if 0 < len(names) - len(STATISTICS_ARRAYS) < len(SEEING_ARRAYS):
        raise ValueError(f"the seeing term needs all of {list(SEEING_ARRAYS)}")
    stats = OodStatistics(**arrays)
    n_features, n_inputs = stats.n_features, len(INPUT_STATISTIC_NAMES)
    n_terms = 3 if stats.has_seeing else 2
    shapes = {
        "feature_precision": (n_features, n_features),
        "input_mean": (n_inputs,),
        "input_precision": (n_inputs, n_inputs),
        "log_d2_median": (n_terms,),
        "log_d2_scale": (n_terms,),
    }
    if stats.seeing_mean is not None:
        n_bands = len(stats.seeing_mean)
        shapes.update(seeing_mean=(n_bands,), seeing_precision=(n_bands, n_bands))
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{name} has shape {arrays[name].shape}; expected {shape}")
    return stats
