"""Predictive distributions from Monte Carlo dropout samples (pure numpy).

The MC model returns, for each cutout, T dropout passes of a heteroscedastic
head: a mean and a log-variance of theta_E per pass. Following Perreault
Levasseur et al. (2017), the predictive distribution is the equal-weight
mixture of the T Gaussians: its variance splits into an aleatoric part (the
mean predicted variance) and an epistemic part (the spread of the means).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Quantile levels reported for every distribution, as fractions.
QUANTILE_LEVELS: tuple[float, ...] = (0.025, 0.16, 0.5, 0.84, 0.975)

#: Newton steps stop once no quantile moves by more than this (arcsec).
_QUANTILE_TOLERANCE = 1e-10
#: Safety cap on the steps; each is a Newton step or, outside the bracket, a bisection.
_MAX_QUANTILE_STEPS = 100


@dataclass(frozen=True)
class MixtureSummary:
    """Summary of n predictive distributions (all arrays have length n; arcsec)."""

    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    aleatoric_std: NDArray[np.float64]
    epistemic_std: NDArray[np.float64]
    quantiles: NDArray[np.float64]
    """Shape (n, len(QUANTILE_LEVELS)), in the order of ``QUANTILE_LEVELS``."""


def _normal_cdf_and_kernel(
    z: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Standard normal CDF and exp(-z^2 / 2), sharing one exp.

    The CDF uses Abramowitz & Stegun 7.1.26 erf (|error| < 1.5e-7).
    """
    x = np.abs(z) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    kernel = np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * (1.0 - poly * kernel)), kernel


@functools.lru_cache(maxsize=16)
def _standard_normal_quantiles(levels: tuple[float, ...]) -> tuple[float, ...]:
    """z with CDF(z) = level, for each level (bisection on a few scalars, cached per levels)."""
    target = np.asarray(levels, dtype=np.float64)
    low, high = np.full_like(target, -40.0), np.full_like(target, 40.0)
    for _ in range(80):
        middle = 0.5 * (low + high)
        below = _normal_cdf_and_kernel(middle)[0] < target
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return tuple((0.5 * (low + high)).tolist())


def mixture_quantiles(
    means: NDArray[np.floating],
    stds: NDArray[np.floating],
    levels: tuple[float, ...] = QUANTILE_LEVELS,
) -> NDArray[np.float64]:
    """Quantiles of equal-weight Gaussian mixtures, by safeguarded Newton steps.

    Each quantile starts at the Gaussian guess (mixture mean + z * mixture std)
    and takes Newton steps on the mixture CDF, falling back to bisection when
    a step would leave the bracket known to hold the root, so multimodal
    mixtures converge too. A handful of steps replace the ~60 of plain bisection.

    Parameters
    ----------
    means, stds : ndarray, shape (n, T)
        Component means and standard deviations (arcsec).
    levels : tuple of float
        Cumulative probabilities in (0, 1).

    Returns
    -------
    ndarray, shape (n, len(levels))
        The quantiles (arcsec), to within 1e-10 arcsec of the CDF's crossing.
    """
    mu = np.asarray(means, dtype=np.float64)[:, None, :]
    sd = np.maximum(np.asarray(stds, dtype=np.float64), 1e-12)[:, None, :]
    target = np.asarray(levels, dtype=np.float64)[None, :]
    # Every component's CDF is below 1e-23 at 10 sd under its mean (and above 1 - 1e-23
    # at 10 sd over it), so the mixture's quantiles lie in between.
    low = np.min(mu - 10.0 * sd, axis=2) + 0.0 * target
    high = np.max(mu + 10.0 * sd, axis=2) + 0.0 * target
    mixture_mean = mu.mean(axis=2)
    mixture_std = np.sqrt((sd**2).mean(axis=2) + mu.var(axis=2))
    z_levels = np.asarray(_standard_normal_quantiles(tuple(levels)))[None, :]
    x = np.clip(mixture_mean + z_levels * mixture_std, low, high)
    inverse_sd = 1.0 / sd
    for _ in range(_MAX_QUANTILE_STEPS):
        z = (x[:, :, None] - mu) * inverse_sd
        cdf, kernel = _normal_cdf_and_kernel(z)
        excess = cdf.mean(axis=2) - target
        density = (kernel * inverse_sd).mean(axis=2) / np.sqrt(2.0 * np.pi)
        low = np.where(excess < 0, x, low)
        high = np.where(excess < 0, high, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = x - excess / density
        # Inclusive: a converged x (excess 0 to rounding) is its own Newton step.
        inside = np.isfinite(newton) & (newton >= low) & (newton <= high)
        step = np.where(inside, newton, 0.5 * (low + high))
        # A non-finite model output gives a non-finite quantile at once (reported upstream).
        if np.all((np.abs(step - x) <= _QUANTILE_TOLERANCE) | ~np.isfinite(step)):
            return step
        x = step
    return x


def summarise_mc_samples(
    sample_means: NDArray[np.floating],
    sample_log_variances: NDArray[np.floating],
    mixture_levels: tuple[float, ...] | None = QUANTILE_LEVELS,
) -> MixtureSummary:
    """Summarise T heteroscedastic MC-dropout passes for each of n cutouts.

    Parameters
    ----------
    sample_means : ndarray, shape (n, T)
        Predicted theta_E per dropout pass (arcsec).
    sample_log_variances : ndarray, shape (n, T)
        Predicted log-variance of theta_E per pass (log arcsec^2).
    mixture_levels : tuple of float
        The mixture's CDF levels reported as ``QUANTILE_LEVELS``: the nominal
        levels themselves, or the recalibrated ones of the MC model's card
        (Kuleshov et al. 2018), which make the reported intervals cover as named;
        None for the moments only (quantiles of shape (n, 0), for
        :func:`calibrate_by_regime` to fill).
    """
    mu = np.asarray(sample_means, dtype=np.float64)
    variance = np.exp(np.asarray(sample_log_variances, dtype=np.float64))
    aleatoric_var = variance.mean(axis=1)
    epistemic_var = mu.var(axis=1)
    return MixtureSummary(
        mean=mu.mean(axis=1),
        std=np.sqrt(aleatoric_var + epistemic_var),
        aleatoric_std=np.sqrt(aleatoric_var),
        epistemic_std=np.sqrt(epistemic_var),
        quantiles=(
            np.zeros((len(mu), 0))
            if mixture_levels is None
            else mixture_quantiles(mu, np.sqrt(variance), mixture_levels)
        ),
    )


def draw_predictive_samples(
    sample_means: NDArray[np.floating],
    sample_log_variances: NDArray[np.floating],
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """One draw from each mixture component: samples of theta_E (arcsec), shape (n, T)."""
    mu = np.asarray(sample_means, dtype=np.float64)
    sigma = np.exp(0.5 * np.asarray(sample_log_variances, dtype=np.float64))
    return mu + sigma * rng.standard_normal(mu.shape)


#: Levels (fractions) at which a regime table gives the standardised residual's quantiles:
#: the reported ``QUANTILE_LEVELS`` and the points between them that shape the draws.
REGIME_TABLE_LEVELS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.16,
    0.25,
    0.5,
    0.75,
    0.84,
    0.9,
    0.95,
    0.975,
)
#: Standard normal grid (and its spacing) on which a table's moments are integrated.
_MOMENT_GRID = np.linspace(-9.0, 9.0, 3601)


@dataclass(frozen=True)
class RegimeTable:
    """Per-regime calibration of the predictive distribution (pure numpy; Romano et al. 2019).

    A cutout's regime is its bin of predicted theta_E (the regressor's point
    estimate, which does not depend on the number of dropout passes) crossed
    with its band of :func:`~service.contract.preprocessing.signal_to_noise`.
    In each regime the standardised residual r = (theta_E - m) / s, with m the
    mixture's mean and s its standard deviation (:func:`regime_spread`), has the quantiles
    ``residual_quantiles[i, j]`` at ``levels``, fitted on held-out lenses
    (conformal, split by regime). The calibrated distribution of a cutout is
    m + s G(Z), Z standard normal, with G piecewise linear in Z through the
    points (Phi^-1(level), residual quantile), continued linearly past the
    ends with the slope between the 2.5-16% (84-97.5%) points: its quantiles at
    the table's levels are the fitted ones, and its mean, standard deviation
    and draws follow from the same G, whatever the number of passes.
    """

    theta_E_edges_arcsec: NDArray[np.float64]
    """Interior edges between theta_E bins, rising (arcsec); B bins, B - 1 edges."""
    signal_to_noise_edges: NDArray[np.float64]
    """Interior edges between signal-to-noise bands, rising; S bands, S - 1 edges."""
    levels: tuple[float, ...]
    """Levels (fractions) of the residual quantiles, rising; they include ``QUANTILE_LEVELS``."""
    residual_quantiles: NDArray[np.float64]
    """Shape (B, S, len(levels)): quantiles of r in each regime, rising along the last axis."""

    def __post_init__(self) -> None:
        table = np.asarray(self.residual_quantiles, dtype=np.float64)
        shape = (len(self.theta_E_edges_arcsec) + 1, len(self.signal_to_noise_edges) + 1)
        if table.shape != (*shape, len(self.levels)):
            raise ValueError(
                f"residual_quantiles has shape {table.shape}; the edges and levels need "
                f"{(*shape, len(self.levels))}"
            )
        if not set(QUANTILE_LEVELS) <= set(self.levels) or list(self.levels) != sorted(
            set(self.levels)
        ):
            raise ValueError(f"levels must rise and include {list(QUANTILE_LEVELS)}")
        if not np.all(np.diff(table, axis=-1) > 0):
            raise ValueError("residual quantiles must rise strictly with the level in every regime")
        for name in ("theta_E_edges_arcsec", "signal_to_noise_edges"):
            edges = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.diff(edges) > 0):
                raise ValueError(f"{name} must rise strictly")
            object.__setattr__(self, name, edges)
        object.__setattr__(self, "residual_quantiles", table)

    def regimes(
        self, theta_E_arcsec: NDArray[np.floating], signal_to_noise: NDArray[np.floating]
    ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Bin index of each cutout's predicted theta_E (arcsec) and signal-to-noise band."""
        return (
            np.searchsorted(self.theta_E_edges_arcsec, theta_E_arcsec, side="right"),
            np.searchsorted(self.signal_to_noise_edges, signal_to_noise, side="right"),
        )

    def standard_quantiles(
        self, z: NDArray[np.floating], theta_bin: NDArray[np.intp], snr_band: NDArray[np.intp]
    ) -> NDArray[np.float64]:
        """G(z) of each cutout's regime; ``z`` has shape (n, k), the answer too."""
        knots_z = np.asarray(_standard_normal_quantiles(self.levels))
        knots = self.residual_quantiles[theta_bin, snr_band]  # (n, L)
        z = np.asarray(z, dtype=np.float64)
        segment = np.clip(np.searchsorted(knots_z, z), 1, len(knots_z) - 1)
        left, right = knots_z[segment - 1], knots_z[segment]
        low = np.take_along_axis(knots, segment - 1, axis=1)
        high = np.take_along_axis(knots, segment, axis=1)
        inside = low + (z - left) * (high - low) / (right - left)
        lower_slope = self._tail_slope(knots, knots_z, (0.025, 0.16))
        upper_slope = self._tail_slope(knots, knots_z, (0.84, 0.975))
        below = knots[:, :1] + (z - knots_z[0]) * lower_slope
        above = knots[:, -1:] + (z - knots_z[-1]) * upper_slope
        return np.where(z < knots_z[0], below, np.where(z > knots_z[-1], above, inside))

    def _tail_slope(
        self, knots: NDArray[np.float64], knots_z: NDArray[np.float64], pair: tuple[float, float]
    ) -> NDArray[np.float64]:
        """Slope dG/dz between two levels, shape (n, 1): the stable part of each tail."""
        a, b = (self.levels.index(level) for level in pair)
        return ((knots[:, b] - knots[:, a]) / (knots_z[b] - knots_z[a]))[:, None]

    @functools.cached_property
    def moments(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Mean and standard deviation of G(Z), Z standard normal, per regime: (B, S) each."""
        n_theta, n_snr = self.residual_quantiles.shape[:2]
        theta_bin, snr_band = (a.ravel() for a in np.indices((n_theta, n_snr)))
        grid = np.broadcast_to(_MOMENT_GRID, (len(theta_bin), len(_MOMENT_GRID)))
        values = self.standard_quantiles(grid, theta_bin, snr_band)
        weights = np.exp(-0.5 * _MOMENT_GRID**2)
        weights /= weights.sum()
        mean = values @ weights
        std = np.sqrt(np.maximum(((values - mean[:, None]) ** 2) @ weights, 0.0))
        return mean.reshape(n_theta, n_snr), std.reshape(n_theta, n_snr)


def regime_spread(summary: MixtureSummary, num_samples: int) -> NDArray[np.float64]:
    """The spread s that a regime table scales (arcsec), shape (n,).

    The mixture's variance with the epistemic part made unbiased and widened by
    the error of the mean of T passes: aleatoric^2 + epistemic^2 (T + 1) / (T - 1)
    (the passes' variance is taken with 1/T; the truth's spread about the
    T-pass mean adds 1/T of the epistemic variance). At T = 1000 it is the
    mixture's std to 0.1%; at T = 10 it keeps the table's coverage from
    slipping with the noisier mean. One pass has no epistemic estimate: s is
    then the aleatoric std.
    """
    if num_samples < 2:
        return summary.aleatoric_std
    inflation = (num_samples + 1) / (num_samples - 1)
    return np.sqrt(summary.aleatoric_std**2 + inflation * summary.epistemic_std**2)


def calibrate_by_regime(
    summary: MixtureSummary,
    table: RegimeTable,
    *,
    theta_E_arcsec: NDArray[np.floating],
    signal_to_noise: NDArray[np.floating],
    num_samples: int,
) -> MixtureSummary:
    """The summary of the per-regime calibrated distribution m + s G(Z) (see :class:`RegimeTable`).

    The quantiles are the table's, placed at m + s G; the mean and standard
    deviation are G(Z)'s, moved and scaled alike; the aleatoric and epistemic
    parts keep the mixture's proportions, so std^2 = aleatoric^2 + epistemic^2.

    Parameters
    ----------
    summary : MixtureSummary
        The raw mixture's summary (:func:`summarise_mc_samples`).
    table : RegimeTable
        The MC model's per-regime residual quantiles.
    theta_E_arcsec : ndarray, shape (n,)
        Predicted theta_E that places each cutout in its bin (arcsec).
    signal_to_noise : ndarray, shape (n,)
        Each cutout's signal-to-noise (dimensionless).
    num_samples : int
        MC-dropout passes the summary was made from, T (:func:`regime_spread`).
    """
    theta_bin, snr_band = table.regimes(theta_E_arcsec, signal_to_noise)
    z = np.broadcast_to(
        np.asarray(_standard_normal_quantiles(QUANTILE_LEVELS)),
        (len(summary.mean), len(QUANTILE_LEVELS)),
    )
    g_mean, g_std = (moment[theta_bin, snr_band] for moment in table.moments)
    m, s = summary.mean, regime_spread(summary, num_samples)
    # The two parts keep the mixture's proportions of the variance.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(summary.std > 0, s * g_std / summary.std, g_std)
    return MixtureSummary(
        mean=m + s * g_mean,
        std=s * g_std,
        aleatoric_std=summary.aleatoric_std * ratio,
        epistemic_std=summary.epistemic_std * ratio,
        quantiles=m[:, None] + s[:, None] * table.standard_quantiles(z, theta_bin, snr_band),
    )


def draw_regime_samples(
    summary: MixtureSummary,
    table: RegimeTable,
    *,
    theta_E_arcsec: NDArray[np.floating],
    signal_to_noise: NDArray[np.floating],
    num_samples: int,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Draws m + s G(Z) of theta_E (arcsec), shape (n, num_samples), from the raw ``summary``
    of ``num_samples`` passes (as :func:`calibrate_by_regime`)."""
    theta_bin, snr_band = table.regimes(theta_E_arcsec, signal_to_noise)
    z = rng.standard_normal((len(summary.mean), num_samples))
    spread = regime_spread(summary, num_samples)
    return summary.mean[:, None] + spread[:, None] * table.standard_quantiles(
        z, theta_bin, snr_band
    )
